"""Where each sample of a webdataset tar ends, found from its 512-byte headers with windowed ranged reads (member data
is skipped, never downloaded), so that a unit of a split tar reads only its own byte range."""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa

from recaption.retry import is_transient

INDEX_FORMAT = 1
# One ranged read fetches this much: headers and small members that follow each other come in one request, while
# a member larger than this is skipped (a seek past the window fetches from the next header on).
WINDOW_BYTES = 1 << 20
# A unit's byte range is read in one request up to this size, in pieces of it beyond (memory stays bounded).
RANGE_PIECE_BYTES = 64 << 20
END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)
_WALK_ERRORS = (tarfile.TarError, EOFError, pa.ArrowException, OSError, UnicodeError, ValueError)


def split_key(name: str) -> tuple[str, str]:
    """Webdataset grouping: `dir/000042.jpg` → (`dir/000042`, `jpg`); the key ends at the basename's first dot."""
    name = name.removeprefix("./")
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem) if head else stem, ext.lower()


def skipped(member: tarfile.TarInfo) -> bool:
    """Directories and hidden files (macOS `._x.jpg`) are not samples: every reader passes over them."""
    return member.isdir() or posixpath.basename(member.name).startswith(".")


def new_sample(key: str | None, exts: set[str], member_key: str, ext: str) -> bool:
    """Whether a member starts a new sample: another key, or an extension the current sample already has."""
    return key is None or member_key != key or ext in exts


class WindowedFile(io.RawIOBase):
    """A read-only, seekable file over `read_at` of a random-access file: reads come from a window fetched with one
    ranged read; a seek past the window skips what lies between without reading it. Counts bytes and requests."""

    def __init__(self, raf: pa.NativeFile, size: int, window: int = WINDOW_BYTES):
        self.raf, self.size, self.window = raf, size, window
        self.pos, self.buf, self.buf_start = 0, b"", 0
        self.bytes_read = self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if not (self.buf_start <= self.pos and end <= self.buf_start + len(self.buf)):
            length = min(max(end - self.pos, self.window), self.size - self.pos)
            self.buf, self.buf_start = self.raf.read_at(length, self.pos), self.pos
            self.bytes_read += len(self.buf)
            self.requests += 1
        data = self.buf[self.pos - self.buf_start : end - self.buf_start]
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class RangeStream(io.RawIOBase):
    """The bytes `prefix + file[begin:end] + suffix` as a sequential stream; the range is fetched with one ranged read
    (pieces of RANGE_PIECE_BYTES for a larger one)."""

    def __init__(self, raf: pa.NativeFile, begin: int, end: int, prefix: bytes = b"", suffix: bytes = b""):
        self.raf, self.next_at, self.end = raf, begin, end
        self.pending, self.suffix = prefix, suffix
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        want = 1 << 62 if n is None or n < 0 else n
        out = []
        while want > 0:
            if not self.pending:
                if self.next_at < self.end:
                    length = min(RANGE_PIECE_BYTES, self.end - self.next_at)
                    self.pending = self.raf.read_at(length, self.next_at)
                    if not self.pending:  # the file is shorter than it was when indexed
                        self.next_at = self.end
                        continue
                    self.next_at += len(self.pending)
                    self.bytes_read += len(self.pending)
                elif self.suffix:
                    self.pending, self.suffix = self.suffix, b""
                else:
                    break
            piece, self.pending = self.pending[:want], self.pending[want:]
            out.append(piece)
            want -= len(piece)
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass
class Slice:
    """What one unit of a split tar reads: file bytes [begin, end), after `prefix` (the archive's global headers in
    force there) and, unless the unit holds the tar's end, followed by an end-of-archive marker."""

    begin: int
    end: int
    prefix: bytes = b""
    tail: bool = False  # the unit that holds the last sample also reads what follows it (a cut or the real end)


@dataclass
class TarIndex:
    """Sample keys and where each sample ends (the byte after its last member's data), as the streaming reader groups
    members; `size` is the tar's size when indexed (a tar of another size is indexed again)."""

    size: int
    keys: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    # (header offset of the first member after a change, global PAX headers in force from there): rare, but a unit
    # that starts after a global header must carry it
    globals: list[tuple[int, dict]] = field(default_factory=list)
    stopped: str | None = None  # why the walk stopped before an end-of-archive marker, if it did
    bytes_read: int = 0
    requests: int = 0

    @property
    def samples(self) -> int:
        return len(self.keys)

    def offset(self, sample: int) -> int:
        """Where sample `sample` begins: the end of the one before it (anything between belongs to this one)."""
        return 0 if sample == 0 else self.ends[sample - 1]

    def slice(self, start: int, stop: int | None) -> Slice | None:
        """The bytes of samples [start, stop) (stop None: to the end of the tar); None when the tar has no sample
        there. The unit holding the last sample (or unit 0 of a tar without one) reads to the end of the file, so a
        cut or corrupt end is reported exactly once, as the streaming reader reports it."""
        last = max(self.samples - 1, 0)
        if start > last:
            return None
        prefix = b""
        state = next((g for off, g in reversed(self.globals) if off < self.offset(start)), None)
        if state and start > 0:
            prefix = tarfile.TarInfo.create_pax_global_header(state)
        if stop is None or stop > last:
            return Slice(self.offset(start), self.size, prefix, tail=True)
        return Slice(self.offset(start), self.offset(stop), prefix)

    def to_json(self) -> bytes:
        record = {
            "format": INDEX_FORMAT,
            "size": self.size,
            "keys": self.keys,
            "ends": self.ends,
            "globals": [[off, g] for off, g in self.globals],
            "stopped": self.stopped,
        }
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TarIndex | None:
        """The index in `data`, None when it is not one this version writes (it is then built again)."""
        try:
            d = json.loads(data)
            if d.get("format") != INDEX_FORMAT or len(d["keys"]) != len(d["ends"]):
                return None
            globals_ = [(int(off), dict(g)) for off, g in d.get("globals") or []]
            return cls(int(d["size"]), list(d["keys"]), [int(e) for e in d["ends"]], globals_, d.get("stopped"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def build_index(raf: pa.NativeFile, size: int, window: int | None = None) -> TarIndex:
    """Walks the tar's headers (tarfile's random-access mode seeks over member data) and groups members into samples
    exactly as the streaming reader does. A transient storage error is raised (the caller retries); a corrupt or cut
    tar stops the walk where tarfile stops, which is where the streaming reader stops too."""
    f = WindowedFile(raf, size, window or WINDOW_BYTES)
    index = TarIndex(size)
    key: str | None = None
    exts: set[str] = set()
    state: dict = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for member in tf:
                if tf.pax_headers != state:
                    state = dict(tf.pax_headers)
                    index.globals.append((member.offset, state))
                if skipped(member):
                    continue
                member_key, ext = split_key(member.name)
                if new_sample(key, exts, member_key, ext):
                    index.keys.append(member_key)
                    index.ends.append(0)
                    key, exts = member_key, set()
                exts.add(ext)
                index.ends[-1] = tf.offset
    except _WALK_ERRORS as e:
        if is_transient(e):
            raise
        index.stopped = f"{type(e).__name__}: {e}"
    index.bytes_read, index.requests = f.bytes_read, f.requests
    return index

"""Webdataset tar shards as img2dataset writes them: a streamed reader that never extracts (a whole tar, or the byte
range of one unit of a split tar), and a writer."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import tarfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import InputConfig
from recaption.redact import redact_text
from recaption.retry import is_transient
from recaption.sources.fs import (
    Unreachable,
    atomic_output,
    display,
    join,
    open_input,
    open_input_file,
    read_optional,
    write_small,
)
from recaption.sources.tarindex import (
    END_OF_ARCHIVE,
    RangeStream,
    TarIndex,
    build_index,
    new_sample,
    skipped,
    split_key,
)
from recaption.sources.units import SourceRecord, WorkUnit

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_MEMBER_BYTES = 256 << 20  # one image member larger than this is refused, not read into memory
_BLOCK = tarfile.BLOCKSIZE
_DRIVE = re.compile(r"^[A-Za-z]:")
# What a cut or corrupt shard raises while streaming (pyarrow's decompressors raise OSError on a cut .gz).
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, pa.ArrowException, OSError)

__all__ = ["split_key", "unsafe_name", "iter_records", "read_samples", "unit_index", "write_webdataset"]


def unsafe_name(name: str) -> bool:
    """Absolute, drive-letter, backslash or `..` member names: never trusted, never used as a path."""
    return name.startswith("/") or "\\" in name or "\x00" in name or bool(_DRIVE.match(name)) or ".." in name.split("/")


@dataclass
class _Sample:
    """The members of one webdataset key read so far."""

    key: str
    exts: set[str] = field(default_factory=set)
    image: bytes | None = None
    text: str | None = None
    meta: dict | None = None
    problem: str | None = None  # first reason the sample cannot be used

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> None:
        self.exts.add(ext)
        if self.problem:
            return
        if unsafe_name(member.name):
            self.problem = f"unsafe member name {member.name!r} (absolute or '..' path): not read"
        elif not member.isreg():
            self.problem = f"member {member.name!r} is a link or special file, not a regular file"
        elif ext in IMAGE_EXTENSIONS and self.image is None:
            if member.size > MAX_MEMBER_BYTES:
                self.problem = f"member {member.name!r} has {member.size} bytes > {MAX_MEMBER_BYTES}"
            else:
                self.image = tf.extractfile(member).read()
        elif ext == "txt":
            self.text = tf.extractfile(member).read().decode("utf-8", errors="replace")
        elif ext == "json":
            try:
                meta = json.loads(tf.extractfile(member).read())
                self.meta = meta if isinstance(meta, dict) else None
            except ValueError:
                self.meta = None  # bad metadata costs the url and caption, not the image

    def record(self) -> SourceRecord:
        meta = self.meta or {}
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
        alt_text = self.text if self.text is not None else caption
        if self.problem:
            return SourceRecord(key=self.key, image=None, url=url, alt_text=alt_text, error=self.problem, meta=meta)
        if self.image is None:
            found = ", ".join("." + e if e else "(no extension)" for e in sorted(self.exts))
            error = f"no image member for key {self.key!r} (found {found})"
            return SourceRecord(key=self.key, image=None, url=url, alt_text=alt_text, error=error, meta=meta)
        return SourceRecord(key=self.key, image=self.image, url=url, alt_text=alt_text, meta=meta)


def is_split(unit: WorkUnit) -> bool:
    """A unit that is a slice of its tar (`<id>-s0003`), not the whole of it."""
    return unit.format == "webdataset" and not (unit.start == 0 and unit.stop is None)


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """One record per sample of the shard (or of the unit's slice of it), streamed; duplicate keys come out as they
    are (read_unit renames them)."""
    if not is_split(unit):
        with open_input(unit.uri) as stream:
            yield from read_samples(stream, unit.source)
        return
    with open_input_file(unit.uri) as f:
        index = unit_index(unit, f)
        part = index.slice(unit.start, unit.stop)
        _check_planned_count(unit, index, input_cfg.unit_size)
        if part is None:
            return  # the tar has fewer samples than planned: this unit has none
        stream = RangeStream(f, part.begin, part.end, part.prefix, b"" if part.tail else END_OF_ARCHIVE)
        yield from read_samples(stream, unit.source, first=unit.start)


def read_samples(stream: IO[bytes] | pa.NativeFile, source: str, first: int = 0) -> Iterator[SourceRecord]:
    """Records of a tar stream; a truncated or corrupt tar ends with one error record for the lost rest. `first`:
    how many samples of the tar come before the stream (a slice of a split tar), for the error's count."""
    sample: _Sample | None = None
    n = first
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if skipped(member):
                    continue
                key, ext = split_key(member.name)
                if new_sample(sample.key if sample else None, sample.exts if sample else set(), key, ext):
                    if sample is not None:
                        yield sample.record()
                        n += 1
                    sample = _Sample(key)
                sample.add(tf, member, ext)
            # A complete tar ends with a zero block, whose read is where the loop stopped; a shorter read means the
            # data ended at a member boundary, which tarfile takes silently for the end.
            ended = tf.fileobj.tell() - tf.offset >= _BLOCK
    except _STREAM_ERRORS as e:
        if is_transient(e):
            raise  # the connection, not the shard: read_unit reads the unit again
        yield _truncated(source, sample.key if sample else None, n, e)
        return
    if sample is not None:
        yield sample.record()
        n += 1
    if not ended:
        yield _truncated(source, None, n, "no end-of-archive marker")


_INDEXES: dict[tuple[str, int], TarIndex] = {}  # the last few indexes this process used: siblings share them
_INDEXES_LOCK = threading.Lock()


def unit_index(unit: WorkUnit, f: pa.NativeFile | None = None) -> TarIndex:
    """The index of the unit's tar: this process's copy, else the one cached in the output (`unit.index`), else
    built from the tar's headers and cached there. A cached index of a tar of another size is built again."""
    if f is None:
        with open_input_file(unit.uri) as opened:
            return unit_index(unit, opened)
    size = f.size()
    with _INDEXES_LOCK:
        index = _INDEXES.get((unit.uri, size))
    if index is None:
        index = _cached_index(unit, size)
    if index is None:
        index = build_index(f, size)
        log.info(
            "indexed %s: %d samples, %d bytes read in %d requests (of %d)",
            unit.source or display(unit.uri),
            index.samples,
            index.bytes_read,
            index.requests,
            size,
        )
        _save_index(unit, index)
    with _INDEXES_LOCK:
        while len(_INDEXES) >= 8:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[(unit.uri, size)] = index
    return index


def _cached_index(unit: WorkUnit, size: int) -> TarIndex | None:
    if not unit.index:
        return None
    data = read_optional(unit.index)
    index = TarIndex.from_json(data) if data is not None else None
    return index if index is not None and index.size == size else None


def _save_index(unit: WorkUnit, index: TarIndex) -> None:
    """Best effort: a cache that cannot be written costs the next reader an index, never a row."""
    if not unit.index:
        return
    try:
        write_small(unit.index, index.to_json())
    except Unreachable:
        raise
    except (OSError, pa.ArrowException) as e:
        log.warning("cannot cache the index of %s: %s", unit.source, redact_text(str(e)))


def _check_planned_count(unit: WorkUnit, index: TarIndex, unit_size: int) -> None:
    """The plan took the sample count from img2dataset's `_stats.json`; when the tar says otherwise, nothing is lost
    or read twice (the last unit reads to the end, units past the last sample are empty), but say so."""
    if unit.stop is None and index.samples - unit.start > unit_size:
        log.warning(
            "%s has %d samples, more than its _stats.json says: its last unit %s takes the %d from sample %d on",
            unit.source,
            index.samples,
            unit.unit,
            index.samples - unit.start,
            unit.start,
        )
    elif unit.stop is not None and index.samples < unit.stop:
        log.warning(
            "%s has %d samples, fewer than its _stats.json says: unit %s (samples %d to %d) gets %d",
            unit.source,
            index.samples,
            unit.unit,
            unit.start,
            unit.stop,
            max(0, index.samples - unit.start),
        )


def _truncated(source: str, key: str | None, n: int, e: object) -> SourceRecord:
    where = f"in sample {key!r}" if key else "after the last complete sample"
    error = f"truncated tar {source}: {e} ({where}; {n} samples read, the rest of the shard is lost)"
    return SourceRecord(key=key or f"{_stem(source)}#truncated", image=None, error=error)


def _stem(source: str) -> str:
    name = source.removesuffix(".gz").removesuffix(".tgz")
    return posixpath.splitext(name)[0] or "shard"


def write_webdataset(
    out_dir: str, samples: Iterable[Mapping], shard_size: int = 1000, prefix: str = "", sidecars: bool = True
) -> list[str]:
    """Write img2dataset-style shards `<prefix>00000.tar` … (`<key>.jpg|png|webp`, `<key>.json`, `<key>.txt`).

    A sample is a mapping with `key`, one image field (`jpg`, `png`, `webp`, `jpeg` → bytes), and optional `caption`,
    `url` and `json` (extra metadata). With `sidecars`, each tar gets img2dataset's `<name>.parquet` metadata
    (no image bytes) and `<name>_stats.json`. Returns the URIs of the tars.
    """
    written: list[str] = []
    batch: list[Mapping] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size:
            written.append(_write_shard(out_dir, f"{prefix}{len(written):05d}", batch, sidecars))
            batch = []
    if batch:
        written.append(_write_shard(out_dir, f"{prefix}{len(written):05d}", batch, sidecars))
    return written


def _write_shard(out_dir: str, name: str, samples: list[Mapping], sidecars: bool) -> str:
    uri = join(out_dir, name + ".tar")
    rows = []
    # PAX: member names of any length and any characters (USTAR refuses names over 100 bytes); written under a
    # temporary name and renamed, so a failure part-way never leaves a partial tar.
    with atomic_output(uri) as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for s in samples:
            key = s["key"]
            ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in s)
            meta = {"caption": s.get("caption"), "url": s.get("url"), "key": key, "status": "success"}
            meta.update(s.get("json") or {})
            rows.append(meta)
            _add(tf, f"{key}.{ext}", s[ext])
            _add(tf, f"{key}.json", json.dumps(meta, indent=4).encode())
            if s.get("caption") is not None:
                _add(tf, f"{key}.txt", s["caption"].encode())
    if sidecars:
        table = pa.table(
            {c: [str(r[c]) if r[c] is not None else None for r in rows] for c in ("key", "url", "caption")}
        )
        table = table.append_column("status", pa.array(["success"] * len(rows)))
        with atomic_output(join(out_dir, name + ".parquet")) as out:
            pq.write_table(table, out)
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
        with atomic_output(join(out_dir, name + "_stats.json")) as out:
            out.write(json.dumps(stats, indent=4).encode())
    return uri


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical shards from identical samples
    tf.addfile(info, io.BytesIO(data))

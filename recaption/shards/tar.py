"""Webdataset tar shards as img2dataset writes them: a streamed reader that never extracts, and a writer."""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import InputConfig
from recaption.retry import is_transient
from recaption.shards import SourceRecord, WorkUnit
from recaption.shards.fs import atomic_output, join, open_input

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_MEMBER_BYTES = 256 << 20  # one image member larger than this is refused, not read into memory
_BLOCK = tarfile.BLOCKSIZE
_DRIVE = re.compile(r"^[A-Za-z]:")
# What a cut or corrupt shard raises while streaming (pyarrow's decompressors raise OSError on a cut .gz).
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, pa.ArrowException, OSError)


def split_key(name: str) -> tuple[str, str]:
    """Webdataset grouping: `dir/000042.jpg` → (`dir/000042`, `jpg`); the key ends at the basename's first dot."""
    name = name.removeprefix("./")
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem) if head else stem, ext.lower()


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


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """One record per sample of the shard, streamed; duplicate keys come out as they are (read_unit renames them)."""
    with open_input(unit.uri) as stream:
        yield from read_samples(stream, unit.source)


def read_samples(stream: IO[bytes] | pa.NativeFile, source: str) -> Iterator[SourceRecord]:
    """Records of a tar stream; a truncated or corrupt tar ends with one error record for the lost rest."""
    sample: _Sample | None = None
    n = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if member.isdir() or posixpath.basename(member.name).startswith("."):
                    continue  # directories and hidden files (macOS `._x.jpg`) are not samples
                key, ext = split_key(member.name)
                if sample is None or key != sample.key or ext in sample.exts:
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

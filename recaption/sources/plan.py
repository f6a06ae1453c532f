"""Work-unit planning: detect the input format, list its shards and cut them into units (metadata only, no data)."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources.folder import folder_keys, is_image_file
from recaption.sources.fs import FileEntry, display, info, join, list_files, open_input, parent, retrying
from recaption.sources.hf import MARKERS, arrow_files, arrow_rows
from recaption.sources.parquet import looks_like_img2dataset, parquet_rows, resolve_columns
from recaption.sources.tarplan import tar_units
from recaption.sources.units import WorkUnit

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LOOKED_FOR = (
    "webdataset .tar shards, .parquet files, a datasets.save_to_disk directory (state.json + data-*.arrow), "
    "image files (.jpg, .png, .webp, …)"
)
EMPTY_TAR_BYTES = 10240  # what Python's and GNU tar write for an archive without members
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class _Input:
    """The input as listed: its root (a directory) and the files below it that may be data."""

    root: str
    files: list[FileEntry]


def detect_format(input_cfg: InputConfig) -> str:
    """The configured format, or for `auto` the one the files show; InputError when nothing usable is there."""
    return _detect(input_cfg, _scan(input_cfg))


def plan_units(
    input_cfg: InputConfig,
    output: str | None = None,
    read_only: bool = False,
    known_counts: dict[str, int] | None = None,
) -> list[WorkUnit]:
    """All work units of the input, the first `input.max_units` by id. With `output` (the run's output path), what
    splitting tars costs to learn (sample counts, member indexes) is cached there and read back on the next plan;
    `read_only` (a reader that does not hold the output: `recaption plan`, inspect) reads that cache, never writes.
    `known_counts`: tar sample counts (by path relative to the input) the caller has counted already.

    Units come sorted by id, except a split tar's: its units come slice-major (the first unit of every tar, then
    the second…), so the first one indexes the tar and its siblings, read later, find the index cached."""
    scanned = _scan(input_cfg)
    fmt = _detect(input_cfg, scanned)
    if fmt == "webdataset":
        units = _tar_units(scanned, input_cfg.unit_size, output, read_only, known_counts)
    elif fmt == "folder":
        units = _folder_units(scanned, input_cfg.unit_size)
    elif fmt == "hf":
        units = _row_units(scanned, arrow_files(scanned.root, scanned.files), fmt, arrow_rows, input_cfg)
    else:
        shards = [f.path for f in scanned.files if f.path.endswith(".parquet")]
        units = _row_units(scanned, shards, fmt, parquet_rows, input_cfg)
    units.sort(key=lambda u: u.unit)
    units = units[: input_cfg.max_units] if input_cfg.max_units else units
    if fmt == "webdataset":
        units.sort(key=lambda u: (u.start // input_cfg.unit_size, u.unit))
    return units


def _scan(cfg: InputConfig) -> _Input:
    if info(cfg.path).type == pafs.FileType.File:
        entries = list_files(cfg.path)
        return _Input(parent(cfg.path), entries)
    # `_stats.json`, `_done/`, `.cache/`, `._x.jpg`: bookkeeping and hidden files are never data.
    files = [f for f in list_files(cfg.path) if not any(p[:1] in "._" for p in f.path.split("/"))]
    return _Input(cfg.path, files)


def _detect(cfg: InputConfig, scanned: _Input) -> str:
    if cfg.format != "auto":
        return cfg.format
    paths = [f.path for f in scanned.files]
    names = {posixpath.basename(p) for p in paths}
    if names & set(MARKERS) and any(p.endswith(".arrow") for p in paths):
        return "hf"
    # img2dataset's webdataset output has a metadata `.parquet` beside each tar: the tars are the data.
    if any(p.endswith(TAR_SUFFIXES) for p in paths):
        return "webdataset"
    parquets = [p for p in paths if p.endswith(".parquet")]
    if parquets:
        _, schema = parquet_rows(join(scanned.root, parquets[0]))
        return "img2dataset-parquet" if looks_like_img2dataset(schema) else "parquet"
    if any(is_image_file(p) for p in paths):
        return "folder"
    sample = ", ".join(paths[:5]) + (", …" if len(paths) > 5 else "")
    raise InputError(
        f"no usable input at {display(cfg.path)}: looked for {LOOKED_FOR}; found {len(paths)} files {sample}"
    )


def unit_id(rel: str) -> str:
    """A file-name-safe id from a shard's relative path: `a/b/00042.tar` → `a__b__00042`."""
    for suffix in (*TAR_SUFFIXES, ".parquet", ".arrow"):
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
            break
    return _UNSAFE.sub("_", rel.replace("/", "__")) or "shard"


def _unique_ids(rels: list[str]) -> dict[str, str]:
    # Sanitising can map two paths to one id (`a b` and `a_b`); those get a hash of their real path.
    ids = {r: unit_id(r) for r in rels}
    counts: dict[str, int] = {}
    for i in ids.values():
        counts[i] = counts.get(i, 0) + 1
    return {r: i if counts[i] == 1 else f"{i}-h{hashlib.sha1(r.encode()).hexdigest()[:8]}" for r, i in ids.items()}


def _tar_units(
    scanned: _Input, unit_size: int, output: str | None, read_only: bool = False, known: dict[str, int] | None = None
) -> list[WorkUnit]:
    tars = [f for f in scanned.files if f.path.endswith(TAR_SUFFIXES)]
    if not tars:
        raise InputError(f"no .tar shards at {display(scanned.root)}")
    if all(f.size is not None and f.size <= EMPTY_TAR_BYTES for f in tars) and not any(
        _has_member(join(scanned.root, f.path)) for f in tars
    ):
        raise InputError(f"input {display(scanned.root)} is empty: its {len(tars)} tar shards hold no members")
    ids = _unique_ids([f.path for f in tars])
    units = tar_units(scanned.root, tars, {f.path for f in scanned.files}, ids, unit_size, output, read_only, known)
    counts: dict[str, int] = {}
    for u in units:
        counts[u.unit] = counts.get(u.unit, 0) + 1
    clashes = sorted(i for i, n in counts.items() if n > 1)
    if clashes:  # `x.tar` cut into `x-s0000`… beside a tar named `x-s0000.tar`
        raise InputError(
            f"tar shards at {display(scanned.root)} give the same unit id twice ({', '.join(clashes[:3])}): rename "
            "the tar whose name ends in -sNNNN, or set input.unit_size to at least its sample count"
        )
    return units


def _has_member(uri: str) -> bool:
    def first_block() -> bytes:
        with open_input(uri) as f:
            return f.read(512)

    return any(retrying(first_block, uri, "read"))  # a member starts with a non-zero header block


def _folder_units(scanned: _Input, unit_size: int) -> list[WorkUnit]:
    images = [f.path for f in scanned.files if is_image_file(f.path)]
    if not images:
        raise InputError(f"no image files at {display(scanned.root)}")
    keys = folder_keys(images)  # over the whole input: two files with one stem may fall in different units
    width = max(4, len(str((len(images) - 1) // unit_size)))
    return [
        WorkUnit(
            unit=f"images-s{i // unit_size:0{width}d}",
            source="",
            uri=scanned.root,
            format="folder",
            start=i,
            stop=i + len(images[i : i + unit_size]),
            members=tuple(images[i : i + unit_size]),
            keys=tuple(keys[i : i + unit_size]),
        )
        for i in range(0, len(images), unit_size)
    ]


def _row_units(
    scanned: _Input,
    shards: list[str],
    fmt: str,
    count: Callable[[str], tuple[int, pa.Schema]],
    cfg: InputConfig,
) -> list[WorkUnit]:
    if not shards:
        raise InputError(f"no {fmt} files at {display(scanned.root)}: looked for {LOOKED_FOR}")
    uris = [join(scanned.root, s) for s in shards]
    # Footers of many remote files: the latency of one request each, overlapped.
    with ThreadPoolExecutor(max_workers=min(16, len(uris))) as pool:
        counted = list(pool.map(count, uris))
    # Fail at planning, not in every worker, when the configured or usual columns are not there.
    resolve_columns(counted[0][1], cfg, fmt, display(uris[0]))
    total = sum(n for n, _ in counted)
    if total == 0:
        raise InputError(f"input {display(cfg.path)} is empty: {len(shards)} {fmt} files with 0 rows")
    ids = _unique_ids(shards)
    units = []
    for rel, uri, (rows, _) in zip(shards, uris, counted, strict=True):
        slices = (rows + cfg.unit_size - 1) // cfg.unit_size
        width = max(4, len(str(slices - 1)))
        for s in range(slices):
            start, stop = s * cfg.unit_size, min((s + 1) * cfg.unit_size, rows)
            units.append(WorkUnit(f"{ids[rel]}-s{s:0{width}d}", rel, uri, fmt, start, stop))
    return units

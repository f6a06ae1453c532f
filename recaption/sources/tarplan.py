"""Cutting webdataset tars into units of `unit_size` samples: the count from img2dataset's `_stats.json`, else from
the tar's index, remembered in the output so that a resume asks nothing per tar; a tar of at most `unit_size` samples
(a small one needs no count at all) stays one unit with its own id."""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from recaption.redact import redact_text
from recaption.sources.fs import FileEntry, Unreachable, display, join, read_optional, write_small
from recaption.sources.units import WorkUnit

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_SUFFIX = ".recaption.json"
COUNTS_FILE = "_manifest/tars.recaption.json.gz"
COUNTS_FORMAT = 1
COMPRESSED_TARS = (".tar.gz", ".tgz")  # no random access: always one unit
WORKERS = 32  # sidecar reads and index walks at once: the latency of many small requests, overlapped


def index_uri(output: str, unit_base: str) -> str:
    """Where the member index of the tar whose unit id is `unit_base` is cached in the output."""
    return join(output, f"{INDEX_DIR}/{unit_base}{INDEX_SUFFIX}")


def most_samples(entry: FileEntry) -> int | None:
    """An upper bound of a tar's samples from its size alone (every member takes at least one 512-byte header)."""
    return None if entry.size is None else entry.size // 512


def tar_units(
    root: str,
    tars: list[FileEntry],
    listed: set[str],
    ids: dict[str, str],
    unit_size: int,
    output: str | None,
    read_only: bool = False,
    known: dict[str, int] | None = None,
) -> list[WorkUnit]:
    """The units of every tar, in tar order. A count is needed only for a tar that may hold more than `unit_size`
    samples; with `output`, counts and indexes are cached there (`read_only`: the cached counts are read, nothing is
    written; `known`: counts the caller has, by tar path)."""
    need = [
        t
        for t in tars
        if not t.path.endswith(COMPRESSED_TARS) and (most_samples(t) is None or most_samples(t) > unit_size)
    ]
    known = known or {}
    unknown = [t for t in need if t.path not in known]
    counts = _counts(root, unknown, listed, ids, output, read_only) if unknown else {}
    counts.update({t.path: known[t.path] for t in need if t.path in known})  # a compressed tar is never cut
    units = []
    for t in tars:
        uri, n = join(root, t.path), counts.get(t.path)
        if n is None or n <= unit_size:
            units.append(WorkUnit(ids[t.path], t.path, uri, "webdataset"))
            continue
        slices = -(-n // unit_size)
        width = max(4, len(str(slices - 1)))
        index = index_uri(output, ids[t.path]) if output and not read_only else ""  # a reader writes no index
        for s in range(slices):
            stop = None if s == slices - 1 else (s + 1) * unit_size  # the last reads to the end, whatever the count
            units.append(
                WorkUnit(f"{ids[t.path]}-s{s:0{width}d}", t.path, uri, "webdataset", s * unit_size, stop, index=index)
            )
    return units


def cached_counts(output: str | None, tars: list[FileEntry]) -> dict[str, int]:
    """The sample counts of `tars` that the output's cache holds for the same size and time (read only)."""
    return _hits(_load_counts(output) if output else {}, tars)


def _hits(cache: dict[str, list], tars: list[FileEntry]) -> dict[str, int]:
    counts = {}
    for t in tars:
        hit = cache.get(t.path)
        if hit is not None and hit[0] == t.size and hit[1] == t.mtime_ns:
            counts[t.path] = hit[2]
    return counts


def count_samples(root: str, tars: list[FileEntry], listed: set[str], ids: dict[str, str]) -> dict[str, int]:
    """The sample counts of `tars` (`_stats.json` sidecars, else the tar's headers), caching nothing."""
    with ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(tars)))) as pool:
        found = list(pool.map(lambda t: _count(root, t, listed, ids[t.path], None), tars))
    return {t.path: n for t, (n, _) in zip(tars, found, strict=True)}


def _counts(
    root: str, need: list[FileEntry], listed: set[str], ids: dict[str, str], output: str | None, read_only: bool
) -> dict[str, int]:
    cache = _load_counts(output) if output else {}
    counts = _hits(cache, need)
    todo = [t for t in need if t.path not in counts]
    if not todo:
        return counts
    if len(todo) > 100:
        log.info("counting the samples of %d tars (once: the counts are kept in the output)", len(todo))
    index_in = None if read_only else output
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(todo))) as pool:
        found = list(pool.map(lambda t: _count(root, t, listed, ids[t.path], index_in), todo))
    for t, (n, how) in zip(todo, found, strict=True):
        counts[t.path] = n
        cache[t.path] = [t.size, t.mtime_ns, n, how]
    if output and not read_only:
        listed_tars = {t.path for t in need}
        _save_counts(output, {k: v for k, v in cache.items() if k in listed_tars})
    return counts


def stats_path(rel: str) -> str:
    """img2dataset's sidecar of a tar: `a/00042.tar` → `a/00042_stats.json`."""
    return posixpath.splitext(rel)[0] + "_stats.json"


def _count(root: str, t: FileEntry, listed: set[str], unit_base: str, output: str | None) -> tuple[int, str]:
    """The samples of one tar: `successes` of its `_stats.json` where that is plausible, else its index's count."""
    from recaption.sources.tar import unit_index

    stats = stats_path(t.path)
    if stats in listed:
        n = _successes(join(root, stats))
        bound = most_samples(t)
        if n is not None and (bound is None or n <= bound):
            return n, "stats"
        log.warning("%s: no usable sample count (%r); the tar is indexed instead", display(join(root, stats)), n)
    uri = join(root, t.path)
    unit = WorkUnit(unit_base, t.path, uri, "webdataset", 0, 0, index=index_uri(output, unit_base) if output else "")
    return unit_index(unit).samples, "index"


def _successes(uri: str) -> int | None:
    data = read_optional(uri)
    try:
        n = json.loads(data)["successes"] if data is not None else None
    except (ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _load_counts(output: str) -> dict[str, list]:
    data = read_optional(join(output, COUNTS_FILE))
    if data is None:
        return {}
    try:
        record = json.loads(gzip.decompress(data))
        if record.get("format") == COUNTS_FORMAT and isinstance(record.get("tars"), dict):
            return record["tars"]
    except (OSError, ValueError, AttributeError):
        pass
    log.warning("%s is not a count cache of this version: counted again", display(join(output, COUNTS_FILE)))
    return {}


def _save_counts(output: str, tars: dict[str, list]) -> None:
    """Best effort: without it the next plan counts again (the same counts, so the same units)."""
    data = gzip.compress(json.dumps({"format": COUNTS_FORMAT, "tars": tars}).encode(), compresslevel=6)
    try:
        write_small(join(output, COUNTS_FILE), data)
    except Unreachable:
        raise
    except (OSError, pa.ArrowException) as e:
        log.warning("cannot keep the tar sample counts in %s: %s", display(output), redact_text(str(e)))

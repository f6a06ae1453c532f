"""Reading one work unit, whatever its format: one SourceRecord per input row, keys non-blank and unique within the
unit, read again from the unit's start when the storage drops a stream part-way."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import random
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.redact import redact_text
from recaption.retry import is_transient
from recaption.sources import folder, fs, hf, parquet, tar
from recaption.sources.units import SourceRecord, WorkUnit

log = logging.getLogger(__name__)

Reader = Callable[[WorkUnit, InputConfig], Iterator[SourceRecord]]
READERS: dict[str, Reader] = {
    "webdataset": tar.iter_records,
    "img2dataset-parquet": parquet.iter_records,
    "parquet": parquet.iter_records,
    "hf": hf.iter_records,
    "folder": folder.iter_records,
}


def read_unit(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """The unit's records in source order. A blank key becomes `<shard stem>/<row>` (what a row without a key
    gets); a repeated key becomes `key#dupN` with an error, so no row is lost; a table that turns out corrupt
    part-way ends with one error record for its unread rest. A transient storage error (a reset connection, a
    503) part-way reads the unit again from its start, skipping the records already given, so each comes once."""
    reader = READERS.get(unit.format)
    if reader is None:
        raise InputError(f"unit {unit.unit}: unknown input format {unit.format!r}, expected one of {sorted(READERS)}")
    n = 0
    seen: dict[str, int] | None = None  # kept across attempts: the records given before a retry hold their keys
    for attempt in range(1, fs.READ_ATTEMPTS + 1):
        try:
            if seen is None:
                seen = _keys_before(unit)
            for i, record in enumerate(reader(unit, input_cfg)):
                if i < n:
                    continue  # given before the stream broke
                yield _unique(_keyed(record, unit, i), seen, unit)
                n += 1
            return
        except InputError:
            raise  # missing or unreachable files: a planning problem, not a bad row
        except (pa.ArrowException, OSError) as e:
            if is_transient(e) and attempt < fs.READ_ATTEMPTS:
                delay = min(16.0, fs.RETRY_BASE_S * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning(
                    "unit %s: %s after %d records (attempt %d of %d; read again from its start in %.1f s)",
                    unit.unit,
                    redact_text(f"{type(e).__name__}: {e}"),
                    n,
                    attempt,
                    fs.READ_ATTEMPTS,
                    delay,
                )
                time.sleep(delay)
                continue
            where = unit.source or fs.display(unit.uri)
            if is_transient(e):
                raise fs.Unreachable(
                    f"cannot read {where} after {fs.READ_ATTEMPTS} attempts: {redact_text(str(e))}"
                ) from None
            stem = posixpath.splitext(unit.source or unit.unit)[0]
            rows = "" if unit.stop is None else f" of rows [{unit.start}, {unit.stop})"
            error = redact_text(f"cannot read {where} after {n} rows{rows}: {e}")
            yield _unique(
                SourceRecord(key=f"{stem}#unreadable", image=None, error=error), seen if seen is not None else {}, unit
            )
            return


def first_record(unit: WorkUnit, input_cfg: InputConfig) -> SourceRecord | None:
    """The unit's first record, None for an empty or unreadable unit (its own read reports that)."""
    try:
        for record in READERS[unit.format](unit, input_cfg):
            return record
    except (InputError, pa.ArrowException, OSError) as e:
        log.debug("unit %s: first record not read: %s", unit.unit, redact_text(str(e)))
    return None


def _keys_before(unit: WorkUnit) -> dict[str, int]:
    """The keys the samples before a slice of a split tar take (its index has them), so that a key repeated across
    slices fails as it does when the whole tar is one unit: the rows of a split tar are those of the whole tar."""
    seen: dict[str, int] = {}
    if tar.is_split(unit) and unit.start > 0:
        index = tar.unit_index(unit)
        stem = posixpath.splitext(unit.source or unit.unit)[0]
        for i, key in enumerate(index.keys[: unit.start]):
            _claim(key if key.strip() else f"{stem}/{i}", seen)
    return seen


def _keyed(record: SourceRecord, unit: WorkUnit, i: int) -> SourceRecord:
    """A record whose key is empty or blank gets the id a row without a key gets: `<shard stem>/<row>`."""
    if record.key.strip():
        return record
    stem = posixpath.splitext(unit.source or unit.unit)[0]
    return dataclasses.replace(record, key=f"{stem}/{unit.start + i}")


def _claim(key: str, seen: dict[str, int]) -> str | None:
    """Records `key` as taken; for a key taken before, the new, still unique key its row gets instead."""
    dups = seen.get(key)
    if dups is None:
        seen[key] = 0
        return None
    # The first row with a key keeps it; later ones are kept as failed rows under a new, still unique key.
    while True:
        dups += 1
        new_key = f"{key}#dup{dups}"
        if new_key not in seen:
            break
    seen[key] = dups
    seen[new_key] = 0
    return new_key


def _unique(record: SourceRecord, seen: dict[str, int], unit: WorkUnit) -> SourceRecord:
    new_key = _claim(record.key, seen)
    if new_key is None:
        return record
    error = f"duplicate key {record.key!r} in {unit.source or unit.unit}: the first row with it is kept"
    return SourceRecord(
        key=new_key, image=None, url=record.url, alt_text=record.alt_text, error=error, source=record.source
    )

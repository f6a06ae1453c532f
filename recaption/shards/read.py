"""Reading one work unit, whatever its format: one SourceRecord per input row, keys unique within the unit."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator

import pyarrow as pa

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.shards import SourceRecord, WorkUnit, folder, hf, parquet, tar

Reader = Callable[[WorkUnit, InputConfig], Iterator[SourceRecord]]
READERS: dict[str, Reader] = {
    "webdataset": tar.iter_records,
    "img2dataset-parquet": parquet.iter_records,
    "parquet": parquet.iter_records,
    "hf": hf.iter_records,
    "folder": folder.iter_records,
}


def read_unit(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """The unit's records in source order. A repeated key becomes `key#dupN` with an error, so no row is lost;
    a table that turns out corrupt part-way ends with one error record for its unread rest."""
    reader = READERS.get(unit.format)
    if reader is None:
        raise InputError(f"unit {unit.unit}: unknown input format {unit.format!r}, expected one of {sorted(READERS)}")
    seen: dict[str, int] = {}
    n = 0
    try:
        for record in reader(unit, input_cfg):
            n += 1
            yield _unique(record, seen, unit)
    except InputError:
        raise  # missing or unreachable files: a planning problem, not a bad row
    except (pa.ArrowException, OSError) as e:
        stem = posixpath.splitext(unit.source or unit.unit)[0]
        rows = "" if unit.stop is None else f" of rows [{unit.start}, {unit.stop})"
        error = f"cannot read {unit.source or unit.uri} after {n} rows{rows}: {e}"
        yield _unique(SourceRecord(key=f"{stem}#unreadable", image=None, error=error), seen, unit)


def _unique(record: SourceRecord, seen: dict[str, int], unit: WorkUnit) -> SourceRecord:
    dups = seen.get(record.key)
    if dups is None:
        seen[record.key] = 0
        return record
    # The first row with a key keeps it; later ones are kept as failed rows under a new, still unique key.
    while True:
        dups += 1
        new_key = f"{record.key}#dup{dups}"
        if new_key not in seen:
            break
    seen[record.key] = dups
    seen[new_key] = 0
    error = f"duplicate key {record.key!r} in {unit.source or unit.unit}: the first row with it is kept"
    return SourceRecord(
        key=new_key, image=None, url=record.url, alt_text=record.alt_text, error=error, source=record.source
    )

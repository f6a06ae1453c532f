"""Reader of `datasets.save_to_disk` output: its Arrow IPC files read with pyarrow, columns as for Parquet."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator

import pyarrow as pa

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.redact import redact_text
from recaption.sources.fs import FileEntry, display, is_uri, join, open_input_file, read_bytes, resolve, retrying
from recaption.sources.parquet import records_from_batches, resolve_columns
from recaption.sources.units import SourceRecord, WorkUnit

MARKERS = ("state.json", "dataset_info.json")


def arrow_files(root: str, files: list[FileEntry]) -> list[str]:
    """The data files of every dataset (or DatasetDict split) below `root`, as relative paths, in dataset order."""
    names = {f.path for f in files}
    dirs = sorted({posixpath.dirname(f.path) for f in files if posixpath.basename(f.path) in MARKERS})
    if not dirs:  # bare Arrow files (format: hf given explicitly): all of them
        dirs = sorted({posixpath.dirname(f.path) for f in files if f.path.endswith(".arrow")})
    out: list[str] = []
    for d in dirs:
        state = posixpath.join(d, "state.json")
        if state in names:
            try:
                listed = [e["filename"] for e in json.loads(read_bytes(join(root, state)))["_data_files"]]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{display(join(root, state))}: not a datasets state.json: {e}") from None
            out += [posixpath.join(d, name) for name in listed]
        else:
            # No state.json: every data file of the directory; `cache-*.arrow` are map() caches, not the dataset.
            out += sorted(
                f.path
                for f in files
                if posixpath.dirname(f.path) == d
                and f.path.endswith(".arrow")
                and not posixpath.basename(f.path).startswith("cache-")
            )
    return out


def arrow_rows(uri: str) -> tuple[int, pa.Schema]:
    """Row count and schema of an Arrow IPC file (stream or file format); local files are memory-mapped."""

    def count() -> tuple[int, pa.Schema]:
        with _open(uri) as f:
            reader = _reader(f)
            return sum(b.num_rows for b in _batches(reader)), reader.schema

    try:
        return retrying(count, uri, "read")
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{display(uri)}: not a readable Arrow file: {redact_text(str(e))}") from None


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """Rows [start, stop) of one Arrow file of a saved dataset."""
    with _open(unit.uri) as f:
        reader = _reader(f)
        cols = resolve_columns(reader.schema, input_cfg, unit.format, display(unit.uri))
        yield from records_from_batches(_numbered(reader, cols.names()), cols, unit)


def _numbered(reader, names: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    row = 0
    for batch in _batches(reader):
        yield row, batch.select(names)
        row += batch.num_rows


def _open(uri: str) -> pa.NativeFile:
    if not is_uri(uri) or uri.startswith("file://"):
        _, path = resolve(uri)
        try:
            # Memory-mapped, batches are views: counting rows or skipping to a slice touches no image bytes.
            return pa.memory_map(path)
        except (pa.ArrowException, OSError):
            pass  # let the generic path report it
    return open_input_file(uri)


def _reader(f: pa.NativeFile):
    # datasets writes the stream format; the file format (magic ARROW1) is read too.
    magic = f.read(6)
    f.seek(0)
    return pa.ipc.open_file(f) if magic == b"ARROW1" else pa.ipc.open_stream(f)


def _batches(reader) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader

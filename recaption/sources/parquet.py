"""Reader of Parquet shards: img2dataset's parquet output and any Parquet with an image column (shared with HF)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.fields import kept_fields
from recaption.redact import redact_text
from recaption.sources.fs import Unreachable, display, is_uri, join, open_input_file, parent, read_bytes, retrying
from recaption.sources.units import SourceRecord, WorkUnit

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "bytes", "jpeg")
IMG2DATASET_IMAGE_COLUMNS = ("jpg", "png", "webp")
KEY_COLUMNS = ("key", "id")
CAPTION_COLUMNS = ("caption", "text", "alt_text")
URL_COLUMNS = ("url",)
BATCH_ROWS = 128  # rows decoded at once: a few MB of image bytes, whatever the row-group size


@dataclass(frozen=True)
class Columns:
    """Which column of a table plays which role; None where the table has none."""

    image: str
    key: str | None = None
    caption: str | None = None
    url: str | None = None
    status: str | None = None  # img2dataset: why `image` is null
    error_message: str | None = None
    kept: tuple[str, ...] = ()  # source columns kept in the output (`input.keep_columns`) that this table has

    def names(self) -> list[str]:
        cols = [self.image, self.key, self.caption, self.url, self.status, self.error_message, *self.kept]
        return list(dict.fromkeys(c for c in cols if c))


def looks_like_img2dataset(schema: pa.Schema) -> bool:
    """img2dataset's parquet output: `key`, an encoded-image bytes column and its status/url columns."""
    names = set(schema.names)
    has_image = any(c in names and pa.types.is_binary(schema.field(c).type) for c in IMG2DATASET_IMAGE_COLUMNS)
    return "key" in names and has_image and bool({"status", "url"} & names)


def resolve_columns(schema: pa.Schema, cfg: InputConfig, fmt: str, where: str) -> Columns:
    """Columns from the config, else the usual names; InputError naming the file when a needed one is missing."""
    names = schema.names

    def pick(configured: str | None, candidates: tuple[str, ...], what: str) -> str | None:
        if configured is not None:
            if configured not in names:
                raise InputError(f"{where}: {what} {configured!r} is not a column; columns are {names}")
            return configured
        return next((c for c in candidates if c in names), None)

    candidates = IMG2DATASET_IMAGE_COLUMNS if fmt == "img2dataset-parquet" else IMAGE_COLUMNS
    image = pick(cfg.image_column, candidates, "input.image_column")
    if image is None:
        raise InputError(
            f"{where}: no image column (looked for {list(candidates)}); set input.image_column, columns are {names}"
        )
    i2d = fmt == "img2dataset-parquet"
    kept = tuple(f.source for f in kept_fields(cfg.keep_columns, fmt, []) if f.source in names)
    return Columns(
        image=image,
        key=pick(cfg.key_column, KEY_COLUMNS, "input.key_column"),
        caption=pick(cfg.caption_column, CAPTION_COLUMNS, "input.caption_column"),
        url=pick(cfg.url_column, URL_COLUMNS, "input.url_column"),
        status="status" if i2d and "status" in names else None,
        error_message="error_message" if i2d and "error_message" in names else None,
        kept=kept,
    )


def parquet_rows(uri: str) -> tuple[int, pa.Schema]:
    """Row count and schema from the footer only (read again after a transient storage error)."""

    def footer() -> pq.FileMetaData:
        with open_input_file(uri) as f:
            return pq.read_metadata(f)

    try:
        md = retrying(footer, uri, "read the footer of")
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{display(uri)}: not a readable Parquet file: {redact_text(str(e))}") from None
    return md.num_rows, md.schema.to_arrow_schema()


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """Rows [start, stop) of one Parquet file, reading only the row groups and columns they need."""
    with open_input_file(unit.uri) as f:
        pf = pq.ParquetFile(f, pre_buffer=True)  # coalesced ranged reads: what high-latency stores need
        cols = resolve_columns(pf.schema_arrow, input_cfg, unit.format, display(unit.uri))
        stop = pf.metadata.num_rows if unit.stop is None else unit.stop
        yield from records_from_batches(_row_group_batches(pf, cols, unit.start, stop), cols, unit)


def _row_group_batches(
    pf: pq.ParquetFile, cols: Columns, start: int, stop: int
) -> Iterator[tuple[int, pa.RecordBatch]]:
    offset = 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            row = offset
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[i], columns=cols.names()):
                yield row, batch
                row += batch.num_rows
        offset += n


def records_from_batches(
    batches: Iterable[tuple[int, pa.RecordBatch]], cols: Columns, unit: WorkUnit
) -> Iterator[SourceRecord]:
    """SourceRecords of the rows in [unit.start, unit.stop) from (first row index, batch) pairs in file order."""
    stop = unit.stop
    for first, batch in batches:
        lo = max(unit.start - first, 0)
        hi = batch.num_rows if stop is None else min(stop - first, batch.num_rows)
        if hi > lo:
            yield from _records(batch.slice(lo, hi - lo), first + lo, cols, unit)
        if stop is not None and first + batch.num_rows >= stop:
            return


def _records(batch: pa.RecordBatch, first: int, cols: Columns, unit: WorkUnit) -> Iterator[SourceRecord]:
    def column(name: str | None) -> list:
        return batch.column(name).to_pylist() if name else [None] * batch.num_rows

    images, keys, captions, urls = column(cols.image), column(cols.key), column(cols.caption), column(cols.url)
    statuses, messages = column(cols.status), column(cols.error_message)
    kept = {name: column(name) for name in cols.kept}
    stem = posixpath.splitext(unit.source)[0]
    base = parent(unit.uri)
    for i, value in enumerate(images):
        key = str(keys[i]) if keys[i] is not None else f"{stem}/{first + i}"
        image, error = _image_bytes(value, base)
        if error and cols.status:
            error = f"img2dataset status {statuses[i]}: {messages[i]}"
        meta = {name: values[i] for name, values in kept.items()} or None
        yield SourceRecord(
            key=key, image=image, url=_text(urls[i]), alt_text=_text(captions[i]), error=error, meta=meta
        )


def _image_bytes(value: object, base: str) -> tuple[bytes | None, str | None]:
    """bytes, an HF Image struct {bytes, path} or a path (relative to the shard's directory) → (bytes, error)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None:
        return None, "image is null"
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, str):
        uri = value if is_uri(value) or os.path.isabs(value) else join(base, value)
        try:
            return read_bytes(uri), None
        except Unreachable:
            raise  # the store kept failing: the unit fails and a rerun retries it, no row is written off
        except InputError as e:
            return None, f"image file: {e}"
    return None, f"image value of type {type(value).__name__} is neither bytes nor a path"


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # several captions per image (COCO-style): the first is the alt-text
        return _text(value[0]) if value else None
    return str(value)

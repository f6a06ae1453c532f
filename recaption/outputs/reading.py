"""Reading a finished output: its part files, row batches, run metadata and the source images of its rows."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.config import ImageConfig, InputConfig
from recaption.errors import InputError
from recaption.job import METADATA_KEY, OutputDir
from recaption.sources import WorkUnit, display


def part_paths(out: OutputDir) -> list[str]:
    """The output's part files, sorted; InputError when there are none."""
    return out.part_paths()


def iter_batches(out: OutputDir, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Every row of the output in part order, a record batch at a time (memory: one batch)."""
    for path in part_paths(out):
        with out.fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def run_metadata(out: OutputDir) -> dict:
    """The run metadata (config, prompt texts, versions) stored in the output's first Parquet file."""
    with out.fs.open_input_file(part_paths(out)[0]) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


def source_units(
    out: OutputDir, input_path: str | None = None, output: str | None = None
) -> tuple[InputConfig, dict[str, WorkUnit]]:
    """The run's input config (its path replaced by `input_path` when the shards moved) and its units by id; with
    `output` (the output's path as given, credentials and all), the tar counts cached there are used, read only."""
    from recaption.sources import plan_units

    raw = dict(run_metadata(out).get("config", {}).get("input") or {})
    if input_path:
        raw["path"] = input_path
    if not raw.get("path"):
        raise InputError(f"{out.uri}: the run metadata names no input path; pass the input's path (--input)")
    input_cfg = InputConfig.model_validate({**raw, "max_units": None})
    units = plan_units(input_cfg, output, read_only=True) if output else plan_units(input_cfg)
    return input_cfg, {u.unit: u for u in units}


def unit_images(input_cfg: InputConfig, unit: WorkUnit, wanted: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image bytes) of a unit's source records that have an image, in source order; with `wanted`,
    only those keys, stopping once all are found."""
    from recaption.sources import read_unit

    left = set(wanted) if wanted is not None else None
    for rec in read_unit(unit, input_cfg):
        if rec.image is None or (left is not None and rec.key not in left):
            continue
        yield rec.key, rec.image
        if left is not None:
            left.discard(rec.key)
            if not left:
                return


def find_unit(units: dict[str, WorkUnit], unit: str, input_cfg: InputConfig) -> WorkUnit:
    if unit not in units:
        raise InputError(
            f"unit {unit} is not in the input {display(input_cfg.path)} any more; pass the input's path (--input)"
        )
    return units[unit]


def png_bytes(data: bytes, image_cfg: ImageConfig) -> bytes:
    """The image as the run decoded it (orientation, RGB, at most max_side), as PNG."""
    from recaption.sources import decode_image

    buf = io.BytesIO()
    decode_image(data, image_cfg).image.save(buf, format="PNG")
    return buf.getvalue()


def fetch_images(
    out: OutputDir, rows: list[dict], input_path: str | None, output: str | None = None
) -> dict[tuple[str, str], bytes]:
    """The source image of each row with one, by (unit, key)."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        if row["image_sha256"]:
            wanted.setdefault(row["unit"], set()).add(row["key"])
    if not wanted:
        return {}
    input_cfg, units = source_units(out, input_path, output)
    found = {}
    for unit, keys in wanted.items():
        found.update(((unit, k), data) for k, data in unit_images(input_cfg, find_unit(units, unit, input_cfg), keys))
    return found

"""`recaption inspect`: rows of an output by key or at random, every caption beside its metadata, images as PNG."""

from __future__ import annotations

import hashlib
import html
import io
import json
import random
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from recaption.config import ImageConfig, InputConfig
from recaption.errors import InputError, RecaptionError
from recaption.shards import WorkUnit
from recaption.shards.fs import display
from recaption.writer import METADATA_KEY, OutputDir, open_output

INSPECT_DIR = "_inspect"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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
    from recaption.shards.plan import plan_units

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
    from recaption.shards.read import read_unit

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
    from recaption.images import decode_image

    buf = io.BytesIO()
    decode_image(data, image_cfg).image.save(buf, format="PNG")
    return buf.getvalue()


def safe_name(key: str) -> str:
    """A file name stem for a key: the key itself when it is safe, else its safe characters (`_` for the others,
    at most 150) and a short hash of the key, so keys that differ only in unsafe characters (`a/b`, `a_b`) or
    beyond 150 characters never share a file."""
    safe = _UNSAFE.sub("_", key)
    if safe == key and 0 < len(key) <= 150 and not key.startswith("."):
        return key
    return f"{safe[:150].lstrip('.') or 'image'}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def select_rows(
    out: OutputDir, keys: Iterable[str] = (), sample: int = 0, seed: int = 0, unit: str | None = None
) -> list[dict]:
    """Every row with one of `keys` (in that order; a key that several units hold gives a row per unit, sorted by
    unit), plus `sample` rows chosen uniformly (reservoir, reproducible by seed); with `unit`, rows of that unit
    only. A row is one (unit, key): keys are unique within a unit, not across units."""
    keys = list(dict.fromkeys(keys))
    rng, reservoir, seen = random.Random(seed), [], 0
    for batch in iter_batches(out, columns=["unit", "key"]) if sample > 0 else ():
        for ident in zip(batch.column("unit").to_pylist(), batch.column("key").to_pylist(), strict=True):
            if unit is not None and ident[0] != unit:
                continue
            seen += 1
            if len(reservoir) < sample:
                reservoir.append(ident)
            elif (j := rng.randrange(seen)) < sample:
                reservoir[j] = ident
    wanted = keys + [k for _, k in reservoir]
    dataset = pads.dataset(part_paths(out), filesystem=out.fs, format="parquet")
    by_key: dict[str, list[dict]] = {}
    for row in dataset.to_table(filter=pc.field("key").isin(wanted)).to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise RecaptionError(f"no row with key {', '.join(map(repr, missing[:5]))} in {out.uri}")
    rows: dict[tuple[str, str], dict] = {}
    for key in keys:
        found = sorted(by_key[key], key=lambda r: r["unit"])
        if unit is not None:
            found = [r for r in found if r["unit"] == unit]
            if not found:
                units = ", ".join(r["unit"] for r in sorted(by_key[key], key=lambda r: r["unit"])[:5])
                raise RecaptionError(f"no row with key {key!r} in unit {unit}; units with that key: {units}")
        rows.update(((r["unit"], r["key"]), r) for r in found)
    for ident in reservoir:
        rows.setdefault(ident, next(r for r in by_key[ident[1]] if r["unit"] == ident[0]))
    return list(rows.values())


def format_row(row: dict, prompts: dict[str, str] | None = None, width: int = 100) -> str:
    """One row as text: metadata, then every caption with its model, prompt, tokens, finish reason and flags."""
    size = f"{row['width']}x{row['height']}" if row.get("width") else "-"
    lines = [f"== {row['key']}  [{row['status']}]  {size}  source={row['source']} unit={row['unit']}"]
    for name in ("url", "alt_text", "error", "image_sha256"):
        if row.get(name):
            lines.append(f"   {name}: {row[name]}")
    for cap in row.get("captions") or []:
        flags = ",".join(cap["flags"] or []) or "-"
        head = f"-- {cap['model']} / {cap['prompt']}: {cap['n_tokens']} tokens, {len(cap['sub_captions'] or [])} "
        lines.append(head + f"sub-captions, finish={cap['finish_reason']}, flags={flags}")
        if prompts and cap["prompt"] in prompts:
            lines.append("   prompt: " + textwrap.shorten(prompts[cap["prompt"]], width - 11))
        lines += textwrap.wrap(cap["text"] or "(empty)", width, initial_indent="   ", subsequent_indent="   ")
    return "\n".join(lines)


def inspect_output(
    output: str,
    keys: Iterable[str] = (),
    sample: int = 0,
    seed: int = 0,
    out_dir: str | None = None,
    input_path: str | None = None,
    stream: IO[str] | None = None,
    unit: str | None = None,
) -> list[str]:
    """Prints the chosen rows (every row with each key, whatever its unit; with `unit`, that unit's only) and saves
    each image (from the source shard) as `<key>.png` in `out_dir` (default `OUTPUT/_inspect`), `<key>@<unit>`
    where several of the rows share a key, with an `index.html` showing every image beside its captions; returns
    the PNG paths."""
    stream = stream or sys.stdout
    out = open_output(output)
    rows = select_rows(out, keys, sample, seed, unit)
    if not rows:
        raise RecaptionError("nothing to inspect: give --key K (repeatable) or --sample N")
    meta = run_metadata(out)
    image_cfg = ImageConfig.model_validate(meta.get("config", {}).get("images") or {})
    dest = open_output(out_dir) if out_dir else OutputDir(out.fs, out.path(INSPECT_DIR))
    images = fetch_images(out, rows, input_path, output)
    shared = {k for k, n in Counter(r["key"] for r in rows).items() if n > 1}
    for key in sorted(shared & set(keys)):
        units = [r["unit"] for r in rows if r["key"] == key]
        print(f"key {key!r} is in {len(units)} units ({', '.join(units)}): each row is shown; pick one with --unit U",
              file=stream)  # fmt: skip
    saved, cards = [], []
    for row in rows:
        print(format_row(row, meta.get("prompts")), file=stream)
        data, png = images.get((row["unit"], row["key"])), None
        if data is not None and hashlib.sha256(data).hexdigest() != row["image_sha256"]:
            print("   warning: the source's image differs from the one captioned (sha256); shown anyway", file=stream)
        if data is not None:
            name = f"{row['key']}@{row['unit']}" if row["key"] in shared else row["key"]
            png = dest.path(f"{safe_name(name)}.png")
            dest.write_atomic(png, png_bytes(data, image_cfg))
            saved.append(png)
            print(f"   image: {png}", file=stream)
        else:
            print("   image: none in the source for this row", file=stream)
        cards.append({**row, "src": png.rsplit("/", 1)[1] if png else None})
        print(file=stream)
    dest.write_atomic(dest.path("index.html"), gallery_page(cards, out.uri).encode())
    return saved


def gallery_page(cards: list[dict], where: str) -> str:
    """The report's gallery as a page of its own: each row's image (a PNG beside the page) and its captions."""
    from recaption.gallery import STYLE, render_gallery
    from recaption.report_page import STYLE as REPORT_STYLE

    head = f"<meta charset=utf-8><title>recaption inspect</title><style>{REPORT_STYLE}{STYLE}</style>"
    body = f"<h1>recaption inspect</h1><p>output <code>{html.escape(where)}</code> · {len(cards)} rows</p>"
    return f"<!doctype html><html><head>{head}</head><body>{body}{render_gallery(cards)}</body></html>"


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

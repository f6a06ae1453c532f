"""`recaption inspect`: rows of an output by key or at random, every caption beside its metadata, images as PNG."""

from __future__ import annotations

import hashlib
import html
import random
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable
from typing import IO

import pyarrow.compute as pc
import pyarrow.dataset as pads

from recaption.config import ImageConfig
from recaption.errors import RecaptionError
from recaption.job import OutputDir, open_output
from recaption.outputs.reading import fetch_images, iter_batches, part_paths, png_bytes, run_metadata

INSPECT_DIR = "_inspect"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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
    from recaption.outputs.gallery import STYLE, render_gallery
    from recaption.outputs.report_page import STYLE as REPORT_STYLE

    head = f"<meta charset=utf-8><title>recaption inspect</title><style>{REPORT_STYLE}{STYLE}</style>"
    body = f"<h1>recaption inspect</h1><p>output <code>{html.escape(where)}</code> · {len(cards)} rows</p>"
    return f"<!doctype html><html><head>{head}</head><body>{body}{render_gallery(cards)}</body></html>"

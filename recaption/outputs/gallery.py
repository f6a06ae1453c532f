"""The gallery that opens the report (and `recaption inspect`'s page): a seeded sample of rows, failed ones included,
each with a thumbnail made from its source image and every model's and prompt's caption side by side with its flags."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import random
import zlib
from html import escape
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from recaption.config import ImageConfig
from recaption.errors import RecaptionError
from recaption.job import OUTPUT_SCHEMA, OutputDir
from recaption.redact import redact_text

log = logging.getLogger(__name__)

THUMB_SIDE = 256
# A card's own entries; any other column of its row is a kept source field (input.keep_columns).
CARD_COLUMNS = frozenset(OUTPUT_SCHEMA.names) | {"src", "image"}
FAILED_SHARE = 4  # up to a quarter of the gallery (at least one card) shows failed rows, when the output has any

STYLE = (
    ".gallery .card{display:flex;gap:14px;border:1px solid #ccc;border-left:8px solid #3a923a;padding:8px;"
    "margin:10px 0;background:#fff}.gallery .card.failed{border-left-color:#b0006a;background:#fff4fa}"
    ".gallery .thumb{flex:0 0 auto;width:256px}.gallery .thumb img{margin:0;max-width:256px;max-height:256px}"
    ".gallery .noimg{width:240px;height:120px;border:1px dashed #b0006a;color:#b0006a;padding:8px;font-size:12px;"
    "overflow:hidden}.gallery .body{flex:1 1 auto;min-width:0}.gallery .meta{margin:0 0 4px}"
    ".gallery .error{color:#b0006a;font-weight:600;margin:2px 0}.gallery .alt{color:#555;margin:2px 0}"
    ".gallery table.caps{width:100%;table-layout:fixed;margin:4px 0}.gallery table.caps td{font-size:13px}"
    ".gallery .flag{display:inline-block;background:#6a3dcc;color:#fff;border-radius:3px;padding:0 4px;"
    "margin-right:3px;font-size:11px}.gallery .tok{color:#888;font-size:11px}"
    ".gallery .status{font-size:11px;padding:0 4px;border-radius:3px;background:#3a923a;color:#fff}"
    ".gallery .failed .status{background:#b0006a}"
)


def sample_idents(out: OutputDir, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(unit, key) of `n` rows chosen uniformly with `seed` (one pass over two columns): up to a quarter (at least
    one) of them failed rows when the output has any, the rest from the other rows; in a stable mixed order."""
    from recaption.outputs.reading import iter_batches

    if n <= 0:
        return []
    rng = random.Random(seed)
    reservoirs: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    seen = {True: 0, False: 0}
    for batch in iter_batches(out, columns=["unit", "key", "status"], batch_size=8192):
        columns = (batch.column(c).to_pylist() for c in ("unit", "key", "status"))
        for unit, key, status in zip(*columns, strict=True):
            failed = status == "failed"
            seen[failed] += 1
            reservoir = reservoirs[failed]
            if len(reservoir) < n:
                reservoir.append((unit, key))
            elif (j := rng.randrange(seen[failed])) < n:
                reservoir[j] = (unit, key)
    failed, other = reservoirs[True], reservoirs[False]
    n_failed = min(len(failed), max(1, n // FAILED_SHARE))
    n_other = min(len(other), n - n_failed)
    n_failed = min(len(failed), n - n_other)
    picked = rng.sample(other, n_other) + rng.sample(failed, n_failed)
    return sorted(picked, key=lambda ident: zlib.crc32(f"{ident[0]}\0{ident[1]}".encode()))


def rows_of(out: OutputDir, idents: list[tuple[str, str]]) -> list[dict]:
    """The output rows with these (unit, key), in that order."""
    from recaption.outputs.reading import part_paths

    if not idents:
        return []
    dataset = pads.dataset(part_paths(out), filesystem=out.fs, format="parquet")
    table = dataset.to_table(filter=pc.field("key").isin(sorted({k for _, k in idents})))
    by_ident = {(r["unit"], r["key"]): r for r in table.to_pylist()}
    return [by_ident[i] for i in idents if i in by_ident]


def thumbnail(data: bytes, image_cfg: ImageConfig, side: int = THUMB_SIDE) -> str | None:
    """A JPEG thumbnail (longest side `side`) of an encoded image as a data URI; None when it cannot be decoded."""
    from recaption.sources import decode_image

    try:
        image = decode_image(data, image_cfg).image
    except RecaptionError:
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_cards(
    out: OutputDir, rows: list[dict], image_cfg: ImageConfig, input_path: str | None = None, output: str | None = None
) -> tuple[list[dict], str | None]:
    """Each row as a card (its metadata, captions and a thumbnail data URI from the source, or None) and a note
    when the source could not be read (moved, unreachable): the gallery is shown without its images then."""
    from recaption.outputs.reading import fetch_images

    note = None
    try:
        images = fetch_images(out, rows, input_path, output)
    except (RecaptionError, OSError) as e:
        images = {}
        note = redact_text(f"the source images could not be read ({e}); pass the input's path (--input) if it moved")
        log.warning("%s", note)
    cards, changed = [], 0
    for row in rows:
        data = images.get((row["unit"], row["key"]))
        if data is not None and hashlib.sha256(data).hexdigest() != row["image_sha256"]:
            data, changed = None, changed + 1  # never a caption beside another image than the one it describes
        cards.append({**row, "src": thumbnail(data, image_cfg) if data is not None else None})
    if changed:
        note = (f"{changed} rows' source images differ from the ones captioned (sha256): shown without them; "
                "pass the input the run read (--input)")  # fmt: skip
    return cards, note


def card_json(card: dict) -> dict[str, Any]:
    """What report.json keeps of a card (no image bytes); kept source fields under `fields`."""
    keep = ("unit", "key", "status", "error", "alt_text", "url", "width", "height")
    caps = [{k: c[k] for k in ("model", "prompt", "text", "n_tokens", "finish_reason", "flags")}
            for c in card.get("captions") or []]  # fmt: skip
    fields = {k: v for k, v in card.items() if k not in CARD_COLUMNS}
    return {**{k: card.get(k) for k in keep}, "fields": fields, "thumbnail": card.get("src") is not None,
            "captions": caps}  # fmt: skip


def render_gallery(cards: list[dict], caption: str = "") -> str:
    """The cards as HTML: per card the thumbnail (`src`: a data URI or a file beside the page), key, unit, status,
    error and alt text, and a table with a column per model and a row per prompt, each caption with its flags."""
    parts = [f"<p class=small>{escape(caption)}</p>" if caption else "", "<div class=gallery>"]
    for card in cards:
        failed = card["status"] == "failed"
        if card.get("src"):
            thumb = f"<img alt='{escape(card['key'])}' src='{escape(card['src'])}'>"
        else:
            why = card.get("error") or "no image in the source for this row"
            thumb = f"<div class=noimg>no thumbnail: {escape(why)}</div>"
        size = f" · {card['width']}×{card['height']}" if card.get("width") else ""
        meta = (f"<p class=meta><b>{escape(card['key'])}</b> · unit {escape(card['unit'])} · "
                f"<span class=status>{escape(card['status'])}</span>{size}</p>")  # fmt: skip
        error = f"<p class=error>{escape(card['error'])}</p>" if card.get("error") else ""
        alt = f"<p class=alt>alt text: {escape(card['alt_text'])}</p>" if card.get("alt_text") else ""
        kept = {k: v for k, v in card.items() if k not in CARD_COLUMNS and v is not None}
        if kept:  # the source fields the output keeps (input.keep_columns): similarity, LICENSE …
            alt += "<p class=alt>" + " · ".join(f"{escape(k)}: {escape(_short(v))}" for k, v in kept.items()) + "</p>"
        parts.append(
            f"<div class='card{' failed' if failed else ''}'><div class=thumb>{thumb}</div><div class=body>"
            f"{meta}{error}{alt}{_captions_table(card.get('captions') or [])}</div></div>"
        )
    parts.append("</div>")
    return "".join(parts)


def _short(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _captions_table(captions: list[dict]) -> str:
    if not captions:
        return "<p class=small>no captions</p>"
    models = list(dict.fromkeys(c["model"] for c in captions))
    prompts = list(dict.fromkeys(c["prompt"] for c in captions))
    cells: dict[tuple[str, str], list[str]] = {}
    for c in captions:
        flags = "".join(f"<span class=flag>{escape(f)}</span>" for f in c.get("flags") or [])
        tokens = f"<span class=tok>{c['n_tokens']} tokens</span>" if c.get("n_tokens") is not None else ""
        text = escape(c.get("text") or "") or "<i>(empty)</i>"
        cells.setdefault((c["prompt"], c["model"]), []).append(f"{text} {flags}{tokens}")
    head = "<tr><th style='width:90px'>prompt</th>" + "".join(f"<th>{escape(m)}</th>" for m in models) + "</tr>"
    body = "".join(
        f"<tr><th>{escape(p)}</th>" + "".join(f"<td>{'<hr>'.join(cells.get((p, m), ['–']))}</td>" for m in models)
        + "</tr>"
        for p in prompts
    )  # fmt: skip
    return f"<table class=caps>{head}{body}</table>"

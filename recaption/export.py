"""`recaption export`: an output to webdataset tars (images from the source), a Hugging Face dataset, or JSONL."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq

from recaption.config import ImageConfig
from recaption.errors import ConfigError, RecaptionError
from recaption.inspect import find_unit, part_paths, png_bytes, run_metadata, source_units, unit_images
from recaption.writer import OutputDir, open_output

FORMATS = ("webdataset", "hf", "jsonl")
FIELDS = ("key", "url", "alt_text", "width", "height", "image_sha256", "status", "error", "source", "unit")
_TAR_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def export_output(
    output: str,
    to: str,
    dest: str,
    include_failed: bool = False,
    caption: str = "first",
    shard_size: int = 1000,
    input_path: str | None = None,
) -> dict[str, Any]:
    """Streams the output's rows (ok rows only unless `include_failed`) to `dest` as `to` and returns counts.

    `caption` picks the text of each sample's `caption` field (`.txt` in webdataset): `first` (the first model's
    first prompt that has text), `alt_text`, or `MODEL` / `MODEL/PROMPT`. Images come from the source shards the
    run read (`input_path` where they moved) and are checked against the output's `image_sha256`."""
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    out = open_output(output)
    check_caption_choice(caption, run_metadata(out))
    export = {"webdataset": export_webdataset, "hf": export_hf, "jsonl": export_jsonl}[to]
    return {"format": to, "dest": dest, **export(out, dest, include_failed, caption, shard_size, input_path)}


def check_caption_choice(caption: str, meta: dict) -> None:
    """A MODEL[/PROMPT] choice must name a model (and prompt) of the run: a typo would export empty captions."""
    if caption in ("first", "alt_text"):
        return
    model, _, prompt = caption.partition("/")
    known = {(m.get("name") or m["path"].rstrip("/").split("/")[-1], p) for m in meta["config"]["models"]
             for p in m.get("prompts") or []}  # fmt: skip
    if not any(m == model and (not prompt or p == prompt) for m, p in known):
        choices = ", ".join(sorted(f"{m}/{p}" for m, p in known))
        raise ConfigError(f"--caption {caption!r} names no model/prompt of this run; use first, alt_text or {choices}")


def pick_caption(row: dict, caption: str) -> str | None:
    """The text a trainer uses by default for this row (see `export_output`); None when there is none."""
    if caption == "alt_text":
        return row["alt_text"]
    model, _, prompt = caption.partition("/")
    for cap in row["captions"] or []:
        usable = cap["text"] and not {"error", "dropped"} & set(cap["flags"] or [])
        if usable and (caption == "first" or cap["model"] == model and (not prompt or cap["prompt"] == prompt)):
            return cap["text"]
    return None


def record(row: dict, caption: str) -> dict[str, Any]:
    """A row as exported: its metadata, the chosen `caption` and every caption."""
    return {**{k: row[k] for k in FIELDS}, "caption": pick_caption(row, caption), "captions": row["captions"] or []}


def iter_rows(out: OutputDir, include_failed: bool, images: bool, input_path: str | None) -> Iterator[tuple]:
    """(row, image bytes or None) in output order, one part (= one unit) in memory at a time; an ok row's image
    is read from its source shard, streamed beside the part (both are in source order)."""
    input_cfg, units = source_units(out, input_path) if images else (None, {})
    for path in part_paths(out):
        with out.fs.open_input_file(path) as f:
            rows = [r for r in pq.read_table(f).to_pylist() if include_failed or r["status"] == "ok"]
        wanted = {r["key"] for r in rows if r["status"] == "ok"}
        if not images or not wanted:
            yield from ((r, None) for r in rows)
            continue
        unit = find_unit(units, rows[0]["unit"], input_cfg)
        source, ahead = unit_images(input_cfg, unit, wanted), {}
        for row in rows:
            data = None
            if row["key"] in wanted:
                while row["key"] not in ahead:
                    key, data = next(source, (None, None))
                    if key is None:
                        raise RecaptionError(f"no image for key {row['key']!r} in {unit.uri}: the input changed")
                    ahead[key] = data
                data = ahead.pop(row["key"])
                if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
                    raise RecaptionError(f"the image of {row['key']!r} in {unit.uri} is not the one captioned")
            yield row, data


def export_jsonl(out: OutputDir, dest: str, include_failed: bool, caption: str, *_: Any) -> dict[str, Any]:
    """One JSON object per row (no images); a `.gz` or `.zst` name compresses (pyarrow picks by extension)."""
    from recaption.shards.fs import open_output as open_stream

    rows = 0
    with open_stream(dest) as sink:
        for row, _ in iter_rows(out, include_failed, images=False, input_path=None):
            sink.write(json.dumps(record(row, caption), ensure_ascii=False).encode() + b"\n")
            rows += 1
    return {"rows": rows, "files": [dest]}


def export_webdataset(
    out: OutputDir, dest: str, include_failed: bool, caption: str, shard_size: int, input_path: str | None
) -> dict[str, Any]:
    """img2dataset-style shards `00000.tar` … of ok rows: `<key>.jpg|png|webp`, `<key>.json` (the row and its
    captions), `<key>.txt` (the chosen caption), with `.parquet`/`_stats.json` sidecars; with `include_failed`
    the other rows go to `failed.jsonl` (a trainer needs an image, so they are not in the tars)."""
    from recaption.shards.fs import join
    from recaption.shards.fs import open_output as open_stream
    from recaption.shards.tar import write_webdataset

    image_cfg = ImageConfig.model_validate(run_metadata(out)["config"].get("images") or {})
    counts = {"rows": 0, "failed_rows": 0}
    failed_path = join(dest, "failed.jsonl")
    failed_file = open_stream(failed_path) if include_failed else None

    def samples() -> Iterator[dict]:
        for row, data in iter_rows(out, include_failed, images=True, input_path=input_path):
            rec = record(row, caption)
            if data is None:
                failed_file.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
                counts["failed_rows"] += 1
                continue
            ext, data = tar_image(data, row, image_cfg)
            counts["rows"] += 1
            yield {"key": tar_key(row["key"]), ext: data, "caption": rec["caption"], "url": row["url"], "json": rec}

    try:
        shards = write_webdataset(dest, samples(), shard_size=shard_size)
    finally:
        if failed_file is not None:
            failed_file.close()
    return {**counts, "files": shards + ([failed_path] if include_failed else [])}


def tar_key(key: str) -> str:
    """A key safe as a webdataset member stem (which ends at the first dot): reversible percent-encoding
    (`urllib.parse.unquote` gives the key back), so distinct keys never share a sample. A `/` stays a folder in the
    tar only between non-empty parts; a key with a leading, trailing or doubled `/` has every `/` encoded."""
    if not key:
        raise RecaptionError("a row has an empty key; a webdataset sample needs a name")
    stem = quote(key, safe="/-_#").replace(".", "%2E")
    return stem.replace("/", "%2F") if "" in stem.split("/") else stem


def tar_image(data: bytes, row: dict, image_cfg: ImageConfig) -> tuple[str, bytes]:
    """The source bytes when they are JPEG, PNG or WebP (what loaders decode); other formats as PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        ext = _TAR_EXTENSIONS.get(im.format or "")
    if ext:
        return ext, data
    full = image_cfg.model_copy(update={"max_side": max(row["width"], row["height"])})
    return "png", png_bytes(data, full)


def hf_features():
    """The `datasets` features of an exported row: `image` (Image) beside the row's fields and its captions."""
    from datasets import Features, Image, Value

    text, number = Value("string"), Value("int32")
    caption = {"model": text, "prompt": text, "prompt_text": text, "text": text, "sub_captions": [text],
               "n_tokens": number, "finish_reason": text, "flags": [text]}  # fmt: skip
    columns = {k: number if k in ("width", "height") else text for k in FIELDS}
    return Features({"image": Image(), **columns, "caption": text, "captions": [caption]})


def export_hf(
    out: OutputDir, dest: str, include_failed: bool, caption: str, shard_size: int, input_path: str | None
) -> dict[str, Any]:
    """A `datasets.save_to_disk` directory (`load_from_disk(dest)`, then `.push_to_hub(repo)`), written through a
    temporary Arrow cache beside `dest`, so memory holds one writer batch; failed rows have `image` None."""
    import datasets
    import pyarrow.compute as pc

    if "://" in dest and not dest.startswith("file://"):
        raise ConfigError(f"--to hf writes a local directory, not {dest}: export to a local path, then push_to_hub")
    dest_path = Path(dest.removeprefix("file://"))
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix=f".{dest_path.name}-cache-", dir=dest_path.parent)
    kwargs = {"output": out.root, "fs": out.fs, "include_failed": include_failed, "caption": caption}
    try:
        ds = datasets.Dataset.from_generator(
            _hf_rows, features=hf_features(), cache_dir=cache, gen_kwargs={**kwargs, "input_path": input_path}
        )
        ds.save_to_disk(str(dest_path), max_shard_size="500MB")
        rows, images = ds.num_rows, pc.sum(pc.equal(ds.data.column("status"), "ok")).as_py() or 0
        del ds  # its cache files are removed below
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows, "images": images, "files": sorted(str(p) for p in dest_path.iterdir())}


def _hf_rows(output: str, fs: Any, include_failed: bool, caption: str, input_path: str | None) -> Iterator[dict]:
    for row, data in iter_rows(OutputDir(fs, output), include_failed, images=True, input_path=input_path):
        yield {**record(row, caption), "image": {"bytes": data, "path": None} if data is not None else None}

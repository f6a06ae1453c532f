"""`recaption export`: an output to webdataset tars (images from the source), a Hugging Face dataset, or JSONL."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recaption.config import ImageConfig
from recaption.errors import ConfigError, RecaptionError
from recaption.job import OutputDir, open_output
from recaption.outputs.reading import (
    find_unit,
    iter_batches,
    part_paths,
    png_bytes,
    run_metadata,
    source_units,
    unit_images,
)
from recaption.redact import redact_text
from recaption.sources import TMP_PREFIX, atomic_output, display, join, resolve

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
    check_dest(out, dest, to)
    check_caption_choice(caption, run_metadata(out))
    export = {"webdataset": export_webdataset, "hf": export_hf, "jsonl": export_jsonl}[to]
    try:
        result = export(out, dest, include_failed, caption, shard_size, input_path)
    except (OSError, pa.ArrowException) as e:  # a full disk, a store that stays down: one line, not a traceback
        raise RecaptionError(redact_text(f"export to {display(dest)} failed: {e}")) from None
    return {"format": to, "dest": display(dest), **result, "files": [display(f) for f in result["files"]]}


def check_dest(out: OutputDir, dest: str, to: str) -> None:
    """DEST is new (or, for a directory, empty) and apart from the output: an export never overwrites or mixes
    with files that are there, and never writes into the output it reads (nor around it). ConfigError otherwise."""
    if not dest.strip():
        raise ConfigError("DEST is empty; give a new directory (webdataset, hf) or file (jsonl)")
    if to == "hf" and "://" in dest and not dest.startswith("file://"):
        raise ConfigError(
            f"--to hf writes a local directory, not {display(dest)}: export to a local path, then push_to_hub"
        )
    fs, path = resolve(dest)
    where, root = _place(fs, path), _place(out.fs, out.root)
    if type(fs) is type(out.fs) and (where + "/").startswith(root + "/"):
        raise ConfigError(f"DEST {display(dest)} lies inside the output {out.uri}; export to a place apart from it")
    if type(fs) is type(out.fs) and (root + "/").startswith(where + "/"):
        raise ConfigError(f"the output {out.uri} lies inside DEST {display(dest)}; export to a place apart from it")
    info = fs.get_file_info(path)
    if to == "jsonl" and info.type != pafs.FileType.NotFound:
        raise ConfigError(f"DEST {display(dest)} exists; give a new file name (an export never overwrites)")
    if info.type == pafs.FileType.File:
        raise ConfigError(f"DEST {display(dest)} is a file; give a new or empty directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise ConfigError(f"DEST {display(dest)} is a non-empty directory; give a new or empty directory")


def _place(fs: pafs.FileSystem, path: str) -> str:
    """A path as a place: local paths with symlinks resolved, so two spellings of one directory compare equal."""
    path = os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else path
    return path.rstrip("/") or "/"


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
                        raise RecaptionError(
                            f"no image for key {row['key']!r} in {display(unit.uri)}: the input changed"
                        )
                    ahead[key] = data
                data = ahead.pop(row["key"])
                if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
                    raise RecaptionError(f"the image of {row['key']!r} in {display(unit.uri)} is not the one captioned")
            yield row, data


def export_jsonl(out: OutputDir, dest: str, include_failed: bool, caption: str, *_: Any) -> dict[str, Any]:
    """One JSON object per row (no images); a `.gz` or `.zst` name compresses (pyarrow picks by extension). Written
    to a temporary name and renamed: a failed export leaves no partial file."""
    rows = 0
    with atomic_output(dest) as sink:
        for row, _ in iter_rows(out, include_failed, images=False, input_path=None):
            sink.write(json.dumps(record(row, caption), ensure_ascii=False).encode() + b"\n")
            rows += 1
    return {"rows": rows, "files": [dest]}


def export_webdataset(
    out: OutputDir, dest: str, include_failed: bool, caption: str, shard_size: int, input_path: str | None
) -> dict[str, Any]:
    """img2dataset-style shards `00000.tar` … of ok rows: `<name>.jpg|png|webp`, `<name>.json` (the row and its
    captions), `<name>.txt` (the chosen caption), with `.parquet`/`_stats.json` sidecars; with `include_failed`
    the other rows go to `failed.jsonl` (a trainer needs an image, so they are not in the tars). A sample's name is
    its key (see `sample_name`), or `KEY@UNIT` for every row whose key more than one unit holds, so no two samples
    share a name; `renamed` counts those. Each file is written to a temporary name and renamed when complete."""
    from recaption.sources import write_webdataset

    image_cfg = ImageConfig.model_validate(run_metadata(out)["config"].get("images") or {})
    repeated = repeated_keys(out)
    counts = {"rows": 0, "failed_rows": 0, "renamed": 0}
    failed_path = join(dest, "failed.jsonl")

    def samples(failed_file: Any) -> Iterator[dict]:
        for row, data in iter_rows(out, include_failed, images=True, input_path=input_path):
            rec = record(row, caption)
            if data is None:
                failed_file.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
                counts["failed_rows"] += 1
                continue
            ext, data = tar_image(data, row, image_cfg)
            counts["rows"] += 1
            renamed = not row["key"] or row["key"] in repeated
            counts["renamed"] += renamed
            name = sample_name(row["key"], row["unit"] if renamed else None)
            yield {"key": name, ext: data, "caption": rec["caption"], "url": row["url"], "json": rec}

    if not include_failed:
        shards = write_webdataset(dest, samples(None), shard_size=shard_size)
        return {**counts, "files": shards}
    with atomic_output(failed_path) as failed_file:
        shards = write_webdataset(dest, samples(failed_file), shard_size=shard_size)
    return {**counts, "files": [*shards, failed_path]}


def repeated_keys(out: OutputDir) -> set[str]:
    """The keys that more than one row of the output holds: keys are unique within a unit, not across units (the
    same key in two tars or two Parquet files). Memory: 8 bytes a row, then the candidate keys only."""
    hashes = [
        np.fromiter(map(hash, batch.column(0).to_pylist()), dtype=np.int64, count=batch.num_rows)
        for batch in iter_batches(out, columns=["key"], batch_size=65536)
    ]
    values, counts = np.unique(np.concatenate(hashes or [np.zeros(0, np.int64)]), return_counts=True)
    candidates = set(values[counts > 1].tolist())  # equal hashes: equal keys, or (rarely) a hash collision
    if not candidates:
        return set()
    seen: Counter[str] = Counter()
    for batch in iter_batches(out, columns=["key"], batch_size=65536):
        seen.update(k for k in batch.column(0).to_pylist() if hash(k) in candidates)
    return {k for k, n in seen.items() if n > 1}


def sample_name(key: str, unit: str | None = None) -> str:
    """A sample's name in a webdataset export: `tar_key(key)`, or with `unit`, `tar_key(key)@tar_key(unit)`.
    `tar_key` encodes every `@` of a key, so a raw `@` is always this separator and the name splits back into
    (key, unit) at it: `unquote(name.rsplit("@", 1)[0])`, `unquote(name.rsplit("@", 1)[1])`."""
    if unit is None:
        return tar_key(key)
    return f"{tar_key(key) if key else ''}@{tar_key(unit)}"


def tar_key(key: str) -> str:
    """A key safe as a webdataset member stem (which ends at the first dot): reversible percent-encoding
    (`urllib.parse.unquote` gives the key back), so distinct keys never share a sample. A `/` stays a folder in the
    tar only between non-empty parts; a key with a leading, trailing or doubled `/` has every `/` encoded."""
    if not key:
        raise RecaptionError("a row has an empty key; a webdataset sample needs a name (see sample_name)")
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
    temporary Arrow cache beside `dest`, so memory holds one writer batch; failed rows have `image` None. The
    dataset is saved in that temporary directory too and renamed to `dest` when whole."""
    import datasets
    import pyarrow.compute as pc

    dest_path = Path(dest.removeprefix("file://"))
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest_path.name}-", dir=dest_path.parent))
    kwargs = {"output": out.root, "fs": out.fs, "include_failed": include_failed, "caption": caption}
    try:
        ds = datasets.Dataset.from_generator(
            _hf_rows,
            features=hf_features(),
            cache_dir=str(work / "cache"),
            gen_kwargs={**kwargs, "input_path": input_path},
        )
        ds.save_to_disk(str(work / "dataset"), max_shard_size="500MB")
        rows, images = ds.num_rows, pc.sum(pc.equal(ds.data.column("status"), "ok")).as_py() or 0
        del ds  # its cache files are removed below
        os.replace(work / "dataset", dest_path)  # onto a missing or empty directory (check_dest saw to it)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, RecaptionError | OSError):
            raise e.__cause__ from None  # what went wrong, not the wrapper of `datasets`
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "images": images, "files": sorted(str(p) for p in dest_path.iterdir())}


def _hf_rows(output: str, fs: Any, include_failed: bool, caption: str, input_path: str | None) -> Iterator[dict]:
    for row, data in iter_rows(OutputDir(fs, output), include_failed, images=True, input_path=input_path):
        yield {**record(row, caption), "image": {"bytes": data, "path": None} if data is not None else None}

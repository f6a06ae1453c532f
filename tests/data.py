"""Builders of small real inputs for tests: images, webdataset/parquet/HF/folder datasets, a real img2dataset run."""

from __future__ import annotations

import functools
import http.server
import io
import os
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from recaption.sources.tar import write_webdataset


def make_image(i: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A deterministic image, different for every `i`: a background colour, a box and a bar code of i's bits."""
    rng = random.Random(i)
    w, h = size
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    x0, y0 = rng.randrange(max(1, w // 2)), rng.randrange(max(1, h // 2))
    draw.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(rng.randrange(256) for _ in range(3)))
    for bit in range(min(w // 2, 24)):
        if (i >> bit) & 1:
            draw.rectangle([2 * bit, h - 4, 2 * bit + 1, h - 1], fill=(255, 255, 255))
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        im.save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


def write_webdataset_dir(dir: str | Path, n: int, shard_size: int) -> list[str]:
    """img2dataset-like webdataset shards (tars, sidecar parquets, stats) of n images; returns their keys."""
    keys = [f"{i:09d}" for i in range(n)]
    samples = (
        {"key": k, "jpg": make_image(i), "caption": f"caption {i}", "url": f"http://example.com/{i}.jpg"}
        for i, k in enumerate(keys)
    )
    write_webdataset(str(dir), samples, shard_size=shard_size)
    return keys


def write_parquet_dataset(
    dir: str | Path,
    n: int,
    image_as: str = "bytes",
    files: int = 1,
    row_group_size: int | None = None,
    key: bool = True,
) -> list[str]:
    """Parquet files `part-00000.parquet` … with an `image` column as bytes, {bytes, path} structs or relative paths,
    plus `text`, `url` and (if `key`) `key`; returns the keys a reader gives (`part-00000/<row>` without a key)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    keys = []
    per_file = -(-n // files)
    for f in range(files):
        rows = range(f * per_file, min(n, (f + 1) * per_file))
        images = [make_image(i) for i in rows]
        if image_as == "bytes":
            column = pa.array(images, pa.binary())
        elif image_as == "struct":
            column = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in zip(rows, images, strict=True)])
        elif image_as == "path":
            (dir / "images").mkdir(exist_ok=True)
            for i, b in zip(rows, images, strict=True):
                (dir / "images" / f"{i}.jpg").write_bytes(b)
            column = pa.array([f"images/{i}.jpg" for i in rows])
        else:
            raise ValueError(f"image_as must be bytes, struct or path, not {image_as!r}")
        table = pa.table(
            {"image": column, "text": [f"caption {i}" for i in rows], "url": [f"http://x/{i}" for i in rows]}
        )
        if key:
            table = table.append_column("key", pa.array([f"k{i:05d}" for i in rows]))
        pq.write_table(table, dir / f"part-{f:05d}.parquet", row_group_size=row_group_size)
        keys += [f"k{i:05d}" for i in rows] if key else [f"part-{f:05d}/{r}" for r in range(len(rows))]
    return keys


def write_hf_dataset(dir: str | Path, n: int, splits: tuple[str, ...] = (), num_shards: int = 1) -> list[str]:
    """A real `datasets` save_to_disk directory (a DatasetDict if `splits`) with an Image column; returns the ids."""
    import datasets

    def build(offset: int) -> datasets.Dataset:
        ids = [f"id{offset + i:05d}" for i in range(n)]
        images = [{"bytes": make_image(offset + i), "path": None} for i in range(n)]
        data = {"image": images, "text": [f"caption {offset + i}" for i in range(n)], "id": ids}
        return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())

    datasets.disable_progress_bars()
    if not splits:
        build(0).save_to_disk(str(dir), num_shards=num_shards)
        return [f"id{i:05d}" for i in range(n)]
    parts = {s: build(k * n) for k, s in enumerate(splits)}
    datasets.DatasetDict(parts).save_to_disk(str(dir), num_shards={s: num_shards for s in splits})
    return [f"id{i:05d}" for i in range(n * len(splits))]


def write_image_folder(dir: str | Path, n: int) -> list[str]:
    """n images in two sub-folders, every other with a sibling `.txt`; returns keys (relative path, no extension)."""
    dir = Path(dir)
    keys = []
    for i in range(n):
        fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
        key = f"{'ab'[i % 2]}/img_{i:04d}"
        path = dir / f"{key}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image(i, fmt=fmt))
        if i % 2 == 0:
            path.with_suffix(".txt").write_text(f"caption {i}\n")
        keys.append(key)
    return sorted(keys)


@contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """A local http.server on 127.0.0.1 (free port) serving `root`; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def img2dataset_download(
    tmp_dir: str | Path,
    n: int,
    output_format: str = "webdataset",
    missing: int = 1,
    number_sample_per_shard: int = 4,
    url_list_format: str = "parquet",
    extra_columns: dict[str, list] | None = None,
) -> Path:
    """Serve n generated images (+ `missing` 404 URLs) locally and run the real `img2dataset.download` on them in a
    subprocess; returns its output folder. Captions are `caption <i>` for `http://…/<i>.jpg`. `extra_columns` (one
    value per URL, the missing ones included) go through img2dataset's `save_additional_columns`."""
    tmp = Path(tmp_dir)
    www, out = tmp / "www", tmp / f"i2d-{output_format}"
    www.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (www / f"{i}.jpg").write_bytes(make_image(i, size=(64 + i % 7, 48)))
    with serve_directory(www) as base:
        urls = [f"{base}/{i}.jpg" for i in range(n)] + [f"{base}/missing-{j}.jpg" for j in range(missing)]
        captions = [f"caption {i}" for i in range(n + missing)]
        table = pa.table({"url": urls, "caption": captions, **(extra_columns or {})})
        url_list = tmp / f"urls.{url_list_format}"
        if url_list_format == "parquet":
            pq.write_table(table, url_list)
        else:
            pa_csv.write_csv(table, url_list)
        script = tmp / f"run_img2dataset_{output_format}.py"
        script.write_text(
            textwrap.dedent(f"""
            import sys

            # img2dataset never uses torch, webdataset runs without it: not importing it saves seconds in each
            # of the 3 processes (this top level also runs in img2dataset's spawned workers).
            sys.modules["torch"] = None

            from img2dataset import download

            if __name__ == "__main__":
                download(
                    url_list={str(url_list)!r}, input_format={url_list_format!r}, url_col="url", caption_col="caption",
                    output_folder={str(out)!r}, output_format={output_format!r}, processes_count=1, thread_count=4,
                    number_sample_per_shard={number_sample_per_shard}, enable_wandb=False, resize_mode="no",
                    timeout=10, retries=0, save_additional_columns={list(extra_columns or []) or None!r},
                )
            """)
        )
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but which carries almost no pixel data (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def image_corpus() -> list[tuple[str, str, bytes, str | None]]:
    """(key, extension, bytes, expected error fragment or None when the image must be captioned) for every kind of
    image a crawl delivers: the bad ones fail with their reason, the odd-but-valid ones are converted."""

    def save(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    good_jpeg, good_png = make_image(1), make_image(2, fmt="PNG")
    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    return [
        ("good-jpeg", "jpg", good_jpeg, None),
        ("zero-bytes", "jpg", b"", "empty"),
        ("truncated-jpeg", "jpg", good_jpeg[: len(good_jpeg) // 2], "truncated"),
        ("truncated-png", "png", good_png[: len(good_png) // 2], "truncated"),
        ("random-bytes", "jpg", bytes(random.Random(0).randrange(256) for _ in range(2000)), "not an image"),
        ("cmyk-jpeg", "jpg", save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), None),
        ("png-16bit", "png", save(Image.new("I;16", (40, 30), 40000), "PNG"), None),
        ("palette-transparent", "png", save(palette, "PNG", transparency=0), None),
        ("animated-gif", "gif", save(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        (
            "animated-webp",
            "webp",
            save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
            None,
        ),
        ("bomb", "png", png_header_only(100_000, 100_000), "decompression bomb"),
        ("one-pixel", "png", save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image too small: 1x1"),
        ("ünïcode-ключ-画像", "jpg", make_image(3), None),
    ]

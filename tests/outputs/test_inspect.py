"""Inspect: rows by key or sample, printed with every caption, and their images saved from the source shards."""

from __future__ import annotations

import hashlib
import io
import shutil

import pyarrow as pa
import pytest
from PIL import Image

from recaption.errors import RecaptionError
from recaption.job.writer import OUTPUT_SCHEMA, open_output
from recaption.outputs.inspect import inspect_output
from recaption.sources.tar import write_webdataset
from tests.data import make_image

N = 5


def caption(model: str, prompt: str, text: str) -> dict:
    return {"model": model, "prompt": prompt, "text": text, "sub_captions": [text], "n_tokens": len(text.split()),
            "finish_reason": "stop", "flags": []}  # fmt: skip


@pytest.fixture
def output(tmp_path):
    """Source shards (3 + 2 JPEGs) and a hand-made output of them, plus one failed row without an image."""
    images = {f"k{i}": make_image(i, size=(60 + i, 40)) for i in range(N)}
    write_webdataset(str(tmp_path / "in"), [{"key": k, "jpg": v} for k, v in images.items()], shard_size=3)
    out = open_output(str(tmp_path / "out"))
    meta = {"config": {"input": {"path": str(tmp_path / "in")}, "images": {}}, "prompts": {"short": "Say it."}}
    for unit, keys in {"00000": ["k0", "k1", "k2"], "00001": ["k3", "k4", "k4#dup1"]}.items():
        rows = []
        for key in keys:
            data = images.get(key)
            size = Image.open(io.BytesIO(data)).size if data else (None, None)
            rows.append({"key": key, "source": f"{unit}.tar", "unit": unit, "url": f"http://x/{key}",
                         "alt_text": f"alt of {key}", "width": size[0], "height": size[1],
                         "image_sha256": hashlib.sha256(data).hexdigest() if data else None,
                         "status": "ok" if data else "failed", "error": None if data else "duplicate key 'k4'",
                         "captions": [caption("m1", "short", f"first words about {key}."),
                                      caption("m2", "short", f"second view of {key}.")] if data else []})  # fmt: skip
        out.commit_unit(unit, pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), meta, {"rows": len(rows)}, "zstd")
    return tmp_path, images


def test_key_prints_every_caption_and_saves_the_source_image(output):
    root, images = output
    stream = io.StringIO()
    saved = inspect_output(str(root / "out"), keys=["k3", "k4#dup1"], stream=stream)
    text = stream.getvalue()
    assert saved == [str(root / "out" / "_inspect" / "k3.png")]
    for expected in ("== k3  [ok]  63x40", "alt_text: alt of k3", "first words about k3.", "second view of k3.",
                     "-- m2 / short:", "prompt: Say it.", "== k4#dup1  [failed]", "error: duplicate key 'k4'",
                     "image: none in the source"):  # fmt: skip
        assert expected in text
    with Image.open(saved[0]) as png, Image.open(io.BytesIO(images["k3"])) as source:
        assert png.format == "PNG" and png.tobytes() == source.convert("RGB").tobytes()
    page = (root / "out" / "_inspect" / "index.html").read_text()
    assert "k3.png" in page and "second view of k3." in page


def test_sample_is_reproducible_and_goes_to_out_dir(output, tmp_path):
    root, _ = output
    first = inspect_output(str(root / "out"), sample=3, seed=7, out_dir=str(tmp_path / "a"), stream=io.StringIO())
    again = inspect_output(str(root / "out"), sample=3, seed=7, out_dir=str(tmp_path / "b"), stream=io.StringIO())
    assert [p.rsplit("/", 1)[1] for p in first] == [p.rsplit("/", 1)[1] for p in again]
    assert 2 <= len(first) <= 3 and len(set(first)) == len(first)  # 3 rows; the failed row has no image
    assert all(p.startswith(str(tmp_path / "a")) for p in first)


def test_unknown_key_fails_and_a_moved_input_is_found_with_input_path(output, tmp_path):
    root, _ = output
    with pytest.raises(RecaptionError, match="no row with key 'nope'"):
        inspect_output(str(root / "out"), keys=["nope"], stream=io.StringIO())
    shutil.move(root / "in", tmp_path / "moved")
    with pytest.raises(RecaptionError, match="not found"):
        inspect_output(str(root / "out"), keys=["k1"], stream=io.StringIO())
    saved = inspect_output(str(root / "out"), keys=["k1"], input_path=str(tmp_path / "moved"), stream=io.StringIO())
    assert [p.rsplit("/", 1)[1] for p in saved] == ["k1.png"]


def test_safe_names_never_collide():
    from recaption.outputs.inspect import safe_name

    keys = ["a/b", "a_b", "a b", "a\\b", "x" * 151, "x" * 150 + "y", "", ".hidden", "k4#dup1", "k4_dup1"]
    names = [safe_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert safe_name("a_b") == "a_b" and safe_name("k0.1-x") == "k0.1-x"  # a safe key is its own name
    assert all(len(n) <= 163 and not n.startswith(".") and "/" not in n for n in names)

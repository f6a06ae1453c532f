"""A corpus of bad and odd inputs through the whole pipeline: the run finishes, one row per input, good images are
captioned, each bad one is a failed row with its own readable error. In tar, parquet and folder inputs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from recaption.captioners.engines.fake import fake_caption
from recaption.captioners.prompts import get_prompt
from recaption.config import load_config
from recaption.job.pipeline import run_pipeline
from tests.data import image_corpus, make_image

FAKE = {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25}


def caption_of(key: str) -> str:
    return f"légende ✓ «{key}» 画像"


def run(tmp_path: Path, input_path: Path) -> dict[str, dict]:
    cfg = load_config(
        None, data={"input": {"path": str(input_path)}, "output": {"path": str(tmp_path / "out")}, "models": [FAKE]}
    )
    summary = run_pipeline(cfg, progress=False)
    assert not summary.unit_errors
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == summary.rows
    return {r["key"]: r for r in rows}


def caption_id(rgb: tuple[int, int, int]) -> str:
    """The opening of the fake engine's caption of a 40×30 image of one colour: its hash tells the pixels apart."""
    return fake_caption(Image.new("RGB", (40, 30), rgb), get_prompt("short")).split(" of a ")[0]


def check_corpus(rows: dict[str, dict]) -> None:
    for key, _, _, expected_error in image_corpus():
        row = rows[key]
        assert row["alt_text"] == caption_of(key), row  # unicode keys and alt texts round-trip, failed rows too
        if expected_error is None:
            assert row["status"] == "ok", row
            assert row["captions"][0]["text"] and row["width"] > 0
        else:
            assert row["status"] == "failed" and expected_error in row["error"], row
            assert row["captions"] == [] and row["width"] is None
    assert "image too small: 1x1, a side is below min_side 8 (images.min_side)" in rows["one-pixel"]["error"]
    # Animated images are captioned from their first frame (red), not a later one (green).
    for key in ("animated-gif", "animated-webp"):
        text = rows[key]["captions"][0]["text"]
        assert caption_id((255, 0, 0)) in text and caption_id((0, 255, 0)) not in text, text


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_corpus(tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for key, ext, data, _ in image_corpus():
            add(tf, f"{key}.{ext}", data)
            add(tf, f"{key}.txt", caption_of(key).encode())
        add(tf, "notes.pdf", b"%PDF-1.4 not an image")
        add(tf, "../escape.jpg", make_image(7))
        add(tf, "/abs/x.jpg", make_image(8))
        add(tf, "good-jpeg.jpg", make_image(9))  # a duplicate key
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(6):
            add(tf, f"t{i}.jpg", make_image(i, size=(200, 160)))
    (shards / "00001.tar").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])

    rows = run(tmp_path, shards)
    check_corpus(rows)
    assert "no image member" in rows["notes"]["error"]
    assert "unsafe member name" in rows["../escape"]["error"] and "unsafe member name" in rows["/abs/x"]["error"]
    assert "duplicate key" in rows["good-jpeg#dup1"]["error"]
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs/x.jpg").exists()
    truncated = [r for r in rows.values() if r["source"] == "00001.tar"]
    assert [r["status"] for r in truncated[:-1]] == ["ok"] * (len(truncated) - 1) and len(truncated) >= 3
    assert truncated[-1]["status"] == "failed" and "truncated tar" in truncated[-1]["error"]


def test_parquet_corpus_with_a_null_image(tmp_path):
    corpus = image_corpus()
    table = pa.table(
        {
            "key": [k for k, *_ in corpus] + ["null-image"],
            "image": [data for _, _, data, _ in corpus] + [None],
            "caption": [caption_of(k) for k, *_ in corpus] + ["no image here"],
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet", row_group_size=5)
    rows = run(tmp_path, tmp_path / "in")
    check_corpus(rows)
    assert len(rows) == len(corpus) + 1
    assert rows["null-image"]["status"] == "failed" and rows["null-image"]["alt_text"] == "no image here"
    assert rows["null-image"]["error"] == "image is null"


def test_folder_corpus(tmp_path):
    folder = tmp_path / "in" / "imgs"
    folder.mkdir(parents=True)
    for key, ext, data, _ in image_corpus():
        (folder / f"{key}.{ext}").write_bytes(data)
        (folder / f"{key}.txt").write_text(caption_of(key))
    rows = run(tmp_path, tmp_path / "in")
    check_corpus({k.removeprefix("imgs/"): r for k, r in rows.items()})
    assert len(rows) == len(image_corpus())

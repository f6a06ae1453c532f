"""The caption stage's fault handling: engine calls that raise, bounded attempts after crashes, degenerate output."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from recaption.captioners.prompts import get_prompt
from recaption.config import ModelConfig, PostprocessConfig
from recaption.job.captioning import CaptionStage
from recaption.job.stages import PAYLOAD_SCHEMA


def png(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, 40), (width % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def unit_table(widths: list[int]) -> pa.Table:
    rows = [
        {
            "key": f"k{i}",
            "source": "s.tar",
            "unit": "u",
            "status": "ok",
            "width": w,
            "height": 40,
            "image": png(w),
            "captions": [],
        }
        for i, w in enumerate(widths)
    ]
    return pa.Table.from_pylist(rows, schema=PAYLOAD_SCHEMA)


def stage(tmp_path, post: dict | None = None, **model) -> CaptionStage:
    cfg = ModelConfig(path="fake", engine="fake", prompts=["short", "detailed"], **model)
    texts = {name: get_prompt(name) for name in cfg.prompts}
    post_cfg = PostprocessConfig(**(post or {})).model_dump()
    return CaptionStage(cfg.model_dump(), texts, post_cfg, str(tmp_path / "out"))


def test_an_engine_call_that_raises_fails_only_the_images_it_raises_on(tmp_path):
    s = stage(tmp_path, fake={"raise_on_width": 61})
    rows = s.caption_unit("u", unit_table([50, 61, 52, 53])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert "fake engine fault" in rows[1]["error"] and rows[1]["captions"] == []
    assert all(len(r["captions"]) == 2 and r["captions"][0]["sub_captions"] for r in rows if r["status"] == "ok")


def test_attempts_are_counted_in_the_output_dir_and_bounded(tmp_path):
    table = unit_table([50, 51])
    # Three attempts that "crashed" (started, never committed): the next one gives up on the unit.
    for n in (1, 2, 3):
        assert stage(tmp_path, max_unit_attempts=3).begin_attempt("u") == n
    rows = stage(tmp_path, max_unit_attempts=3).caption_unit("u", table).to_pylist()
    assert {r["status"] for r in rows} == {"failed"}
    assert all("crashed on this unit 3 times" in r["error"] for r in rows)
    # Another unit is unaffected.
    assert {r["status"] for r in stage(tmp_path).caption_unit("v", table).to_pylist()} == {"ok"}


@pytest.mark.parametrize("policy", ["keep", "drop", "regenerate"])
def test_degenerate_captions(tmp_path, policy):
    rows = stage(tmp_path, post={"degenerate": policy}, fake={"loop_on_width": 61})
    out = rows.caption_unit("u", unit_table([50, 61])).to_pylist()
    good, looping = out[0]["captions"], out[1]["captions"]
    assert all("repetition" not in c["flags"] for c in good) and all("regenerated" not in c["flags"] for c in good)
    if policy == "keep":
        assert all("repetition" in c["flags"] and c["text"].startswith("a cat on a mat") for c in looping)
    elif policy == "drop":
        assert all(c["flags"][-1] == "dropped" and c["text"] == "" and c["sub_captions"] == [] for c in looping)
    else:  # the second generation has a repetition penalty, which breaks the fake engine's loop
        assert all(c["flags"] == ["regenerated"] and c["text"].startswith("A fake caption") for c in looping)
    assert [c["prompt"] for c in looping] == ["short", "detailed"]


def test_rows_across_chunks_keep_their_place_status_and_regenerated_captions(tmp_path, monkeypatch):
    """Chunks of 3 rows: a row that failed before this stage passes through untouched, an image that fails to
    decode fails its row only, and every looping caption is regenerated on its own row, whichever chunk it is in."""
    from recaption.job import captioning

    monkeypatch.setattr(captioning, "CHUNK_ROWS", 3)
    widths = [50, 61, 52, 61, 53, 54, 61, 55]
    table = unit_table(widths)
    status = table.column("status").to_pylist()
    status[4] = "failed"  # its read failed: this stage leaves it as it is
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    images = table.column("image").to_pylist()
    images[5] = images[5][:60]  # truncated
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    s = stage(tmp_path, post={"degenerate": "regenerate"}, fake={"loop_on_width": 61})
    rows = s.caption_unit("u", table).to_pylist()
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(len(widths))]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"] * 2 + ["ok"] * 2
    assert rows[4]["captions"] == [] and rows[4]["error"] is None
    assert rows[5]["error"].startswith("truncated image")
    from recaption.captioners.engines.fake import fake_caption

    looping = Image.new("RGB", (61, 40), (61, 80, 160))  # png(61): each regenerated caption is of its own image
    for i in (1, 3, 6):
        assert [c["flags"] for c in rows[i]["captions"]] == [["regenerated"]] * 2, i
        for c in rows[i]["captions"]:
            assert c["text"].startswith(fake_caption(looping, s.prompt_texts[c["prompt"]]).split(".")[0]), (i, c)
    assert all(len(r["captions"]) == 2 and not r["captions"][0]["flags"] for r in (rows[0], rows[2], rows[7]))
    assert [r["width"] for r in rows] == [*widths[:5], None, *widths[6:]]


@pytest.mark.parametrize("num_cpus", [0.5, 3.0])
def test_decoding_on_one_or_several_threads_gives_the_same_rows(tmp_path, num_cpus):
    table = unit_table([50, 51, 52, 53])
    images = table.column("image").to_pylist()
    images[1] = images[1][:60]  # a truncated PNG: only its row fails, with the reason
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    s = stage(tmp_path, num_cpus=num_cpus)
    assert s.decode_pool._max_workers == (3 if num_cpus == 3.0 else 1)
    rows = s.caption_unit("u", table).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1]["error"].startswith("truncated image") and rows[1]["image_sha256"] is None
    assert [r["width"] for r in rows] == [50, None, 52, 53] and all(len(r["captions"]) == 2 for r in rows[::2])
    assert rows[0]["image"] == images[0]  # a stage before another model's keeps the bytes


def test_a_unit_is_captioned_without_copying_its_image_bytes(tmp_path):
    """A 60 MB unit (200 noise JPEGs) through a caption stage: its own memory grows by far less than the unit, since
    the payload and each image are read in place (indexing the columns copied the unit twice: +120 MB)."""
    import asyncio
    import threading

    import numpy as np

    from recaption.job.captioning import actor_memory
    from recaption.job.stages import rows_table, unit_row

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=30
    )
    big = buf.getvalue()

    def batch(n: int) -> pa.Table:
        rows = [
            {"key": f"k{i}", "source": "s.tar", "unit": "u", "url": None, "alt_text": None, "width": None,
             "height": None, "image_sha256": None, "status": "ok", "error": None, "captions": [], "image": big}
            for i in range(n)
        ]  # fmt: skip
        return rows_table([unit_row("u", 0.0, pa.Table.from_pylist(rows, schema=PAYLOAD_SCHEMA))])

    cfg = ModelConfig(path="fake", engine="fake", prompts=["short"], batch_size=4)
    s = CaptionStage(
        cfg.model_dump(), {"short": get_prompt("short")}, PostprocessConfig().model_dump(), None,
        image_cfg={"max_side": 256}, keep_images=False,
    )  # fmt: skip

    async def caption(b: pa.Table) -> list[pa.Table]:
        return [out async for out in s(b)]

    asyncio.run(caption(batch(8)))  # threads, imports, the decoder's buffers
    unit = batch(200)
    assert unit.nbytes > 50 << 20
    before, peak, done = actor_memory()["own_mib"], [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], actor_memory()["own_mib"])
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        (out,) = asyncio.run(caption(unit))
    finally:
        done.set()
        sampler.join()
    assert out.num_rows == 1 and out.column("error")[0].as_py() is None
    assert peak[0] - before < 24, (before, peak[0])  # MiB

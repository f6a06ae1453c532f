"""Report: numbers of a hand-made output against hand-computed values; plots written; the page renders in Chromium."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from recaption.job.writer import OUTPUT_SCHEMA, open_output
from recaption.outputs.report import DistinctCounter, build_report, error_kind

CHROMIUM = Path("/usr/bin/chromium")
RUN_META = {
    "config": {"input": {"path": "/nowhere"}, "models": [{"name": "A"}, {"name": "B"}]},
    "config_hash": "h",
    "prompts": {"detailed": "Describe it.", "short": "Say it short."},
    "versions": {"recaption": "test"},
}


def cap(model, prompt, text, tokens, subs=1, finish="stop", flags=()):
    sub_captions = [text] if subs == 1 else [text[: len(text) // 2], text[len(text) // 2 :]][:subs]
    return {"model": model, "prompt": prompt, "text": text, "sub_captions": sub_captions, "n_tokens": tokens,
            "finish_reason": finish, "flags": list(flags)}  # fmt: skip


def row(key, unit, status="ok", error=None, captions=()):
    ok = status == "ok"
    return {"key": key, "source": f"{unit}.tar", "unit": unit, "url": None, "alt_text": None,
            "width": 8 if ok else None, "height": 8 if ok else None, "image_sha256": "0" * 64 if ok else None,
            "status": status, "error": error, "captions": list(captions)}  # fmt: skip


CUBE = "The red cube sits on a table."
HAND_MADE = {
    "u1": [
        row(
            "r1",
            "u1",
            captions=[
                cap("A", "detailed", CUBE, 8),
                cap("A", "short", "A red cube.", 4),
                cap("B", "detailed", "A red cube on a wooden table.", 9),
            ],
        ),  # fmt: skip
        row(
            "r2",
            "u1",
            captions=[
                cap("A", "detailed", f"{CUBE} {CUBE}", 16, subs=2, flags=["repetition"]),
                cap("A", "short", "Blue sky.", 3),
                cap("B", "detailed", "Blue sky over green hills.", 7),
            ],
        ),  # fmt: skip
        row("r3", "u1", "failed", "truncated image: image file is truncated (3 bytes not processed)"),
    ],
    "u2": [
        row("r4", "u2", "failed", "decompression bomb: 10000x10000 = 1e+08 pixels > max_pixels 89478485"),
        row(
            "r5",
            "u2",
            "failed",
            "model B prompt detailed: RuntimeError: CUDA out of memory",
            [
                cap("A", "detailed", "A dog.", 3),
                cap("A", "short", "A dog running.", 5, finish="length", flags=["truncated"]),
                cap("B", "detailed", "", 0, subs=0, finish="error", flags=["error"]),
            ],
        ),  # fmt: skip
        row("r6", "u2", "failed", "truncated image: broken data stream when reading image file"),
        row("r7", "u2", "skipped"),
    ],
}


def write_hand_made(out_dir: Path) -> Path:
    out = open_output(str(out_dir))
    for unit, rows in HAND_MADE.items():
        out.commit_unit(unit, pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), RUN_META, {"rows": len(rows)}, "zstd")
    return out_dir


def test_error_kinds_drop_names_and_numbers():
    assert error_kind("truncated tar 00003.tar: unexpected end (in sample '7'; 3 samples read)") == "truncated tar"
    assert error_kind("duplicate key 'k1' in a/00001.tar: the first row with it is kept") == "duplicate key … in"
    assert error_kind("model llava-7b: the engine crashed on this unit 3 times; gave up") == (
        "model llava-7b: the engine crashed on this unit … times"
    )
    assert error_kind("empty image: 0 bytes") == "empty image"
    assert error_kind("no image member for key 'x' (found .txt)") == "no image member for key"


def test_distinct_counter_is_exact_when_small_and_close_when_large():
    small, large = DistinctCounter(k=64), DistinctCounter(k=1024)
    for i in range(50):
        small.add(f"w{i % 40}")
    for i in range(60000):
        large.add(f"w{i % 40000}")
    assert small.exact and small.count() == 40
    assert not large.exact and abs(large.count() - 40000) / 40000 < 0.1


def test_report_numbers_match_hand_computed_values(tmp_path):
    report = build_report(str(write_hand_made(tmp_path / "out")))
    assert report["rows"] == 7 and report["status"] == {"ok": 2, "failed": 4, "skipped": 1}
    kinds = {e["kind"]: e["count"] for e in report["errors"]}
    assert kinds == {"truncated image": 2, "decompression bomb": 1, "model B: RuntimeError": 1}
    by = {(c["model"], c["prompt"]): c for c in report["captions"]}
    a = by["A", "detailed"]
    assert a["captions"] == 3 and a["error_captions"] == 0
    assert a["tokens"] | {"hist": None} == {
        "n": 3,
        "mean": 9.0,
        "p50": 8,
        "p90": 16,
        "p99": 16,
        "max": 16,
        "hist": None,
    }
    assert a["tokens"]["hist"] == [[3, 1], [8, 1], [16, 1]]
    assert a["words"]["mean"] == round(23 / 3, 4) and a["words"]["hist"] == [[2, 1], [7, 1], [14, 1]]
    assert a["sub_captions"]["hist"] == [[1, 2], [2, 1]]
    assert a["flags"] == {"repetition": 1} and a["flag_share"] == {"repetition": round(1 / 3, 4)}
    # words: the red cube sits on a table (×3) + a dog: 8 distinct of 23; bigrams 8 of 20; trigrams 7 of 17
    assert (a["vocab_size"], a["distinct_1"], a["distinct_2"], a["distinct_3"]) == (8, 0.3478, 0.4, 0.4118)
    assert a["openings"][0] == {"phrase": "the red cube", "count": 2, "share": 0.6667}
    short = by["A", "short"]
    assert short["tokens"]["mean"] == 4.0 and short["finish_reason"] == {"stop": 2, "length": 1}
    assert short["flags"] == {"truncated": 1} and short["words"]["mean"] == round(8 / 3, 4)
    b = by["B", "detailed"]
    assert b["captions"] == 3 and b["error_captions"] == 1 and b["tokens"]["mean"] == 8.0
    assert b["flags"] == {"error": 1} and b["finish_reason"] == {"stop": 2, "error": 1}
    # r1: {red cube sits table} vs {red cube wooden table} = 3/5; r2: nothing shared = 0; r5: B failed, no pair
    assert report["agreement"] == [{"models": ["A", "B"], "prompt": "detailed", "mean_jaccard": 0.3, "images": 2}]

    folder = tmp_path / "out" / "_report"
    assert json.loads((folder / "report.json").read_text())["captions"] == report["captions"]
    assert set(report["plots"]) == {"status.png", "tokens.png", "words.png", "sub_captions.png", "flags.png",
                                    "agreement.png"}  # fmt: skip
    for name in report["plots"]:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.width > 300 and sum(1 for c in im.convert("L").histogram() if c) > 10, name
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "truncated image" in page and "the red cube" in page


def test_word_statistics_on_a_sample_of_rows(tmp_path):
    report = build_report(str(write_hand_made(tmp_path / "out")), text_sample=3)
    assert report["text_sample_rate"] == round(3 / 7, 6) and report["rows"] == 7
    a = next(c for c in report["captions"] if (c["model"], c["prompt"]) == ("A", "detailed"))
    # counts cover every row; word statistics the rows whose key hashes below the rate (here r1 and r5)
    assert a["tokens"]["n"] == 3 and a["text_sampled"] == 2 and a["openings"][0]["count"] == 1


@pytest.mark.slow
def test_report_page_renders_in_headless_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install chromium to run this test")
    build_report(str(write_hand_made(tmp_path / "out")))
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,4000"]  # fmt: skip
    page = (tmp_path / "out" / "_report" / "index.html").as_uri()
    subprocess.run([str(CHROMIUM), *flags, page], check=True, capture_output=True, timeout=120)
    with Image.open(io.BytesIO(shot.read_bytes())) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    assert rgb.shape == (4000, 1200, 3)
    dark = (rgb.mean(axis=-1) < 200).sum()
    assert dark > 0.01 * 1200 * 4000, "the screenshot is (nearly) blank"
    # The plots' own colours, which no text or table of the page has, prove the PNGs were decoded and drawn:
    # the bars (#4c72b0) and the first histogram series (matplotlib's C0, #1f77b4).
    for colour in ((0x4C, 0x72, 0xB0), (0x1F, 0x77, 0xB4)):
        near = (np.abs(rgb - np.array(colour)).max(axis=-1) <= 12).sum()
        assert near > 2000, f"too few plot pixels of colour {colour}: {near}"
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_the_engines_of_the_last_run_are_in_the_report(tmp_path, ray_session):
    """A real run reports each model's engine (busy, in flight, waiting, tokens/s) with every unit; the report shows
    the last figures and plots their history."""
    from recaption.config import load_config
    from recaption.job.pipeline import run_pipeline
    from tests.data import write_webdataset_dir

    write_webdataset_dir(tmp_path / "in", 6, shard_size=2)
    model = {"path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25, "fake": {"delay_s": 0.02}}
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    run_pipeline(load_config(None, data=data), progress=False)
    progress = json.loads((tmp_path / "out" / "_progress.json").read_text())
    fake = progress["engines"]["fake"]
    assert fake["actors"] == 1 and 0 < fake["busy"] <= 1 and fake["out_tokens_per_s"] > 0
    assert len(progress["engine_history"]) == 3 and all("fake" in p for p in progress["engine_history"])
    report = build_report(str(tmp_path / "out"))
    assert report["engines"]["fake"] == fake and "engines.png" in report["plots"]
    page = (tmp_path / "out" / "_report" / "index.html").read_text()
    assert "Engines (last run)" in page and "alt='engines.png'" in page

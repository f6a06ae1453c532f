"""The report opens with a gallery: a seeded sample of rows (failed ones with their error), thumbnails made from the
source, every model's and prompt's caption side by side with its flags; `recaption inspect` writes the same page.
Checked in the HTML, in report.json, and drawn by headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from recaption.cli import main
from recaption.config import load_config
from recaption.job.pipeline import run_pipeline
from recaption.outputs.inspect import inspect_output
from recaption.outputs.report import build_report
from recaption.sources.tar import write_webdataset
from tests.data import image_corpus

CHROMIUM = "/usr/bin/chromium"
MAGENTA = (255, 0, 255)  # every source image is this colour: no text, table or plot of the page has it
LOOP_WIDTH = 97  # the fake engine writes a repetition loop (flagged) for images this wide
ACCENT, FLAG = (0xB0, 0x00, 0x6A), (0x6A, 0x3D, 0xCC)  # the gallery's failed-card and flag-badge colours


def solid(width: int, height: int = 90, colour: tuple[int, int, int] = MAGENTA) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def output(tmp_path_factory, ray_session):
    """A real run of two fake models with two prompts over 9 good images (one gets a flagged caption; each has a
    similarity, which img2dataset-style inputs keep) and 3 bad."""
    root = tmp_path_factory.mktemp("gallery")
    samples = [{"key": f"img{i}", "png": solid(LOOP_WIDTH if i == 4 else 100 + 10 * i), "json": {"similarity": i / 8}}
               for i in range(9)]  # fmt: skip
    samples += [{"key": key, ext: data} for key, ext, data, err in image_corpus() if err][:3]
    write_webdataset(str(root / "in"), samples, shard_size=5)
    fake = {"path": "fake", "engine": "fake", "prompts": ["short", "detailed"], "num_cpus": 0.25,
            "fake": {"loop_on_width": LOOP_WIDTH}}  # fmt: skip
    data = {"input": {"path": str(root / "in")}, "output": {"path": str(root / "out")},
            "models": [{**fake, "name": "alpha"}, {**fake, "name": "beta"}]}  # fmt: skip
    summary = run_pipeline(load_config(None, data=data), progress=False)
    assert (summary.ok, summary.failed) == (9, 3)
    return root


def thumbnails(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r"data:image/jpeg;base64,([^']+)", page)]


def test_the_report_opens_with_a_seeded_gallery_of_thumbnails_and_side_by_side_captions(output):
    report = build_report(str(output / "out"), gallery=8, seed=3)
    gallery = report["gallery"]
    rows = gallery["rows"]
    assert len(rows) == 8 and gallery["seed"] == 3 and gallery["note"] is None
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["error"] and not r["captions"] for r in failed)  # a quarter of the cards
    for r in rows:
        if r["status"] == "ok":
            assert r["thumbnail"] and {(c["model"], c["prompt"]) for c in r["captions"]} == {
                ("alpha", "short"), ("alpha", "detailed"), ("beta", "short"), ("beta", "detailed")
            }  # fmt: skip
    again = build_report(str(output / "out"), gallery=8, seed=3)["gallery"]["rows"]
    assert [(r["unit"], r["key"]) for r in again] == [(r["unit"], r["key"]) for r in rows]
    other = build_report(str(output / "out"), gallery=8, seed=4)["gallery"]["rows"]
    assert {r["key"] for r in other} != {r["key"] for r in rows}

    page = (output / "out" / "_report" / "index.html").read_text()
    assert page.index("<h2>Gallery</h2>") < page.index("<h2>Rows</h2>")  # the page opens with it
    shown = thumbnails(page)  # seed 4's page: a thumbnail per ok row; the failed rows' images cannot be decoded
    assert len(shown) == sum(r["thumbnail"] for r in other) == sum(r["status"] == "ok" for r in other) == 6
    for im in shown:  # made from the source (its colour), at most 256 px
        assert max(im.size) <= 256 and np.abs(np.asarray(im.convert("RGB"), int) - MAGENTA).mean() < 12
    assert page.count("class='card failed'") == 2 and "no thumbnail: " in page
    assert "<th>alpha</th><th>beta</th>" in page
    # Kept source fields come with their card.
    assert all(r["fields"]["similarity"] == int(r["key"][3:]) / 8 for r in other if r["status"] == "ok")
    assert all(f"similarity: {r['fields']['similarity']}<" in page or f"similarity: {r['fields']['similarity']} " in page
               for r in other if r["status"] == "ok")  # fmt: skip


def test_flags_errors_and_a_moved_input(output, tmp_path):
    # Every row: the flagged caption and every failure are in the gallery.
    report = build_report(str(output / "out"), gallery=12)
    rows = {r["key"]: r for r in report["gallery"]["rows"]}
    assert len(rows) == 12 and all(c["flags"] == ["repetition"] for c in rows["img4"]["captions"])
    page = (output / "out" / "_report" / "index.html").read_text()
    assert page.count("<span class=flag>repetition</span>") == 4 and "truncated image" in page
    # The input moved: the report still opens with the gallery, without thumbnails, and says why.
    moved = tmp_path / "moved"
    shutil.copytree(output / "out", tmp_path / "out")
    shutil.move(output / "in", moved)
    try:
        report = build_report(str(tmp_path / "out"), gallery=4)
        assert "could not be read" in report["gallery"]["note"] and len(report["gallery"]["rows"]) == 4
        assert not any(r["thumbnail"] for r in report["gallery"]["rows"])
        report = build_report(str(tmp_path / "out"), gallery=4, input_path=str(moved))
        assert report["gallery"]["note"] is None and any(r["thumbnail"] for r in report["gallery"]["rows"])
        # Another input with the same keys: no thumbnail of an image that is not the one captioned.
        other = [{"key": f"img{i}", "png": solid(100 + 10 * i, colour=(0, 200, 0))} for i in range(9)]
        write_webdataset(str(tmp_path / "other"), other, shard_size=5)
        report = build_report(str(tmp_path / "out"), gallery=4, input_path=str(tmp_path / "other"))
        assert "differ from the ones captioned" in report["gallery"]["note"]
        assert not any(r["thumbnail"] for r in report["gallery"]["rows"])
    finally:
        shutil.move(moved, output / "in")
    assert main(["report", str(tmp_path / "out"), "--gallery", "0"]) == 0
    assert "<h2>Gallery</h2>" not in (tmp_path / "out" / "_report" / "index.html").read_text()


def test_inspect_writes_the_same_gallery_for_chosen_keys(output, tmp_path):
    inspect_output(str(output / "out"), keys=["img4", "zero-bytes"], out_dir=str(tmp_path / "i"), stream=io.StringIO())
    page = (tmp_path / "i" / "index.html").read_text()
    assert "class=gallery" in page and "src='img4.png'" in page and "<th>alpha</th><th>beta</th>" in page
    assert page.count("<div class='card") == 2 and "class='card failed'" in page and "empty image" in page


def test_the_gallery_renders_in_headless_chromium(output, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium to run this test")
    build_report(str(output / "out"), gallery=12)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000"]  # fmt: skip
    page = (output / "out" / "_report" / "index.html").as_uri()
    subprocess.run([CHROMIUM, *flags, page], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    assert rgb.shape == (3000, 1200, 3)

    def near(colour: tuple[int, int, int], tolerance: int = 14) -> int:
        return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= tolerance).sum())

    # 9 thumbnails of about 100..180 × 90 px decoded and drawn; the failed cards' accent and a flag badge drawn.
    assert near(MAGENTA, 24) > 9 * 80 * 80, near(MAGENTA, 24)
    assert near(ACCENT) > 3 * 8 * 60, near(ACCENT)
    assert near(FLAG) > 4 * 200, near(FLAG)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)

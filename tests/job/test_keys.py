"""Row identity: `key` is unique within a unit, `(unit, key)` within an output. The same key in two tars, two
Parquet files or (made unique at planning) two folder files never merges two rows in export, inspect or report."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.sources.tar import write_webdataset
from tests.data import make_image
from tests.job.test_pipeline import make_config

JAPANESE = "日本語のファイル名の写真"  # 12 characters: 108 bytes percent-encoded, past USTAR's 100-byte names


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_session) -> dict[str, tuple[Path, dict]]:
    """Real runs (fake engine) over three inputs whose keys repeat across units; per format (output dir, the
    source image of each (unit, key))."""
    from recaption.job.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("keys")
    keys = ["dup", "a0", "a1", "dup", "b0", " "]  # 00000.tar, 00001.tar; " " is a blank key
    write_webdataset(str(root / "tar"), [{"key": k, "jpg": make_image(i)} for i, k in enumerate(keys)], shard_size=3)
    (root / "folder").mkdir()
    files = {"a.jpg": 20, "a.png": 21, "b.jpg": 22, f"{JAPANESE}.jpg": 23}  # unit_size 1: a.jpg, a.png apart
    for name, i in files.items():
        (root / "folder" / name).write_bytes(make_image(i, fmt="PNG" if name.endswith("png") else "JPEG"))
    (root / "pq").mkdir()
    for f, keys in enumerate([["dup", "p0"], ["dup", "p1", ""]]):
        images = pa.array([make_image(30 + 10 * f + i) for i in range(len(keys))], pa.binary())
        pq.write_table(pa.table({"image": images, "key": keys}), root / "pq" / f"part-{f:05d}.parquet")
    for name, unit_size in (("tar", 10), ("folder", 1), ("pq", 10)):
        cfg = make_config(root / name, root / f"{name}-out", input={"path": str(root / name), "unit_size": unit_size})
        run_pipeline(cfg, progress=False)
    found = {}
    for name in ("tar", "folder", "pq"):
        rows = pads.dataset(str(root / f"{name}-out"), format="parquet").to_table().to_pylist()
        found[name] = (root / f"{name}-out", {(r["unit"], r["key"]): r for r in rows})
    return found


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_every_input_row_is_one_row_unique_by_unit_and_key(outputs):
    expected = {
        "tar": {("00000", "dup"), ("00000", "a0"), ("00000", "a1"), ("00001", "dup"), ("00001", "b0"),
                ("00001", "00001/2")},  # the blank key became <shard stem>/<index>
        "folder": {("images-s0000", "a.jpg"), ("images-s0001", "a.png"), ("images-s0002", "b"),
                   ("images-s0003", JAPANESE)},
        "pq": {("part-00000-s0000", "dup"), ("part-00000-s0000", "p0"), ("part-00001-s0000", "dup"),
               ("part-00001-s0000", "p1"), ("part-00001-s0000", "part-00001/2")},
    }  # fmt: skip
    for name, (out, rows) in outputs.items():
        table = pads.dataset(str(out), format="parquet").to_table()
        assert table.num_rows == len(rows) == len(expected[name]) and set(rows) == expected[name], name
        assert all(r["status"] == "ok" for r in rows.values()), name


@pytest.mark.parametrize("name", ["tar", "folder", "pq"])
def test_webdataset_export_gives_every_row_its_own_sample(outputs, tmp_path, name):
    out, rows = outputs[name]
    code, stdout, stderr = cli("export", str(out), "--to", "webdataset", str(tmp_path / "wds"), "--shard-size", "3")
    assert (code, stderr) == (0, "")
    renamed = {"tar": 2, "folder": 0, "pq": 2}[name]
    assert f"exported {len(rows)} rows" in stdout and (f"{renamed} samples named KEY@UNIT" in stdout) == bool(renamed)
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                stem, _, ext = m.name.partition(".")
                assert ext not in samples.setdefault(stem, {}), f"two samples named {stem}"
                samples[stem][ext] = tf.extractfile(m).read()
    assert len(samples) == len(rows)
    for stem, sample in samples.items():
        meta = json.loads(sample["json"])
        row = rows[(meta["unit"], meta["key"])]
        if "@" in stem:  # KEY@UNIT, percent-encoded: splits back into the row's identity
            key, unit = (unquote(s) for s in stem.rsplit("@", 1))
            assert (unit, key) == (row["unit"], row["key"]) and key == "dup"
        else:
            assert unquote(stem) == row["key"]
        image = sample.get("jpg") or sample.get("png")
        assert hashlib.sha256(image).hexdigest() == row["image_sha256"]
    assert not [p for p in (tmp_path / "wds").iterdir() if p.name.startswith(".")]


def test_a_long_unicode_key_exports_as_a_pax_member(outputs, tmp_path):
    out, rows = outputs["folder"]
    code, _, stderr = cli("export", str(out), "--to", "webdataset", str(tmp_path / "wds"))
    assert (code, stderr) == (0, "")
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tf:
        names = {unquote(m.name.partition(".")[0]) for m in tf.getmembers()}
    assert JAPANESE in names


def test_inspect_shows_every_row_with_a_key_and_picks_one_unit(outputs, tmp_path):
    out, rows = outputs["tar"]
    code, stdout, stderr = cli("inspect", str(out), "--key", "dup", "--out", str(tmp_path / "both"))
    assert (code, stderr) == (0, "")
    assert "key 'dup' is in 2 units (00000, 00001)" in stdout and "--unit U" in stdout
    assert "== dup  [ok]" in stdout and "unit=00000" in stdout and "unit=00001" in stdout
    pngs = sorted(p.name for p in (tmp_path / "both").glob("*.png"))
    assert len(pngs) == 2 and all(p.startswith("dup_0000") for p in pngs)
    code, stdout, _ = cli("inspect", str(out), "--key", "dup", "--unit", "00001", "--out", str(tmp_path / "one"))
    assert code == 0 and "unit=00001" in stdout and "unit=00000" not in stdout
    assert [p.name for p in (tmp_path / "one").glob("*.png")] == ["dup.png"]
    with open(tmp_path / "one" / "dup.png", "rb") as f:
        from PIL import Image

        assert Image.open(f).size == (rows[("00001", "dup")]["width"], rows[("00001", "dup")]["height"])
    code, _, stderr = cli("inspect", str(out), "--key", "a0", "--unit", "00001", "--out", str(tmp_path / "none"))
    assert code == 1 and stderr == "error: no row with key 'a0' in unit 00001; units with that key: 00000\n"


def test_sampling_draws_rows_not_keys(outputs, tmp_path):
    out, rows = outputs["pq"]
    code, stdout, _ = cli("inspect", str(out), "--sample", "10", "--out", str(tmp_path / "s"))
    assert code == 0 and stdout.count("== ") == len(rows) == 5
    assert len(list((tmp_path / "s").glob("*.png"))) == 5
    code, stdout, _ = cli("inspect", str(out), "--sample", "10", "--unit", "part-00000-s0000", "--out", str(tmp_path))
    assert code == 0 and stdout.count("== ") == 2 and "part-00001" not in stdout


def test_report_counts_rows_that_share_a_key(outputs, tmp_path):
    from recaption.outputs.report import build_report

    out, rows = outputs["tar"]
    report = build_report(str(out))
    assert report["rows"] == len(rows) == 6 and report["status"]["ok"] == 6

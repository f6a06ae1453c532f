"""Export round trips: webdataset tars, a Hugging Face dataset and JSONL read back give the output's rows."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from PIL import Image

from recaption.cli import main
from recaption.errors import ConfigError, RecaptionError
from recaption.outputs.export import export_output, tar_key
from recaption.sources.tar import write_webdataset
from tests.data import make_image
from tests.job.test_pipeline import make_config


def gif_image() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (40, 30), 3).save(buf, format="GIF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, ray_session):
    """A real pipeline output (fake engine) of 7 images in 2 shards: 5 JPEGs, a GIF stored as .png, one bad."""
    from recaption.job.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("export")
    samples = [{"key": f"im{i}", "jpg": make_image(i), "caption": f"alt {i}", "url": f"http://x/{i}"} for i in range(5)]
    samples.insert(2, {"key": "gif", "png": gif_image(), "caption": "a gif"})
    samples.append({"key": "bad", "jpg": b"not an image at all", "caption": "broken"})
    write_webdataset(str(root / "in"), samples, shard_size=4)
    run_pipeline(make_config(root / "in", root / "out"), progress=False)
    table = pads.dataset(str(root / "out"), format="parquet").to_table()
    return root, {r["key"]: r for r in table.to_pylist()}


def read_tars(dest: Path) -> dict[str, dict[str, bytes]]:
    """Members of every shard grouped by key (the stem up to the basename's first dot), with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(dest.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_webdataset_tars_hold_the_ok_rows_with_their_source_images(captioned, tmp_path):
    root, rows = captioned
    summary = export_output(str(root / "out"), "webdataset", str(tmp_path / "wds"), shard_size=4)
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert summary["rows"] == len(ok) == 6 and rows["bad"]["status"] == "failed"
    samples = read_tars(tmp_path / "wds")
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 2 and sorted(samples) == sorted(tar_key(k) for k in ok)
    for key, row in ok.items():
        sample = samples[tar_key(key)]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["captions"] == row["captions"] and meta["alt_text"] == row["alt_text"]
        assert sample["txt"].decode() == row["captions"][0]["text"] == meta["caption"]
        if key == "gif":  # not a format trainers' loaders expect in a tar: converted to PNG, same pixels size
            assert Image.open(io.BytesIO(sample["png"])).size == (row["width"], row["height"])
        else:
            assert hashlib.sha256(sample["jpg"]).hexdigest() == row["image_sha256"]
    assert not (tmp_path / "wds" / "failed.jsonl").exists()


def test_webdataset_package_reads_the_export_and_failed_rows_go_beside_it(captioned, tmp_path):
    wds = pytest.importorskip("webdataset")
    root, rows = captioned
    summary = export_output(str(root / "out"), "webdataset", str(tmp_path / "wds"), include_failed=True)
    assert (summary["rows"], summary["failed_rows"]) == (6, 1)
    failed = [json.loads(line) for line in (tmp_path / "wds" / "failed.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failed] == ["bad"] and failed[0]["error"] == rows["bad"]["error"]
    shards = [str(p) for p in sorted((tmp_path / "wds").glob("*.tar"))]
    read = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(read) == 6
    for sample in read:
        row = rows[sample["json"]["key"]]
        image = sample.get("jpg") or sample.get("png")
        assert image.size == (row["width"], row["height"]) and sample["json"]["captions"] == row["captions"]


def test_hf_dataset_loads_with_images_and_captions(captioned, tmp_path):
    import datasets

    root, rows = captioned
    summary = export_output(str(root / "out"), "hf", str(tmp_path / "hf"), include_failed=True, caption="fake/short")
    assert (summary["rows"], summary["images"]) == (7, 6)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and ds.num_rows == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for got in ds:
        row = rows[got["key"]]
        assert got["captions"] == row["captions"] and got["status"] == row["status"]
        assert got["caption"] == (row["captions"][1]["text"] if row["captions"] else None)
        if row["status"] == "ok":
            assert got["image"].size == (row["width"], row["height"])
        else:
            assert got["image"] is None and got["error"] == row["error"]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_jsonl_holds_every_row_and_caption(captioned, tmp_path, name):
    root, rows = captioned
    dest = tmp_path / name
    export_output(str(root / "out"), "jsonl", str(dest), caption="alt_text")
    text = gzip.decompress(dest.read_bytes()).decode() if name.endswith(".gz") else dest.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["key"] for r in lines) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    for got in lines:
        row = rows[got["key"]]
        assert got["captions"] == row["captions"] and got["caption"] == row["alt_text"] and got["url"] == row["url"]
        assert {k: got[k] for k in ("width", "height", "image_sha256", "source")} == {
            k: row[k] for k in ("width", "height", "image_sha256", "source")
        }


def test_tar_keys_keep_webdataset_grouping():
    from urllib.parse import unquote

    assert tar_key("000000042") == "000000042" and tar_key("dir/cat.1") == "dir/cat%2E1"
    assert tar_key("data.parquet/12") == "data%2Eparquet/12" and tar_key("k4#dup1") == "k4#dup1"
    # Distinct keys, distinct samples: the encoding is reversible, and a `/` that would make an empty path part
    # (leading, trailing, doubled) is encoded with every other `/` of the key.
    keys = ["abs", "/abs", "//abs", "a/b", "a//b", "a/b/", "a_b", "a%2Fb", "a.b", "a%2Eb", "_", "x y"]
    stems = [tar_key(k) for k in keys]
    assert len(set(stems)) == len(keys) and [unquote(s) for s in stems] == keys
    assert tar_key("/abs") == "%2Fabs" and tar_key("a//b") == "a%2F%2Fb"
    assert all("." not in s and "" not in s.split("/") for s in stems)
    with pytest.raises(RecaptionError, match="empty key"):
        tar_key("")


def test_hf_export_refuses_a_remote_destination(captioned, tmp_path, monkeypatch):
    root, _ = captioned
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--to hf writes a local directory, not s3://bucket/ds"):
        export_output(str(root / "out"), "hf", "s3://bucket/ds")
    assert not (tmp_path / "s3:").exists()
    summary = export_output(str(root / "out"), "hf", f"file://{tmp_path / 'local'}")
    assert summary["rows"] == 6 and (tmp_path / "local" / "dataset_info.json").exists()


def test_export_refuses_an_unknown_caption_choice_and_a_changed_source(captioned, tmp_path):
    root, rows = captioned
    with pytest.raises(ConfigError, match="fake/detailed"):
        export_output(str(root / "out"), "jsonl", str(tmp_path / "x.jsonl"), caption="llava/short")
    with pytest.raises(ConfigError, match="--to"):
        export_output(str(root / "out"), "csv", str(tmp_path / "x.csv"))
    moved = tmp_path / "moved"
    shutil.copytree(root / "in", moved)
    samples = [{"key": f"im{i}", "jpg": make_image(100 + i)} for i in range(2)]  # same keys, other images
    samples += [{"key": "gif", "png": gif_image()}, {"key": "im2", "jpg": make_image(2)}]
    write_webdataset(str(moved), samples, shard_size=4)  # rewrites the first shard only
    with pytest.raises(RecaptionError, match="not the one captioned"):
        export_output(str(root / "out"), "webdataset", str(tmp_path / "wds"), input_path=str(moved))


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_export_refuses_a_dest_it_would_overwrite_or_mix_with_the_output(captioned, tmp_path):
    root, _ = captioned
    out = root / "out"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    (tmp_path / "rows.jsonl").write_text("a user's rows\n")
    (tmp_path / "link").symlink_to(out)
    cases = [
        ("webdataset", tmp_path / "full", "is a non-empty directory"),
        ("hf", tmp_path / "full", "is a non-empty directory"),
        ("jsonl", tmp_path / "full", "exists; give a new file name"),
        ("jsonl", tmp_path / "rows.jsonl", "exists; give a new file name"),
        ("webdataset", tmp_path / "rows.jsonl", "is a file"),
        ("webdataset", out, "lies inside the output"),
        ("webdataset", out / "wds", "lies inside the output"),
        ("hf", out / "hf", "lies inside the output"),
        ("jsonl", out / "rows.jsonl", "lies inside the output"),
        ("webdataset", tmp_path / "link" / "wds", "lies inside the output"),  # the output by another name
        ("webdataset", root, "the output .* lies inside DEST"),
    ]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for to, dest, message in cases:
        code, stdout, stderr = cli("export", str(out), "--to", to, str(dest))
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, (to, dest, stderr)
        assert re.search(message, stderr) and "Traceback" not in stderr, (to, dest, stderr)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert (tmp_path / "full" / "mine.txt").read_text() == "a user's file"
    assert (tmp_path / "rows.jsonl").read_text() == "a user's rows\n"
    (tmp_path / "empty").mkdir()
    assert cli("export", str(out), "--to", "webdataset", str(tmp_path / "empty"))[0] == 0


def test_a_failed_export_leaves_no_partial_tar(captioned, tmp_path):
    root, _ = captioned
    moved = tmp_path / "moved"
    shutil.copytree(root / "in", moved)
    samples = [{"key": f"im{i}", "jpg": make_image(i)} for i in range(2)] + [{"key": "gif", "png": gif_image()}]
    samples.append({"key": "im2", "jpg": make_image(102)})  # the 4th image changed: found while writing the tar
    write_webdataset(str(moved), samples, shard_size=4)
    code, stdout, stderr = cli("export", str(root / "out"), "--to", "webdataset", str(tmp_path / "wds"),
                               "--input", str(moved), "--include-failed")  # fmt: skip
    assert code == 1 and stderr.count("\n") == 1 and "is not the one captioned" in stderr
    assert list((tmp_path / "wds").iterdir()) == []  # no partial tar, no temporary file, no failed.jsonl
    code, _, stderr = cli("export", str(root / "out"), "--to", "hf", str(tmp_path / "hf"), "--input", str(moved))
    last = stderr.splitlines()[-1]  # after the progress bar of `datasets`
    assert code == 1 and last.startswith("error: ") and "is not the one captioned" in last and "Traceback" not in stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".recaption-tmp-*"))
    code, _, stderr = cli("export", str(root / "out"), "--to", "jsonl", str(tmp_path / "x.jsonl"), "--caption", "x/y")
    assert code == 2 and not (tmp_path / "x.jsonl").exists() and not list(tmp_path.glob(".recaption-tmp-*"))


def test_a_disk_full_while_writing_a_tar_leaves_earlier_shards_whole_and_no_partial_one(
    captioned, tmp_path, monkeypatch
):
    root, _ = captioned
    real_addfile, calls = tarfile.TarFile.addfile, []

    def addfile(self, tarinfo, fileobj=None):
        calls.append(tarinfo.name)
        if len(calls) == 14:  # the 2nd tar (4 samples × 3 members in the 1st), part-way
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    code, _, stderr = cli("export", str(root / "out"), "--to", "webdataset", str(tmp_path / "wds"), "--shard-size", "4")
    assert code == 1 and stderr.count("\n") == 1 and "No space left on device" in stderr and str(tmp_path) in stderr
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tf:
        assert len(tf.getmembers()) == 12

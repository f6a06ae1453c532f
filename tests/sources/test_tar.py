"""Webdataset tars: round trip, and one row per sample whatever is wrong with the tar."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from recaption.config import InputConfig
from recaption.sources.read import read_unit
from recaption.sources.tar import split_key, unsafe_name, write_webdataset
from recaption.sources.units import WorkUnit
from tests.data import make_image, write_webdataset_dir

CFG = InputConfig(path="unused")


def build_tar(members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


def read(tmp_path, data: bytes, name: str = "00000.tar") -> list:
    path = tmp_path / name
    path.write_bytes(data)
    return list(read_unit(WorkUnit("00000", name, str(path), "webdataset"), CFG))


def sample(key: str, i: int) -> list[tuple[str, bytes]]:
    meta = f'{{"url": "http://x/{i}", "caption": "json caption {i}", "key": "{key}"}}'.encode()
    return [(f"{key}.jpg", make_image(i)), (f"{key}.json", meta), (f"{key}.txt", f"alt {i}".encode())]


def test_split_key_and_unsafe_names():
    assert split_key("dir/000042.jpg") == ("dir/000042", "jpg")
    assert split_key("./k.seg.PNG") == ("k", "seg.png")
    assert split_key("README") == ("README", "")
    assert all(unsafe_name(n) for n in ["../x.jpg", "/abs.jpg", "a/../../x.jpg", "C:x.jpg", "a\\b.jpg"])
    assert not unsafe_name("a/b..c.jpg")


def test_round_trip(tmp_path):
    keys = write_webdataset_dir(tmp_path / "wds", 7, 3)
    records = []
    for i, name in enumerate(["00000.tar", "00001.tar", "00002.tar"]):
        unit = WorkUnit(f"{i:05d}", name, str(tmp_path / "wds" / name), "webdataset")
        records += list(read_unit(unit, CFG))
    assert [r.key for r in records] == keys
    assert all(r.error is None for r in records)
    assert records[4].image == make_image(4)
    assert (records[4].url, records[4].alt_text) == ("http://example.com/4.jpg", "caption 4")


def test_writer_output_is_deterministic_and_img2dataset_shaped(tmp_path):
    samples = [{"key": "k1", "png": make_image(1, fmt="PNG"), "caption": "c", "url": "u", "json": {"extra": 1}}]
    [uri] = write_webdataset(str(tmp_path / "a"), samples, prefix="p-")
    write_webdataset(str(tmp_path / "b"), samples, prefix="p-")
    assert uri.endswith("p-00000.tar")
    assert (tmp_path / "a" / "p-00000.tar").read_bytes() == (tmp_path / "b" / "p-00000.tar").read_bytes()
    with tarfile.open(uri) as tf:
        assert tf.getnames() == ["k1.png", "k1.json", "k1.txt"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "p-00000.parquet",
        "p-00000.tar",
        "p-00000_stats.json",
    ]


def test_json_caption_when_no_txt(tmp_path):
    [rec] = read(tmp_path, build_tar(sample("k", 1)[:2]))
    assert (rec.alt_text, rec.url, rec.error) == ("json caption 1", "http://x/1", None)


def test_unsafe_and_special_members_become_error_records(tmp_path):
    members = sample("a", 0) + [("../evil.jpg", make_image(1)), ("/abs/x.jpg", make_image(2))] + sample("b", 3)
    records = read(tmp_path, build_tar(members, links=("c.jpg",)))
    assert [r.key for r in records] == ["a", "../evil", "/abs/x", "b", "c"]
    assert [r.error is None for r in records] == [True, False, False, True, False]
    assert "unsafe member name '../evil.jpg'" in records[1].error and records[1].image is None
    assert "unsafe member name '/abs/x.jpg'" in records[2].error
    assert "link or special file" in records[4].error
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_duplicate_keys_keep_every_row(tmp_path):
    members = sample("k", 0) + sample("other", 1) + sample("k", 2) + [("k.jpg", make_image(3))]
    records = read(tmp_path, build_tar(members))
    assert [r.key for r in records] == ["k", "other", "k#dup1", "k#dup2"]
    assert records[0].image == make_image(0) and records[0].error is None
    assert all("duplicate key 'k'" in r.error and r.image is None for r in records[2:])
    assert records[2].url == "http://x/2"  # what we know of the duplicate is kept


def test_sample_without_image(tmp_path):
    members = sample("a", 0) + sample("b", 1)[1:] + [("README", b"hi")] + sample("c", 2)
    records = read(tmp_path, build_tar(members))
    assert [r.key for r in records] == ["a", "b", "README", "c"]
    assert records[1].error == "no image member for key 'b' (found .json, .txt)"
    assert records[1].alt_text == "alt 1" and records[1].url == "http://x/1"
    assert "no image member for key 'README'" in records[2].error


def complete_tar(n: int) -> tuple[bytes, list[int]]:
    """A tar of n samples and the byte offsets where each sample's members end."""
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n):
            for name, data in sample(f"{i:03d}", i):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            ends.append(tf.offset)
    return buf.getvalue(), ends


@pytest.mark.parametrize("where", ["mid-image", "block-boundary", "mid-header", "last-block"])
def test_truncated_tar_gives_rows_so_far_and_one_error(tmp_path, where):
    data, ends = complete_tar(4)
    cut = {
        "mid-image": ends[1] + 512 + 100,  # inside sample 2's image data
        "block-boundary": ends[1],  # exactly between samples 1 and 2: tarfile alone would see a clean end
        "mid-header": ends[1] + 200,
        "last-block": ends[3],  # every sample there, end-of-archive blocks missing
    }[where]
    records = read(tmp_path, data[:cut])
    ok = [r for r in records if r.error is None]
    assert [r.key for r in ok] == ["000", "001", "002", "003"][: 4 if where == "last-block" else 2]
    [bad] = [r for r in records if r.error is not None]
    assert (
        records[-1] is bad and "truncated tar 00000.tar" in bad.error and "the rest of the shard is lost" in bad.error
    )
    assert bad.key == ("002" if where == "mid-image" else "00000#truncated")


def test_garbage_and_empty_files_are_error_rows(tmp_path):
    [rec] = read(tmp_path, b"this is not a tar at all" * 40)
    assert rec.key == "00000#truncated" and "truncated tar" in rec.error
    [rec] = read(tmp_path, b"", name="empty.tar")
    assert rec.key == "empty#truncated" and rec.error


def test_gzipped_tar_and_a_cut_one(tmp_path):
    data, _ = complete_tar(2)
    records = read(tmp_path, gzip.compress(data), name="00000.tar.gz")
    assert [(r.key, r.error) for r in records] == [("000", None), ("001", None)]
    records = read(tmp_path, gzip.compress(data)[:-20], name="00000.tar.gz")
    # pyarrow's decompressor may notice the cut on its first read, before any sample comes out
    assert all(r.error is None for r in records[:-1]) and "truncated tar 00000.tar.gz" in records[-1].error


def test_blank_keys_get_the_shard_and_sample_index(tmp_path):
    # A member ` .jpg` has the key " "; like a row without a key it becomes `<shard stem>/<index>`, never a blank
    # `ok` row that a webdataset export could not name.
    records = read(tmp_path, build_tar(sample("k0", 0) + [(" .jpg", make_image(1)), ("\t.jpg", make_image(2))]))
    assert [r.key for r in records] == ["k0", "00000/1", "00000/2"]
    assert all(r.error is None for r in records) and records[2].image == make_image(2)

"""Planning: formats detected from the files, units cut from metadata, bookkeeping files ignored, empty inputs refused."""

from __future__ import annotations

import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources.plan import detect_format, plan_units, unit_id
from tests.data import (
    make_image,
    write_hf_dataset,
    write_image_folder,
    write_parquet_dataset,
    write_webdataset_dir,
)


def cfg(path, **kw) -> InputConfig:
    return InputConfig(path=str(path), **kw)


def write_img2dataset_parquet(path, n: int) -> None:
    keys = [f"{i:06d}" for i in range(n)]
    table = pa.table(
        {
            "caption": [f"c{i}" for i in range(n)],
            "url": [f"http://x/{i}" for i in range(n)],
            "key": keys,
            "status": ["success"] * n,
            "error_message": pa.nulls(n, pa.string()),
            "jpg": pa.array([make_image(i) for i in range(n)], pa.binary()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_detects_every_format(tmp_path):
    write_webdataset_dir(tmp_path / "wds", 3, 2)
    write_img2dataset_parquet(tmp_path / "i2d" / "00000.parquet", 3)
    write_parquet_dataset(tmp_path / "pq", 3)
    write_hf_dataset(tmp_path / "hf", 3)
    write_hf_dataset(tmp_path / "hfdict", 3, splits=("train", "test"))
    write_image_folder(tmp_path / "folder", 3)
    found = {name: detect_format(cfg(tmp_path / name)) for name in ["wds", "i2d", "pq", "hf", "hfdict", "folder"]}
    assert found == {
        "wds": "webdataset",
        "i2d": "img2dataset-parquet",
        "pq": "parquet",
        "hf": "hf",
        "hfdict": "hf",
        "folder": "folder",
    }
    assert detect_format(cfg(tmp_path / "wds", format="webdataset")) == "webdataset"


def test_webdataset_sidecars_and_bookkeeping_are_not_shards(tmp_path):
    write_webdataset_dir(tmp_path, 5, 2)
    assert {p.name for p in tmp_path.iterdir()} >= {"00000.parquet", "00000_stats.json", "00000.tar"}
    (tmp_path / "_done").mkdir()
    (tmp_path / "_done" / "x.tar").write_bytes(b"")
    (tmp_path / ".hidden.tar").write_bytes(b"")
    units = plan_units(cfg(tmp_path))
    assert [(u.unit, u.source, u.format) for u in units] == [
        ("00000", "00000.tar", "webdataset"),
        ("00001", "00001.tar", "webdataset"),
        ("00002", "00002.tar", "webdataset"),
    ]
    assert units[0].uri == str(tmp_path / "00000.tar")


def test_nested_and_colliding_tar_ids(tmp_path):
    for rel in ["a/b/00042.tar", "a__b/00042.tar", "x y.tar", "x_y.tar"]:
        write_webdataset_dir(tmp_path / "src", 1, 1)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "src" / "00000.tar", tmp_path / rel)
        shutil.rmtree(tmp_path / "src")
    ids = [u.unit for u in plan_units(cfg(tmp_path))]
    assert unit_id("a/b/00042.tar") == "a__b__00042"
    assert len(set(ids)) == 4 and ids == sorted(ids)
    assert all(set(i) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-.") for i in ids)
    assert plan_units(cfg(tmp_path)) == plan_units(cfg(tmp_path))  # deterministic


def test_single_file_input(tmp_path):
    write_webdataset_dir(tmp_path, 3, 2)
    [unit] = plan_units(cfg(tmp_path / "00001.tar"))
    assert (unit.unit, unit.source, unit.uri) == ("00001", "00001.tar", str(tmp_path / "00001.tar"))


def test_parquet_split_by_metadata_rows(tmp_path):
    write_parquet_dataset(tmp_path, 23, files=2, row_group_size=5)  # 12 + 11 rows
    units = plan_units(cfg(tmp_path, unit_size=5))
    assert [(u.unit, u.start, u.stop) for u in units] == [
        ("part-00000-s0000", 0, 5),
        ("part-00000-s0001", 5, 10),
        ("part-00000-s0002", 10, 12),
        ("part-00001-s0000", 0, 5),
        ("part-00001-s0001", 5, 10),
        ("part-00001-s0002", 10, 11),
    ]
    assert plan_units(cfg(tmp_path, unit_size=5, max_units=2)) == units[:2]


def test_hf_units_follow_state_json(tmp_path):
    write_hf_dataset(tmp_path, 6, splits=("train", "test"), num_shards=2)
    units = plan_units(cfg(tmp_path, unit_size=2))
    assert [(u.source, u.start, u.stop) for u in units] == [
        ("test/data-00000-of-00002.arrow", 0, 2),
        ("test/data-00000-of-00002.arrow", 2, 3),
        ("test/data-00001-of-00002.arrow", 0, 2),
        ("test/data-00001-of-00002.arrow", 2, 3),
        ("train/data-00000-of-00002.arrow", 0, 2),
        ("train/data-00000-of-00002.arrow", 2, 3),
        ("train/data-00001-of-00002.arrow", 0, 2),
        ("train/data-00001-of-00002.arrow", 2, 3),
    ]
    assert units[0].unit == "test__data-00000-of-00002-s0000"


def test_folder_units_list_members(tmp_path):
    write_image_folder(tmp_path, 5)
    units = plan_units(cfg(tmp_path, unit_size=2))
    assert [u.unit for u in units] == ["images-s0000", "images-s0001", "images-s0002"]
    assert units[0].members == ("a/img_0000.png", "a/img_0002.jpg")
    assert sum(len(u.members) for u in units) == 5 and units[2].start == 4


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="not found: .*nope"):
        plan_units(cfg(tmp_path / "nope"))


def test_nothing_usable_names_path_and_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no usable input at .*looked for webdataset \.tar.*notes\.txt"):
        plan_units(cfg(tmp_path))
    with pytest.raises(InputError, match="no usable input"):
        detect_format(cfg(tmp_path))


def test_empty_dir(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        plan_units(cfg(tmp_path))


def test_zero_rows_is_empty(tmp_path):
    write_parquet_dataset(tmp_path, 0)
    with pytest.raises(InputError, match="is empty: 1 parquet files with 0 rows"):
        plan_units(cfg(tmp_path))


def test_tars_without_members_are_empty(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass
    with pytest.raises(InputError, match="hold no members"):
        plan_units(cfg(tmp_path))


def test_parquet_without_image_column_fails_at_planning(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "url": ["u"]}), tmp_path / "meta.parquet")
    with pytest.raises(InputError, match="no image column .*input.image_column"):
        plan_units(cfg(tmp_path))
    write_parquet_dataset(tmp_path / "ok", 2)
    with pytest.raises(InputError, match="input.image_column 'pic' is not a column"):
        plan_units(cfg(tmp_path / "ok", image_column="pic"))

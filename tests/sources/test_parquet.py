"""Parquet shards: image columns as bytes, structs or paths; null images; unit slices covering every row once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from recaption.sources.units import WorkUnit
from tests.data import make_image, write_parquet_dataset


def read_all(cfg: InputConfig) -> list:
    return [r for u in plan_units(cfg) for r in read_unit(u, cfg)]


@pytest.mark.parametrize("image_as", ["bytes", "struct", "path"])
def test_image_column_kinds(tmp_path, image_as):
    keys = write_parquet_dataset(tmp_path, 5, image_as=image_as)
    records = read_all(InputConfig(path=str(tmp_path)))
    assert [r.key for r in records] == keys
    assert [r.image for r in records] == [make_image(i) for i in range(5)]
    assert (records[2].alt_text, records[2].url, records[2].error) == ("caption 2", "http://x/2", None)


def test_slices_cover_every_row_once(tmp_path):
    keys = write_parquet_dataset(tmp_path, 40, files=2, row_group_size=3)
    cfg = InputConfig(path=str(tmp_path), unit_size=7)
    units = plan_units(cfg)
    assert len(units) == 6
    per_unit = [[r.key for r in read_unit(u, cfg)] for u in units]
    assert [len(k) for k in per_unit] == [7, 7, 6, 7, 7, 6]
    assert [k for unit_keys in per_unit for k in unit_keys] == keys


def test_no_key_column_gives_stable_row_keys(tmp_path):
    write_parquet_dataset(tmp_path, 9, key=False, row_group_size=2)
    cfg = InputConfig(path=str(tmp_path), unit_size=4)
    units = plan_units(cfg)
    assert [r.key for r in read_unit(units[1], cfg)] == [f"part-00000/{i}" for i in range(4, 8)]
    assert [r.image for r in read_unit(units[2], cfg)] == [make_image(8)]


def test_blank_keys_get_the_row_id_of_a_missing_key(tmp_path):
    keys = ["k0", "", "  ", None, "k4", ""]
    images = pa.array([make_image(i) for i in range(6)], pa.binary())
    pq.write_table(pa.table({"image": images, "key": pa.array(keys, pa.string())}), tmp_path / "t.parquet")
    records = read_all(InputConfig(path=str(tmp_path), unit_size=4))
    assert [r.key for r in records] == ["k0", "t/1", "t/2", "t/3", "k4", "t/5"]
    assert all(r.error is None for r in records) and [r.image for r in records] == images.to_pylist()


def test_null_and_missing_images_are_error_rows(tmp_path):
    table = pa.table(
        {
            "id": [1, 2, 3, 4],
            "image": pa.array(
                [
                    {"bytes": make_image(0), "path": None},
                    None,
                    {"bytes": None, "path": "gone.jpg"},
                    {"bytes": None, "path": None},
                ]
            ),
            "alt_text": ["a", "b", "c", None],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    records = read_all(InputConfig(path=str(tmp_path)))
    assert [r.key for r in records] == ["1", "2", "3", "4"]
    assert records[0].error is None and records[0].alt_text == "a"
    assert records[1].error == "image is null" and records[1].image is None and records[1].alt_text == "b"
    assert "image file: input path not found: " in records[2].error and "gone.jpg" in records[2].error
    assert records[3].error == "image is null"


def test_img2dataset_failed_rows_carry_status(tmp_path):
    table = pa.table(
        {
            "caption": ["ok", "bad"],
            "url": ["http://a/0.jpg", "http://a/1.jpg"],
            "key": ["000000", "000001"],
            "status": ["success", "failed_to_download"],
            "error_message": [None, "HTTP Error 404: File not found"],
            "jpg": pa.array([make_image(0), None], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    records = read_all(InputConfig(path=str(tmp_path)))
    assert records[0].error is None and records[0].image == make_image(0)
    assert records[1].error == "img2dataset status failed_to_download: HTTP Error 404: File not found"
    assert (records[1].url, records[1].alt_text) == ("http://a/1.jpg", "bad")


def test_configured_columns_and_absolute_paths(tmp_path):
    (tmp_path / "img.png").write_bytes(make_image(5, fmt="PNG"))
    table = pa.table({"uid": ["u1"], "pic": [str(tmp_path / "img.png")], "desc": ["d"], "link": ["l"], "text": ["t"]})
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = InputConfig(
        path=str(tmp_path / "t.parquet"), image_column="pic", key_column="uid", caption_column="desc", url_column="link"
    )
    [rec] = read_all(cfg)
    assert (rec.key, rec.image, rec.alt_text, rec.url) == ("u1", make_image(5, fmt="PNG"), "d", "l")
    with pytest.raises(InputError, match="input.key_column 'nope' is not a column"):
        read_all(cfg.model_copy(update={"key_column": "nope"}))


def test_corrupt_file_ends_with_one_error_record(tmp_path):
    write_parquet_dataset(tmp_path, 3)
    cfg = InputConfig(path=str(tmp_path))
    [unit] = plan_units(cfg)
    data = bytearray((tmp_path / "part-00000.parquet").read_bytes())
    data[4:400] = b"\x00" * 396  # column data gone, footer intact
    (tmp_path / "part-00000.parquet").write_bytes(bytes(data))
    records = list(read_unit(WorkUnit(**{**unit.to_dict(), "members": ()}), cfg))
    assert records[-1].key == "part-00000#unreadable" and "cannot read part-00000.parquet" in records[-1].error

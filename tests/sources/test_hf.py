"""HF `save_to_disk` datasets read straight from their Arrow files, splits and shards included."""

from __future__ import annotations

import pyarrow as pa

from recaption.config import InputConfig
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from tests.data import make_image, write_hf_dataset


def read_all(cfg: InputConfig) -> list:
    return [r for u in plan_units(cfg) for r in read_unit(u, cfg)]


def test_dataset_round_trip(tmp_path):
    keys = write_hf_dataset(tmp_path, 7, num_shards=2)
    records = read_all(InputConfig(path=str(tmp_path), unit_size=3))
    assert [r.key for r in records] == keys
    assert [r.image for r in records] == [make_image(i) for i in range(7)]
    assert records[3].alt_text == "caption 3" and records[3].error is None


def test_dataset_dict_splits(tmp_path):
    keys = write_hf_dataset(tmp_path, 4, splits=("train", "validation"))
    records = read_all(InputConfig(path=str(tmp_path), unit_size=3))
    assert sorted(r.key for r in records) == keys  # units sort by split name, rows keep their order within one


def test_image_paths_and_arrow_file_format(tmp_path):
    """An Image column holding paths only, in an Arrow *file* (ARROW1) rather than a stream, found by format: hf."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(make_image(1))
    table = pa.table({"image": pa.array([{"bytes": None, "path": "img/a.jpg"}]), "text": ["t"]})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    [rec] = read_all(InputConfig(path=str(tmp_path), format="hf"))
    assert (rec.key, rec.image, rec.alt_text) == ("data-00000-of-00001/0", make_image(1), "t")

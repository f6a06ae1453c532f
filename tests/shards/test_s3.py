"""Inputs on S3 (moto's server on 127.0.0.1): planned and read through URIs with endpoint options."""

from __future__ import annotations

import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.shards.plan import plan_units
from recaption.shards.read import read_unit
from tests.data import make_image, write_webdataset_dir


def test_webdataset_on_s3(s3_endpoint):
    root = f"s3://bucket/data/wds?{s3_endpoint}"
    keys = write_webdataset_dir(root, 5, 3)
    cfg = InputConfig(path=root)
    units = plan_units(cfg)
    assert [(u.unit, u.source) for u in units] == [("00000", "00000.tar"), ("00001", "00001.tar")]
    assert units[1].uri == f"s3://bucket/data/wds/00001.tar?{s3_endpoint}"
    records = [r for u in units for r in read_unit(u, cfg)]
    assert [r.key for r in records] == keys and all(r.error is None for r in records)
    assert records[3].image == make_image(3) and records[3].alt_text == "caption 3"
    with pytest.raises(InputError, match="not found: s3://bucket/nope"):
        plan_units(InputConfig(path=f"s3://bucket/nope?{s3_endpoint}"))

"""A real img2dataset download from a local HTTP server, read back: every downloaded image, with its url and caption."""

from __future__ import annotations

import hashlib
import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from recaption.config import InputConfig
from recaption.sources.plan import detect_format, plan_units
from recaption.sources.read import read_unit
from tests.data import img2dataset_download, make_image

N, MISSING = 10, 2


@pytest.mark.parametrize(
    "output_format, url_list_format, detected",
    [("webdataset", "parquet", "webdataset"), ("parquet", "csv", "img2dataset-parquet")],
)
def test_read_what_img2dataset_wrote(tmp_path, output_format, url_list_format, detected):
    out = img2dataset_download(tmp_path, N, output_format, missing=MISSING, url_list_format=url_list_format)
    # img2dataset's own account: one metadata parquet per shard (beside the tar, or the shard itself)
    columns = ["key", "url", "caption", "status", "sha256"]
    meta = [m for f in sorted(out.glob("*.parquet")) for m in pq.read_table(f, columns=columns).to_pylist()]
    success = {m["key"]: m for m in meta if m["status"] == "success"}
    assert len(success) == N and len(meta) == N + MISSING

    cfg = InputConfig(path=str(out), unit_size=3)
    assert detect_format(cfg) == detected
    units = plan_units(cfg)
    assert len(units) >= 3 and all(u.format == detected for u in units)
    records = [r for u in units for r in read_unit(u, cfg)]

    ok = [r for r in records if r.error is None]
    assert sorted(r.key for r in ok) == sorted(success)
    for r in ok:
        m = success[r.key]
        i = int(m["url"].rsplit("/", 1)[1].removesuffix(".jpg"))
        assert (r.url, r.alt_text) == (m["url"], f"caption {i}")
        # img2dataset hashes what it downloaded, then re-encodes it: same picture, other bytes
        assert hashlib.sha256(make_image(i, size=(64 + i % 7, 48))).hexdigest() == m["sha256"]
        assert Image.open(io.BytesIO(r.image)).size == (64 + i % 7, 48)
    failed = [r for r in records if r.error is not None]
    if output_format == "webdataset":
        assert failed == []  # failed downloads are only in the sidecar parquet, never in the tar
    else:
        assert len(failed) == MISSING
        assert all(r.error == "img2dataset status failed_to_download: HTTP Error 404: File not found" for r in failed)
        assert all("/missing-" in r.url for r in failed)

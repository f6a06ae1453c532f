"""Transient storage errors (a reset connection) while planning and reading are retried: every row comes out once;
permanent ones (not found, no permission) fail at once. The storage is a real pyarrow filesystem, a PyFileSystem
around the local one that fails as a flaky object store does."""

from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources import fs
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from tests.data import make_image, write_image_folder, write_parquet_dataset, write_webdataset_dir

RESET = "AWS Error NETWORK_CONNECTION during {}: curl error: Recv failure: Connection reset by peer"


class FlakyStore(pafs.FileSystemHandler):
    """The local filesystem, except that the first `info` listings/lookups, `open` calls and `read` calls whose
    offset lies in `window` [lo, hi) raise a connection reset; a stream's read that would cross `lo` stops there, so
    the stream breaks part-way, after the bytes before `lo` were delivered."""

    def __init__(self, info: int = 0, open: int = 0, read: int = 0, window: tuple[int, int] = (0, 1 << 62)):
        self.fs = pafs.LocalFileSystem()
        self.left = Counter(info=info, open=open, read=read)
        self.window = window
        self.calls = Counter()
        self.permanent: dict[str, type[OSError]] = {}  # path suffix → error raised on open, every time

    def fail(self, op: str) -> None:
        self.calls[op] += 1
        if self.left[op] > 0:
            self.left[op] -= 1
            raise OSError(RESET.format(op))

    def get_type_name(self) -> str:
        return "flaky"

    def equals(self, other) -> bool:
        return other is self

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        self.fail("info")
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self.fail("info")
        return self.fs.get_file_info(selector)

    def open_input_stream(self, path):
        return pa.PythonFile(FlakyFile(self, self._open(path), stream=True), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(FlakyFile(self, self._open(path), stream=False), mode="r")

    def _open(self, path):
        for suffix, error in self.permanent.items():
            if path.endswith(suffix):
                self.calls["permanent"] += 1
                raise error(f"{path}: refused")
        self.fail("open")
        return self.fs.open_input_file(path)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


class FlakyFile:
    """A file object over a real one whose reads fail as FlakyStore says."""

    def __init__(self, store: FlakyStore, real: pa.NativeFile, stream: bool):
        self.store, self.real, self.stream = store, real, stream
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        pos = self.real.tell()
        lo, hi = self.store.window
        if self.stream and pos < lo and (n < 0 or pos + n > lo):
            n = lo - pos  # deliver up to the break, fail from there
        elif lo <= pos < hi:
            self.store.fail("read")
        return self.real.read(n) if n >= 0 else self.real.read()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.real.seek(offset, whence)

    def tell(self) -> int:
        return self.real.tell()

    def size(self) -> int:
        return self.real.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return not self.stream

    def close(self) -> None:
        self.closed = True
        self.real.close()


@pytest.fixture
def flaky(monkeypatch):
    """Every input access goes through one FlakyStore; backoff is instant. Returns a function configuring it."""
    store = FlakyStore()
    real_resolve = fs.resolve
    monkeypatch.setattr(fs, "resolve", lambda uri: (pafs.PyFileSystem(store), real_resolve(uri)[1]))
    monkeypatch.setattr(fs, "RETRY_BASE_S", 0.0)

    def configure(**kw) -> FlakyStore:
        store.__init__(**kw)
        return store

    return configure


def read_all(cfg: InputConfig) -> list:
    return [r for u in plan_units(cfg) for r in read_unit(u, cfg)]


def test_tar_stream_broken_part_way_is_read_again_each_row_once(tmp_path, flaky, caplog):
    keys = write_webdataset_dir(tmp_path, 10, 10)
    size = (tmp_path / "00000.tar").stat().st_size
    store = flaky(read=2, window=(size // 2, size))  # the stream breaks twice half-way, after samples were given
    with caplog.at_level(logging.WARNING):
        records = read_all(InputConfig(path=str(tmp_path)))
    assert [r.key for r in records] == keys and all(r.error is None for r in records)
    assert [r.image for r in records] == [make_image(i) for i in range(10)]
    assert store.left["read"] == 0 and store.calls["read"] >= 3
    assert "read again from its start" in caplog.text and "Connection reset by peer" in caplog.text


def test_parquet_ranged_read_failing_part_way_is_read_again_each_row_once(tmp_path, flaky):
    write_parquet_dataset(tmp_path, 12, row_group_size=4)
    path = tmp_path / "part-00000.parquet"
    md = pq.read_metadata(path)
    second = min(md.row_group(1).column(c).data_page_offset for c in range(md.num_columns))
    store = flaky(read=3, window=(second, md.row_group(2).column(0).data_page_offset))
    records = read_all(InputConfig(path=str(tmp_path)))
    assert [r.key for r in records] == [f"k{i:05d}" for i in range(12)] and all(r.error is None for r in records)
    assert [r.image for r in records] == [make_image(i) for i in range(12)]
    assert store.left["read"] == 0


def test_planning_retries_listing_opening_and_footers(tmp_path, flaky):
    write_parquet_dataset(tmp_path, 6, files=2)
    store = flaky(info=2, open=2, read=2, window=(0, 1))  # footers of small files are read from offset 0
    units = plan_units(InputConfig(path=str(tmp_path), unit_size=2))
    assert [u.unit for u in units] == [f"part-0000{f}-s000{s}" for f in range(2) for s in range(2)]
    assert store.left == Counter(info=0, open=0, read=0)
    assert store.calls["info"] >= 3 and store.calls["open"] >= 4


def test_folder_images_are_retried_not_written_off(tmp_path, flaky):
    keys = write_image_folder(tmp_path, 4)
    cfg = InputConfig(path=str(tmp_path))
    [unit] = plan_units(cfg)
    store = flaky(open=3)
    records = list(read_unit(unit, cfg))
    assert [r.key for r in records] == keys and all(r.error is None and r.image for r in records)
    assert store.left["open"] == 0


def test_a_store_that_stays_down_fails_the_unit_not_its_rows(tmp_path, flaky, monkeypatch):
    keys = write_image_folder(tmp_path, 2)
    cfg = InputConfig(path=str(tmp_path))
    [unit] = plan_units(cfg)
    monkeypatch.setattr(fs, "READ_ATTEMPTS", 3)
    store = flaky(open=100)
    with pytest.raises(fs.Unreachable, match="after 3 attempts: .*Connection reset by peer"):
        list(read_unit(unit, cfg))  # no `failed` row: the unit is not committed, a rerun reads it again
    assert store.calls["open"] == 3 and keys


@pytest.mark.parametrize("error", [FileNotFoundError, PermissionError])
def test_permanent_errors_are_not_retried(tmp_path, flaky, error):
    write_webdataset_dir(tmp_path, 4, 2)
    cfg = InputConfig(path=str(tmp_path))
    units = plan_units(cfg)
    store = flaky()
    store.permanent["00001.tar"] = error
    with pytest.raises(InputError, match="00001.tar"):
        list(read_unit(units[1], cfg))
    assert store.calls["permanent"] == 1

"""Tars split into units of `unit_size` samples: the rows of the units are exactly the rows of the whole tar, a unit
reads about its share of the bytes (ranged reads, counted), the count comes from `_stats.json`, the index or the
cache, and a sidecar that lies or a cut tar loses and repeats nothing."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources import fs, tar, tarindex, tarplan
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from recaption.sources.tar import write_webdataset
from tests.data import make_image
from tests.sources.test_tar import complete_tar


@pytest.fixture(autouse=True)
def _fresh_index_cache():
    tar._INDEXES.clear()  # each test sees what a new worker process sees
    yield
    tar._INDEXES.clear()


def write_tar(path, members: list[tuple[str, bytes | None]], fmt=tarfile.GNU_FORMAT, pax_headers=None) -> None:
    """Members in order; data None makes a directory, a name starting with `->` a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name.removeprefix("->"))
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif name.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def sample(key: str, i: int, image: bytes | None = None) -> list[tuple[str, bytes]]:
    meta = json.dumps({"url": f"http://x/{i}", "key": key}).encode()
    return [
        (f"{key}.jpg", image if image is not None else make_image(i)),
        (f"{key}.json", meta),
        (f"{key}.txt", b"alt"),
    ]


def rows(units, cfg) -> list[tuple]:
    return [(u.unit, r.key, r.image, r.error, r.url, r.alt_text) for u in units for r in read_unit(u, cfg)]


def same_rows(split, whole) -> bool:
    return [r[1:] for r in split] == [r[1:] for r in whole]


def whole_and_split(root, unit_size: int, output=None):
    whole = plan_units(InputConfig(path=str(root), unit_size=10**6))
    cfg = InputConfig(path=str(root), unit_size=unit_size)
    split = plan_units(cfg, None if output is None else str(output))
    return rows(whole, cfg), split, cfg


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_split_units_give_the_rows_of_the_whole_tar(tmp_path, fmt):
    long_key = "deep/" + "x" * 120  # a name over 100 bytes: a GNU long-name or a PAX header precedes its member
    members = (
        sample("a", 0)
        + [("dir", None), ("._a.jpg", b"apple double")]
        + sample("k", 1)  # `k` again in sample 7: the second fails, as in the whole tar, though in another unit
        + [("nometa.json", b"{}")]  # no image
        + [("../evil.jpg", make_image(3)), ("->link.jpg", b"")]
        + sample(" ", 5)  # blank key: `<stem>/<index>`, the index within the whole tar
        + sample(long_key, 6)
        + sample("k", 7)
        + sample("z", 8)
        + sample("k#dup1", 9)  # collides with the name the duplicate got
        + sample("last", 10)
    )
    pax = {"comment": "a global header: units after the first must carry it"} if fmt == tarfile.PAX_FORMAT else None
    write_tar(tmp_path / "in" / "00000.tar", members, fmt, pax)
    whole, split, cfg = whole_and_split(tmp_path / "in", 3, tmp_path / "out")
    assert [(u.unit, u.start, u.stop) for u in split] == [
        ("00000-s0000", 0, 3),
        ("00000-s0001", 3, 6),
        ("00000-s0002", 6, 9),
        ("00000-s0003", 9, None),
    ]
    got = rows(split, cfg)
    assert same_rows(got, whole), [r[1] for r in got]
    keys = [r[1] for r in got]
    assert keys.count("k") == 1 and {"k#dup1", "k#dup1#dup1", "00000/5"} <= set(keys)
    assert [r[0] for r in got].count("00000-s0003") == 2


def test_small_and_gzipped_tars_stay_one_unit_and_need_no_count(tmp_path, monkeypatch):
    write_webdataset(str(tmp_path / "in"), [{"key": f"{i}", "jpg": make_image(i)} for i in range(6)], shard_size=6)
    monkeypatch.setattr(tarplan, "_count", lambda *a: pytest.fail("a 6-sample tar needs no count for unit_size 100"))
    [unit] = plan_units(InputConfig(path=str(tmp_path / "in"), unit_size=100), str(tmp_path / "out"))
    assert (unit.unit, unit.start, unit.stop) == ("00000", 0, None)
    assert not (tmp_path / "out").exists()
    data, _ = complete_tar(5)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar.gz").write_bytes(gzip.compress(data))
    [unit] = plan_units(InputConfig(path=str(tmp_path / "gz"), unit_size=1))
    assert (unit.unit, unit.stop) == ("00000", None)


def test_counts_from_the_sidecar_the_index_or_the_cache(tmp_path, monkeypatch):
    samples = [{"key": f"{i:03d}", "jpg": make_image(i), "caption": "c"} for i in range(10)]
    write_webdataset(str(tmp_path / "in"), samples, shard_size=10)  # with img2dataset's sidecars
    out = tmp_path / "out"
    cfg = InputConfig(path=str(tmp_path / "in"), unit_size=4)
    units = plan_units(cfg, str(out))
    assert [u.unit for u in units] == ["00000-s0000", "00000-s0001", "00000-s0002"]
    assert not (out / "_index").exists()  # the sidecar's count: the tar is not read at planning
    counts = json.loads(gzip.decompress((out / tarplan.COUNTS_FILE).read_bytes()))
    assert counts["tars"]["00000.tar"][2:] == [10, "stats"]
    # The first unit read indexes the tar and caches the index; a sibling in another process finds it.
    assert [r.key for r in read_unit(units[0], cfg)] == ["000", "001", "002", "003"]
    assert (out / "_index" / "00000.recaption.json").is_file()
    tar._INDEXES.clear()
    monkeypatch.setattr(tar, "build_index", lambda *a: pytest.fail("the index is cached"))
    assert [r.key for r in read_unit(units[2], cfg)] == ["008", "009"]
    monkeypatch.undo()
    # A resume asks nothing per tar: the count comes from the cache.
    monkeypatch.setattr(tarplan, "_count", lambda *a: pytest.fail("the count is cached"))
    assert plan_units(cfg, str(out)) == units
    monkeypatch.undo()
    # Without a sidecar the tar is indexed at planning (and the index cached for the readers).
    os.remove(tmp_path / "in" / "00000_stats.json")
    tar._INDEXES.clear()
    fresh = tmp_path / "fresh"
    assert [(u.unit, u.start, u.stop) for u in plan_units(cfg, str(fresh))] == [
        (u.unit, u.start, u.stop) for u in units
    ]
    assert (fresh / "_index" / "00000.recaption.json").is_file()
    tar._INDEXES.clear()
    monkeypatch.setattr(tar, "build_index", lambda *a: pytest.fail("indexed at planning"))
    assert [r.key for r in read_unit(plan_units(cfg, str(fresh))[1], cfg)] == ["004", "005", "006", "007"]


@pytest.mark.parametrize("claimed", [4, 25, 10**9])
def test_a_sidecar_that_lies_loses_and_repeats_nothing(tmp_path, caplog, claimed):
    samples = [{"key": f"{i:03d}", "jpg": make_image(i)} for i in range(11)]
    write_webdataset(str(tmp_path / "in"), samples, shard_size=11)
    stats = tmp_path / "in" / "00000_stats.json"
    stats.write_text(json.dumps({"count": claimed, "successes": claimed}))
    caplog.set_level(logging.WARNING)
    whole, split, cfg = whole_and_split(tmp_path / "in", 3, tmp_path / "out")
    got = rows(split, cfg)
    assert same_rows(got, whole) and len(got) == 11
    if claimed == 10**9:  # more samples than the tar's size allows: the sidecar is ignored, the tar indexed
        assert len(split) == 4 and "no usable sample count" in caplog.text
    elif claimed == 4:  # 2 units planned: the last reads to the end
        assert [u.stop for u in split] == [3, None] and "more than its _stats.json says" in caplog.text
    else:  # 9 units planned: those past the last sample are empty
        assert len(split) == 9 and {r[0] for r in got} == {f"00000-s000{i}" for i in range(4)}
        assert "fewer than its _stats.json says" in caplog.text


@pytest.mark.parametrize("where", ["mid-image", "block-boundary", "mid-header", "last-block", "garbage"])
def test_a_cut_or_corrupt_tar_split_into_units_reports_the_cut_once(tmp_path, where):
    data, ends = complete_tar(6)
    cut = {
        "mid-image": ends[3] + 512 + 100,
        "block-boundary": ends[3],
        "mid-header": ends[3] + 200,
        "last-block": ends[5],
        "garbage": len(data),
    }[where]
    shard = data[:cut] if where != "garbage" else data[: ends[2]] + b"\x07garbage" * 300
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(shard)
    # img2dataset wrote the sidecar before the tar was damaged: it still says 6
    (tmp_path / "in" / "00000_stats.json").write_text(json.dumps({"successes": 6}))
    whole, split, cfg = whole_and_split(tmp_path / "in", 2, tmp_path / "out")
    assert len(split) == 3
    got = rows(split, cfg)
    assert same_rows(got, whole), [(r[0], r[1], r[3]) for r in got]
    assert sum(r[3] is not None for r in got) == (0 if where == "garbage" else 1)


def test_a_unit_id_clash_is_refused(tmp_path):
    samples = [{"key": f"{i}", "jpg": make_image(i)} for i in range(4)]
    write_webdataset(str(tmp_path), samples, shard_size=4, prefix="x")  # x00000.tar
    os.rename(tmp_path / "x00000_stats.json", tmp_path / "x00000_stats.keep")
    write_webdataset(str(tmp_path / "o"), samples[:1], shard_size=1, prefix="x00000-s")
    os.rename(tmp_path / "o" / "x00000-s00000.tar", tmp_path / "x00000-s0000.tar")
    with pytest.raises(InputError, match="same unit id twice .*x00000-s0000"):
        plan_units(InputConfig(path=str(tmp_path), unit_size=2))


class Counting(pafs.FileSystemHandler):
    """A filesystem that counts the bytes read from files whose path contains `.tar` (the data, not the caches)."""

    def __init__(self, base: pafs.FileSystem):
        self.base, self.bytes, self.requests = base, 0, 0

    def _count(self, path: str, n: int) -> None:
        if ".tar" in path:
            self.bytes += n
            self.requests += 1

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        return pa.PythonFile(CountingFile(self, path, self.base.open_input_stream(path)), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(CountingFile(self, path, self.base.open_input_file(path)), mode="r")

    def open_output_stream(self, path, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError

    def equals(self, other):
        return self is other


class CountingFile(io.RawIOBase):
    def __init__(self, owner: Counting, path: str, f: pa.NativeFile):
        self.owner, self.path, self.f = owner, path, f

    def readable(self):
        return True

    def seekable(self):
        return self.f.seekable()

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def read(self, n=-1):
        data = self.f.read() if n is None or n < 0 else self.f.read(n)
        self.owner._count(self.path, len(data))
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self):
        self.f.close()
        super().close()


def big_samples(n: int, image_bytes: int) -> list[dict]:
    """Samples whose image member is `image_bytes` of incompressible data (the reader does not decode)."""
    return [{"key": f"{i:03d}", "jpg": os.urandom(image_bytes), "caption": f"c{i}"} for i in range(n)]


def test_a_unit_reads_about_its_share_of_a_local_tar(tmp_path, monkeypatch):
    [uri] = write_webdataset(str(tmp_path / "in"), big_samples(8, 3 << 20), shard_size=8)
    size = os.path.getsize(uri)
    counting = Counting(pafs.LocalFileSystem())
    real = fs.resolve
    monkeypatch.setattr(fs, "resolve", lambda u: (pafs.PyFileSystem(counting), real(u)[1]))
    cfg = InputConfig(path=str(tmp_path / "in"), unit_size=2)
    units = plan_units(cfg, str(tmp_path / "out"))
    assert counting.bytes == 0  # counted from the sidecar
    index = tar.unit_index(units[1])  # walks the headers: member data larger than a window is skipped
    assert index.samples == 8 and counting.bytes < 0.4 * size, (counting.bytes, size)
    for unit in units:
        counting.bytes = counting.requests = 0
        assert [r.key for r in read_unit(unit, cfg)] == [f"{i:03d}" for i in range(unit.start, unit.start + 2)]
        share = index.offset(unit.start + 2) - index.offset(unit.start) if unit.stop else size - index.offset(6)
        assert share <= counting.bytes <= share + (64 << 10), (unit.unit, counting.bytes, share)
        assert counting.requests == 1  # one ranged read of the unit's bytes


def test_split_tar_on_s3_reads_byte_ranges(s3_endpoint, monkeypatch):
    root, out = f"s3://bucket/split/in?{s3_endpoint}", f"s3://bucket/split/out?{s3_endpoint}"
    [uri] = write_webdataset(root, big_samples(8, 1 << 20), shard_size=8)
    counting = Counting(fs.resolve(uri)[0])
    monkeypatch.setattr(fs, "_bucket_filesystem", lambda *_: pafs.PyFileSystem(counting))
    monkeypatch.setattr(tarindex, "WINDOW_BYTES", 64 << 10)  # headers only: member data is skipped
    cfg = InputConfig(path=root, unit_size=3)
    units = plan_units(cfg, out)
    assert [u.unit for u in units] == ["00000-s0000", "00000-s0001", "00000-s0002"] and counting.bytes == 0
    got = []
    for unit in reversed(units):  # the last unit first: it indexes the tar, the others find the index in the output
        tar._INDEXES.clear()  # each unit in a worker of its own
        counting.bytes = 0
        got = [r.key for r in read_unit(unit, cfg)] + got
        share = (3 if unit.stop else 2) * (1 << 20)
        index_walk = 12 * (64 << 10) if unit is units[-1] else 0
        assert share < counting.bytes < share + index_walk + (64 << 10), (unit.unit, counting.bytes)
    assert got == [f"{i:03d}" for i in range(8)]
    assert fs.read_optional(tarplan.index_uri(out, "00000")) is not None

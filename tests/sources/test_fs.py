"""pyarrow.fs access: local paths and URIs resolved, query options kept, listings sorted, missing paths named."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from recaption.errors import InputError
from recaption.sources import fs

S3 = "s3://bucket/data dir?endpoint_override=127.0.0.1:9&scheme=http"


def test_resolve_local_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = fs.resolve("sub/x.tar")
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path / "sub" / "x.tar")
    assert fs.resolve(str(tmp_path))[1] == str(tmp_path)
    assert fs.resolve(f"file://{tmp_path}/a%20b")[1] == f"{tmp_path}/a b"


def test_resolve_s3_with_query_options_needs_no_network():
    filesystem, path = fs.resolve("s3://bucket/a/b.tar?endpoint_override=127.0.0.1:9&scheme=http")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == "bucket/a/b.tar"


def test_join_keeps_query_and_quotes():
    uri = fs.join(S3.replace("data dir", "data"), "sub/a b.tar")
    assert uri == "s3://bucket/data/sub/a%20b.tar?endpoint_override=127.0.0.1:9&scheme=http"
    assert fs.resolve(uri)[1] == "bucket/data/sub/a b.tar"
    assert fs.basename(uri) == "a b.tar"
    assert fs.parent(uri) == "s3://bucket/data/sub?endpoint_override=127.0.0.1:9&scheme=http"
    assert fs.join("/data", "a/b.tar") == os.path.join("/data", "a", "b.tar")


def test_display_hides_credentials():
    assert fs.display("s3://KEY:SECRET@bucket/x") == "s3://bucket/x"
    assert fs.display("/local/x") == "/local/x"


def test_bad_uri_is_an_input_error():
    with pytest.raises(InputError, match="gs://b/x"):
        fs.resolve("gs://b/x?no_such_option=1")


def test_list_files_recursive_sorted(tmp_path):
    for rel in ["b/2.tar", "a/1.tar", "a/0.tar", "c.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * len(rel))
    entries = fs.list_files(str(tmp_path))
    assert [e.path for e in entries] == ["a/0.tar", "a/1.tar", "b/2.tar", "c.txt"]
    assert entries[0].size == 7
    assert [e.path for e in fs.list_files(str(tmp_path / "c.txt"))] == ["c.txt"]


def test_read_and_stream(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"hello")
    assert fs.read_bytes(str(tmp_path / "f.bin")) == b"hello"
    with fs.open_input(str(tmp_path / "f.bin")) as f:
        assert f.read(2) == b"he"
    with fs.open_output(str(tmp_path / "new" / "deep" / "g.bin")) as f:
        f.write(b"abc")
    assert (tmp_path / "new" / "deep" / "g.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("call", [fs.read_bytes, fs.open_input, fs.open_input_file, fs.list_files, fs.info])
def test_missing_path_names_it(tmp_path, call):
    missing = str(tmp_path / "nope" / "x.tar")
    with pytest.raises(InputError, match="not found: .*nope/x.tar"):
        call(missing)

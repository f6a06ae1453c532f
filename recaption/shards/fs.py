"""Every file access of the inputs, through `pyarrow.fs`: local paths and URIs (s3://, gs://, with query options)."""

from __future__ import annotations

import functools
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from recaption.errors import InputError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Object stores whose FileSystem paths are "bucket/key": for these the path is computed without a second
# `from_uri` call, which for s3 without `region=` costs a HeadBucket request every time.
_BUCKET_SCHEMES = {"s3", "gs", "gcs"}
STREAM_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class FileEntry:
    """A file found by a listing: its path relative to the listed root (posix separators) and its size."""

    path: str
    size: int | None


def is_uri(path: str) -> bool:
    """True for `scheme://…` (a one-letter scheme is a Windows drive, not a URI)."""
    return bool(_URI.match(path))


def display(uri: str) -> str:
    """The uri for messages, with any `user:secret@` removed."""
    if not is_uri(uri):
        return uri
    p = urlsplit(uri)
    return urlunsplit((p.scheme, p.netloc.rsplit("@", 1)[-1], p.path, p.query, p.fragment))


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path (relative or absolute) or URI → (FileSystem, path inside it). Nothing is checked to exist."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    p = urlsplit(uri)
    try:
        if p.scheme == "file":
            return pafs.LocalFileSystem(), unquote(p.path)
        if p.scheme in _BUCKET_SCHEMES:
            bucket = p.netloc.rsplit("@", 1)[-1]
            path = (bucket + unquote(p.path)).rstrip("/")
            return _bucket_filesystem(p.scheme, p.netloc, p.query), path
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot open {display(uri)}: {e}") from None


def join(base: str, rel: str) -> str:
    """`rel` (posix, relative) inside `base`, keeping a URI's query options."""
    if not rel:
        return base
    if not is_uri(base):
        return os.path.join(os.path.abspath(os.path.expanduser(base)), *rel.split("/"))
    p = urlsplit(base)
    path = p.path.rstrip("/") + "/" + quote(rel, safe="/")
    return urlunsplit((p.scheme, p.netloc, path, p.query, p.fragment))


def parent(uri: str) -> str:
    """The directory holding `uri`."""
    if not is_uri(uri):
        return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))
    p = urlsplit(uri)
    return urlunsplit((p.scheme, p.netloc, posixpath.dirname(p.path.rstrip("/")), p.query, p.fragment))


def basename(uri: str) -> str:
    """The last path component of a local path or URI (query options left out)."""
    path = unquote(urlsplit(uri).path) if is_uri(uri) else uri
    return posixpath.basename(path.replace(os.sep, "/").rstrip("/"))


def info(uri: str) -> pafs.FileInfo:
    """File info of `uri`; InputError naming the path when it does not exist or cannot be reached."""
    fs, path = resolve(uri)
    try:
        fi = fs.get_file_info(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot reach input {display(uri)}: {e}") from None
    if fi.type == pafs.FileType.NotFound:
        raise InputError(f"input path not found: {display(uri)}")
    return fi


def list_files(uri: str) -> list[FileEntry]:
    """All files below directory `uri`, recursively, sorted by relative path; a file lists as its own name."""
    fi = info(uri)
    if fi.type == pafs.FileType.File:
        return [FileEntry(basename(uri), fi.size)]
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot list {display(uri)}: {e}") from None
    root = path.rstrip("/") + "/"
    entries = [
        FileEntry(i.path[len(root) :] if i.path.startswith(root) else posixpath.relpath(i.path, path), i.size)
        for i in infos
        if i.type == pafs.FileType.File
    ]
    return sorted(entries, key=lambda e: e.path)


def open_input(uri: str, compression: str | None = "detect", buffered: bool = True) -> pa.NativeFile:
    """A sequential input stream (decompressed by extension, `.gz` …, unless compression=None)."""
    fs, path = resolve(uri)
    # Object stores answer every read() with a ranged GET: small reads (tarfile's are 10 KB) need a buffer.
    buffer_size = STREAM_BUFFER_BYTES if buffered and not isinstance(fs, pafs.LocalFileSystem) else None
    try:
        return fs.open_input_stream(path, compression=compression, buffer_size=buffer_size)
    except (pa.ArrowException, OSError) as e:
        raise _read_error(uri, e) from None


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access file (what Parquet and Arrow IPC file readers need)."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except (pa.ArrowException, OSError) as e:
        raise _read_error(uri, e) from None


def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    with open_input(uri, compression=None, buffered=False) as f:
        try:
            return f.read()
        except (pa.ArrowException, OSError) as e:
            raise _read_error(uri, e) from None


def open_output(uri: str) -> pa.NativeFile:
    """An output stream to `uri`, creating its parent directories (used to write test and demo shards)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    return fs.open_output_stream(path)


def _read_error(uri: str, e: Exception) -> InputError:
    if isinstance(e, FileNotFoundError) or "not exist" in str(e) or "not found" in str(e).lower():
        return InputError(f"input path not found: {display(uri)}")
    return InputError(f"cannot read {display(uri)}: {e}")

"""Every file access of the inputs, through `pyarrow.fs`: local paths and URIs (s3://, gs://, with query options)."""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from recaption.errors import InputError
from recaption.redact import redact_text, strip_credentials
from recaption.retry import is_transient, with_retries

T = TypeVar("T")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Object stores whose FileSystem paths are "bucket/key": for these the path is computed without a second
# `from_uri` call, which for s3 without `region=` costs a HeadBucket request every time.
_BUCKET_SCHEMES = {"s3", "gs", "gcs"}
STREAM_BUFFER_BYTES = 4 << 20
# Transient errors of a store (a reset connection, a 503) are retried this often, with backoff from this many seconds.
READ_ATTEMPTS = 5
RETRY_BASE_S = 0.5
TMP_PREFIX = ".recaption-tmp-"


class Unreachable(InputError):
    """The storage kept failing with transient errors through every retry: the read, not the data, failed."""


@dataclass(frozen=True)
class FileEntry:
    """A file found by a listing: its path relative to the listed root (posix separators) and its size."""

    path: str
    size: int | None
    mtime_ns: int | None = None  # from the listing: with the size, tells whether a cache about the file still holds


def is_uri(path: str) -> bool:
    """True for `scheme://…` (a one-letter scheme is a Windows drive, not a URI)."""
    return bool(_URI.match(path))


def display(uri: str) -> str:
    """The uri for messages and logs: no `user:secret@`, no secret query parameters (`secret_key=`, signatures)."""
    return strip_credentials(uri) if is_uri(uri) else uri


def retrying(fn: Callable[[], T], uri: str, doing: str) -> T:
    """`fn()`, retried with backoff while it raises transient storage errors; when they outlast every attempt,
    `Unreachable` naming `uri` (without credentials). Permanent errors are raised as they are, at once."""
    try:
        return with_retries(fn, f"{doing} {display(uri)}", attempts=READ_ATTEMPTS, base_s=RETRY_BASE_S)
    except Exception as e:
        if is_transient(e):
            raise Unreachable(
                f"cannot {doing} {display(uri)} after {READ_ATTEMPTS} attempts: {redact_text(str(e))}"
            ) from None
        raise


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    uri = urlunsplit((scheme, netloc, "/", query, ""))
    return retrying(lambda: pafs.FileSystem.from_uri(uri)[0], uri, "connect to")


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
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"cannot open {display(uri)}: {redact_text(str(e))}") from None


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
        fi = retrying(lambda: fs.get_file_info(path), uri, "reach")
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot reach input {display(uri)}: {redact_text(str(e))}") from None
    if fi.type == pafs.FileType.NotFound:
        raise InputError(f"input path not found: {display(uri)}")
    return fi


def list_files(uri: str) -> list[FileEntry]:
    """All files below directory `uri`, recursively, sorted by relative path; a file lists as its own name."""
    fi = info(uri)
    if fi.type == pafs.FileType.File:
        return [FileEntry(basename(uri), fi.size, fi.mtime_ns)]
    fs, path = resolve(uri)
    try:
        infos = retrying(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), uri, "list")
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot list {display(uri)}: {redact_text(str(e))}") from None
    root = path.rstrip("/") + "/"
    entries = [
        FileEntry(
            i.path[len(root) :] if i.path.startswith(root) else posixpath.relpath(i.path, path), i.size, i.mtime_ns
        )
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
        stream = functools.partial(fs.open_input_stream, path, compression=compression, buffer_size=buffer_size)
        return retrying(stream, uri, "open")
    except (pa.ArrowException, OSError) as e:
        raise _read_error(uri, e) from None


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access file (what Parquet and Arrow IPC file readers need)."""
    fs, path = resolve(uri)
    try:
        return retrying(lambda: fs.open_input_file(path), uri, "open")
    except (pa.ArrowException, OSError) as e:
        raise _read_error(uri, e) from None


def read_bytes(uri: str) -> bytes:
    """The whole content of one file (opened and read again from its start after a transient error)."""
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()

    try:
        return retrying(read, uri, "read")
    except (pa.ArrowException, OSError) as e:
        raise _read_error(uri, e) from None


def read_optional(uri: str) -> bytes | None:
    """The content of a file of ours that may not exist (a cache): None when it does not."""
    try:
        return read_bytes(uri)
    except Unreachable:
        raise
    except InputError as e:
        if "not found" in str(e):
            return None
        raise


def write_small(uri: str, data: bytes) -> None:
    """Writes a small file so that readers see the old content or the new, never a part: one PUT on object stores,
    a temporary name renamed on file systems."""
    fs, path = resolve(uri)
    directory, name = posixpath.split(path)
    fs.create_dir(directory, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    tmp = posixpath.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")
    try:
        with fs.open_output_stream(tmp, compression=None) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp)
        raise


def open_output(uri: str) -> pa.NativeFile:
    """An output stream to `uri`, creating its parent directories (used to write test and demo shards)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    return fs.open_output_stream(path)


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[pa.NativeFile]:
    """An output stream to a temporary name beside `uri` (`.recaption-tmp-…`, hidden from listings), renamed to
    `uri` when the block ends and deleted when it raises: `uri` never holds a partial file."""
    fs, path = resolve(uri)
    directory, name = posixpath.split(path)
    fs.create_dir(directory, recursive=True)
    tmp = posixpath.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")  # keeps `.gz`: same compression
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp)
        raise


def _read_error(uri: str, e: Exception) -> InputError:
    if isinstance(e, FileNotFoundError) or "not exist" in str(e) or "not found" in str(e).lower():
        return InputError(f"input path not found: {display(uri)}")
    return InputError(f"cannot read {display(uri)}: {redact_text(str(e))}")

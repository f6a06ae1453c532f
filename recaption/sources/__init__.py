"""The sources: listing inputs on any filesystem, one reader per format, work units, image decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.sources.fs import (
        TMP_PREFIX,
        FileEntry,
        atomic_output,
        basename,
        display,
        is_uri,
        join,
        list_files,
        open_input,
        open_input_file,
        parent,
        resolve,
        retrying,
    )
    from recaption.sources.hf import arrow_files, arrow_rows
    from recaption.sources.images import FORMATS, decode_image, load_rgb, to_rgb
    from recaption.sources.parquet import parquet_rows
    from recaption.sources.plan import TAR_SUFFIXES, plan_units, unit_id
    from recaption.sources.read import first_record, fs, read_unit, tar
    from recaption.sources.tar import read_samples, write_webdataset
    from recaption.sources.tarplan import COMPRESSED_TARS, INDEX_DIR, cached_counts, count_samples
    from recaption.sources.units import WorkUnit

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "COMPRESSED_TARS": "recaption.sources.tarplan",
    "FORMATS": "recaption.sources.images",
    "FileEntry": "recaption.sources.fs",
    "INDEX_DIR": "recaption.sources.tarplan",
    "TAR_SUFFIXES": "recaption.sources.plan",
    "TMP_PREFIX": "recaption.sources.fs",
    "WorkUnit": "recaption.sources.units",
    "arrow_files": "recaption.sources.hf",
    "arrow_rows": "recaption.sources.hf",
    "atomic_output": "recaption.sources.fs",
    "basename": "recaption.sources.fs",
    "cached_counts": "recaption.sources.tarplan",
    "count_samples": "recaption.sources.tarplan",
    "decode_image": "recaption.sources.images",
    "display": "recaption.sources.fs",
    "first_record": "recaption.sources.read",
    "fs": "recaption.sources.read",
    "is_uri": "recaption.sources.fs",
    "join": "recaption.sources.fs",
    "list_files": "recaption.sources.fs",
    "load_rgb": "recaption.sources.images",
    "open_input": "recaption.sources.fs",
    "open_input_file": "recaption.sources.fs",
    "parent": "recaption.sources.fs",
    "parquet_rows": "recaption.sources.parquet",
    "plan_units": "recaption.sources.plan",
    "read_samples": "recaption.sources.tar",
    "read_unit": "recaption.sources.read",
    "resolve": "recaption.sources.fs",
    "retrying": "recaption.sources.fs",
    "tar": "recaption.sources.read",
    "to_rgb": "recaption.sources.images",
    "unit_id": "recaption.sources.plan",
    "write_webdataset": "recaption.sources.tar",
}
__all__ = [
    "COMPRESSED_TARS",
    "FORMATS",
    "FileEntry",
    "INDEX_DIR",
    "TAR_SUFFIXES",
    "TMP_PREFIX",
    "WorkUnit",
    "arrow_files",
    "arrow_rows",
    "atomic_output",
    "basename",
    "cached_counts",
    "count_samples",
    "decode_image",
    "display",
    "first_record",
    "fs",
    "is_uri",
    "join",
    "list_files",
    "load_rgb",
    "open_input",
    "open_input_file",
    "parent",
    "parquet_rows",
    "plan_units",
    "read_samples",
    "read_unit",
    "resolve",
    "retrying",
    "tar",
    "to_rgb",
    "unit_id",
    "write_webdataset",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

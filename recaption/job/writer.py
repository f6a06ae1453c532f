"""The output contract: Arrow schema, atomic Parquet commit of a unit, done markers, and run metadata."""

from __future__ import annotations

import errno
import io
import json
import re
import time
import uuid
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recaption.errors import ConfigError, InputError
from recaption.faults import fault_point, fault_raise
from recaption.redact import strip_credentials

CAPTION_TYPE = pa.struct(
    [
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("prompt_text", pa.string()),  # the prompt's text as the model got it (before its chat format)
        ("text", pa.string()),
        ("sub_captions", pa.list_(pa.string())),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("flags", pa.list_(pa.string())),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("unit", pa.string()),
        ("url", pa.string()),
        ("alt_text", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("captions", pa.list_(CAPTION_TYPE)),
    ]
)

STATUSES = ("ok", "failed", "skipped")


def output_schema(kept: Collection = ()) -> pa.Schema:
    """The output's schema: OUTPUT_SCHEMA, then the source fields the run keeps (`input.keep_columns`)."""
    schema = OUTPUT_SCHEMA
    for field in kept:
        schema = schema.append(field.arrow_field)
    return schema


def run_schema(run_meta: dict) -> pa.Schema:
    """The schema of a run's part files, from the fields its metadata says it keeps."""
    from recaption.fields import KeptField

    return output_schema([KeptField(**f) for f in run_meta.get("kept_columns") or ()])


OWNER_FILE = "_recaption.json"  # says the directory is a recaption output: the only kind a run writes into
OUTPUT_KIND = "captions"
LAYOUT = 2  # 2: every file a run may delete carries `.recaption.` in its name (1: `part-<unit>.parquet`)
DONE_DIR = "_done"
ATTEMPTS_DIR = "_attempts"
RUN_INFO = "_run.json"
STATS_FILE = "_stats.json"  # the output's totals, from every unit's marker: rewritten at the end of each run
# Every name a run deletes matches one of these, so a user's file (`part-00000-….snappy.parquet`, `.tmp-mywork`, a
# note under `_attempts/`) is never taken for one of ours.
TMP_PREFIX = ".recaption-tmp-"
PART_PREFIX, PART_SUFFIX = "part-", ".recaption.parquet"
MARKER_SUFFIX = ".recaption.json"
ATTEMPTS_SUFFIX = ".recaption.json"
METADATA_KEY = b"recaption"


def attempts_name(unit: str, model_id: str) -> str:
    return f"{unit}.{re.sub(r'[^A-Za-z0-9._-]', '_', model_id)}{ATTEMPTS_SUFFIX}"


def unit_of_part(name: str) -> str | None:
    """The unit of one of our part file names, else None."""
    if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX) and len(name) > len(PART_PREFIX + PART_SUFFIX):
        return name[len(PART_PREFIX) : -len(PART_SUFFIX)]
    return None


def unit_of_marker(name: str) -> str | None:
    """The unit of one of our done-marker names, else None."""
    if name.endswith(MARKER_SUFFIX) and not name.startswith(TMP_PREFIX) and len(name) > len(MARKER_SUFFIX):
        return name[: -len(MARKER_SUFFIX)]
    return None


class OutputDir:
    """An output directory on any pyarrow filesystem; the only place the pipeline writes."""

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/")
        self.uri = strip_credentials(uri) if uri else self.root  # for messages: never a credential
        self.atomic_rename = isinstance(fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def part_name(self, unit: str) -> str:
        return f"{PART_PREFIX}{unit}{PART_SUFFIX}"

    def marker_path(self, unit: str) -> str:
        return self.path(DONE_DIR, f"{unit}{MARKER_SUFFIX}")

    def attempts_path(self, unit: str, model_id: str) -> str:
        return self.path(ATTEMPTS_DIR, attempts_name(unit, model_id))

    def owner(self) -> dict | None:
        """The ownership record of the directory, None where it has none (or one that is not ours)."""
        path = self.path(OWNER_FILE)
        if not self.fs.get_file_info(path).is_file:
            return None
        try:
            data = json.loads(self.read_bytes(path))
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("tool") == "recaption" else None

    def claim(self) -> None:
        """Makes sure the directory is ours before anything is written: a new or empty directory becomes a recaption
        output; one that already is stays; anything else is refused in one line (ConfigError), untouched."""
        state, refusal = self.state()
        if refusal:
            raise ConfigError(refusal)
        if state == "ours":
            return
        self.fs.create_dir(self.root, recursive=True)
        record = {"tool": "recaption", "kind": OUTPUT_KIND, "layout": LAYOUT, "created_at": time.time()}
        self.write_json(self.path(OWNER_FILE), record)

    def state(self) -> tuple[str, str | None]:
        """What the directory is now, read only: `new` (absent), `empty`, `ours` (a captions output of this layout)
        or `refused`, with the one line a run would fail with."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            return "refused", f"output.path {self.uri} is a file; give a directory (new or empty)"
        owner = self.owner() if info.type == pafs.FileType.Directory else None
        if owner is not None:
            if owner.get("kind") != OUTPUT_KIND:
                return "refused", (
                    f"output.path {self.uri} is a recaption {owner.get('kind')} directory, not a captions output; "
                    "choose another output.path"
                )
            if owner.get("layout") != LAYOUT:
                return "refused", (
                    f"output.path {self.uri} was written by another recaption version (layout "
                    f"{owner.get('layout')}, this one writes {LAYOUT}); choose a new output.path"
                )
            return "ours", None
        if info.type != pafs.FileType.Directory:
            return "new", None
        names = sorted(e.base_name for e in self._entries())
        if not names:
            return "empty", None
        if RUN_INFO in names and self._legacy_run_info():
            return "refused", (
                f"output.path {self.uri} was written by an older recaption (part-*.parquet names, no "
                f"{OWNER_FILE}); it stays readable, but a run needs a new output.path"
            )
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        return "refused", (
            f"output.path {self.uri} is not empty and is not a recaption output (it holds {len(names)} entries: "
            f"{shown}); choose a new or empty directory"
        )

    def _legacy_run_info(self) -> bool:
        try:
            return "config_hash" in json.loads(self.read_bytes(self.path(RUN_INFO)))
        except (OSError, ValueError, TypeError):
            return False

    def _entries(self) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))

    def prepare(self, done: Collection[str] | None = None) -> None:
        """Creates the directories and removes what a killed run left behind, matching only names a run writes:
        temp files, part files whose unit has no marker (so readers never see rows of a unit that is not done),
        and attempt counts (a run killed while captioning is no engine crash: only actor deaths within one run
        count against `max_unit_attempts`). `done`: the done units, where the caller has listed them already."""
        done = set(done) if done is not None else set(self.marker_infos())
        for directory in (self.root, self.path(DONE_DIR), self.path(ATTEMPTS_DIR)):
            self.fs.create_dir(directory, recursive=True)
            if directory == self.path(DONE_DIR) and not self.atomic_rename:
                continue  # object stores: markers are written in one PUT, never under a temp name
            for info in self.fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
                ours = info.base_name.startswith(TMP_PREFIX)
                ours |= directory.endswith(ATTEMPTS_DIR) and info.base_name.endswith(ATTEMPTS_SUFFIX)
                unit = unit_of_part(info.base_name) if directory == self.root else None
                ours |= unit is not None and unit not in done
                if info.is_file and ours:
                    self.fs.delete_file(info.path)
        remove_temps(self)

    def delete_if_exists(self, path: str) -> None:
        if self.fs.get_file_info(path).is_file:
            self.fs.delete_file(path)

    def clear(self) -> None:
        """Deletes what earlier runs wrote here, nothing else: the done manifest and markers first, then part files,
        then run info, so a kill at any point leaves part files without markers, which the next run removes and
        redoes."""
        self.delete_if_exists(self.path(DONE_MANIFEST))
        markers = self.fs.get_file_info(pafs.FileSelector(self.path(DONE_DIR), allow_not_found=True))
        for info in markers:
            if info.is_file and unit_of_marker(info.base_name) is not None:
                self.fs.delete_file(info.path)
        fault_point("overwrite:after-markers")
        for info in self._entries():
            if info.is_file and unit_of_part(info.base_name) is not None:
                self.fs.delete_file(info.path)
        attempts = self.fs.get_file_info(pafs.FileSelector(self.path(ATTEMPTS_DIR), allow_not_found=True))
        for info in attempts:
            if info.is_file and info.base_name.endswith(ATTEMPTS_SUFFIX):
                self.fs.delete_file(info.path)
        self.delete_if_exists(self.path(RUN_INFO))
        self.delete_if_exists(self.path(STATS_FILE))

    def marker_infos(self) -> dict[str, pafs.FileInfo]:
        """The markers as listed (no content read), by unit."""
        selector = pafs.FileSelector(self.path(DONE_DIR), allow_not_found=True)
        found = {}
        for info in self.fs.get_file_info(selector):
            unit = unit_of_marker(info.base_name)
            if info.is_file and unit is not None:
                found[unit] = info
        return found

    def part_paths(self) -> list[str]:
        """The output's part files, sorted (an older output's `part-*.parquet` where the directory has no owner
        record); InputError when there are none."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            raise InputError(f"output directory not found: {self.uri}")
        entries = self._entries()
        if any(e.base_name == OWNER_FILE for e in entries):
            parts = [e.path for e in entries if e.is_file and unit_of_part(e.base_name) is not None]
        else:
            parts = [e.path for e in entries if e.is_file and is_legacy_part(e.base_name)]
        if not parts:
            raise InputError(f"no part files in {self.uri}: not a recaption output (or nothing committed yet)")
        return sorted(parts)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_atomic(self, path: str, data: bytes, fault: str | None = None) -> None:
        """Readers never see a partial file: write a temp name beside it, then rename (object stores: one PUT)."""
        if not self.atomic_rename:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        directory, name = path.rsplit("/", 1)
        self.fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if fault:
            fault_point(fault)
        self.fs.move(tmp, path)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode())

    def commit_unit(self, unit: str, table: pa.Table, run_meta: dict, stats: dict, compression: str) -> None:
        """Writes the unit's Parquet, then its done marker: the marker is only ever written after the data. A unit
        without rows (an img2dataset shard whose downloads all failed) is a file with the schema and no row group,
        which every Parquet reader takes as empty (an empty row group breaks `datasets`)."""
        fault_raise("commit:enospc", lambda: OSError(errno.ENOSPC, "No space left on device"))
        schema = run_schema(run_meta)
        table = table.select(schema.names).cast(schema)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(run_meta, sort_keys=True).encode()})
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, table.schema, compression=None if compression == "none" else compression) as w:
            if table.num_rows:
                w.write_table(table)
        self.write_atomic(self.path(self.part_name(unit)), buf.getvalue(), fault="commit:before-rename")
        fault_point("commit:after-data")
        self.write_json(self.marker_path(unit), {**stats, "unit": unit, "committed_at": time.time()})

    def read_part(self, unit: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(self.part_name(unit))) as f:
            return pq.read_table(f, columns=columns)

    def replace_rows(self, unit: str, table: pa.Table, run_meta: dict, stats: dict, compression: str) -> None:
        """A done unit's part file with the rows of `table` in place of the rows with their keys, replaced in one
        atomic step (rename; one PUT on object stores): a kill leaves the old file or the new one, and the unit's
        marker, which exists throughout, is rewritten after with the new counts."""
        merged = merge_rows(self.read_part(unit), table, run_schema(run_meta))
        merged = merged.replace_schema_metadata({METADATA_KEY: json.dumps(run_meta, sort_keys=True).encode()})
        buf = io.BytesIO()
        pq.write_table(merged, buf, compression=None if compression == "none" else compression)
        self.write_atomic(self.path(self.part_name(unit)), buf.getvalue(), fault="retry:before-replace")
        previous = json.loads(self.read_bytes(self.marker_path(unit)))
        counts = unit_stats(merged, previous.get("seconds", 0.0) + stats["seconds"], stats["config_hash"])
        retried = {"retried_rows": previous.get("retried_rows", 0) + table.num_rows, "retried_at": time.time()}
        self.write_json(self.marker_path(unit), {**previous, **counts, **retried})


def merge_rows(old: pa.Table, new: pa.Table, schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """`old` with each row whose key is in `new` replaced by that row, in old's order (keys are unique in a unit)."""
    replacement = {row["key"]: row for row in new.select(schema.names).to_pylist()}
    rows = [replacement.get(row["key"], row) for row in old.select(schema.names).to_pylist()]
    return pa.Table.from_pylist(rows, schema=schema)


def is_legacy_part(name: str) -> bool:
    """A part file name of an output written before layout 2 (which had no owner record)."""
    return name.startswith(PART_PREFIX) and name.endswith(".parquet")


def open_output(path: str) -> OutputDir:
    """The output directory a path or URI names (local, s3://, gs://)."""
    from recaption.sources import resolve

    if not str(path).strip():
        raise ConfigError("output.path is empty; give a directory for the output")
    fs, root = resolve(path)
    return OutputDir(fs, root, path)


def unit_stats(table: pa.Table, seconds: float, config_hash: str) -> dict:
    """The numbers a done marker records about a committed unit: rows by status, failed rows by error kind
    (`errors`, like img2dataset's `status_dict`), generated tokens, seconds, config hash."""
    from recaption.errors import error_counts

    statuses = table.column("status").to_pylist()
    tokens = 0
    for caps in table.column("captions").to_pylist():
        tokens += sum(c["n_tokens"] or 0 for c in caps or [])
    errors = [e for s, e in zip(statuses, table.column("error").to_pylist(), strict=True) if s == "failed"]
    return {
        "rows": table.num_rows,
        "ok": statuses.count("ok"),
        "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"),
        "errors": error_counts(errors),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "config_hash": config_hash,
    }


def output_totals(done: dict[str, dict]) -> dict:
    """The totals of an output from its done units' markers: units, rows by status, failed rows by error kind,
    tokens, seconds (summed over units). Markers written before error kinds were counted add their failed rows as
    `(not counted)`, so the kinds always sum to `failed`."""
    from recaption.errors import merge_error_counts

    totals = {"units": len(done), **dict.fromkeys(("rows", "ok", "failed", "skipped", "tokens"), 0), "seconds": 0.0}
    kinds = []
    for marker in done.values():
        for k in ("rows", "ok", "failed", "skipped", "tokens"):
            totals[k] += int(marker.get(k) or 0)
        totals["seconds"] += float(marker.get("seconds") or 0.0)
        errors = marker.get("errors")
        kinds.append(errors if isinstance(errors, dict) else {"(not counted)": int(marker.get("failed") or 0)})
    totals["seconds"] = round(totals["seconds"], 3)
    totals["errors"] = {k: n for k, n in merge_error_counts(kinds).items() if n}
    return totals


def read_run_metadata(parquet_path: str) -> dict:
    """The run metadata (config, hash, versions) stored in an output Parquet file."""
    meta = pq.read_schema(parquet_path).metadata or {}
    return json.loads(meta[METADATA_KEY])


MANIFEST_DIR = "_manifest"


DONE_MANIFEST = f"{MANIFEST_DIR}/done.recaption.json.gz"


def remove_temps(out: OutputDir) -> None:
    """Temporary files a killed run left in the manifest and index folders (only the run that holds the output calls
    this, before anything of its own is written there)."""
    from recaption.sources import INDEX_DIR

    for directory in (MANIFEST_DIR, INDEX_DIR):
        selector = pafs.FileSelector(out.path(directory), allow_not_found=True)
        for info in out.fs.get_file_info(selector):
            if info.is_file and info.base_name.startswith(TMP_PREFIX):
                out.fs.delete_file(info.path)

"""The output contract: Arrow schema, atomic Parquet commit of a unit, done markers, and run metadata."""

from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recaption.faults import fault_point

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
DONE_DIR = "_done"
ATTEMPTS_DIR = "_attempts"
RUN_INFO = "_run.json"
TMP_PREFIX = ".tmp-"
METADATA_KEY = b"recaption"


class OutputDir:
    """An output directory on any pyarrow filesystem; the only place the pipeline writes."""

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs = fs
        self.root = root.rstrip("/")
        self.atomic_rename = isinstance(fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def part_name(self, unit: str) -> str:
        return f"part-{unit}.parquet"

    def marker_path(self, unit: str) -> str:
        return self.path(DONE_DIR, f"{unit}.json")

    def prepare(self) -> None:
        """Creates the directories and removes what a killed run left behind: temp files, part files whose unit has
        no marker (so readers never see rows of a unit that is not done), and attempt counts (a run killed while
        captioning is no engine crash: only actor deaths within one run count against `max_unit_attempts`)."""
        for directory in (self.root, self.path(DONE_DIR), self.path(ATTEMPTS_DIR)):
            self.fs.create_dir(directory, recursive=True)
            for info in self.fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
                if info.base_name.startswith(TMP_PREFIX):
                    self.fs.delete_file(info.path)
        self.fs.delete_dir_contents(self.path(ATTEMPTS_DIR), missing_dir_ok=True)
        done = self.done_units()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            unit = info.base_name.removeprefix("part-").removesuffix(".parquet")
            if info.is_file and info.base_name == self.part_name(unit) and unit not in done:
                self.fs.delete_file(info.path)

    def delete_if_exists(self, path: str) -> None:
        if self.fs.get_file_info(path).is_file:
            self.fs.delete_file(path)

    def clear(self) -> None:
        """Deletes everything an earlier run wrote here (part files, markers, run info), nothing else."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            name = info.base_name
            if info.is_file and (name.startswith("part-") and name.endswith(".parquet") or name == RUN_INFO):
                self.fs.delete_file(info.path)
        for sub in (DONE_DIR, ATTEMPTS_DIR):
            self.fs.delete_dir_contents(self.path(sub), missing_dir_ok=True)

    def done_units(self) -> dict[str, dict]:
        """Units whose marker exists: a unit is done iff its marker exists."""
        selector = pafs.FileSelector(self.path(DONE_DIR), allow_not_found=True)
        done = {}
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if name.endswith(".json") and not name.startswith(TMP_PREFIX):
                done[name[: -len(".json")]] = json.loads(self.read_bytes(info.path))
        return done

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
        """Writes the unit's Parquet, then its done marker: the marker is only ever written after the data."""
        table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(run_meta, sort_keys=True).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=None if compression == "none" else compression)
        self.write_atomic(self.path(self.part_name(unit)), buf.getvalue(), fault="commit:before-rename")
        fault_point("commit:after-data")
        self.write_json(self.marker_path(unit), {**stats, "unit": unit, "committed_at": time.time()})


def open_output(path: str) -> OutputDir:
    """The output directory a path or URI names (local, s3://, gs://)."""
    from recaption.shards.fs import resolve

    fs, root = resolve(path)
    return OutputDir(fs, root)


def unit_stats(table: pa.Table, seconds: float, config_hash: str) -> dict:
    """The numbers a done marker records about a committed unit."""
    statuses = table.column("status").to_pylist()
    tokens = 0
    for caps in table.column("captions").to_pylist():
        tokens += sum(c["n_tokens"] or 0 for c in caps or [])
    return {
        "rows": table.num_rows,
        "ok": statuses.count("ok"),
        "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "config_hash": config_hash,
    }


def read_run_metadata(parquet_path: str) -> dict:
    """The run metadata (config, hash, versions) stored in an output Parquet file."""
    meta = pq.read_schema(parquet_path).metadata or {}
    return json.loads(meta[METADATA_KEY])

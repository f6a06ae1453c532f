"""The pipeline's CPU stages and the unit payload: read+decode, and commit (captioning is in captioning.py).

A unit travels between stages as one row: its id, its start time, and its records as an Arrow IPC stream
(`payload`), so Ray never splits a unit. Images travel as their original bytes: the read stage only reads them, each
caption stage decodes (and checks) the pixels it needs, so an image is decoded once per model; the last model's
stage drops the image column, so the commit stage moves only captions.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any

import pyarrow as pa

from recaption.config import InputConfig
from recaption.job.writer import OUTPUT_SCHEMA, output_schema
from recaption.redact import redact_text
from recaption.sources import display

log = logging.getLogger(__name__)

PAYLOAD_SCHEMA = OUTPUT_SCHEMA.append(pa.field("image", pa.binary()))


def payload_schema(kept=()) -> pa.Schema:
    """A unit's rows between stages: the output's columns (with the kept source fields) and the image bytes."""
    return output_schema(kept).append(pa.field("image", pa.binary()))


SUMMARY_FIELDS = (
    "unit",
    "rows",
    "ok",
    "failed",
    "skipped",
    "tokens",
    "seconds",
    "error",
    "fatal",
    "retry",
    "metrics",
    "error_kinds",
)


def to_ipc(table: pa.Table) -> pa.Buffer:
    """The table as one Arrow IPC stream, in a Buffer (`to_pybytes` would copy a whole unit's bytes once more)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes | pa.Buffer) -> pa.Table:
    """The unit's table over `data`, without a copy."""
    return pa.ipc.open_stream(data if isinstance(data, pa.Buffer) else pa.py_buffer(data)).read_all()


def binary_cell(column: pa.ChunkedArray | pa.Array, i: int) -> pa.Buffer | None:
    """Value `i` of a binary column as a Buffer over the column's own memory, or None where it is null. Indexing the
    column (`column[i]`, `to_pylist`) copies the value, so a unit's payload or its images read that way cost a whole
    unit's bytes more per unit in flight."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if i >= len(chunk):
            i -= len(chunk)
            continue
        validity, offsets, data = chunk.buffers()
        j = chunk.offset + i
        if validity is not None and not validity[j // 8] >> (j % 8) & 1:  # its bit, not the whole column's
            return None
        at = memoryview(offsets).cast("q" if pa.types.is_large_binary(chunk.type) else "i")
        start, end = at[j], at[j + 1]
        return data.slice(start, end - start) if data is not None else pa.py_buffer(b"")
    raise IndexError(f"row {i} is past the end of the column")


def unit_rows(batch: pa.Table) -> list[dict[str, Any]]:
    """The unit rows of a batch, each payload a Buffer over the batch's memory (in a caption actor: the block in
    Ray's shared memory), not a copy of the unit's image bytes."""
    payloads = batch.column("payload")
    rows = batch.drop_columns(["payload"]).to_pylist()
    for i, row in enumerate(rows):
        row["payload"] = binary_cell(payloads, i) or b""
    return rows


def unit_row(
    unit: str,
    t_start: float,
    table: pa.Table | None,
    error: str | None = None,
    retry: bool = False,
    fatal: bool = False,
    metrics: str | None = None,
) -> dict[str, Any]:
    """A unit as it travels between stages; `error` set means it is not committed (a rerun retries it), `fatal` that
    no later unit can be either (the output cannot be written); `retry`: its rows are the failed rows of a done
    unit, to be merged into its part file."""
    payload = to_ipc(table) if table is not None else b""
    return {
        "unit": unit,
        "t_start": t_start,
        "payload": payload,
        "error": error,
        "retry": retry,
        "fatal": fatal,
        "metrics": metrics,  # JSON: each caption stage's engine figures when this unit left it (by model id)
    }


UNIT_ROW_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("t_start", pa.float64()),
        ("payload", pa.large_binary()),
        ("error", pa.string()),
        ("retry", pa.bool_()),
        ("fatal", pa.bool_()),
        ("metrics", pa.string()),
    ]
)


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Unit rows as a block. Each payload becomes a column chunk over its own Buffer: `from_pylist` would copy every
    unit's bytes into a new column."""
    at = UNIT_ROW_SCHEMA.get_field_index("payload")
    field = UNIT_ROW_SCHEMA.field(at)
    others = pa.Table.from_pylist(
        [{k: v for k, v in row.items() if k != "payload"} for row in rows], schema=UNIT_ROW_SCHEMA.remove(at)
    )
    chunks = [_one_value(row["payload"], field.type) for row in rows]
    return others.add_column(at, field, pa.chunked_array(chunks, field.type))


def _one_value(data: bytes | pa.Buffer, kind: pa.DataType) -> pa.Array:
    """A one-value large_binary array over `data`'s memory."""
    buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    offsets = pa.array([0, buffer.size], pa.int64()).buffers()[1]
    return pa.Array.from_buffers(kind, 1, [None, offsets, buffer])


def describe(exc: BaseException) -> str:
    """A readable one-line error for an output row."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def unfused() -> dict:
    """No remote arguments to add: given as a stage's `ray_remote_args_fn`, it keeps Ray Data from fusing the stage
    into the next one. Ray Data fuses a task stage into the actor stage after it whenever their resources are equal
    (a read at `read_num_cpus` and a caption actor of the same `num_cpus`), and the read then runs inside the caption
    actor: its reads hold the actor (its engine waits) and each unit's bytes are built in the actor's own memory."""
    return {}


def run_as_task(batch: pa.Table, stage: type, kwargs: dict) -> pa.Table:
    """Runs a CPU stage class as a plain Ray task (Ray Data schedules callable classes only on actors)."""
    return stage(**kwargs)(batch)


class ReadStage:
    """Reads one unit's records from its shard (CPU task); the caption stage decodes and checks the images. For a
    unit to retry, only the records whose rows failed in its committed part file."""

    def __init__(self, input_cfg: dict, output_path: str | None = None, kept: list[dict] | None = None):
        from recaption.fields import KeptField

        self.input_cfg = InputConfig.model_validate(input_cfg)
        self.output_path = output_path
        self.kept = [KeptField(**f) for f in kept or ()]  # source fields that become output columns
        self.schema = payload_schema(self.kept)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from recaption.sources import WorkUnit

        return rows_table([self.read(WorkUnit.from_dict(u)) for u in batch.to_pylist()])

    def read(self, unit) -> dict[str, Any]:
        from recaption.sources import read_unit

        t_start = time.time()
        rows = []
        try:
            wanted = self.failed_keys(unit.unit) if unit.retry else None
            for rec in read_unit(unit, self.input_cfg):
                if wanted is not None and rec.key not in wanted:
                    continue
                row = {
                    "key": rec.key,
                    "source": rec.source or unit.source,
                    "unit": unit.unit,
                    "url": rec.url,
                    "alt_text": rec.alt_text,
                    "status": "failed",
                    "error": rec.error,
                    "captions": [],
                }
                row.update((f.column, f.value(rec.meta)) for f in self.kept)
                if rec.error is None:  # size and hash come from the caption stage's decode
                    row.update(status="ok", image=rec.image or b"")
                rows.append(row)
        except Exception as e:  # an unreadable shard: the unit is not committed, so a rerun retries it
            where = unit.source or display(unit.uri)
            error = redact_text(f"cannot read {where}: {describe(e)}")
            log.warning("unit %s: %s", unit.unit, error)  # one line; the summary says it again
            log.debug("unit %s: %s", unit.unit, redact_text(traceback.format_exc()))
            return unit_row(unit.unit, t_start, None, error, retry=unit.retry)
        return unit_row(unit.unit, t_start, pa.Table.from_pylist(rows, schema=self.schema), retry=unit.retry)

    def failed_keys(self, unit: str) -> set[str]:
        """Keys of the failed rows in the unit's committed part file."""
        import pyarrow.compute as pc

        from recaption.job.writer import open_output

        table = open_output(self.output_path).read_part(unit, columns=["key", "status"])
        return set(table.filter(pc.equal(table.column("status"), "failed")).column("key").to_pylist())


class CommitStage:
    """Commits a unit: Parquet first, done marker after, then forgets its attempt counts (CPU task). Only while this
    run holds the output's lease; an output that cannot be written ends the run (`fatal`), never a marker."""

    def __init__(self, output_path: str, compression: str, run_meta: dict, model_ids: list[str], run_id: str):
        from recaption.job.writer import open_output

        self.out = open_output(output_path)
        self.compression = compression
        self.run_meta = run_meta
        self.model_ids = model_ids
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.commit(row) for row in unit_rows(batch)])

    def commit(self, row: dict) -> dict:
        from recaption.job.lease import check_holder
        from recaption.job.writer import unit_stats
        from recaption.retry import with_retries

        summary = dict.fromkeys(SUMMARY_FIELDS, 0) | {"unit": row["unit"], "error": row["error"], "fatal": row["fatal"]}
        summary.update(retry=row["retry"], metrics=row.get("metrics"), error_kinds="{}")
        if row["error"]:
            return summary
        table = from_ipc(row["payload"])
        stats = unit_stats(table, time.time() - row["t_start"], self.run_meta["config_hash"])
        commit = self.out.commit_unit
        if row["retry"]:
            commit = self.out.replace_rows  # the retried rows replace their failed rows in the unit's part file
        try:
            refused = with_retries(lambda: check_holder(self.out, self.run_id), "reading the output lease")
            if refused:
                return summary | {"error": f"{refused}; this run may not write here any more", "fatal": True}
            with_retries(
                lambda: commit(row["unit"], table, self.run_meta, stats, self.compression),
                f"committing unit {row['unit']}",
            )
            for model_id in self.model_ids:
                self.out.delete_if_exists(self.out.attempts_path(row["unit"], model_id))
        except OSError as e:  # a full disk, no permission, a store that stays down: no later unit would fare better
            error = redact_text(f"cannot write the output {self.out.uri}: {e}")
            log.debug("unit %s: %s", row["unit"], redact_text(traceback.format_exc()))
            return summary | {"error": error, "fatal": True}
        # this unit's failed rows by error kind, as JSON: one string column whatever the kinds
        return (
            summary | {k: stats[k] for k in SUMMARY_FIELDS if k in stats} | {"error_kinds": json.dumps(stats["errors"])}
        )

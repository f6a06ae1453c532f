"""The pipeline's stages, each mapping one work unit to one work unit: read+decode, caption, clean, commit.

A unit travels between stages as one row: its id, its start time, and its records as an Arrow IPC stream
(`payload`), so Ray never splits a unit and images stay encoded bytes until the stage that needs pixels.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import pyarrow as pa

from recaption.config import ImageConfig, InputConfig, ModelConfig, PostprocessConfig
from recaption.errors import ImageError
from recaption.writer import CAPTION_TYPE, OUTPUT_SCHEMA

log = logging.getLogger(__name__)

PAYLOAD_SCHEMA = OUTPUT_SCHEMA.append(pa.field("image", pa.binary()))
SUMMARY_FIELDS = ("unit", "rows", "ok", "failed", "skipped", "tokens", "seconds", "error")


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def unit_row(unit: str, t_start: float, table: pa.Table | None, error: str | None = None) -> dict[str, Any]:
    return {"unit": unit, "t_start": t_start, "payload": to_ipc(table) if table is not None else b"", "error": error}


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema(
        [("unit", pa.string()), ("t_start", pa.float64()), ("payload", pa.large_binary()), ("error", pa.string())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def describe(exc: BaseException) -> str:
    """A readable one-line error for an output row."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_as_task(batch: pa.Table, stage: type, kwargs: dict) -> pa.Table:
    """Runs a CPU stage class as a plain Ray task (Ray Data schedules callable classes only on actors)."""
    return stage(**kwargs)(batch)


class ReadStage:
    """Reads one unit's records from its shard and decodes every image (CPU task)."""

    def __init__(self, input_cfg: dict, image_cfg: dict):
        self.input_cfg = InputConfig.model_validate(input_cfg)
        self.image_cfg = ImageConfig.model_validate(image_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from recaption.shards import WorkUnit

        return rows_table([self.read(WorkUnit.from_dict(u)) for u in batch.to_pylist()])

    def read(self, unit) -> dict[str, Any]:
        from recaption.images import decode_image
        from recaption.shards.read import read_unit

        t_start = time.time()
        rows = []
        try:
            for rec in read_unit(unit, self.input_cfg):
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
                if rec.error is None:
                    try:
                        img = decode_image(rec.image or b"", self.image_cfg)
                    except ImageError as e:
                        row["error"] = str(e)
                    else:
                        row.update(status="ok", width=img.width, height=img.height, image_sha256=img.sha256)
                        row["image"] = img.data
                rows.append(row)
        except Exception as e:  # an unreadable shard: the unit is not committed, so a rerun retries it
            log.error("unit %s: cannot read %s: %s", unit.unit, unit.uri, traceback.format_exc())
            return unit_row(unit.unit, t_start, None, f"cannot read {unit.source or unit.uri}: {describe(e)}")
        return unit_row(unit.unit, t_start, pa.Table.from_pylist(rows, schema=PAYLOAD_SCHEMA))


class CaptionStage:
    """Captions every ok image × prompt of a unit with one model (an actor holding one engine)."""

    def __init__(self, model_cfg: dict, prompt_texts: dict[str, str]):
        from recaption.engines.base import build_captioner

        self.model = ModelConfig.model_validate(model_cfg)
        self.prompt_texts = prompt_texts
        self.captioner = build_captioner(self.model)
        self.n = self.model.generation.n

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            if row["error"]:
                out.append(row)
                continue
            table = self.caption(from_ipc(row["payload"]))
            out.append(unit_row(row["unit"], row["t_start"], table))
        return rows_table(out)

    def caption(self, table: pa.Table) -> pa.Table:
        from recaption.images import load_rgb

        rows = table.to_pylist()
        todo, images = [], []
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                continue
            try:
                images.append(load_rgb(row["image"]))
                todo.append(i)
            except Exception as e:  # validated in ReadStage, so this is unexpected; fail the row, not the unit
                row.update(status="failed", error=f"decode before captioning: {describe(e)}")
        names = self.model.prompts
        if todo:
            pairs = [(img, name) for img in images for name in names]
            try:
                gens = self.captioner.caption([p[0] for p in pairs], [self.prompt_texts[p[1]] for p in pairs])
            except Exception as e:
                log.error("model %s failed on a unit: %s", self.model.id, traceback.format_exc())
                error = f"model {self.model.id}: {describe(e)}"
                for i in todo:
                    rows[i].update(status="failed", error=error)
                todo = []
            per_image = len(names) * self.n
            for n, i in enumerate(todo):
                for k, name in enumerate(names):
                    for j in range(self.n):
                        self.append(rows[i], name, gens[n * per_image + k * self.n + j])
        return pa.Table.from_pylist(rows, schema=table.schema)

    def append(self, row: dict, prompt: str, gen) -> None:
        flags = list(gen.flags)
        if gen.error:
            flags.append("error")
            error = f"model {self.model.id} prompt {prompt}: {gen.error}"
            row.update(status="failed", error=f"{row['error']}; {error}" if row["error"] else error)
        row["captions"].append(
            {
                "model": self.model.id,
                "prompt": prompt,
                "text": gen.text,
                "sub_captions": [],
                "n_tokens": gen.n_tokens,
                "finish_reason": gen.finish_reason,
                "flags": flags,
            }
        )


class CommitStage:
    """Cleans and splits captions, then commits the unit: Parquet first, done marker after (CPU task)."""

    def __init__(self, output_path: str, compression: str, run_meta: dict, prompt_texts: dict, post_cfg: dict):
        from recaption.writer import open_output

        self.out = open_output(output_path)
        self.compression = compression
        self.run_meta = run_meta
        self.prompt_texts = prompt_texts
        self.post_cfg = PostprocessConfig.model_validate(post_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.commit(row) for row in batch.to_pylist()])

    def commit(self, row: dict) -> dict:
        from recaption.postprocess import clean_caption
        from recaption.writer import unit_stats

        summary = dict.fromkeys(SUMMARY_FIELDS, 0) | {"unit": row["unit"], "error": row["error"]}
        if row["error"]:
            return summary
        table = from_ipc(row["payload"])
        captions = [
            [clean_caption(c, self.prompt_texts.get(c["prompt"], ""), self.post_cfg) for c in caps]
            for caps in table.column("captions").to_pylist()
        ]
        table = table.set_column(
            table.schema.get_field_index("captions"), "captions", pa.array(captions, pa.list_(CAPTION_TYPE))
        )
        stats = unit_stats(table, time.time() - row["t_start"], self.run_meta["config_hash"])
        self.out.commit_unit(row["unit"], table, self.run_meta, stats, self.compression)
        return summary | {k: stats[k] for k in SUMMARY_FIELDS if k in stats}

"""The caption stage: one actor holding one engine, captioning every ok image × prompt of a unit, surviving faults.

Faults, from the smallest to the largest: a generation that fails alone is an `error` caption; an engine call
that raises is retried image by image so only the images that raise fail; an engine that is dead (its process died,
its CUDA context faulted: `EngineDeadError`) ends the actor, as an engine that kills its process does, so Ray
starts a new actor and retries the unit, up to `max_unit_attempts` (counted in the output dir, so the count survives
the crash; each run starts by clearing the counts, `OutputDir.prepare`, so a killed driver or Ctrl-C is no engine
crash), after which the unit's rows are committed as failed (and `--retry-failed` can redo them later).
"""

from __future__ import annotations

import json
import logging
import math
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import pyarrow as pa

from recaption.config import GenerationConfig, ImageConfig, ModelConfig, PostprocessConfig
from recaption.engines.base import Generation, engine_dead
from recaption.errors import EXIT_ENGINE_DEAD, EngineDeadError, EngineError, OutputWriteError
from recaption.faults import fault_point, fault_raise
from recaption.postprocess import clean_caption
from recaption.redact import redact_text
from recaption.stages import describe, from_ipc, rows_table, unit_row

log = logging.getLogger(__name__)


class CaptionStage:
    """Captions the units that pass through it with one model; the result's captions are cleaned and final."""

    def __init__(
        self,
        model_cfg: dict,
        prompt_texts: dict[str, str],
        post_cfg: dict,
        output_path: str,
        image_cfg: dict | None = None,
        keep_images: bool = True,
    ):
        from recaption.engines.base import build_captioner
        from recaption.writer import open_output

        self.model = ModelConfig.model_validate(model_cfg)
        self.model.generation = self.model.generation or GenerationConfig()
        self.prompt_texts = prompt_texts
        self.post = PostprocessConfig.model_validate(post_cfg)
        self.image_cfg = ImageConfig.model_validate(image_cfg or {})
        self.keep_images = keep_images
        self.decode_threads = max(1, math.floor(self.model.num_cpus))
        self.pool: ThreadPoolExecutor | None = None
        self.out = open_output(output_path)
        self.n = self.model.generation.n
        self.captioner = build_captioner(self.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            if row["error"]:
                out.append(row)
                continue
            try:
                table = self.caption_unit(row["unit"], from_ipc(row["payload"]))
            except EngineDeadError as e:
                self.end_actor(row["unit"], e)
            except OutputWriteError as e:  # no unit can be committed now: the driver stops the run
                out.append(unit_row(row["unit"], row["t_start"], None, str(e), retry=row["retry"], fatal=True))
                continue
            out.append(unit_row(row["unit"], row["t_start"], table, retry=row["retry"]))
        return rows_table(out)

    def end_actor(self, unit: str, error: EngineDeadError) -> NoReturn:
        """A dead engine fails no row: this process ends, Ray starts a new actor and retries the unit, which counts
        as one more attempt at it (`max_unit_attempts`)."""
        log.error(
            "model %s: the engine is dead while captioning unit %s (%s); this actor ends so Ray replaces it and the "
            "unit is retried",
            self.model.id,
            unit,
            redact_text(str(error)),
        )
        logging.shutdown()
        os._exit(EXIT_ENGINE_DEAD)

    def caption_unit(self, unit: str, table: pa.Table) -> pa.Table:
        from recaption.errors import ImageError

        # The image bytes stay in Arrow (no copy into Python objects and back); rows carry everything else.
        image_column = table.column("image")
        rows = table.drop_columns(["image"]).to_pylist()
        todo = [i for i, row in enumerate(rows) if row["status"] == "ok"]
        attempt = self.begin_attempt(unit) if todo else 0
        fault_point("caption:start")
        if attempt > self.model.max_unit_attempts:
            error = f"model {self.model.id}: the engine crashed on this unit {attempt - 1} times; gave up"
            for i in todo:
                rows[i].update(status="failed", error=error)
            return self.unit_table(rows, image_column, table.schema)
        images = []
        for i, decoded in zip(list(todo), self.decode([image_column[i] for i in todo]), strict=True):
            row = rows[i]  # the read stage did not look inside: every bad image shows up here
            if isinstance(decoded, ImageError):
                row.update(status="failed", error=str(decoded), width=None, height=None, image_sha256=None)
                todo.remove(i)
            elif isinstance(decoded, Exception):  # a decoder bug, not a bad image: fail the row, not the unit
                row.update(status="failed", error=f"decode before captioning: {describe(decoded)}", image_sha256=None)
                todo.remove(i)
            else:
                row.update(width=decoded.width, height=decoded.height, image_sha256=decoded.sha256)
                images.append(decoded.image)
        done = [rows[i] for i in todo]
        for row, result in zip(done, self.generate(images), strict=True):
            if isinstance(result, str):
                row.update(status="failed", error=f"model {self.model.id}: {result}")
                continue
            for k, name in enumerate(self.model.prompts):
                for gen in result[k * self.n : (k + 1) * self.n]:
                    row["captions"].append(self.caption_struct(row, name, gen))
        if self.post.degenerate != "keep":
            self.handle_degenerate(done, images)
        return self.unit_table(rows, image_column, table.schema)

    def unit_table(self, rows: list[dict], image_column: pa.ChunkedArray, schema: pa.Schema) -> pa.Table:
        """The unit's rows with the image column put back (the last model's stage drops it: commit needs none)."""
        table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("image")))
        return table.append_column(schema.field("image"), image_column) if self.keep_images else table

    def decode(self, cells: list[pa.Scalar]) -> list:
        """Each image decoded, or the exception its decode raised. PIL releases the GIL while decoding, so an actor
        with several CPUs (a GPU worker's share of its node) decodes on that many threads and its engine waits less."""
        from recaption.images import decode_image

        def one(cell: pa.Scalar):
            try:
                return decode_image(memoryview(cell.as_buffer()) if cell.is_valid else b"", self.image_cfg)
            except Exception as e:
                return e

        if self.decode_threads == 1 or len(cells) < 2:
            return [one(c) for c in cells]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return list(self.pool.map(one, cells))

    def handle_degenerate(self, rows: list[dict], images: list) -> None:
        """Drops, or generates once more with a repetition penalty, this model's captions with degenerate flags."""
        bad = [
            (i, c)
            for i, row in enumerate(rows)
            for c, cap in enumerate(row["captions"])
            if cap["model"] == self.model.id
            and "error" not in cap["flags"]
            and set(cap["flags"]) & set(self.post.degenerate_flags)
        ]
        if not bad:
            return
        if self.post.degenerate == "drop":
            for i, c in bad:
                rows[i]["captions"][c].update(
                    text="", sub_captions=[], flags=[*rows[i]["captions"][c]["flags"], "dropped"]
                )
            return
        gen = self.model.generation
        retry = gen.model_copy(
            update={
                "n": 1,
                "seed": gen.seed + 1,
                "repetition_penalty": max(gen.repetition_penalty, self.post.regenerate_repetition_penalty),
            }
        )
        prompts = [rows[i]["captions"][c]["prompt"] for i, c in bad]
        try:
            gens = self.captioner.caption([images[i] for i, _ in bad], [self.prompt_texts[p] for p in prompts], retry)
        except EngineDeadError:
            raise
        except Exception:  # the first captions stay, flagged; a failed retry costs nothing more
            log.warning(
                "model %s: regenerating %d captions failed: %s", self.model.id, len(bad), traceback.format_exc()
            )
            return
        for (i, c), prompt, new in zip(bad, prompts, gens, strict=True):
            if new.error is None:
                struct = self.caption_struct(rows[i], prompt, new)
                rows[i]["captions"][c] = struct | {"flags": [*struct["flags"], "regenerated"]}

    def generate(self, images: list) -> list[list[Generation] | str]:
        """Per image, its prompts × n Generations, or the error of an engine call that raised on it alone."""
        if not images:
            return []
        names = self.model.prompts
        prompts = [self.prompt_texts[name] for name in names]
        try:
            fault_raise("engine:request-error", lambda: RuntimeError("injected request error"))
            gens = self.captioner.caption([im for im in images for _ in names], prompts * len(images))
        except EngineDeadError:
            raise
        except Exception as e:
            if engine_dead(e):  # an engine that does not classify its own faults
                raise EngineDeadError(f"model {self.model.id}: {describe(e)}") from e
            log.warning("model %s raised on %d images: %s", self.model.id, len(images), traceback.format_exc())
            if len(images) == 1:
                return [describe(e)]
            return [result for im in images for result in self.generate([im])]  # find the ones that raise
        per_image = len(names) * self.n
        if len(gens) != len(images) * per_image:  # an engine bug: captions would land on the wrong images
            raise EngineError(
                f"model {self.model.id}: the engine returned {len(gens)} generations for {len(images)} images × "
                f"{len(names)} prompts × n={self.n} (expected {len(images) * per_image})"
            )
        return [gens[i * per_image : (i + 1) * per_image] for i in range(len(images))]

    def caption_struct(self, row: dict, prompt: str, gen: Generation) -> dict:
        """The cleaned caption of one generation; an error also fails the row."""
        flags = list(gen.flags)
        if gen.error:
            flags.append("error")
            error = f"model {self.model.id} prompt {prompt}: {gen.error}"
            row.update(status="failed", error=f"{row['error']}; {error}" if row["error"] else error)
        raw = {
            "model": self.model.id,
            "prompt": prompt,
            "prompt_text": self.prompt_texts[prompt],
            "text": gen.text,
            "sub_captions": [],
            "n_tokens": gen.n_tokens,
            "finish_reason": gen.finish_reason,
            "flags": flags,
        }
        return clean_caption(raw, self.prompt_texts[prompt], self.post)

    def begin_attempt(self, unit: str) -> int:
        """Counts this attempt at the unit in the output dir before the engine sees it; returns its number. The count
        is this run's: `OutputDir.prepare` clears what a killed run left."""
        path = self.out.attempts_path(unit, self.model.id)
        previous = 0
        try:
            if self.out.fs.get_file_info(path).is_file:
                previous = json.loads(self.out.read_bytes(path))["attempts"]
            self.out.write_json(path, {"attempts": previous + 1, "model": self.model.id, "unit": unit})
        except OSError as e:
            raise OutputWriteError(redact_text(f"cannot write the output {self.out.uri}: {e}")) from e
        return previous + 1

"""The caption stage: one actor holding one engine, streaming the units that pass through it into that engine.

Several units are in flight in one actor (Ray Data runs `__call__`, an async generator, concurrently): each image is
decoded on a CPU thread as a slot frees up (at most `in_flight_images` decoded images per actor, whatever the unit
size), and its requests go straight to the engine runner (`recaption.captioners.engines.runner`), which keeps the engine's batch
full across unit boundaries. Results are still put together and committed per unit, in input order.

Faults, from the smallest to the largest: a generation that fails alone is an `error` caption; a request the engine
refuses or that raises alone fails its row; an engine that is dead (its process died, its CUDA context faulted:
`EngineDeadError`) ends the actor, as an engine that kills its process does, so Ray starts a new actor and retries
the unit, up to `max_unit_attempts` (counted in the output dir, so the count survives the crash; each run starts by
clearing the counts, `OutputDir.prepare`, so a killed driver or Ctrl-C is no engine crash), after which the unit's
rows are committed as failed (and `--retry-failed` can redo them later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import psutil
import pyarrow as pa
import pyarrow.compute as pc

from recaption.captioners import Generation, MissingField, Request, clean_caption, engine_dead, make_runner
from recaption.config import GenerationConfig, ImageConfig, ModelConfig, PostprocessConfig
from recaption.errors import EXIT_ENGINE_DEAD, EngineDeadError, EngineError, ImageError, OutputWriteError
from recaption.faults import fault_point, fault_raise
from recaption.job.stages import binary_cell, describe, from_ipc, rows_table, unit_row, unit_rows
from recaption.redact import redact_text

log = logging.getLogger(__name__)

# Rows of a unit held as Python objects at a time, beside those in flight: the grain at which captioned rows go back
# into Arrow.
CHUNK_ROWS = 64


class CaptionStage:
    """Captions the units that pass through it with one model; the result's captions are cleaned and final."""

    def __init__(
        self,
        model_cfg: dict,
        prompt_texts: dict[str, str],
        post_cfg: dict,
        output_path: str | None,
        image_cfg: dict | None = None,
        keep_images: bool = True,
        prompt_fallbacks: dict[str, str] | None = None,
    ):
        from recaption.captioners import build_captioner, build_prompts
        from recaption.job.writer import open_output

        use_system_allocator()
        self.model = ModelConfig.model_validate(model_cfg)
        self.model.generation = self.model.generation or GenerationConfig()
        self.prompt_texts = prompt_texts
        fallbacks = prompt_fallbacks or {}
        # Each prompt filled in from its row (`{alt_text}` …), or its fallback where the row lacks a field.
        self.prompts = build_prompts({n: {"text": t, "fallback": fallbacks.get(n)} for n, t in prompt_texts.items()})
        self.post = PostprocessConfig.model_validate(post_cfg)
        self.image_cfg = ImageConfig.model_validate(image_cfg or {})
        self.keep_images = keep_images
        self.out = open_output(output_path) if output_path else None  # None: attempts are not counted
        self.n = self.model.generation.n
        self.captioner = build_captioner(self.model)
        self.runner = make_runner(self.captioner, self.model)
        # Decoded images in flight: enough requests to fill the engine's batch twice (the next one forms while one
        # runs), never more; memory is bounded by this, not by the unit size.
        requests_per_image = len(self.model.prompts) * self.n
        self.in_flight_images = max(2, math.ceil(2 * self.runner.metrics.capacity / requests_per_image))
        from recaption.sources import decode_image

        self.decode_image = decode_image  # once: per image, the room's lazy lookup was 3% of the actor's time
        self.decode_pool = ThreadPoolExecutor(max(1, math.floor(self.model.num_cpus)), thread_name_prefix="decode")
        self._slots: dict[asyncio.AbstractEventLoop, tuple[asyncio.Semaphore, asyncio.Lock]] = {}
        self._turns: dict[asyncio.AbstractEventLoop, Turns] = {}

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        for row in unit_rows(batch):
            if row["error"]:  # a unit that failed before (its read): it carries no records
                yield rows_table([row | {"payload": b""}])
                continue
            try:
                table = await self.caption_unit_async(row["unit"], from_ipc(row["payload"]))
            except EngineDeadError as e:
                self.end_actor(row["unit"], e)
            except OutputWriteError as e:  # no unit can be committed now: the driver stops the run
                yield rows_table([unit_row(row["unit"], row["t_start"], None, str(e), retry=row["retry"], fatal=True)])
                continue
            out = unit_row(row["unit"], row["t_start"], table, retry=row["retry"])
            yield rows_table([out | {"metrics": self.add_metrics(row.get("metrics"))}])

    def add_metrics(self, previous: str | None) -> str:
        """The unit's metrics record with this model's engine figures added (the driver aggregates them)."""
        metrics = json.loads(previous) if previous else {}
        metrics[self.model.id] = {**self.runner.snapshot(), "actor": os.getpid(), **actor_memory()}
        return json.dumps(metrics)

    def end_actor(self, unit: str, error: EngineDeadError) -> NoReturn:
        """A dead engine fails no row: this process ends, Ray starts a new actor and retries the unit (and any other
        unit in flight here), which counts as one more attempt at it (`max_unit_attempts`)."""
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
        """`caption_unit_async` for callers without an event loop (tests, the ablation)."""
        return asyncio.run(self.caption_unit_async(unit, table))

    async def caption_unit_async(self, unit: str, table: pa.Table) -> pa.Table:
        # The image bytes stay in Arrow (no copy into Python objects and back); the rest of a row becomes a dict only
        # while its chunk is captioned (`caption_chunks`).
        image_column = table.column("image")
        meta = table.drop_columns(["image"])
        todo = bool(pc.any(pc.equal(meta.column("status"), "ok")).as_py())  # any row for the engine
        crashed = await asyncio.to_thread(self.attempts_so_far, unit) if todo else 0
        if crashed >= self.model.max_unit_attempts:
            error = f"model {self.model.id}: the engine crashed on this unit {crashed} times; gave up"
            rows = meta.to_pylist()
            for row in rows:
                if row["status"] == "ok":
                    row.update(status="failed", error=error)
            return self.with_images(pa.Table.from_pylist(rows, schema=meta.schema), table)
        # A unit that was in flight when this model's engine died before runs alone now, so a crash that still
        # follows is its own; it is counted once it runs, not while it waits, so units that only shared an actor
        # with a unit that crashes it lose one attempt at most.
        async with self.turns().take(alone=crashed > 0):
            if todo:
                await asyncio.to_thread(self.count_attempt, unit, crashed + 1)
            fault_point("caption:start")
            chunks = await self.caption_chunks(unit, meta, image_column)
            if todo:  # this attempt did not crash the engine: if the actor dies before the unit is passed on, the
                await asyncio.to_thread(self.uncount_attempt, unit, crashed)  # retry is no crash of this unit
        return self.with_images(pa.Table.from_batches(chunks, schema=meta.schema), table)

    async def caption_chunks(self, unit: str, meta: pa.Table, images: pa.ChunkedArray) -> list[pa.RecordBatch]:
        """The unit's rows captioned, `CHUNK_ROWS` at a time, each chunk a record batch as soon as its rows are done:
        a row is a Python dict (and its captions Python structs) only from its chunk's admission to that chunk's end,
        so an actor's memory follows its decode slots, not its units' sizes.

        A row's coroutine starts only once a decode slot is free, so a unit waiting for slots holds nothing per row;
        the actor's units admit their rows one unit after another, so the first to begin admitting is the first done,
        and the next one's rows enter as its last ones drain. A chunk that raises (a dead engine) raises once every chunk
        is done, as a unit whose rows all finished."""
        slots, admission = self.slots()
        chunks = []
        async with admission:
            for start in range(0, meta.num_rows, CHUNK_ROWS):
                rows = meta.slice(start, CHUNK_ROWS).to_pylist()
                tasks = {}
                for j, row in enumerate(rows):
                    if row["status"] != "ok":
                        continue
                    await slots.acquire()
                    tasks[j] = asyncio.ensure_future(self.caption_row(unit, start + j, row, images))
                    tasks[j].add_done_callback(lambda _: slots.release())
                chunks.append(asyncio.ensure_future(self.finish_chunk(unit, start, rows, tasks, images, meta.schema)))
        done = await asyncio.gather(*chunks, return_exceptions=True)
        error = next((d for d in done if isinstance(d, BaseException)), None)
        if error is not None:
            raise error
        return done

    async def finish_chunk(
        self,
        unit: str,
        start: int,
        rows: list[dict],
        tasks: dict[int, asyncio.Future],
        images: pa.ChunkedArray,
        schema: pa.Schema,
    ) -> pa.RecordBatch:
        """A chunk's rows with their captions (or why they failed), once all of them are done, as a record batch."""
        names = self.model.prompts
        done = []
        for j, result in zip(tasks, await asyncio.gather(*tasks.values()), strict=True):
            if result is None:  # its image failed to decode: the row says why
                continue
            row = rows[j]
            error = next((r for r in result if isinstance(r, BaseException)), None)
            if isinstance(error, EngineError):  # a dead engine, or one returning wrong counts: never a row failure
                raise error
            if error is not None:
                row.update(status="failed", error=f"model {self.model.id}: {describe(error)}")
                continue
            for name, gens in zip(names, result, strict=True):
                for gen in gens:
                    row["captions"].append(self.caption_struct(row, name, gen))
            done.append((start + j, row))
        if self.post.degenerate != "keep":
            await self.handle_degenerate(unit, done, images)
        return pa.RecordBatch.from_pylist(rows, schema=schema)

    def slots(self) -> tuple[asyncio.Semaphore, asyncio.Lock]:
        """This event loop's decode slots (images in flight) and the lock units take in turn to admit their rows."""
        loop = asyncio.get_running_loop()
        if loop not in self._slots:
            self._slots[loop] = (asyncio.Semaphore(self.in_flight_images), asyncio.Lock())
        return self._slots[loop]

    def turns(self) -> Turns:
        loop = asyncio.get_running_loop()
        if loop not in self._turns:
            self._turns[loop] = Turns()
        return self._turns[loop]

    async def caption_row(self, unit: str, i: int, row: dict, images: pa.ChunkedArray) -> list[Any] | None:
        """Decodes one row's image (`caption_chunks` holds a slot for it) and captions it with every prompt: per prompt
        its n Generations or the exception of its request; None when the image itself failed (the row says why)."""
        decoded = await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.decode, images, i)
        if isinstance(decoded, ImageError):  # the read stage did not look inside: every bad image shows up here
            row.update(status="failed", error=str(decoded), width=None, height=None, image_sha256=None)
            return None
        if isinstance(decoded, Exception):  # a decoder bug, not a bad image: fail the row, not the unit
            row.update(status="failed", error=f"decode before captioning: {describe(decoded)}", image_sha256=None)
            return None
        row.update(width=decoded.width, height=decoded.height, image_sha256=decoded.sha256)
        names = self.model.prompts
        shared = (unit, i) if len(names) > 1 else None  # prompts of one image: the first one's prefill is reused
        futures = []  # submitted together: one image's requests adjacent
        for k, name in enumerate(names):
            try:
                text = self.prompts[name].fill(row)
            except MissingField as e:  # this prompt cannot be asked of this row: its caption fails, not the unit
                futures.append(failed_future(e))
                continue
            request = Request(decoded.image, text, self.model.generation, i * len(names) + k, unit, shared)
            futures.append(self.submit(request))
        return [await self.outcome(future) for future in futures]

    async def result(self, request: Request) -> list[Generation] | BaseException:
        return await self.outcome(self.submit(request))

    def submit(self, request: Request) -> Future:
        try:
            fault_raise("engine:request-error", lambda: RuntimeError("injected request error"), request.unit)
        except RuntimeError as e:
            return failed_future(e)
        return self.runner.submit(request)

    async def outcome(self, future: Future) -> list[Generation] | BaseException:
        """A request's Generations, or its exception (an engine's wrong count and a dead engine are EngineErrors,
        which the unit raises: they never become failed rows)."""
        try:
            return await asyncio.wrap_future(future)
        except EngineError as e:
            return e
        except Exception as e:
            if engine_dead(e):  # an engine that does not classify its own faults
                return EngineDeadError(f"model {self.model.id}: {describe(e)}")
            return e

    def decode(self, images: pa.ChunkedArray, i: int) -> Any:
        """Image `i` decoded (read in place from the unit's bytes), or the exception its decode raised (PIL releases
        the GIL: decode threads overlap)."""
        try:
            data = binary_cell(images, i)
            return self.decode_image(memoryview(data) if data is not None else b"", self.image_cfg)
        except Exception as e:
            return e

    def with_images(self, table: pa.Table, unit: pa.Table) -> pa.Table:
        """The unit's rows with its image column put back (the last model's stage drops it: commit needs none)."""
        return table.append_column(unit.schema.field("image"), unit.column("image")) if self.keep_images else table

    async def handle_degenerate(self, unit: str, rows: list[tuple[int, dict]], image_column: pa.ChunkedArray) -> None:
        """Drops, or generates once more with a repetition penalty, this model's captions with degenerate flags."""
        bad = [
            (i, row, c)
            for i, row in rows
            for c, cap in enumerate(row["captions"])
            if cap["model"] == self.model.id
            and "error" not in cap["flags"]
            and set(cap["flags"]) & set(self.post.degenerate_flags)
        ]
        if not bad:
            return
        if self.post.degenerate == "drop":
            for _, row, c in bad:
                row["captions"][c].update(text="", sub_captions=[], flags=[*row["captions"][c]["flags"], "dropped"])
            return
        gen = self.model.generation
        retry = gen.model_copy(
            update={
                "n": 1,
                "seed": gen.seed + 1,
                "repetition_penalty": max(gen.repetition_penalty, self.post.regenerate_repetition_penalty),
            }
        )
        loop = asyncio.get_running_loop()
        per_row = len(self.model.prompts) * self.n  # this model's captions of a row, the last ones of its list
        for i, row, c in bad:  # a few images, decoded again: their pixels were not kept
            prompt = row["captions"][c]["prompt"]
            decoded = await loop.run_in_executor(self.decode_pool, self.decode, image_column, i)
            # Its place among the unit's captions of this model, which seeds it: the same whichever rows around it
            # were degenerate or are still in flight.
            index = i * per_row + c - (len(row["captions"]) - per_row)
            result = await self.result(Request(decoded.image, self.prompts[prompt].fill(row), retry, index, unit))
            if isinstance(result, EngineDeadError):
                raise result
            if isinstance(result, BaseException) or result[0].error is not None:
                log.warning("model %s: regenerating a caption failed: %s", self.model.id, result)
                continue  # the first caption stays, flagged
            struct = self.caption_struct(row, prompt, result[0])
            row["captions"][c] = struct | {"flags": [*struct["flags"], "regenerated"]}

    def caption_struct(self, row: dict, prompt: str, gen: Generation) -> dict:
        """The cleaned caption of one generation; an error also fails the row."""
        flags = list(gen.flags)
        if gen.error:
            flags.append("error")
            error = f"model {self.model.id} prompt {prompt}: {gen.error}"
            row.update(status="failed", error=f"{row['error']}; {error}" if row["error"] else error)
        prompt_text = self.prompts[prompt].fill(row)  # the text the model got for this row
        raw = {
            "model": self.model.id,
            "prompt": prompt,
            "prompt_text": prompt_text,
            "text": gen.text,
            "sub_captions": [],
            "n_tokens": gen.n_tokens,
            "finish_reason": gen.finish_reason,
            "flags": flags,
        }
        return clean_caption(raw, prompt_text, self.post)

    def begin_attempt(self, unit: str) -> int:
        """Counts one more attempt at the unit in the output dir; returns its number."""
        attempt = self.attempts_so_far(unit) + 1
        self.count_attempt(unit, attempt)
        return attempt

    def attempts_so_far(self, unit: str) -> int:
        """Attempts at the unit that started and never committed in this run: each one ended with its actor. The
        count is this run's: `OutputDir.prepare` clears what a killed run left."""
        if self.out is None:
            return 0
        path = self.out.attempts_path(unit, self.model.id)
        try:
            if not self.out.fs.get_file_info(path).is_file:
                return 0
            return int(json.loads(self.out.read_bytes(path))["attempts"])
        except OSError as e:
            raise OutputWriteError(redact_text(f"cannot read the output {self.out.uri}: {e}")) from e

    def uncount_attempt(self, unit: str, crashed: int) -> None:
        """Puts the count back to the crashes before this attempt, which ended without one."""
        if self.out is None:
            return
        if crashed:
            self.count_attempt(unit, crashed)
        else:
            try:
                self.out.delete_if_exists(self.out.attempts_path(unit, self.model.id))
            except OSError as e:
                raise OutputWriteError(redact_text(f"cannot write the output {self.out.uri}: {e}")) from e

    def count_attempt(self, unit: str, attempt: int) -> None:
        """Records, before the engine sees the unit, that attempt number `attempt` started."""
        if self.out is None:
            return
        path = self.out.attempts_path(unit, self.model.id)
        try:
            self.out.write_json(path, {"attempts": attempt, "model": self.model.id, "unit": unit})
        except OSError as e:
            raise OutputWriteError(redact_text(f"cannot write the output {self.out.uri}: {e}")) from e


def actor_memory() -> dict[str, float]:
    """This process's resident memory in MiB: `rss_mib` all of it; `own_mib` its anonymous pages (heap, Python
    objects, the units Ray handed it, decoded images: what it alone holds and frees on exit). The rest is files and
    shared memory (libraries, pages of Ray's object store it has mapped)."""
    rss = psutil.Process().memory_info().rss
    own = rss
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration, ValueError):  # not Linux: all of it
        pass
    return {"rss_mib": round(rss / 2**20, 1), "own_mib": round(own / 2**20, 1)}


def use_system_allocator() -> None:
    """Arrow allocates from glibc's malloc in this process, not from its default pool (mimalloc), unless
    `ARROW_DEFAULT_MEMORY_POOL` names one. mimalloc kept the pages of a unit's tables resident after they were freed,
    so a caption actor's memory followed the unit size: 142 against 124 MiB of its own for 1024- against 256-image
    units (the fake engine, in one local Ray), and 115 MiB for both with malloc."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())


def failed_future(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


class Turns:
    """Units share the actor's engine, except one that must run alone: it waits for the others to finish, and none
    starts until it is done (a unit waiting to run alone goes before units that arrive after it)."""

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.active = 0
        self.alone = False
        self.waiting_alone = 0

    @contextlib.asynccontextmanager
    async def take(self, alone: bool) -> AsyncIterator[None]:
        async with self.changed:
            if alone:
                self.waiting_alone += 1
                await self.changed.wait_for(lambda: self.active == 0 and not self.alone)
                self.waiting_alone -= 1
                self.alone = True
            else:
                await self.changed.wait_for(lambda: not self.alone and not self.waiting_alone)
            self.active += 1
        try:
            yield
        finally:
            async with self.changed:
                self.active -= 1
                self.alone = self.alone and not alone
                self.changed.notify_all()

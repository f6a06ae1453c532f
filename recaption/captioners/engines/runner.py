"""Engine runners: a caption actor's engine fed from one stream of requests, so its batch stays full across units.

The caption stage submits one request per (image, prompt) as soon as the image is decoded, from every unit the actor
holds; a runner thread owns the engine and resolves each request's future. `VLLMRunner` adds requests to vLLM's
engine as they come and steps it continuously (continuous batching across units); `BatchRunner` (hf, fake) cuts the
stream into batches of `batch_size`, preparing the next batch (processor, tensors) on a second thread while the
current one generates, where a core is free for it (on the CPU torch's threads may hold them all). A dead engine
fails every pending and later request with EngineDeadError; the error of one request fails that request only.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from recaption.captioners.engines.base import Generation, engine_dead
from recaption.errors import EngineDeadError, EngineError
from recaption.faults import fault_call

if TYPE_CHECKING:
    from PIL import Image

    from recaption.config import GenerationConfig, ModelConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One (image, prompt) to caption; its future gets the request's `gen.n` Generations or its exception."""

    image: Image.Image
    prompt: str
    gen: GenerationConfig
    index: int  # its place among its unit's requests: per-request seeds do not depend on batching
    unit: str
    image_key: Any = None  # requests with one image_key share an image (vLLM: the first one's prefill is cached)
    future: Future = field(default_factory=Future)


class Metrics:
    """What a runner did so far; `snapshot()` is what the caption stage reports with each unit."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.busy_s = 0.0  # engine time weighted by how full its batch was
        self.engine_s = 0.0
        self.in_flight = 0  # requests inside the engine
        self.waiting = 0  # requests submitted, not yet inside the engine (their images decoded)
        self.done = 0
        self.output_tokens = 0
        self.cache_queries = 0
        self.cache_hits = 0

    def engine_time(self, seconds: float, in_batch: int) -> None:
        with self.lock:
            self.engine_s += seconds
            self.busy_s += seconds * min(in_batch / self.capacity, 1.0)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            wall = max(time.monotonic() - self.started, 1e-9)
            return {
                "wall_s": round(wall, 3),
                "busy_s": round(self.busy_s, 3),
                "engine_s": round(self.engine_s, 3),
                "busy": round(self.busy_s / wall, 4),
                "in_flight": self.in_flight,
                "waiting": self.waiting,
                "requests": self.done,
                "output_tokens": self.output_tokens,
                "cache_queries": self.cache_queries,
                "cache_hits": self.cache_hits,
            }


class Runner:
    """The common part: an inbox of requests, a metrics record, a dead flag."""

    def __init__(self, captioner: Any, capacity: int) -> None:
        self.captioner = captioner
        self.metrics = Metrics(capacity)
        self.inbox: queue.Queue[Any] = queue.Queue()  # requests; None closes (a runner may add its own markers)
        self.dead: str | None = None
        self.closed = False

    def submit(self, request: Request) -> Future:
        if self.dead:
            request.future.set_exception(EngineDeadError(self.dead))
            return request.future
        with self.metrics.lock:
            self.metrics.waiting += 1
        self.inbox.put(request)
        return request.future

    def snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot()

    def _die(self, error: BaseException, pending: list[Request]) -> None:
        self.dead = f"{type(error).__name__}: {error}"
        log.error("model %s: the engine is dead: %s", getattr(self.captioner, "model_id", "?"), self.dead)
        for request in pending:
            _fail(request, EngineDeadError(self.dead))
        while True:  # whatever is still queued fails too
            try:
                request = self.inbox.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                _fail(request, EngineDeadError(self.dead))

    def _finish(self, request: Request, gens: list[Generation]) -> None:
        with self.metrics.lock:
            self.metrics.in_flight -= 1
            self.metrics.done += 1
            self.metrics.output_tokens += sum(g.n_tokens for g in gens)
        if not request.future.done():
            request.future.set_result(gens)

    def _entered(self, n: int) -> None:
        with self.metrics.lock:
            self.metrics.waiting -= n
            self.metrics.in_flight += n

    def close(self) -> None:
        self.closed = True
        self.inbox.put(None)


def _fail(request: Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)


class BatchRunner(Runner):
    """hf and fake engines: batches of up to `batch_size` requests, taken from whatever units are in flight; while
    one batch generates, the next is formed and prepared (processor, tensors) on a second thread. With sampling
    (temperature > 0) a batch holds one unit's requests only and is seeded by its first request's index, so a
    unit's captions do not depend on what it was batched with."""

    def __init__(self, captioner: Any, batch_size: int) -> None:
        super().__init__(captioner, batch_size)
        self.batch_size = batch_size
        self.ready: queue.Queue[tuple[list[Request], Any] | None] = queue.Queue(maxsize=1)
        # Batches handed to the engine thread and not yet finished (the one generating and the one waiting in
        # `ready`): the engine is idle only when this is 0, so a batch that waits in `ready` still counts as work
        # and the next batch fills meanwhile instead of leaving with what happened to be queued.
        self.outstanding = 0
        self.outstanding_lock = threading.Lock()
        self.held: deque[Request] = deque()
        self.overlap = _core_to_spare(captioner)  # False: the engine thread prepares each batch itself
        self.threads = [
            threading.Thread(target=self._prepare_loop, name="recaption-prepare", daemon=True),
            threading.Thread(target=self._engine_loop, name="recaption-engine", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _next(self, block: bool) -> Request | None:
        if self.held:
            return self.held.popleft()
        return self.inbox.get() if block else self.inbox.get_nowait()

    def _prepare_loop(self) -> None:
        while True:
            first = self._next(block=True)
            if first is None:
                self.ready.put(None)
                return
            batch, later = [first], []
            while len(batch) < self.batch_size:
                try:
                    request = self._next(block=False)
                except queue.Empty:
                    if not self.engine_has_work():
                        break  # the engine is idle: go with what there is
                    time.sleep(0.001)  # the engine is busy anyway: let the batch fill meanwhile
                    continue
                if request is None:
                    self.inbox.put(None)
                    break
                (batch if _batchable(first, request) else later).append(request)
            self.held.extendleft(reversed(later))
            with self.outstanding_lock:
                self.outstanding += 1
            self.ready.put((batch, self._prepare(batch)))

    def engine_has_work(self) -> bool:
        with self.outstanding_lock:
            return self.outstanding > 0

    def _prepare(self, batch: list[Request]) -> Any:
        prepare = getattr(self.captioner, "prepare", None)
        if prepare is None or not self.overlap:
            return None
        try:
            return prepare([r.image for r in batch], [r.prompt for r in batch], _batch_gen(batch))
        except Exception:  # the engine thread will go request by request and fail only what fails
            log.debug("preparing a batch failed", exc_info=True)
            return None

    def _engine_loop(self) -> None:
        while True:
            item = self.ready.get()
            if item is None:
                return
            batch, prepared = item
            if self.dead:
                with self.outstanding_lock:
                    self.outstanding -= 1
                self._die(EngineDeadError(self.dead), batch)
                continue
            self._entered(len(batch))
            start = time.monotonic()
            try:
                results = self._generate(batch, prepared)
            except Exception as e:
                if engine_dead(e):
                    self._die(e, batch)
                    continue
                for request in batch:  # an engine bug (a wrong count): fails loudly, never misplaces captions
                    _fail(request, e)
                continue
            finally:
                self.metrics.engine_time(time.monotonic() - start, len(batch))
                with self.outstanding_lock:
                    self.outstanding -= 1
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    with self.metrics.lock:
                        self.metrics.in_flight -= 1
                    _fail(request, result)
                else:
                    self._finish(request, result)

    def _generate(self, batch: list[Request], prepared: Any) -> list[list[Generation] | BaseException]:
        """Each request's Generations, or the exception it alone raised."""
        gen = _batch_gen(batch)
        images, prompts = [r.image for r in batch], [r.prompt for r in batch]
        try:
            if prepared is not None:
                gens = self.captioner.generate_prepared(prepared)
            else:
                gens = self.captioner.caption(images, prompts, gen)
        except Exception as e:
            if engine_dead(e):
                raise
            if len(batch) == 1:
                return [e]
            # One bad request must not fail the others: each alone (the hf engine also halves on OOM inside).
            return [r for request in batch for r in self._generate([request], None)]
        expected = len(batch) * gen.n
        if len(gens) != expected:
            raise EngineError(
                f"model {getattr(self.captioner, 'model_id', '?')}: the engine returned {len(gens)} generations for "
                f"{len(batch)} requests × n={gen.n} (expected {expected})"
            )
        return [gens[i * gen.n : (i + 1) * gen.n] for i in range(len(batch))]


def _core_to_spare(captioner: Any) -> bool:
    """Whether preparing the next batch can run beside a generating one: always on an accelerator; on the CPU only
    when torch's threads leave one of this process's CPUs free. Otherwise the processor's thread takes a core from
    torch's team mid-generate (its threads wait on the one that lost its core), which cost more than preparing in
    turn: the 64-wide tiny LLaVA on 2 cores ran at 0.66x its bare `generate` that way, 0.75x in turn."""
    device = getattr(captioner, "device", None)
    if getattr(device, "type", None) != "cpu":
        return True
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not Linux
    return torch.get_num_threads() < usable


def _batchable(first: Request, other: Request) -> bool:
    if other.gen != first.gen:
        return False
    return first.gen.temperature == 0 or other.unit == first.unit


def _batch_gen(batch: list[Request]) -> GenerationConfig:
    gen = batch[0].gen
    return gen if gen.temperature == 0 else gen.model_copy(update={"seed": gen.seed + batch[0].index})


class VLLMRunner(Runner):
    """vLLM: each request is added to the engine when it arrives and the engine is stepped continuously, so requests
    of the next unit join the running batch while the current one drains. A request is rendered (chat format, the
    image through the checkpoint's processor, its hash: vLLM's `Renderer`) on a thread of its own, so the thread that
    steps the engine only adds finished inputs and steps; requests are rendered and added in one order, which vLLM's
    multimodal cache (the renderer's side mirrors the engine's) needs. Of the requests sharing an image, the first
    enters alone and the others are rendered and added once its prefill is done, so theirs hits the prefix cache
    (image tokens first) and skips the vision encoder."""

    def __init__(self, captioner: Any, capacity: int) -> None:
        super().__init__(captioner, capacity)
        self.engine = captioner.llm.llm_engine
        self.render = _renderer(captioner)
        self.ids = itertools.count()
        self.pending: dict[str, Request] = {}
        # Rendered requests in render order (a request's input, or the exception its rendering raised, and whether
        # it leads its image), for the stepping thread to add in that order; None after the last.
        self.rendered: queue.Queue[tuple[Request, Any, bool] | None] = queue.Queue()
        self.lock = threading.Lock()  # guards followers and released, shared by the two threads
        self.followers: dict[Any, list[Request]] = {}  # image_key → requests waiting for their leader's prefill
        self.released: deque[Request] = deque()  # followers whose leader's prefill is done: rendered first
        self.leaders: dict[str, Any] = {}  # request id → image_key, until its prefill is done (stepping thread)
        self.stats_at = 0.0  # when vLLM's cache counters were last read
        self.render_thread = threading.Thread(target=self._render_loop, name="recaption-render", daemon=True)
        self.thread = threading.Thread(target=self._loop, name="recaption-vllm", daemon=True)
        self.render_thread.start()
        self.thread.start()

    def _render_loop(self) -> None:
        while True:
            item = self.inbox.get()
            with self.lock:
                batch, self.released = list(self.released), deque()
            for follower in batch:
                self._render(follower, leader=False)
            if item is None:
                self.rendered.put(None)
                return
            if item is _WAKE:
                continue
            key = item.image_key
            with self.lock:
                if key is not None and key in self.followers:
                    self.followers[key].append(item)  # its leader is still in prefill
                    continue
                if key is not None:
                    self.followers[key] = []  # it leads: the others of its image wait for its prefill
            self._render(item, leader=key is not None)

    def _render(self, request: Request, leader: bool) -> None:
        if self.dead:
            self.rendered.put((request, EngineDeadError(self.dead), leader))
            return
        try:
            self.rendered.put((request, self.render(request), leader))
        except Exception as e:  # this request's image or prompt: it fails alone
            self.rendered.put((request, e, leader))

    def _release(self, key: Any) -> None:
        """The leader of `key` has its first token (or was refused): its image's followers go to be rendered."""
        with self.lock:
            waiting = self.followers.pop(key, [])
            self.released.extend(waiting)
        if waiting:
            self.inbox.put(_WAKE)

    def _loop(self) -> None:
        while True:
            idle = not self.pending
            try:
                arrived = [self.rendered.get()] if idle else []
                while True:
                    arrived.append(self.rendered.get_nowait())
            except queue.Empty:
                pass
            for item in arrived:
                if item is None:
                    self._abort_all()
                    return
                self._add(*item)
            if self.dead or not self.pending:
                continue
            start = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:
                self._die(e, list(self.pending.values()))
                self.pending.clear()
                continue
            finally:
                self.metrics.engine_time(time.monotonic() - start, len(self.pending))
            # vLLM's cache counters, read before the outputs resolve any future (a unit that ends here reports them
            # up to date): every 0.5 s, and whenever this step ends the last request in the engine.
            finished = sum(1 for out in outputs if out.finished)
            if finished >= len(self.pending) or time.monotonic() - self.stats_at >= 0.5:
                self._cache_stats()
            for out in outputs:
                self._progress(out)

    def _add(self, request: Request, prompt: Any, leader: bool) -> None:
        """Adds one rendered request to the engine; one vLLM refuses (or whose rendering failed) fails alone."""
        from recaption.captioners.engines.vllm import final_only, sampling_params

        if self.dead or isinstance(prompt, BaseException):
            with self.metrics.lock:
                self.metrics.waiting -= 1
            _fail(request, EngineDeadError(self.dead) if self.dead else prompt)
            if leader:
                self._release(request.image_key)
            return
        rid = f"recaption-{next(self.ids)}"
        params = sampling_params(request.gen, request.index)
        if not leader:  # only a leader's first token matters before the end: the others report once, finished
            final_only(params)
        try:
            fault_call("engine:kill-core", self.captioner.watchdog.kill_engine_soon)
            self.engine.add_request(rid, prompt, params)
        except Exception as e:
            with self.metrics.lock:
                self.metrics.waiting -= 1
            if engine_dead(e):
                self._die(e, [request, *self.pending.values()])
                self.pending.clear()
            else:  # vLLM refused this request alone (its image, its length): it fails, the others go on
                _fail(request, e)
                if leader:
                    self._release(request.image_key)
            return
        self.pending[rid] = request
        if leader:
            self.leaders[rid] = request.image_key
        self._entered(1)

    def _progress(self, out: Any) -> None:
        from recaption.captioners.engines.vllm import _generations

        key = self.leaders.pop(out.request_id, None)
        if key is not None:  # the leader's prefill is done (it has a token): its image's blocks are cached now
            self._release(key)
        if out.finished:
            request = self.pending.pop(out.request_id, None)
            if request is not None:
                self._finish(request, _generations(out, request.gen.n))

    def _die(self, error: BaseException, pending: list[Request]) -> None:
        """Fails what the engine held and what waits for a leader; what is queued or being rendered fails as it
        reaches `_add` (the render thread keeps the inbox: a close still ends both threads)."""
        self.dead = f"{type(error).__name__}: {error}"
        log.error("model %s: the engine is dead: %s", getattr(self.captioner, "model_id", "?"), self.dead)
        self.leaders.clear()
        for request in [*pending, *self._take_waiting()]:
            _fail(request, EngineDeadError(self.dead))

    def _take_waiting(self) -> list[Request]:
        with self.lock:
            waiting = [r for rs in self.followers.values() for r in rs] + list(self.released)
            self.followers.clear()
            self.released.clear()
        with self.metrics.lock:
            self.metrics.waiting -= len(waiting)
        return waiting

    def _cache_stats(self) -> None:
        self.stats_at = time.monotonic()
        get = getattr(self.engine, "get_metrics", None)
        if get is None or not getattr(self.engine, "log_stats", False):
            return
        try:
            metrics = get()
        except Exception:
            return
        values = {m.name: getattr(m, "value", 0) for m in metrics}
        with self.metrics.lock:
            self.metrics.cache_queries = int(values.get("vllm:prefix_cache_queries", 0))
            self.metrics.cache_hits = int(values.get("vllm:prefix_cache_hits", 0))

    def _abort_all(self) -> None:
        if self.pending:
            try:
                self.engine.abort_request(list(self.pending))
            except Exception:
                log.debug("aborting requests failed", exc_info=True)
        for request in [*self.pending.values(), *self._take_waiting()]:
            _fail(request, EngineError("the runner was closed"))
        self.pending.clear()


_WAKE = object()  # wakes the render thread for released followers


def _renderer(captioner: Any) -> Any:
    """A request's input as vLLM's engine takes it: rendered by the offline `LLM`'s own path (chat format applied
    by us, the image through the multimodal processor) where this vLLM has it; the raw prompt otherwise, which
    `add_request` renders itself (on the stepping thread, as before vLLM had a separate renderer)."""
    render = getattr(captioner.llm, "_preprocess_cmpl_one", None)

    def raw(request: Request) -> Any:
        return captioner.vllm_request(request.image, request.prompt)

    if render is None:
        return raw
    return lambda request: render(raw(request))


def make_runner(captioner: Any, model: ModelConfig) -> Runner:
    """The runner for a captioner: continuous batching where the engine supports it, batches otherwise."""
    if model.engine == "vllm" and hasattr(captioner, "llm"):
        seqs = model.vllm.max_num_seqs or _engine_max_seqs(captioner) or 256
        return VLLMRunner(captioner, seqs)
    return BatchRunner(captioner, model.batch_size)


def _engine_max_seqs(captioner: Any) -> int | None:
    try:
        return int(captioner.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    except Exception:
        return None

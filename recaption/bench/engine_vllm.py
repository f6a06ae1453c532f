"""`recaption bench engine --engine vllm`: the pipeline against the vLLM engine's own limit and against the peer.

Three ways through the same decoded images, with the same engine arguments and sampling (those of the first model
of a pipeline YAML, its first prompt), each repeat interleaved with the others (bare, ours, peer, bare, ours, …):

* bare: ONE `vllm.LLM.generate` call over all the images (decoded before the clock), in a process of its own that
  keeps its engine between repeats (on a GPU it is started anew for each repeat, so that the pipeline's engine has
  the GPU's memory while it runs): the engine's limit, one batch that stays full until the last request drains;
* ours: the pipeline (read, decode, caption, commit) on several units per engine; its steady rate is the engine
  runner's completed requests after an actor's first unit over the actor's clock from then to its last unit (the
  engine's start and the first unit's trip are left out, the drain at the end stays in). Times are taken where the
  work is done: the driver sees outputs in bursts, so their arrival there says little;
* peer: the same job as a user would write it with `ray.data.llm`: `read_webdataset`, a decode in the preprocess
  `map`, `build_processor(vLLMEngineProcessorConfig(...))` with the same engine arguments and sampling, each output
  block written as Parquet as it arrives; steady rate the same way (each row stamped in its postprocess: those after
  the first quarter over the time from then to the last). On a small machine
  its defaults deadlock (every stage asks for a whole CPU while the engine's actor holds one): each stage that is
  not the engine gets a fraction of a CPU, and the engine's metrics export is off (it needs a Prometheus port).

Then k prompts per image against one, through the engine runner the caption stage uses (the prompts of one image
enter together, the first one's prefill is cached for the others), with vLLM's prefix-cache hit rate as the runner
reports it (what the progress line shows) and as expected from the prompts' token counts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recaption.bench.inputs import _run_once, local_ray, make_shards, pipeline_config, short_config, timed_pipeline
from recaption.bench.result import BenchResult, BenchSizes, compared, interleaved, median
from recaption.errors import ConfigError

# The prompts of pipelines/holistic.yaml: six views of one image, the case that prefix caching is for.
HOLISTIC_PROMPTS = ["objects", "background", "text", "style", "detailed", "spatial"]


def bench_engine_vllm(
    result: BenchResult, work: Path, sizes: BenchSizes, pipeline: str | None, model: str | None, cpus: int
) -> None:
    from recaption.captioners import vllm_installed
    from recaption.config import load_config
    from recaption.demo import find_pipeline

    if not vllm_installed():
        raise ConfigError("--engine vllm: vllm is not installed in this environment (pip install 'recaption[vllm]')")
    base = load_config(pipeline or find_pipeline("llava15.yaml"), [f"models.0.path={model}"] if model else [])
    model_cfg = base.models[0].model_copy(deep=True)
    k_prompts = list(model_cfg.prompts) if len(model_cfg.prompts) > 1 else HOLISTIC_PROMPTS
    model_cfg.prompts = model_cfg.prompts[:1]
    model_cfg.generation = (model_cfg.generation or base.generation).model_copy()
    if sizes.is_quick:
        model_cfg.generation.max_new_tokens = min(model_cfg.generation.max_new_tokens, sizes.max_new_tokens)
    root = work / "vllm"
    input_dir = make_shards(root, sizes.vllm_images, sizes.vllm_unit_size, sizes.image_side)
    cfg = pipeline_config(input_dir, root / "output", sizes.vllm_unit_size, cpus, [model_cfg.model_dump()], base.images)
    cfg.prompts = dict(base.prompts)
    gpus = _gpu_count()
    with local_ray(cpus), BareEngine(cfg.model_dump(), keep=not gpus) as bare:
        import ray

        from recaption.job import pool_size

        engines = pool_size(cfg.models[0], ray.nodes())  # the pool's actors
        divisor = gpus or engines
        units = -(-sizes.vllm_images // sizes.vllm_unit_size)
        if units < 2 * engines:
            raise ConfigError(f"the vllm bench needs at least two units per engine ({units} units, {engines} engines)")
        timings, bare_runs, peer_runs = [], [], []

        def ours() -> float:
            timing = windowed_pipeline(cfg)
            timings.append(timing)
            return timing.rate / divisor

        def bare_loop() -> float:
            seconds, images, tokens, rate = bare.call(_bare_generate)
            bare_runs.append((seconds, images, tokens))
            return rate  # one engine

        def peer() -> float:
            timing = _peer_run(cfg, root / "peer")
            peer_runs.append(timing)
            return timing.rate / divisor

        if not sizes.is_quick:  # Ray's workers start and import once, as in any long run
            _run_once(short_config(cfg, engines))
        values = interleaved({"bare": bare_loop, "ours": ours, "peer": peer}, sizes.repeats, "vllm (images/s)")
        bare.keep = True  # the pipeline and the peer are done: the engine may stay for the k-prompt runs
        prompt_runs = bench_prompts(bare, k_prompts, sizes.prompt_images, sizes.repeats)
    per = "GPU" if gpus else "engine"
    where = f"{gpus} GPUs" if gpus else f"{engines} engine(s) on CPU"
    last = timings[-1].timing
    tokens_per_image = sum(r[2] for r in bare_runs) / max(sum(r[1] for r in bare_runs), 1)
    engine = last.engine.get(model_cfg.id, {})
    result.add(
        compared(
            f"vllm pipeline ({model_cfg.id})", f"images/s/{per}", values["ours"], values["bare"], ">= 0.95",
            f"{units} units of {sizes.vllm_unit_size} images of {sizes.image_side}px through {where}; steady rate: "
            f"the engine runner's completions after an actor's first unit over its clock from then to its last unit "
            f"(whole run incl. start-up: median {median([t.whole_rate for t in timings]):.3g} images/s); engine busy "
            f"{engine.get('busy', 0):.2f} in the last run; bare "
            f"loop: ONE vllm.LLM.generate over all {bare_runs[-1][1]} images (decoded before the clock), same engine "
            f"arguments, sampling and threads, its steady rate from the requests' finish times the same way (whole "
            f"call: median {median([n / t for t, n, _ in bare_runs]):.3g} images/s), {tokens_per_image:.1f} generated tokens per image",
        )
    )  # fmt: skip
    result.add(
        compared(
            f"vllm pipeline vs the bare call's whole rate ({model_cfg.id})", f"images/s/{per}", values["ours"],
            [n / t for t, n, _ in bare_runs],
            note="the same bare call timed from its start to its end: with vLLM's input processing of every image "
            "(chat format, the processor, hashing), which one LLM.generate does before its first step and so outside "
            "its steady window, while the pipeline does it beside the engine, on the same CPUs",
        )
    )  # fmt: skip
    result.add(
        compared(
            f"vllm pipeline vs ray.data.llm ({model_cfg.id})", f"images/s/{per}", values["ours"], values["peer"],
            ">= 1.0",
            "the same images, engine arguments and sampling through ray.data.llm (read_webdataset, a decode map, "
            "build_processor with vLLMEngineProcessorConfig, each output block written as Parquet as it arrives), "
            "steady rate the same way (rows stamped in its postprocess: those after the first quarter over the time "
            "from then to the last; whole run incl. "
            f"start-up: median {median([t.whole_rate for t in peer_runs]):.3g} images/s); its stages other than the "
            "engine get 0.25 CPU each (with its defaults it deadlocks on 2 CPUs)",
        )
    )  # fmt: skip
    add_prompt_measurements(result, prompt_runs, model_cfg.id, len(k_prompts))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


# ---------------------------------------------------------------- the bare engine, in a process of its own


class BareEngine:
    """A spawned process holding a caption engine (the same `vllm.LLM` a caption actor starts, same arguments) and
    the decoded images. `keep`: the process and its engine live across calls (CPU); otherwise each call starts and
    ends one, so the engine's accelerator memory is free between calls (GPU)."""

    def __init__(self, cfg_dict: dict, keep: bool) -> None:
        self.cfg_dict = cfg_dict
        self.keep = keep
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> BareEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self.pool is not None:
            try:
                self.pool.submit(_bare_close).result()
            except BrokenProcessPool:  # the process is gone already, and its engine with it
                pass
            finally:
                self.pool.shutdown()
                self.pool = None

    def call(self, fn, *args: Any) -> Any:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.pool.submit(_bare_load, self.cfg_dict).result()
        try:
            future: Future = self.pool.submit(fn, *args)
            return future.result()
        finally:
            if not self.keep:
                self._close()


_BARE: dict[str, Any] = {}


def _bare_load(cfg_dict: dict) -> None:
    """In the bare process: the engine, the decoded images, and one small generate call (warm-up, off the clock)."""
    from recaption.config import PipelineConfig

    cfg = PipelineConfig.model_validate(cfg_dict)
    model = cfg.models[0]
    os.environ.update(model.env)  # what the pipeline sets in its actors (e.g. the CPU build's KV cache size)
    # As Ray sets it in an actor that reserves num_cpus CPUs: the CPU build's engine runs that many threads (more
    # threads than the actor's on a loaded machine would measure thread contention, not the engine).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(model.num_cpus))))
    from recaption.captioners import VLLMCaptioner, get_prompt
    from recaption.sources import decode_image, plan_units, read_unit

    captioner = VLLMCaptioner(model, on_engine_dead=lambda reason: os._exit(70))
    images = [decode_image(r.image, cfg.images).image for u in plan_units(cfg.input) for r in read_unit(u, cfg.input)]
    _BARE.update(cfg=cfg, model=model, captioner=captioner, images=images, prompts=cfg.prompts)
    _BARE["prompt"] = get_prompt(model.prompts[0], cfg.prompts)
    _bare_generate(images[:8])


def _bare_close() -> None:
    """In the bare process: its engine ended (with vLLM's engine core in a process of its own, the pool's worker
    would otherwise wait for that child forever as it exits)."""
    captioner = _BARE.pop("captioner", None)
    if captioner is not None:
        captioner.close()


def _bare_generate(images: list | None = None) -> tuple[float, int, int, float]:
    """ONE `LLM.generate` over every image with the pipeline's prompt and per-request sampling parameters: seconds,
    images, generated tokens, and the steady rate from the requests' finish times in the engine (those after the
    first quarter over the time from then to the last, as for the pipeline and the peer)."""
    from recaption.captioners import sampling_params

    captioner, model = _BARE["captioner"], _BARE["model"]
    images = _BARE["images"] if images is None else images
    gen = model.generation
    requests = [captioner.vllm_request(im, _BARE["prompt"]) for im in images]
    params = [sampling_params(gen, i) for i in range(len(requests))]
    _reset_caches(captioner.llm)  # the engine stays between repeats: a repeat must not find the last one's blocks
    start = time.perf_counter()
    outputs = captioner.llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    done = [out.metrics.last_token_ts for out in outputs if getattr(out, "metrics", None) is not None]
    rate = completion_rate(done, seconds) if len(done) == len(outputs) else len(images) / seconds
    return seconds, len(images), sum(len(c.token_ids) for out in outputs for c in out.outputs), rate


def _bare_prompts(prompt_names: list[str], n_images: int) -> dict[str, float]:
    """The first `n_images` images with each of `prompt_names` through the engine runner the caption stage uses (an
    image's requests submitted together, sharing its image key), caches emptied first: seconds, requests, generated
    tokens, the prefix-cache queries and hits (tokens) as the runner reads them, and the hits expected if every
    prompt after an image's first one found the blocks the first one filled (their common prefix, in whole
    blocks)."""
    from recaption.captioners import Request, get_prompt, make_runner

    captioner, model, images = _BARE["captioner"], _BARE["model"], _BARE["images"][:n_images]
    texts = [get_prompt(name, _BARE["prompts"]) for name in prompt_names]
    _reset_caches(captioner.llm)
    runner = make_runner(captioner, model)
    try:
        start = time.perf_counter()
        futures = []
        for i, image in enumerate(images):
            key = ("bench", i) if len(texts) > 1 else None
            for k, text in enumerate(texts):
                futures.append(runner.submit(Request(image, text, model.generation, i * len(texts) + k, "bench", key)))
        results = [f.result() for f in futures]
        seconds = time.perf_counter() - start
        cache = runner.snapshot()  # what the caption stage reports with each unit (the progress line's cache=)
    finally:
        runner.close()
        runner.thread.join(timeout=30)
    prompt_tokens, shared = _prompt_tokens(captioner, images[0], texts)
    before = _BARE.setdefault("cache_seen", [0, 0])  # the engine's counters are cumulative: this run's share
    queries, hits = cache["cache_queries"] - before[0], cache["cache_hits"] - before[1]
    _BARE["cache_seen"] = [cache["cache_queries"], cache["cache_hits"]]
    block = int(captioner.llm.llm_engine.vllm_config.cache_config.block_size)
    return {
        "seconds": seconds,
        "requests": len(futures),
        "tokens": sum(g.n_tokens for gens in results for g in gens),
        "queries": queries,
        "hits": hits,
        "expected_hits": (len(texts) - 1) * len(images) * (shared // block * block) if shared is not None else None,
        "prompt_tokens": prompt_tokens,
        "shared_tokens": shared,
        "block": block,
    }


def _reset_caches(llm: Any) -> None:
    """Empties vLLM's prefix cache and its multimodal caches, so a repeat finds nothing of the one before."""
    for name in ("reset_prefix_cache", "reset_mm_cache"):
        reset = getattr(llm, name, None)
        if reset is not None:
            reset()


def _prompt_tokens(captioner: Any, image: Any, texts: list[str]) -> tuple[list[int] | None, int | None]:
    """Each prompt's token count with `image` (its image tokens expanded, as the checkpoint's processor does) and
    the length of their common prefix; None where the processor cannot say."""
    try:
        import transformers

        processor = captioner.processor or transformers.AutoProcessor.from_pretrained(captioner.info.path)
        ids = [
            processor(images=image, text=captioner._format(text), return_tensors="pt")["input_ids"][0].tolist()
            for text in texts
        ]
    except Exception:
        return None, None
    shared = 0
    for column in zip(*ids, strict=False):
        if len(set(column)) > 1:
            break
        shared += 1
    return [len(i) for i in ids], shared


def bench_prompts(bare: BareEngine, k_prompts: list[str], n_images: int, repeats: int) -> dict[str, list[dict]]:
    """One prompt per image against `k_prompts`, interleaved."""
    runs: dict[str, list[dict]] = {"one": [], "k": []}

    def one() -> float:
        runs["one"].append(bare.call(_bare_prompts, k_prompts[:1], n_images))
        return runs["one"][-1]["seconds"]

    def k() -> float:
        runs["k"].append(bare.call(_bare_prompts, k_prompts, n_images))
        return runs["k"][-1]["seconds"]

    interleaved({"one": one, "k": k}, repeats, f"1 vs {len(k_prompts)} prompts per image (s)")
    return runs


def add_prompt_measurements(result: BenchResult, runs: dict[str, list[dict]], model_id: str, k: int) -> None:
    """Each extra prompt's cost relative to the first (target <= 0.4), and the prefix-cache hit rate."""
    pairs = zip(runs["one"], runs["k"], strict=True)
    extra = [(rk["seconds"] - r1["seconds"]) / ((k - 1) * r1["seconds"]) for r1, rk in pairs]
    last = runs["k"][-1]
    tokens_one = median([r["tokens"] / r["requests"] for r in runs["one"]])
    tokens_k = median([r["tokens"] / r["requests"] for r in runs["k"]])
    prompt = f"prompt tokens {last['prompt_tokens']}" if last["prompt_tokens"] else "prompt tokens unknown"
    images = runs["k"][-1]["requests"] // k
    result.add(
        compared(
            f"vllm: each of {k - 1} extra prompts vs the first ({model_id})", "x first", extra, [1.0] * len(extra),
            "<= 0.4",
            f"{images} images, {k} prompts each vs 1, through the caption stage's engine runner (an image's prompts "
            f"together, the others after the first one's prefill), caches emptied before each run: (t_{k} - t_1) / "
            f"({k - 1} t_1); generated tokens per request {tokens_one:.1f} (1 prompt) and {tokens_k:.1f} ({k}); "
            f"{prompt}, common prefix {last['shared_tokens']} tokens, KV-cache block {last['block']} tokens. Decoding "
            "is not shared: an extra prompt saves at most its image's share of the work",
        )
    )  # fmt: skip
    rates = [r["hits"] / r["queries"] if r["queries"] else 0.0 for r in runs["k"]]
    expected = [r["expected_hits"] / r["queries"] if r["queries"] and r["expected_hits"] else 0.0 for r in runs["k"]]
    hit = compared(
        f"vllm: prefix-cache hit rate, {k} prompts per image ({model_id})", "hits/queries", rates, expected,
        note="prompt tokens found in vLLM's prefix cache / prompt tokens looked up, as the caption stage's runner "
        "reads them (the progress line's cache= figure); baseline: the rate if every later prompt of an image reused "
        "the common prefix of its prompts in whole KV-cache blocks (0 when that prefix is shorter than one block)",
    )  # fmt: skip
    if not any(expected):
        hit.baseline, hit.ratio, hit.spread, hit.repeats = 0.0, None, [min(rates), max(rates)], len(rates)
    result.add(hit)


# ---------------------------------------------------------------- the peer: ray.data.llm


@dataclass
class Window:
    """Completion times taken where the work is done (never where the driver happens to see outputs, which Ray
    hands over in bursts). The steady rate is the completions after the first quarter (the pipeline: after each
    actor's first unit) over the time from then to the last one: the engine's start and the first batch's trip are
    left out, the drain at the end stays in."""

    seconds: float  # the whole run, start-up included
    images: int
    rate: float
    timing: Any = None

    @property
    def whole_rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def windowed_pipeline(cfg) -> Window:
    """One pipeline run on the current Ray. Each caption actor reports, with every unit it passes on, its engine
    runner's completed requests and its own clock: per actor, (requests at its last unit - at its first) / (clock
    at its last unit - at its first), summed over actors (one prompt per image: requests are images)."""
    model_id = cfg.models[0].id
    points: dict[int, list[tuple[float, int]]] = {}

    def on_unit(row: dict) -> None:
        snap = json.loads(row.get("metrics") or "{}").get(model_id)
        if snap:
            points.setdefault(int(snap["actor"]), []).append((float(snap["wall_s"]), int(snap["requests"])))

    start = time.perf_counter()
    timing = timed_pipeline(cfg, short_units=0, warm_up=False, on_unit=on_unit)
    seconds = time.perf_counter() - start
    rate = 0.0
    for pts in points.values():
        pts.sort()
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            rate += (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
    return Window(seconds, timing.images, rate or timing.images / seconds, timing)


def completion_rate(done_at: list[float], seconds: float) -> float:
    """Completions after the first quarter over the time from then to the last one."""
    done_at = sorted(done_at)
    q = len(done_at) // 4
    if len(done_at) < 2 or done_at[-1] <= done_at[q]:
        return len(done_at) / seconds if seconds else 0.0
    return (len(done_at) - 1 - q) / (done_at[-1] - done_at[q])


def _peer_run(cfg, out: Path) -> Window:
    """The job through ray.data.llm; each output block written as Parquet as it arrives, its time and rows kept."""
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from recaption.captioners import engine_args, format_prompt, get_prompt, resolve_model, sampling_kwargs
    from recaption.sources import plan_units

    model = cfg.models[0]
    info = resolve_model(model.path, model.family, model.revision)
    args = engine_args(model, info.path)
    args.pop("model")
    prompt = format_prompt(info.family, get_prompt(model.prompts[0], cfg.prompts), None)
    sampling = sampling_kwargs(model.generation, 0)
    image_cfg = cfg.images.model_dump()
    small = {"num_cpus": 0.25}
    gpu_bundle = {"CPU": model.num_cpus, "GPU": model.num_gpus} if model.num_gpus else {"CPU": model.num_cpus}
    config = vLLMEngineProcessorConfig(
        model_source=info.path,
        engine_kwargs=args,
        runtime_env={"env_vars": dict(model.env)},
        concurrency=1,
        batch_size=model.vllm.max_num_seqs or 64,
        placement_group_config={"bundles": [gpu_bundle]},
        log_engine_metrics=False,
        chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        prepare_multimodal_stage={"enabled": False},
    )

    def preprocess(row: dict) -> dict:
        from recaption.config import ImageConfig
        from recaption.sources import decode_image

        image = decode_image(row["jpg"], ImageConfig(**image_cfg)).image
        return {
            "key": row["__key__"],
            "prompt": prompt,
            "multimodal_data": {"image": image},
            "sampling_params": sampling,
        }

    def postprocess(row: dict) -> dict:
        import time

        # done_at: when the row left the engine's stage (the bench's clock for the peer, taken where the work is)
        return {"key": row["key"], "caption": row["generated_text"], "n_tokens": row["num_generated_tokens"],
                "done_at": time.time()}  # fmt: skip

    processor = build_processor(
        config, preprocess=preprocess, postprocess=postprocess, preprocess_map_kwargs=small,
        postprocess_map_kwargs=small,
    )  # fmt: skip
    tars = sorted({u.uri for u in plan_units(cfg.input)})
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    done_at: list[float] = []
    start = time.perf_counter()
    ds = processor(ray.data.read_webdataset(tars, decoder=None, ray_remote_args=small))
    for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        pq.write_table(batch, out / f"part-{i:05d}.parquet")
        done_at.extend(batch.column("done_at").to_pylist())
    seconds = time.perf_counter() - start
    return Window(seconds, len(done_at), completion_rate(done_at, seconds))

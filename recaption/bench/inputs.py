"""What the benches run on: photo-like shards, configs, a local Ray, timed pipeline runs."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


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
    from recaption.sources import write_webdataset

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
    from recaption.job.pipeline import keep_idle_workers

    keep_idle_workers()  # as `recaption run` starts its local Ray
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    yield


@dataclass
class PipelineTiming:
    seconds: float  # planning to the last commit of the full run, on a Ray already started
    images: int
    marginal_images_per_s: float  # (full - short run) images / (full - short run) seconds: start-up cancels out
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the full run: Ray's daemons, the driver
    actor_rss_mib: float = 0.0  # the largest resident memory a caption actor reported with a unit (full run)
    actor_own_mib: float = 0.0  # the largest own (anonymous) memory a caption actor reported with a unit (full run)
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
    before, samples, memory, engine = cpu_seconds(), [], {"rss_mib": 0.0, "own_mib": 0.0}, {}

    def seen(row: dict) -> None:
        if on_unit is not None:
            on_unit(row)
        samples.append(cpu_seconds())
        for model, snap in json.loads(row.get("metrics") or "{}").items():
            for key in memory:  # the largest each actor reported
                memory[key] = max(memory[key], float(snap.get(key, 0.0)))
            engine[model] = snap

    seconds, images = _run_once(cfg, on_unit=seen)
    after = samples[-1] if samples else cpu_seconds()  # at the last commit, before the actors exit
    if seconds > s_seconds and images > s_images:
        marginal = (images - s_images) / (seconds - s_seconds)
    else:  # timing noise larger than the difference (tiny --quick sizes): the whole run's rate, start-up included
        log.warning("bench: the short run took as long as the full one; reporting the whole run's rate")
        marginal = images / seconds
    cpu = {k: after[k] - before.get(k, 0.0) for k in after}
    return PipelineTiming(
        seconds, images, marginal, cpu, actor_rss_mib=memory["rss_mib"], actor_own_mib=memory["own_mib"], engine=engine
    )


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
    from recaption.job import run_pipeline

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

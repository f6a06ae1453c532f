"""Data-plane bench: the pipeline with a zero-cost engine against a bare read+decode."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from recaption.bench.inputs import (
    _run_once,
    fake_model,
    local_ray,
    make_shards,
    pipeline_config,
    short_config,
    timed_pipeline,
)
from recaption.bench.result import BenchResult, BenchSizes, compared, interleaved, median


def _bare_read_unit(unit_dict: dict, input_cfg: dict, image_cfg: dict) -> int:
    """What a hand-written loop does per unit: read the shard, decode every image. Returns images decoded."""
    from recaption.config import ImageConfig, InputConfig
    from recaption.errors import ImageError
    from recaption.sources import WorkUnit, decode_image, read_unit

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
    from recaption.sources import plan_units

    units = [u.to_dict() for u in plan_units(cfg.input)]
    inp, img = cfg.input.model_dump(), cfg.images.model_dump()
    start = time.perf_counter()
    images = sum(pool.map(_bare_read_unit, units, [inp] * len(units), [img] * len(units)))
    return time.perf_counter() - start, images


def _warm(_: int) -> None:
    import recaption.sources.images  # noqa: F401
    import recaption.sources.read  # noqa: F401


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
            f"caption actor memory, {big}- vs {small}-image units", "MiB (own)",
            [t.actor_own_mib for t in timings[big]], [t.actor_own_mib for t in timings[small]], "<= 1.1",
            f"the largest own memory (anonymous pages: heap, objects, decoded images) a caption actor (fake engine) reported "
            f"with any unit of a run, units {big // small}x as large; decoded images in flight are bounded by the "
            "engine's batch, not the unit, and a unit's bytes are read in place from Ray's shared memory",
        )
    )  # fmt: skip
    result.add(
        compared(
            f"caption actor RSS, {big}- vs {small}-image units", "MiB",
            [t.actor_rss_mib for t in timings[big]], [t.actor_rss_mib for t in timings[small]],
            note="all resident pages: its own (above), libraries and shared memory",
        )
    )  # fmt: skip

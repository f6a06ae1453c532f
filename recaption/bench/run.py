"""`recaption bench`: runs the chosen sections and collects their measurements."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recaption.bench.data_plane import bench_data_plane
from recaption.bench.engine import bench_engine
from recaption.bench.inputs import _stop_ray
from recaption.bench.result import (
    SECTIONS,
    BenchResult,
    BenchSizes,
    _load,
    default_workdir,
    describe_machine,
    format_table,
    machine_facts,
)
from recaption.bench.scaling import bench_scaling
from recaption.bench.trainer import bench_trainer
from recaption.errors import ConfigError


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
            from recaption.bench.plan import bench_plan

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

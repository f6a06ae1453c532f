"""Scaling over workers, and workers' memory over units."""

from __future__ import annotations

import shutil
from pathlib import Path

from recaption.bench.inputs import fake_model, local_ray, make_shards, pipeline_config, timed_pipeline
from recaption.bench.result import BenchResult, BenchSizes, Measurement, _ratio, median


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
    from recaption.job import run_pipeline

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

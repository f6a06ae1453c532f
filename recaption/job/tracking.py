"""Sending a run's figures where users look: TensorBoard event files and Weights & Biases (`--report-to`).

A tracker gets the numbers the progress view already has (units, rows, images/s, engine figures for a pipeline run;
loss, learning rate, samples/s and eval metrics for the trainer) at each update, keyed by step. Both are optional
extras (`pip install 'recaption[tensorboard]'`, `'recaption[wandb]'`); asking for one that is not installed is one
clear line before any work. W&B follows its own environment (`WANDB_MODE=offline`, `WANDB_PROJECT`, …); neither
gets a credential from recaption's config (stored configs are stripped of them first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from recaption.errors import ConfigError

TRACKERS = ("tensorboard", "wandb")


class Tracker(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """`tensorboard`, `wandb`, `tensorboard,wandb`, `none` or a list of those → the tracker names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [i.strip().lower() for i in items if i.strip() and i.strip().lower() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name!r}: known trackers are {', '.join(TRACKERS)} (or none)")
    return list(dict.fromkeys(names))


def require(names: list[str]) -> None:
    """One line, before any work, for a tracker whose package is not installed."""
    import importlib.util

    for name in names:
        module = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install 'recaption[{name}]'")


def tracking_dir(output_uri: str, local_root: str | None) -> Path:
    """Where a run's tracker files go: `OUTPUT/_tracking` for a local output, else a cache directory named after the
    output (TensorBoard and W&B write local files; sync or upload them from there)."""
    import hashlib

    if local_root is not None:
        return Path(local_root) / "_tracking"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recaption" / "tracking"
    return cache / hashlib.sha256(output_uri.encode()).hexdigest()[:12]


def make_trackers(
    names: list[str], log_dir: str | Path, run_name: str, config: Mapping[str, Any] | None = None, kind: str = "run"
) -> list[Tracker]:
    """The trackers asked for, writing under `log_dir` (TensorBoard's event files in `log_dir/tensorboard`, W&B's
    offline files in `log_dir/wandb`). `config` (already stripped of credentials) goes to W&B as the run's config."""
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(Path(log_dir) / "tensorboard" / run_name))
            elif name == "wandb":
                trackers.append(WandbTracker(Path(log_dir), run_name, config or {}, kind))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers


class TensorBoardTracker:
    """Scalars into TensorBoard event files (torch's SummaryWriter; needs the `tensorboard` package)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--report-to tensorboard needs the tensorboard package: pip install 'recaption[tensorboard]'"
            ) from None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Scalars into a Weights & Biases run (online, or offline with `WANDB_MODE=offline` and synced later)."""

    def __init__(self, log_dir: Path, run_name: str, config: Mapping[str, Any], kind: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--report-to wandb needs the wandb package: pip install 'recaption[wandb]'") from None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "recaption"),
            name=run_name,
            job_type=kind,
            dir=str(log_dir),
            config=dict(config),
            reinit="create_new",
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def scalars(state: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a progress snapshot or a metrics record, nested mappings flattened (`engines` →
    `engine/<model>/<figure>`, an eval's `{"long": {"i2t_r1": …}}` → `long/i2t_r1`), named `prefix/key`."""
    out: dict[str, float] = {}
    skip = {"done", "total", "initial", "started_at", "updated_at", "eta_s"}

    def put(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                put(f"{key}/{k}", v)
        elif not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)

    for key, value in state.items():
        if key in skip or key in ("errors", "error_kinds"):
            continue
        put("engine" if key == "engines" else key, value)
    return out

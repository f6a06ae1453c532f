"""Atomic checkpoints of all a run needs to go on exactly: model, optimizer, scheduler, scaler, RNG, data position."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from recaption.errors import ConfigError, TrainingError
from recaption.faults import fault_point
from recaption.train.data import DataState

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_NAME = re.compile(r"step-\d{8}")


def weights_finite(model: torch.nn.Module) -> bool:
    """True when no parameter or buffer holds NaN or inf (one sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Every generator a step may draw from, in plain tensors and tuples (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    data_state: DataState,
    model_hash: str,
    rank: int = 0,
    world: int = 1,
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step-<n>/` and point `checkpoints/latest` at it. The directory is filled under a temp name
    and renamed, and `latest` is replaced by rename, so a run killed at any moment leaves the last complete one.
    Every worker adds its own RNG and data position; rank 0 writes the (replicated) model and optimizer."""
    if not weights_finite(model):
        raise TrainingError(
            f"step {step}: the weights hold NaN or inf; no checkpoint written, the earlier ones are kept"
        )
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"rng": rng_state(), "data": data_state.to_dict()}, tmp / f"rank-{rank}.pt")
    _barrier()
    if rank == 0:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        trainer = {"step": step, "world": world, "model_hash": model_hash}
        torch.save({**trainer, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, tmp / "trainer.pt")
        final = root / name
        fault_point("train:before-rename")  # the temp dir is complete; `latest` still names the previous one
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / f"{TMP_PREFIX}{LATEST}"
        pointer.write_text(name)
        os.replace(pointer, root / LATEST)
        # Only the names this function writes: a user's `step-…-keep` copy is theirs.
        older = sorted(p for p in root.glob("step-*") if STEP_NAME.fullmatch(p.name) and p.name != name)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        fault_point("train:after-checkpoint")
    _barrier()
    return root / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer.pt").is_file() else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    model_hash: str,
    rank: int = 0,
    world: int = 1,
) -> tuple[int, DataState]:
    """Restore everything `save_checkpoint` wrote (into the unwrapped model); returns the step and data position."""
    path = Path(path)
    device = next(model.parameters()).device
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    if trainer["model_hash"] != model_hash:
        raise ConfigError(
            f"{path}: written with another model config; set run.output to a new directory or run.resume to false"
        )
    if trainer["world"] != world:
        raise ConfigError(
            f"{path}: written by {trainer['world']} workers, resuming with {world}; each worker's data position "
            f"is saved, so use distributed.num_workers: {trainer['world']} to resume exactly"
        )
    model.load_state_dict(torch.load(path / "model.pt", map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    mine = torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
    set_rng_state(mine["rng"])
    return trainer["step"], DataState(**mine["data"])

"""The training loop, readable in one sitting: AdamW + cosine, bf16 autocast, accumulation, clipping, logs, evals,
checkpoints, export. The same function runs alone or as one of N DDP workers."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from recaption.errors import TrainingError
from recaption.faults import fault_point
from recaption.job import Progress, make_trackers
from recaption.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from recaption.train.config import TrainConfig
from recaption.train.data import Batches, DataState, prefetch, row_report
from recaption.train.losses import compute_losses, split_texts
from recaption.train.model import ContrastiveModel, build_model, save_pretrained
from recaption.train.storage import RunStore
from recaption.train.tokenizer import load_tokenizer

EvalHook = Callable[[ContrastiveModel, object, int], dict]
TENSOR_KEYS = ("pixel_values", "long_ids", "long_mask", "short_ids", "short_mask")
MAX_SKIPPED_STEPS = 20  # fp16 only: consecutive steps the grad scaler may skip before the run stops


def train(
    cfg: TrainConfig,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    eval_hook: EvalHook | None = None,
    progress: bool = True,
    report_to: list[str] | None = None,
) -> dict:
    """Train as `cfg` says from `<run.output>/tokenizer` (see run.prepare_run), resuming from its latest checkpoint;
    returns a summary. With world > 1 a torch.distributed process group must already exist (Ray Train makes it)."""
    run_dir, main = Path(cfg.run.output), rank == 0
    device = device or pick_device(cfg.run.device)
    amp_dtype = autocast_dtype(cfg.run.precision, device)

    # Model: the same initial weights on every worker (DDP also broadcasts rank 0's), then per-worker randomness.
    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id).to(device)
    freeze_unused(model, cfg)
    torch.manual_seed(cfg.run.seed + 1_000_003 * (rank + 1))
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, data_state = 0, DataState()
    checkpoint = latest_checkpoint(run_dir) if cfg.run.resume else None
    if checkpoint is not None:
        step, data_state = load_checkpoint(
            checkpoint, model, optimizer, scheduler, scaler, cfg.model_hash(), rank, world
        )
        log(main, f"resumed from {checkpoint} at step {step}")
    ddp = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    loader = Batches(cfg, tokenizer, rank, world, data_state)
    rows = row_report(cfg.data.path, loader.sampler) if main else None
    if rows is not None and rows["skipped"]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in rows["skipped"].items())
        log(main, f"data: {rows['trainable']} of {rows['rows']} rows trainable; skipped {reasons}")
    batches = prefetch(iter(loader))
    metrics = (run_dir / "metrics.jsonl").open("a") if main else None
    # An output on object storage (run.mirror) gets each checkpoint as it is saved, and the rest at the end.
    store = RunStore(cfg.run.mirror, local=run_dir) if cfg.run.mirror and main else None
    trackers = (
        make_trackers(report_to or [], run_dir / "tracking", run_dir.name, cfg.resolved(), "train") if main else []
    )
    # Trackers get each metrics record (loss, lr, grad norm, samples/s, eval metrics) at its step, not every update.
    bar = Progress.for_steps(
        cfg.run.steps, initial=step, enabled=progress and main, trackers=trackers, track_updates=False
    )
    accum, micro_batch = cfg.run.grad_accum, cfg.run.batch_size
    history: list[dict] = []
    bad_steps = 0  # consecutive fp16 steps the scaler skipped
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < cfg.run.steps:
            model.train()
            totals: dict[str, torch.Tensor] = {}  # summed on the device; read (a sync) only when logged
            for micro in range(accum):
                batch = next(batches)
                inputs = {k: batch[k].to(device, non_blocking=True) for k in TENSOR_KEYS if k in batch}
                # Gradients are exchanged once per optimizer step, on the last micro-step.
                sync = nullcontext() if world == 1 or micro == accum - 1 else ddp.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        out = ddp(**inputs)
                        if "short_all" in out:
                            out.update(split_texts(out.pop("short_all"), batch["layout"], len(batch["keys"])))
                        ids = {k: v.to(device, non_blocking=True) for k, v in batch["text_ids"].items()}
                        losses = compute_losses(out, cfg.loss, ids)
                    scaler.scale(losses["loss"] / accum).backward()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value.detach() / accum
            scaler.unscale_(optimizer)
            limit = cfg.optim.grad_clip or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], limit)
            # One sync per step: a non-finite loss or gradient must never reach the weights or a checkpoint. Every
            # worker sees the same global loss and all-reduced gradients, so all stop together.
            finite = bool(torch.isfinite(totals["loss"]) & torch.isfinite(grad_norm))
            if not finite and scaler.is_enabled() and bad_steps < MAX_SKIPPED_STEPS:
                bad_steps += 1  # fp16: the scaler skips this step and lowers its scale, as GradScaler is meant to
            elif not finite:
                raise TrainingError(non_finite_message(step + 1, totals, grad_norm, scheduler, run_dir))
            else:
                bad_steps = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            model.clamp_scales(cfg.model.max_logit_scale)
            step += 1
            window_steps += 1
            data_state = batch["state"]
            samples = {"samples": accum * micro_batch * world}
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    **{k: round(v.item(), 6) for k, v in totals.items()},
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": round(model.logit_scale.exp().item(), 4),
                    "grad_norm": round(float(grad_norm), 4),
                    "global_batch": micro_batch * world,
                    "samples_per_s": round(window_steps * accum * micro_batch * world / max(elapsed, 1e-9), 2),
                    "epoch": data_state.epoch,
                }
                history.append(record)
                bar.advance(1, samples, loss=record["loss"])
                write_metrics(metrics, record, bar)
                window_start, window_steps = time.perf_counter(), 0
            else:
                bar.advance(1, samples)  # the loss stays on the device between log steps: no sync per step
            if eval_hook is not None and cfg.run.eval_every and step % cfg.run.eval_every == 0 and main:
                model.eval()
                with torch.no_grad():
                    write_metrics(metrics, {"step": step, **eval_hook(model, tokenizer, step)}, bar)
            if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
                saved = save_checkpoint(
                    run_dir, step, model, optimizer, scheduler, scaler, data_state, cfg.model_hash(),
                    rank, world, cfg.run.keep_checkpoints,
                )  # fmt: skip
                if store is not None and saved is not None:
                    store.push("metrics.jsonl", "tracking")
                    store.push_checkpoint(saved)
                    fault_point("train:after-upload")
    finally:
        batches.close()
        loader.close()
        bar.close(finished=step >= cfg.run.steps)
        if metrics:
            metrics.close()
    # Images are counted by each worker over its own rows; no collective here (a worker that stopped early must not
    # leave the others waiting): the summary holds worker 0's share, which with N workers is about 1/N of all.
    skipped = {"rows": rows["skipped"] if rows else {}, "images": loader.skipped(), "images_of_workers": [0]}
    if main and any(skipped["images"].values()):
        log(main, "images skipped: " + ", ".join(f"{n} {r}" for r, n in skipped["images"].items() if n))
    summary = {"step": step, "history": history, "run_dir": str(run_dir), "export": None, "skipped": skipped}
    if main:
        summary["export"] = str(quiet_export(model, tokenizer, run_dir / "final", cfg))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if store is not None:
            store.push("metrics.jsonl", "tracking", "final", "summary.json")
            summary["export"] = f"{store.shown.split('?', 1)[0].rstrip('/')}/final"
    return summary


def non_finite_message(step: int, totals: dict, grad_norm: torch.Tensor, scheduler, run_dir: Path) -> str:
    """One line: which step went non-finite, at what learning rate, what is kept and what to change."""
    values = ", ".join(f"{k} {v.item():.4g}" for k, v in totals.items())
    last = latest_checkpoint(run_dir)
    kept = f"the last checkpoint, {last}, holds finite weights" if last else "no checkpoint was written"
    return (
        f"step {step}: non-finite loss or gradient ({values}, grad_norm {float(grad_norm):.4g}) at lr "
        f"{scheduler.get_last_lr()[0]:.3g}; stopped before updating the weights, nothing exported; {kept}. "
        f"Lower optim.lr (or set optim.grad_clip, optim.warmup_steps) and run again"
    )


def quiet_export(model: ContrastiveModel, tokenizer, out: Path, cfg: TrainConfig) -> Path:
    """`save_pretrained` without transformers' per-file progress bars in the run's log."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return save_pretrained(model, tokenizer, out, cfg.model)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32 without autocast; `auto` is bf16 on a GPU that has it, fp32 elsewhere (CPU bf16 is slow)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def freeze_unused(model: ContrastiveModel, cfg: TrainConfig) -> None:
    """Parameters no switched-on loss can reach get no gradient; DDP must not wait for them."""
    model.group_logit_scale.requires_grad_(cfg.loss.grouping > 0)
    if model.text.corners is not None and not cfg.loss.long and not cfg.model.text.corners_see_each_other:
        model.text.corners.requires_grad_(False)  # only long texts read the corner slots


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on parameters of 2+ dims (linear and attention weights, projections); none on
    1-dim ones (biases, norm weights, logit scales), on any parameter with `embedding` in its name (token, position
    and class embeddings, the patch-embedding kernel) or on the corner and extra class tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or any(s in name for s in ("embedding", "corners", "extra_class", "logit_scale"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then a cosine down to `min_lr_ratio` at the last step."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def write_metrics(file, record: dict, bar) -> None:
    if file is None:
        return
    file.write(json.dumps(record) + "\n")
    file.flush()
    bar.log_scalars(record.get("step", bar.done), {k: v for k, v in record.items() if k != "step"})
    shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
    bar.write(shown)


def log(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)

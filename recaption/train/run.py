"""`recaption train`: prepare the run directory once, then train in this process or on N Ray Train (DDP) workers."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml

from recaption.errors import ConfigError
from recaption.job import OUTPUT_KIND, OWNER_FILE
from recaption.sources import is_uri
from recaption.train.checkpoint import latest_checkpoint
from recaption.train.config import TrainConfig, load_train_config
from recaption.train.data import caption_texts, export_shards, output_parts, source_input
from recaption.train.loop import EvalHook, train
from recaption.train.storage import RunStore
from recaption.train.tokenizer import prepare_tokenizer

RUN_KIND = "train-run"
# What a training run writes in run.output (and may find there when it resumes).
RUN_NAMES = {OWNER_FILE, "config.yaml", "tokenizer", "metrics.jsonl", "checkpoints", "final", "summary.json",
             "ray-train", ".tmp-tokenizer", "tracking"}  # fmt: skip
# Keys a resume may change: how often it logs, evaluates and saves, where shards now are, local resources, and
# run.steps (applied for real: the schedule is a function of the step and run.steps, so the cosine is recomputed
# from the checkpoint's step to the new last step).
RESUMABLE_CHANGES = (
    "run.steps", "run.log_every", "run.eval_every", "run.checkpoint_every", "run.keep_checkpoints", "run.resume", "run.device",
    "data.input_path", "data.decode_threads", "distributed.address", "distributed.cpus_per_worker", "eval",
    "run.mirror",
)  # fmt: skip


def prepare_run(cfg: TrainConfig) -> TrainConfig:
    """Fix every path as absolute (Ray workers run elsewhere), write the resolved config to the run directory and put
    the tokenizer every worker loads there (trained here, once). Returns the config the workers get."""
    cfg = cfg.model_copy(deep=True)
    if not is_uri(cfg.data.path):
        cfg.data.path = os.path.abspath(cfg.data.path)
    # The source shards as the pipeline saw them, resolved from here: a relative input path was relative to the
    # directory the pipeline ran in, which is the best guess we have.
    if not export_shards(cfg.data.path):  # a webdataset export holds its images: no source shards to find
        input_path = source_input(output_parts(cfg.data.path), cfg.data.input_path).path
        cfg.data.input_path = input_path if is_uri(input_path) else os.path.abspath(input_path)
    store = RunStore(cfg.run.output)
    if store.remote:  # object storage: train in a local staging copy, brought up to date from it first
        claim_names(store.names(), store.read_owner(), store.shown)
        store.pull()
    else:
        cfg.run.output = os.path.abspath(cfg.run.output)
    text, image = cfg.model.text, cfg.model.image
    if cfg.eval is not None and not is_uri(cfg.eval.config):
        cfg.eval.config = os.path.abspath(cfg.eval.config)
    for section, key in ((text, "pretrained"), (text, "tokenizer"), (image, "pretrained")):
        if getattr(section, key):
            setattr(section, key, os.path.abspath(getattr(section, key)))
    run_dir = store.local
    claim_run_dir(run_dir)
    check_resume(cfg, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    prepare_tokenizer(cfg.model.text, run_dir, lambda: caption_texts(cfg.data.path))
    if store.remote:
        store.push(OWNER_FILE, "config.yaml", "tokenizer")
        cfg.run.mirror, cfg.run.output = cfg.run.output, str(run_dir)  # the workers write the staging copy
    return cfg


def claim_run_dir(run_dir: Path) -> None:
    """Make sure `run.output` is a training run's before anything is written (the pipeline's ownership rule): a new
    or empty directory becomes one, one that is stays; a captions output, another recaption directory or a foreign
    non-empty directory is refused in one line, untouched. A run directory of an earlier version (only the names a
    run writes, no owner file) is adopted."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.output {run_dir} is a file; give a directory (new, empty, or an earlier run's)")
    owner_path = run_dir / OWNER_FILE
    owner = None
    if owner_path.is_file():
        try:
            owner = json.loads(owner_path.read_text())
        except ValueError:
            owner = {}
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if claim_names(names, owner, str(run_dir)):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"tool": "recaption", "kind": RUN_KIND, "created_at": time.time()}
    owner_path.write_text(json.dumps(record))


def claim_names(names: list[str], owner: dict | None, where: str) -> bool:
    """The ownership rule on a directory's entries and its owner record (None: it has none): True when it is
    already a training run's, False when it may become one; a ConfigError in one line otherwise."""
    if owner is not None:
        kind = owner.get("kind") if isinstance(owner, dict) else None
        if kind == RUN_KIND:
            return True
        what = "a captions output (recaption run)" if kind == OUTPUT_KIND else f"a recaption {kind} directory"
        raise ConfigError(f"run.output {where} is {what}, not a training run; choose another run.output")
    if any(n in ("_done", "_run.json") or n.startswith("part-") for n in names):  # an output of an older layout
        raise ConfigError(f"run.output {where} is a captions output (recaption run), not a training run; choose "
                          f"another run.output")  # fmt: skip
    foreign = [n for n in names if n not in RUN_NAMES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise ConfigError(
            f"run.output {where} is not empty and is not a training run (it holds {shown}); choose a new or empty "
            f"directory"
        )
    return False


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """A resume must train as the checkpoint's run did: every key of the saved `config.yaml` outside
    `RESUMABLE_CHANGES` must be unchanged, else one line names the keys that differ (the checkpoint's optimizer and
    scheduler state, data position and seeds would otherwise be mixed with the new values)."""
    saved_path = run_dir / "config.yaml"
    if not cfg.run.resume or latest_checkpoint(run_dir) is None or not saved_path.is_file():
        return
    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    new = _flat(cfg.resolved())
    changed = [
        k
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)
    ]
    if changed:
        shown = ", ".join(f"{k} {saved.get(k)!r} → {new.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ConfigError(
            f"run.output {run_dir} holds a checkpoint of another training config: {shown}{more}; resume with the "
            f"saved config.yaml, or set a new run.output (or run.resume: false to start this one over)"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def train_command(
    config: str, overrides: list[str] = (), progress: bool = True, report_to: list[str] | None = None
) -> int:
    """`recaption train CONFIG [--set key=value ...]`: load, train, print where the results are; the exit code."""
    summary = run_training(load_train_config(config, overrides), progress=progress, report_to=report_to)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"run:      {summary['run_dir']} (metrics.jsonl, checkpoints/)")
    print(f"steps:    {summary['step']}" + (f", last loss {last['loss']:.4f}" if "loss" in last else ""))
    print(f"model:    {summary['export']} (load with recaption.train.model.load_pretrained)")
    return 0


def run_training(
    cfg: TrainConfig, progress: bool = True, eval_hook: EvalHook | None = None, report_to: list[str] | None = None
) -> dict:
    """Train as `cfg` says: 1 worker in this process, N workers through Ray Train's TorchTrainer. Without an explicit
    `eval_hook`, the config's `eval` section (if any) makes one; the loop calls it on rank 0 only. `report_to`:
    trackers (tensorboard, wandb) that get the losses, learning rate and eval metrics (files in RUN/tracking)."""
    from recaption.job import tracking

    tracking.require(report_to or [])
    cfg = prepare_run(cfg)
    if eval_hook is None and cfg.eval is not None:
        from recaption.eval.run import trainer_hook

        eval_hook = trainer_hook(cfg.eval.config, cfg.model, cfg.eval.text_slot)  # a bad eval set fails here, early
    if cfg.distributed.num_workers == 1:
        return train(cfg, eval_hook=eval_hook, progress=progress, report_to=report_to)
    return run_on_ray(cfg, progress, eval_hook, report_to)


def run_on_ray(
    cfg: TrainConfig, progress: bool = True, eval_hook: EvalHook | None = None, report_to: list[str] | None = None
) -> dict:
    """N DDP workers under Ray Train (gloo on CPUs, nccl on GPUs); the run directory must be shared by all nodes."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = cfg.distributed
    # Ray Train's print patch sends a worker's print both to its stdout and through logging, so every line (progress,
    # metrics) reached the driver twice; the workers print as plain processes instead (propagated by Ray Train).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        address = dist.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(**kwargs, logging_level=logging.WARNING)
    backend = dist.backend if dist.backend != "auto" else ("nccl" if dist.use_gpu else "gloo")
    resources = {"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": cfg.resolved(),
            "progress": progress,
            "eval_hook": eval_hook,
            "report_to": report_to or [],
        },
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name="ray-train", storage_path=str(Path(cfg.run.output).resolve())),
    )
    trainer.fit()
    return json.loads((Path(cfg.run.output) / "summary.json").read_text())


def _worker(config: dict) -> None:
    """One Ray Train worker: the process group exists; train, then report the summary (rank 0's is kept)."""
    import ray.train
    import torch

    cfg = TrainConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    device = torch.device("cpu")
    if cfg.distributed.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
    summary = train(
        cfg,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        device,
        config["eval_hook"],
        config["progress"],
        report_to=config.get("report_to"),
    )
    ray.train.report({"step": summary["step"]})  # the summary itself is in <run.output>/summary.json

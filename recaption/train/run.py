"""`recaption train`: prepare the run directory once, then train in this process or on N Ray Train (DDP) workers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from recaption.shards.fs import is_uri
from recaption.train.config import TrainConfig, load_train_config
from recaption.train.data import caption_texts, export_shards, output_parts, source_input
from recaption.train.loop import EvalHook, train
from recaption.train.tokenizer import prepare_tokenizer


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
    cfg.run.output = os.path.abspath(cfg.run.output)
    text, image = cfg.model.text, cfg.model.image
    if cfg.eval is not None and not is_uri(cfg.eval.config):
        cfg.eval.config = os.path.abspath(cfg.eval.config)
    for section, key in ((text, "pretrained"), (text, "tokenizer"), (image, "pretrained")):
        if getattr(section, key):
            setattr(section, key, os.path.abspath(getattr(section, key)))
    run_dir = Path(cfg.run.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    prepare_tokenizer(cfg.model.text, run_dir, lambda: caption_texts(cfg.data.path))
    return cfg


def train_command(config: str, overrides: list[str] = (), progress: bool = True) -> int:
    """`recaption train CONFIG [--set key=value ...]`: load, train, print where the results are; the exit code."""
    summary = run_training(load_train_config(config, overrides), progress=progress)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"run:      {summary['run_dir']} (metrics.jsonl, checkpoints/)")
    print(f"steps:    {summary['step']}" + (f", last loss {last['loss']:.4f}" if "loss" in last else ""))
    print(f"model:    {summary['export']} (load with recaption.train.model.load_pretrained)")
    return 0


def run_training(cfg: TrainConfig, progress: bool = True, eval_hook: EvalHook | None = None) -> dict:
    """Train as `cfg` says: 1 worker in this process, N workers through Ray Train's TorchTrainer. Without an explicit
    `eval_hook`, the config's `eval` section (if any) makes one; the loop calls it on rank 0 only."""
    cfg = prepare_run(cfg)
    if eval_hook is None and cfg.eval is not None:
        from recaption.eval.trainer import trainer_hook

        eval_hook = trainer_hook(cfg.eval.config, cfg.model, cfg.eval.text_slot)  # a bad eval set fails here, early
    if cfg.distributed.num_workers == 1:
        return train(cfg, eval_hook=eval_hook, progress=progress)
    return run_on_ray(cfg, progress, eval_hook)


def run_on_ray(cfg: TrainConfig, progress: bool = True, eval_hook: EvalHook | None = None) -> dict:
    """N DDP workers under Ray Train (gloo on CPUs, nccl on GPUs); the run directory must be shared by all nodes."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = cfg.distributed
    if not ray.is_initialized():
        address = dist.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(**kwargs, logging_level=logging.WARNING)
    backend = dist.backend if dist.backend != "auto" else ("nccl" if dist.use_gpu else "gloo")
    resources = {"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.resolved(), "progress": progress, "eval_hook": eval_hook},
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
    summary = train(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, config["eval_hook"], config["progress"])
    ray.train.report({"step": summary["step"]})  # the summary itself is in <run.output>/summary.json

"""Where caption actors run: pool size per model (fixed, or every GPU of a kind) and each actor's resources."""

from __future__ import annotations

import math
from typing import Any

from recaption.config import ModelConfig
from recaption.errors import ConfigError

ACCELERATOR_PREFIX = "accelerator_type:"


def cluster_gpus(nodes: list[dict[str, Any]], accelerator_type: str | None = None) -> float:
    """GPUs of the alive nodes in `ray.nodes()`; only nodes with that Ray accelerator type when one is given."""
    total = 0.0
    for node in nodes:
        resources = node.get("Resources") or {}
        if not node.get("Alive", True):
            continue
        if accelerator_type and f"{ACCELERATOR_PREFIX}{accelerator_type}" not in resources:
            continue
        total += resources.get("GPU", 0.0)
    return total


def pool_size(model: ModelConfig, nodes: list[dict[str, Any]], autoscaling: bool = False) -> int:
    """Actors in a model's pool: the configured number, or (auto) as many as the cluster's GPUs hold. A pool of GPU
    actors on a cluster where no node has one actor's GPUs is an error now, not a job that waits forever, unless the
    cluster autoscales (`ray.autoscaling`): there a fixed-size pool waits for its nodes."""
    per_actor = model.gpus_per_actor
    if model.concurrency != "auto":
        if per_actor > 0 and not autoscaling:
            _check_an_actor_fits(model, nodes, per_actor)
        return model.concurrency
    if per_actor <= 0:
        raise ConfigError(f"models[{model.id}].concurrency: auto sizes GPU pools; set num_gpus or a number of actors")
    gpus = cluster_gpus(nodes, model.accelerator_type)
    size = math.floor(gpus / per_actor + 1e-9)
    if size < 1:
        kind = f" of type {model.accelerator_type}" if model.accelerator_type else ""
        raise ConfigError(
            f"models[{model.id}].concurrency: auto found {gpus:g} GPUs{kind} in the Ray cluster, "
            f"fewer than one actor's {per_actor:g}"
        )
    return size


def _check_an_actor_fits(model: ModelConfig, nodes: list[dict[str, Any]], per_actor: float) -> None:
    most = max((cluster_gpus([node], model.accelerator_type) for node in nodes), default=0.0)
    if most + 1e-9 >= per_actor:
        return
    kind = f" of type {model.accelerator_type}" if model.accelerator_type else ""
    raise ConfigError(
        f"models[{model.id}]: each actor needs {per_actor:g} GPUs{kind} but no node of the Ray cluster has "
        f"{'them' if per_actor > 1 else 'one'} (most on one node: {most:g}); run on a GPU machine or cluster, or on "
        "CPUs with `num_gpus: 0` (`--set models.N.num_gpus=0`); on an autoscaling cluster set ray.autoscaling: true"
    )


def actor_options(model: ModelConfig, nodes: list[dict[str, Any]], autoscaling: bool = False) -> dict[str, Any]:
    """The `map_batches` arguments that place one model's caption actors."""
    import ray.data

    options: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(size=pool_size(model, nodes, autoscaling)),
        "num_cpus": model.num_cpus,
        "num_gpus": model.gpus_per_actor,
    }
    if model.accelerator_type:
        options["accelerator_type"] = model.accelerator_type
    if model.env:
        options["runtime_env"] = {"env_vars": dict(model.env)}
    return options

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


def pool_size(model: ModelConfig, nodes: list[dict[str, Any]]) -> int:
    """Actors in a model's pool: the configured number, or (auto) as many as the cluster's GPUs hold."""
    if model.concurrency != "auto":
        return model.concurrency
    per_actor = model.gpus_per_actor
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


def actor_options(model: ModelConfig, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The `map_batches` arguments that place one model's caption actors."""
    import ray.data

    options: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(size=pool_size(model, nodes)),
        "num_cpus": model.num_cpus,
        "num_gpus": model.gpus_per_actor,
    }
    if model.accelerator_type:
        options["accelerator_type"] = model.accelerator_type
    if model.env:
        options["runtime_env"] = {"env_vars": dict(model.env)}
    return options

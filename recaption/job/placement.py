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


def pool_bounds(model: ModelConfig, nodes: list[dict[str, Any]], autoscaling: bool = False) -> tuple[int, int | None]:
    """(min, max) actors of a model's pool; max None: as many as the cluster will hold, now or once nodes join.
    A number is a fixed pool; [min, max] grows and shrinks with the work (Ray Data's autoscaling pool); auto starts
    with one actor per GPU the cluster has now and grows as GPU nodes join."""
    if isinstance(model.concurrency, tuple):
        if model.gpus_per_actor > 0 and not autoscaling:
            _check_an_actor_fits(model, nodes, model.gpus_per_actor)
        return model.concurrency
    if model.concurrency == "auto":
        return pool_size(model, nodes, autoscaling), None
    size = pool_size(model, nodes, autoscaling)
    return size, size


def pool_size(model: ModelConfig, nodes: list[dict[str, Any]], autoscaling: bool = False) -> int:
    """Actors in a model's pool now: the configured number, or (auto) as many as the cluster's GPUs hold. A pool of
    GPU actors on a cluster where no node has one actor's GPUs is an error now, not a job that waits forever, unless
    the cluster autoscales (`ray.autoscaling`): there a fixed-size pool waits for its nodes."""
    per_actor = model.gpus_per_actor
    if isinstance(model.concurrency, tuple):
        return model.concurrency[0]
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
    """The `map_batches` arguments that place one model's caption actors: the pool (fixed or elastic), each actor's
    resources, and how many units one actor holds at once (its async `__call__` runs that many concurrently)."""
    import ray.data

    low, high = pool_bounds(model, nodes, autoscaling)
    # The actor runs `units_in_flight` units' `__call__` at once (async). An elastic pool also queues as many more
    # at each actor: Ray Data grows a pool only once its actors are that loaded (its threshold is 175%).
    calls = model.units_in_flight
    if low == high:
        compute = ray.data.ActorPoolStrategy(
            size=low, max_concurrent_calls_per_actor=calls, max_tasks_in_flight_per_actor=calls
        )
    else:
        compute = ray.data.ActorPoolStrategy(
            min_size=low,
            max_size=high,
            initial_size=low,
            max_concurrent_calls_per_actor=calls,
            max_tasks_in_flight_per_actor=2 * calls,
        )
    options: dict[str, Any] = {
        "compute": compute,
        "num_cpus": model.num_cpus,
        "num_gpus": model.gpus_per_actor,
    }
    if model.accelerator_type:
        options["accelerator_type"] = model.accelerator_type
    if model.env:
        options["runtime_env"] = {"env_vars": dict(model.env)}
    return options

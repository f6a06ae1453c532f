"""Caption-actor placement: pool sizes from config or from the cluster's GPUs, and each actor's resources."""

import pytest

from recaption.config import ModelConfig
from recaption.errors import ConfigError
from recaption.job.placement import actor_options, cluster_gpus, pool_size

NODES = [
    {"Alive": True, "Resources": {"CPU": 16.0}},  # head, no GPUs
    {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "accelerator_type:A100": 1.0}},
    {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 4.0, "accelerator_type:H100": 1.0}},
    {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},  # dead: not counted
]


def vllm(**kw) -> ModelConfig:
    return ModelConfig(path="m", engine="vllm", **kw)


def test_cluster_gpus_by_kind():
    assert cluster_gpus(NODES) == 12
    assert cluster_gpus(NODES, "H100") == 4
    assert cluster_gpus(NODES, "L4") == 0


def test_auto_pool_fills_the_gpus_of_a_kind():
    assert pool_size(vllm(concurrency="auto"), NODES) == 12
    assert pool_size(vllm(concurrency="auto", vllm={"tensor_parallel_size": 2}), NODES) == 6
    assert pool_size(vllm(concurrency="auto", accelerator_type="H100", vllm={"tensor_parallel_size": 4}), NODES) == 1
    # Two small models per GPU: half a GPU each, with half its memory.
    half = vllm(concurrency="auto", num_gpus=0.5, vllm={"gpu_memory_utilization": 0.45})
    assert pool_size(half, NODES) == 24
    assert pool_size(vllm(concurrency=3), NODES) == 3


def test_auto_pool_errors_are_config_errors():
    with pytest.raises(ConfigError, match="fewer than one actor"):
        pool_size(vllm(concurrency="auto", accelerator_type="H100", vllm={"tensor_parallel_size": 8}), NODES)
    with pytest.raises(ConfigError, match="auto sizes GPU pools"):
        pool_size(ModelConfig(path="m", engine="hf", concurrency="auto"), NODES)


def test_a_gpu_pool_on_a_cluster_without_such_gpus_is_a_config_error_saying_how_to_use_cpus():
    cpu_only = [{"Alive": True, "Resources": {"CPU": 16.0}}]
    hf_on_gpu = ModelConfig(path="instructblip-vicuna-7b")  # the registry puts it on one GPU
    with pytest.raises(ConfigError) as e:
        pool_size(hf_on_gpu, cpu_only)
    assert "no node of the Ray cluster has one" in str(e.value) and "--set models.N.num_gpus=0" in str(e.value)
    assert pool_size(hf_on_gpu, NODES) == 1
    with pytest.raises(ConfigError, match="needs 2 GPUs"):  # 8 + 4 GPUs in all, but an engine spans one node
        pool_size(vllm(vllm={"tensor_parallel_size": 2}, num_gpus=2), NODES[:1])
    assert pool_size(vllm(vllm={"tensor_parallel_size": 8}), NODES) == 1
    with pytest.raises(ConfigError, match="most on one node: 8"):
        pool_size(vllm(vllm={"tensor_parallel_size": 12}), NODES)
    cpu = ModelConfig(path="instructblip-vicuna-7b", num_gpus=0, concurrency=2)
    assert pool_size(cpu, cpu_only) == 2
    # An autoscaling cluster has no GPU node until the pool asks for one: the fixed-size pool waits for it.
    assert pool_size(hf_on_gpu, cpu_only, autoscaling=True) == 1
    assert "ray.autoscaling: true" in str(e.value)


def test_gpu_sharing_must_leave_memory_and_tp_reserves_its_gpus():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        vllm(num_gpus=0.5)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vllm(num_gpus=1, vllm={"tensor_parallel_size": 2})


def test_actor_options():
    opts = actor_options(vllm(concurrency=2, accelerator_type="A100", env={"VLLM_X": "1"}), NODES)
    assert opts["num_gpus"] == 1.0 and opts["accelerator_type"] == "A100"
    assert opts["runtime_env"] == {"env_vars": {"VLLM_X": "1"}}
    assert opts["compute"].min_size == opts["compute"].max_size == 2
    cpu = actor_options(ModelConfig(path="m", engine="hf", num_cpus=0.25), NODES)
    assert cpu["num_gpus"] == 0.0 and cpu["num_cpus"] == 0.25 and "runtime_env" not in cpu


class _PlanRecorder:
    """Stands in for a Ray Dataset: records each `map_batches` call of the plan `build_dataset` builds."""

    def __init__(self):
        self.calls: list[tuple[object, dict]] = []

    def map_batches(self, fn, **kwargs):
        self.calls.append((fn, kwargs))
        return self


def test_build_dataset_gives_each_caption_pool_its_placement(monkeypatch):
    """The pipeline's caption stages run with exactly what placement computed: GPUs, CPUs, pool, accelerator, env."""
    import ray.data

    from recaption.config import load_config
    from recaption.job.captioning import CaptionStage
    from recaption.job.pipeline import build_dataset

    plan = _PlanRecorder()
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: plan)
    data = {
        "input": {"path": "in"},
        "output": {"path": "out"},
        "models": [
            {"path": "instructblip-vicuna-7b", "concurrency": 2, "accelerator_type": "A100", "num_cpus": 4},
            {"path": "m", "name": "half", "engine": "vllm", "num_gpus": 0.5, "vllm": {"gpu_memory_utilization": 0.4}},
        ],
    }
    cfg = load_config(None, data=data)
    placements = [actor_options(m, NODES) for m in cfg.models]
    build_dataset(cfg, [], {"detailed": "d"}, {}, placements, "run-id")
    stages = [kw for fn, kw in plan.calls if fn is CaptionStage]
    assert len(stages) == 2
    for kw, placement in zip(stages, placements, strict=True):
        assert {k: kw[k] for k in placement} == placement
    assert (stages[0]["num_gpus"], stages[0]["num_cpus"], stages[0]["accelerator_type"]) == (1, 4, "A100")
    assert stages[0]["compute"].max_size == 2 and stages[1]["num_gpus"] == 0.5
    assert stages[0]["fn_constructor_kwargs"]["model_cfg"]["num_gpus"] == 1  # the registry's GPU reaches the actor


def test_pools_fixed_elastic_or_following_the_cluster():
    fixed = actor_options(vllm(concurrency=2, units_in_flight=3), NODES)["compute"]
    assert (fixed.min_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (2, 2, 3)
    assert fixed.max_concurrent_calls_per_actor == 3  # the actor runs 3 units' calls at once
    elastic = actor_options(vllm(concurrency=[1, 4]), NODES)["compute"]
    assert (elastic.min_size, elastic.max_size, elastic.initial_size) == (1, 4, 1)
    # Queued units count towards the load Ray Data grows a pool at (175%): twice what one actor runs.
    assert elastic.max_tasks_in_flight_per_actor == 2 * elastic.max_concurrent_calls_per_actor
    auto = actor_options(vllm(concurrency="auto"), NODES)["compute"]
    assert (auto.initial_size, auto.max_size) == (12, float("inf"))  # starts on today's GPUs, grows as nodes join
    with pytest.raises(ValueError, match=r"1 <= min <= max"):
        vllm(concurrency=[3, 2])
    with pytest.raises(ConfigError, match="no node of the Ray cluster has"):
        actor_options(vllm(concurrency=[1, 2], accelerator_type="L4"), NODES)

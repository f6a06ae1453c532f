"""The ready pipelines in pipelines/: each loads, names prompts that exist, and asks for what its comments say."""

from __future__ import annotations

from pathlib import Path

import pytest

from recaption.captioners.prompts import get_prompt
from recaption.catalog import REGISTRY
from recaption.config import PipelineConfig, load_config

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
ALL = sorted(p for p in PIPELINES.glob("*.yaml") if not p.name.startswith("train-"))  # train configs: tests/train


def load(name: str) -> PipelineConfig:
    return load_config(PIPELINES / f"{name}.yaml")


def test_the_ready_pipelines_are_there():
    names = {p.stem for p in ALL}
    assert {"demo", "llava15", "lotlip-3mllm", "holistic"} <= names


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_pipeline_loads_and_its_prompts_and_registry_names_resolve(path):
    cfg = load_config(path)
    for model in cfg.models:
        for prompt in model.prompts:
            assert get_prompt(prompt, cfg.prompts)
        entry = REGISTRY.get(model.path)
        if entry is not None and entry["engine"] == "hf" and "tiny" not in entry:
            # Registry models that vLLM cannot run (InstructBLIP) must not be put on the vllm engine.
            assert model.engine != "vllm", f"{model.id}: vLLM does not run this model; use engine: hf"


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_auto_sized_gpu_pools_do_not_claim_the_same_gpus(path):
    """`concurrency: auto` gives a pool every GPU (of its accelerator_type): two such pools would wait on each other."""
    cfg = load_config(path)
    gpu_models = [m for m in cfg.models if m.gpus_per_actor > 0]
    if len(gpu_models) < 2:
        return
    auto_types = [m.accelerator_type for m in gpu_models if m.concurrency == "auto"]
    if auto_types:
        others = [m.accelerator_type for m in gpu_models if m.concurrency != "auto"]
        assert None not in auto_types and len(set(auto_types)) == len(auto_types) and not set(auto_types) & set(others)


def test_llava15_runs_on_vllm_one_engine_per_gpu():
    (model,) = load("llava15").models
    assert model.engine == "vllm" and model.dtype == "bfloat16"
    assert model.vllm.gpu_memory_utilization == 0.9 and model.vllm.max_model_len == 4096
    assert model.concurrency == "auto" and model.gpus_per_actor == model.vllm.tensor_parallel_size == 1
    assert model.prompts == ["detailed"]


def test_lotlip_3mllm_runs_three_models_with_the_detailed_prompt():
    cfg = load("lotlip-3mllm")
    assert len(cfg.models) == 3
    assert len({m.id for m in cfg.models}) == 3
    assert all("detailed" in m.prompts for m in cfg.models)
    by_id = {m.id: m for m in cfg.models}
    instructblip = by_id["instructblip-vicuna-7b"]
    assert instructblip.engine == "hf" and instructblip.dtype == "bfloat16"
    assert instructblip.device == "cuda" and instructblip.gpus_per_actor >= 1
    for name in ("llava-1.5-7b", "sharegpt4v-7b"):
        assert by_id[name].engine == "vllm" and by_id[name].gpus_per_actor >= 1
    # ShareGPT4V runs from a converted checkpoint directory, not the released repo (its own model type).
    assert Path(by_id["sharegpt4v-7b"].path).is_absolute()
    assert all(isinstance(m.concurrency, int) for m in cfg.models), "one sized pool per model"


def test_holistic_runs_five_perspectives_or_more_on_one_model():
    cfg = load("holistic")
    (model,) = cfg.models
    assert len(model.prompts) >= 5 and len(set(model.prompts)) == len(model.prompts)
    assert {"objects", "background", "text", "style", "detailed"} <= set(model.prompts)
    texts = [get_prompt(name, cfg.prompts) for name in model.prompts]
    assert len(set(texts)) == len(texts), "each perspective has its own prompt text"
    assert model.engine == "vllm"

"""Config validation, `--set` overrides and the config hash."""

import pytest

from recaption.config import PipelineConfig, load_config
from recaption.errors import ConfigError

BASE = {
    "input": {"path": "/data/in"},
    "output": {"path": "/data/out"},
    "models": [{"path": "some/model", "prompts": ["detailed", "short"]}],
}


def test_defaults_fill_and_model_generation_inherits_top_level():
    cfg = load_config(None, ["generation.max_new_tokens=17"], data=BASE)
    assert cfg.input.format == "auto"
    assert cfg.models[0].generation.max_new_tokens == 17
    assert cfg.models[0].id == "model"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"input\.pathh: unknown key"):
        load_config(None, data={**BASE, "input": {"path": "x", "pathh": "y"}})


def test_wrong_type_and_negative_size_are_named():
    with pytest.raises(ConfigError, match=r"input\.unit_size"):
        load_config(None, ["input.unit_size=-3"], data=BASE)
    with pytest.raises(ConfigError, match=r"models\.0\.batch_size"):
        load_config(None, ["models.0.batch_size=many"], data=BASE)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"output: required key is missing"):
        load_config(None, data={k: v for k, v in BASE.items() if k != "output"})


def test_override_parses_yaml_values_and_list_indices():
    cfg = load_config(None, ["models.0.prompts=[short]", "ray.num_cpus=2", "input.format=folder"], data=BASE)
    assert cfg.models[0].prompts == ["short"]
    assert cfg.ray.num_cpus == 2
    with pytest.raises(ConfigError, match="not an index"):
        load_config(None, ["models.5.path=x"], data=BASE)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["models"], data=BASE)


def test_duplicate_model_ids_rejected():
    data = {**BASE, "models": [{"path": "a/m"}, {"path": "b/m"}]}
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, data=data)


def test_hash_is_stable_and_changes_with_content():
    a = PipelineConfig.model_validate(BASE)
    b = PipelineConfig.model_validate(dict(reversed(list(BASE.items()))))
    assert a.hash() == b.hash()
    c = load_config(None, ["generation.temperature=0.7"], data=BASE)
    assert c.hash() != a.hash()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_registry_name_brings_engine_and_context_defaults():
    from recaption.config import ModelConfig

    llava = ModelConfig(path="llava-1.5-7b")
    assert llava.engine == "vllm" and llava.vllm.max_model_len == 4096 and llava.gpus_per_actor == 1.0
    assert ModelConfig(path="instructblip-vicuna-7b").engine == "hf"  # vLLM has no InstructBLIP
    assert ModelConfig(path="llava-1.5-7b", engine="hf", vllm={"max_model_len": 1024}).vllm.max_model_len == 1024
    assert ModelConfig(path="some/repo").engine == "hf"


def test_n_above_one_needs_sampling():
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["generation.n=3"], data=BASE)

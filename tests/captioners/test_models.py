"""Model family detection and path resolution: local checkpoints, the HF cache, registry names, bad paths."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants  # noqa: E402

from recaption.captioners.models import family_of, resolve_model
from recaption.captioners.prompts import PROMPT_FORMATS  # noqa: E402
from recaption.captioners.tiny import FAMILIES, build_tiny  # noqa: E402
from recaption.catalog import REGISTRY
from recaption.config import ModelConfig, load_config  # noqa: E402
from recaption.errors import ConfigError  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline HF cache holding only config.json files, laid out as huggingface_hub writes them."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, architectures: list[str]) -> None:
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"architectures": architectures}))

    return add


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_from_a_tiny_checkpoint(tiny, family):
    info = resolve_model(str(tiny[family]))
    assert info.family == family
    assert info.path == str(tiny[family].resolve())
    assert len(info.architectures) == 1


def test_explicit_family_wins_and_bad_family_is_rejected(tiny):
    assert resolve_model(str(tiny["llava"]), family="chat").family == "chat"
    with pytest.raises(ConfigError, match="llava_next"):
        resolve_model(str(tiny["llava"]), family="llavaa")


def test_unknown_architectures_are_generic_chat_models():
    assert family_of(["Qwen2VLForConditionalGeneration"]) == "chat"
    assert family_of([]) == "chat"
    assert family_of(["Foo", "LlavaNextForConditionalGeneration"]) == "llava_next"


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-dir", "relative/../nothing/here/x"])
def test_missing_path_is_a_config_error_naming_it(path):
    with pytest.raises(ConfigError) as e:
        resolve_model(path)
    assert path in str(e.value) and "local checkpoint directory" in str(e.value)


def test_directory_without_config_and_file_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_repo_id_resolves_offline_from_the_hf_cache(hf_cache):
    hf_cache("someone/tiny-blip", ["Blip2ForConditionalGeneration"])
    info = resolve_model("someone/tiny-blip")
    assert (info.path, info.family) == ("someone/tiny-blip", "blip2")
    assert info.architectures == ["Blip2ForConditionalGeneration"]


def test_registry_name_resolves_to_its_repo_and_family(hf_cache):
    hf_cache("llava-hf/llava-1.5-7b-hf", ["LlavaForConditionalGeneration"])
    info = resolve_model("llava-1.5-7b")
    assert info.path == "llava-hf/llava-1.5-7b-hf" and info.family == "llava" and info.registry_name == "llava-1.5-7b"


def test_uncached_repo_offline_is_a_config_error_saying_what_to_do(hf_cache):
    with pytest.raises(ConfigError, match=r"nobody/nothing.*hf download nobody/nothing"):
        resolve_model("nobody/nothing")


def test_registry_entries_are_complete():
    names = {"llava-1.5-7b", "llava-1.5-13b", "instructblip-vicuna-7b", "blip2-opt-2.7b", "sharegpt4v-7b"}
    assert names <= set(REGISTRY)
    for name, entry in REGISTRY.items():
        assert {"family", "engine", "chat_format"} <= set(entry), name
        assert sum(k in entry for k in ("repo", "tiny", "asset")) == 1, name
        assert entry["engine"] in {"hf", "vllm"}
        # The format that wraps its prompts is the one its family's engines use.
        assert PROMPT_FORMATS[entry["chat_format"]] == PROMPT_FORMATS[entry["family"]], name
        if "repo" in entry:  # a Hub checkpoint is loaded at a stated revision (a commit, or a branch)
            assert isinstance(entry["revision"], str) and entry["revision"], name
            assert set(entry["hf"]) <= set(ModelConfig.model_fields), name
    assert REGISTRY["instructblip-vicuna-7b"]["engine"] == "hf"  # vLLM has no InstructBLIP


def test_a_registry_model_brings_its_engine_revision_gpu_and_dtype():
    blip = ModelConfig(path="instructblip-vicuna-7b")
    assert (blip.engine, blip.revision, blip.num_gpus, blip.dtype) == ("hf", "main", 1, "bfloat16")
    assert blip.gpus_per_actor == 1
    # Config values win; an actor put on CPUs keeps dtype auto (float32 there), not bf16.
    cpu = load_config(None, ["models.0.num_gpus=0"], data=_pipeline("instructblip-vicuna-7b")).models[0]
    assert (cpu.num_gpus, cpu.dtype, cpu.gpus_per_actor) == (0, "auto", 0)
    fp16 = ModelConfig(path="instructblip-vicuna-7b", dtype="float16", revision="0123abc")
    assert (fp16.dtype, fp16.revision, fp16.num_gpus) == ("float16", "0123abc", 1)
    # Under vllm the engine reserves tensor_parallel_size GPUs and picks its dtype; the hf defaults do not apply.
    llava = ModelConfig(path="llava-1.5-7b")
    assert (llava.engine, llava.num_gpus, llava.dtype, llava.gpus_per_actor) == ("vllm", None, "auto", 1.0)
    assert llava.vllm.max_model_len == 4096
    assert (ModelConfig(path="llava-1.5-7b", engine="hf").num_gpus, ModelConfig(path="tiny-llava").num_gpus) == (
        1,
        None,
    )


def _pipeline(path: str) -> dict:
    return {"input": {"path": "in"}, "output": {"path": "out"}, "models": [{"path": path}]}


def test_sharegpt4v_registry_name_says_exactly_what_to_run():
    with pytest.raises(ConfigError) as e:
        resolve_model("sharegpt4v-7b")
    message = str(e.value)
    assert "\n" not in message
    assert "`hf download Lin-Chen/ShareGPT4V-7B --local-dir SRC`" in message
    assert "`recaption convert sharegpt4v SRC DST`" in message
    assert "`--set models.N.path=DST`" in message and "path: DST" in message


def test_tiny_registry_name_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path))
    info = resolve_model("tiny-blip2")
    assert info.family == "blip2" and info.registry_name == "tiny-blip2"
    assert info.path.startswith(str(tmp_path)) and (tmp_path / "tiny").is_dir()
    assert resolve_model("tiny-blip2").path == info.path


def test_original_sharegpt4v_checkpoint_says_to_convert_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Share4VLlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="recaption convert sharegpt4v"):
        resolve_model(str(tmp_path))

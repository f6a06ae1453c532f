"""Tiny random-weight checkpoints: build, save, load back like a real checkpoint, cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from recaption.captioners.tiny import FAMILIES, HUB_ROOTS, build_tiny, ensure_tiny, tiny_cache_dir, tiny_model  # noqa: E402
from recaption.errors import ConfigError  # noqa: E402

CLASSES = {
    "llava": transformers.LlavaForConditionalGeneration,
    "instructblip": transformers.InstructBlipForConditionalGeneration,
    "blip2": transformers.Blip2ForConditionalGeneration,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_back_with_no_missing_or_unexpected_keys(tiny, family):
    model, info = CLASSES[family].from_pretrained(tiny[family], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    processor = transformers.AutoProcessor.from_pretrained(tiny[family])
    assert processor.tokenizer.padding_side == "left"
    assert json.loads((tiny[family] / "config.json").read_text())["architectures"] == [CLASSES[family].__name__]


def test_llava_checkpoint_uses_the_llava_hf_hub_layout(tiny):
    with safe_open(tiny["llava"] / "model.safetensors", "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert all(k.startswith(HUB_ROOTS) for k in keys), [k for k in keys if not k.startswith(HUB_ROOTS)]
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys


def test_llava_rewritten_checkpoint_gives_the_in_memory_logits(tiny):
    expected, processor = tiny_model("llava", seed=0)
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(tiny["llava"]).eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "USER: <image>\nDescribe the image. ASSISTANT:"
    inputs = processor(images=[Image.new("RGB", (40, 30), (200, 30, 30))], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.config.image_token_index).sum()) == 16  # (32 / 8) ** 2 patches
    with torch.inference_mode():
        assert torch.equal(expected(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_expands_image_tokens(tiny, family):
    processor = transformers.AutoProcessor.from_pretrained(tiny[family])
    config = transformers.AutoConfig.from_pretrained(tiny[family])
    texts = ["USER: <image>\na red cube ASSISTANT:", "<image>\ntwo"] if family == "llava" else ["a red cube", "two"]
    batch = processor(images=[Image.new("RGB", (50, 20))] * 2, text=texts, return_tensors="pt", padding=True)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 32, 32)
    image_token = config.image_token_index
    expected = 16 if family == "llava" else config.num_query_tokens
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [expected, expected]


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (tiny_model("blip2", seed=s)[0].state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_is_fast(tmp_path):
    tiny_model("instructblip")  # warm the lazy transformers imports, which are not the builder's cost
    start = time.perf_counter()
    for family in FAMILIES:
        build_tiny(family, tmp_path / family)
    assert time.perf_counter() - start < 3.0


def test_ensure_tiny_builds_once_and_reuses(tmp_path):
    first = ensure_tiny("blip2", root=tmp_path)
    assert first == tmp_path / "blip2-0" and (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("blip2", root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["blip2-0"]  # no temp dirs left behind


def test_ensure_tiny_rebuilds_a_stale_or_half_written_dir(tmp_path):
    stale = tmp_path / "blip2-0"
    stale.mkdir()
    (stale / "junk").write_text("from an interrupted build")
    path = ensure_tiny("blip2", root=tmp_path)
    assert path == stale and not (path / "junk").exists() and (path / "tiny.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blip2-0"]


def test_cache_dir_follows_recaption_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path))
    assert tiny_cache_dir() == tmp_path / "tiny"
    assert ensure_tiny("blip2") == tmp_path / "tiny" / "blip2-0"
    monkeypatch.delenv("RECAPTION_CACHE")
    assert tiny_cache_dir() == Path.home() / ".cache" / "recaption" / "tiny"


def test_unknown_family_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="llava, llava-336, instructblip, blip2"):
        build_tiny("gpt5", tmp_path)


def test_llava_at_llava15_geometry_has_576_image_tokens_and_loads_back(tmp_path):
    """tiny-llava-336: the tiny widths at LLaVA-1.5's 336-px, 14-px-patch geometry (what the vLLM bench runs on a
    CPU, so the image dominates the prompt as with the real model)."""
    path = build_tiny("llava-336", tmp_path / "l336")
    model, info = CLASSES["llava"].from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = transformers.AutoProcessor.from_pretrained(path)
    batch = processor(images=[Image.new("RGB", (500, 300))], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)
    assert (batch["input_ids"] == model.config.image_token_index).sum().item() == 576
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 3

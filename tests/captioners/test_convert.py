"""ShareGPT4V → llava-hf conversion, on a tiny random checkpoint laid out like Lin-Chen/ShareGPT4V-7B and its
separately released CLIP tower, checked against the computation the original ShareGPT4V code performs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from recaption.captioners import convert  # noqa: E402
from recaption.captioners.convert import convert_sharegpt4v  # noqa: E402
from recaption.captioners.engines.hf import HFCaptioner  # noqa: E402
from recaption.captioners.tiny import WIDTH, build_tiny  # noqa: E402
from recaption.config import GenerationConfig, ModelConfig  # noqa: E402
from recaption.errors import ConfigError  # noqa: E402
from tests.sharegpt4v_fixture import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    HUB_TOWER,
    IMAGE_TOKENS,
    PROMPT,
    SIDE,
    _share4v_config,
    build_original,
    square_image,
    write_share4v,
    write_tokenizer,
)


class _NotATensor:
    """Pickled into a .bin to prove the converter never unpickles arbitrary objects."""


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The source checkpoint (mm_vision_tower naming the local tower directory) and its reference modules."""
    return build_original(tmp_path_factory.mktemp("share4v"))


@pytest.fixture(scope="module")
def converted(original):
    return convert_sharegpt4v(original["src"], original["root"] / "converted", max_shard_bytes=100_000)


@pytest.fixture(scope="module")
def model(converted):
    return transformers.LlavaForConditionalGeneration.from_pretrained(converted).eval()


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(directory / file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert set(tensors) == set(index["weight_map"])
    return tensors


def hub_name(key: str) -> str | None:
    """What llava-hf calls an original ShareGPT4V or CLIP-tower weight (None: a buffer that is not carried over)."""
    if key.endswith(("inv_freq", "position_ids")):
        return None
    if key.startswith("model.mm_projector."):
        return key.replace("model.mm_projector.0.", "multi_modal_projector.linear_1.").replace(
            "model.mm_projector.2.", "multi_modal_projector.linear_2."
        )
    if key.startswith("vision_model."):
        return "vision_tower." + key
    return "language_model." + key


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(converted):
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["image_seq_length"] == IMAGE_TOKENS
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"


def test_weights_are_the_originals_under_llava_hf_names(original, converted):
    tensors = read_checkpoint(converted)
    sources = {**original["state"], **original["tower_state"]}
    expected = {hub_name(k): v for k, v in sources.items() if hub_name(k)}
    assert set(tensors) == set(expected)
    vocab = original["vocab"]
    for name, tensor in tensors.items():
        if name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            assert tensor.shape[0] == 64 * -(-(vocab + 2) // 64)  # <image> and <pad>, padded to a multiple of 64
            assert torch.equal(tensor[:vocab], expected[name])
            assert torch.allclose(tensor[vocab:], expected[name].mean(dim=0).expand(tensor.shape[0] - vocab, -1))
        else:
            assert torch.equal(tensor, expected[name]), name
    assert len(json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]) == len(tensors)
    assert len(list(converted.glob("model-*-of-*.safetensors"))) > 1  # sharded


def test_text_logits_equal_the_original_language_model(original, model):
    ids = torch.tensor([[1, 40, 41, 42, 7, 99, 300, 5]])
    vocab = original["vocab"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reference = original["lm"](input_ids=ids).logits
    torch.testing.assert_close(logits[..., :vocab], reference, rtol=1e-5, atol=1e-5)
    # New lm_head rows are the mean row, so their logits are the mean logit.
    torch.testing.assert_close(logits[..., vocab], reference.mean(dim=-1), rtol=1e-4, atol=1e-5)


def test_projector_equals_the_original_mlp(original, model):
    features = torch.randn(3, IMAGE_TOKENS, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(model.model.multi_modal_projector(features), original["mlp"](features))


def test_image_prompt_logits_equal_the_original_share4v_computation(original, converted, model):
    processor = transformers.AutoProcessor.from_pretrained(converted)
    inputs = processor(images=[square_image()], text=[PROMPT], return_tensors="pt")
    image_id = model.config.image_token_index
    ids = inputs["input_ids"][0]
    assert int((ids == image_id).sum()) == IMAGE_TOKENS
    # The original CLIP preprocessing: bicubic resize to 32, then CLIP normalisation.
    resized = np.asarray(square_image().resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32) / 255
    pixels = torch.from_numpy((resized - CLIP_MEAN) / CLIP_STD).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        # share4v_arch.py: tower hidden_states[-2] without CLS → mm_projector → spliced where the one image
        # placeholder of the prompt was, the text around it embedded by the LM.
        hidden = original["tower"](pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_embeds = original["mlp"](hidden)[0]
        start = int((ids == image_id).nonzero()[0])
        embed = original["lm"].model.embed_tokens
        embeds = torch.cat([embed(ids[:start]), image_embeds, embed(ids[start + IMAGE_TOKENS :])])
        reference = original["lm"](inputs_embeds=embeds[None]).logits[0]
    torch.testing.assert_close(logits[:, : original["vocab"]], reference, rtol=1e-4, atol=1e-5)


def test_processor_and_tokenizer_match_llava_hf(original, converted):
    processor = transformers.AutoProcessor.from_pretrained(converted)
    tokenizer = processor.tokenizer
    vocab = original["vocab"]
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [vocab, vocab + 1]
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"
    ids = processor(images=[square_image()] * 2, text=[PROMPT, "USER: <image>\nHi ASSISTANT:"], padding=True)[
        "input_ids"
    ]
    assert [row.count(vocab) for row in ids] == [IMAGE_TOKENS, IMAGE_TOKENS]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == PROMPT
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, vocab + 1)


def test_hf_engine_captions_with_it(converted):
    gen = GenerationConfig(max_new_tokens=6)
    engine = HFCaptioner(ModelConfig(path=str(converted), engine="hf", device="cpu", batch_size=2, generation=gen))
    assert engine.info.family == "llava"
    images = [square_image(), Image.new("RGB", (60, 40), (200, 30, 30))]
    results = engine.caption(images, ["Describe the image.", "What is in the picture?"])
    assert [r.error for r in results] == [None, None]
    assert all(r.finish_reason in ("stop", "length") and r.n_tokens > 0 for r in results)
    assert engine.caption(images, ["Describe the image.", "What is in the picture?"]) == results  # greedy


def test_reads_one_source_shard_at_a_time_and_safetensors_sources(original, tmp_path, monkeypatch):
    """A safetensors release (with the tower given explicitly, as for a hub tower id) streams shard by shard."""
    src = tmp_path / "ShareGPT4V-7B"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], HUB_TOWER, fmt="safetensors")
    opened, open_now, most = [], [0], [0]
    real = convert._read_shard

    def tracked(file):
        opened.append(file.name)
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            yield from real(file)
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(convert, "_read_shard", tracked)
    out = convert_sharegpt4v(src, tmp_path / "out", vision_tower=original["tower_dir"])
    assert most[0] == 1
    assert opened == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    assert (out / "model.safetensors").is_file()  # small enough for one shard
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(
            f.get_tensor("multi_modal_projector.linear_2.weight"), original["state"]["model.mm_projector.2.weight"]
        )


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; `add(repo_id, directory)` puts a snapshot of `directory` in it, laid out
    as huggingface_hub writes one (refs/main → snapshots/COMMIT/files)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, directory: Path) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        shutil.copytree(directory, snapshot)
        return snapshot

    return add


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_hub_tower_name_is_read_from_the_hf_cache(original, tmp_path, hf_cache):
    src = tmp_path / "src"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], HUB_TOWER)
    hf_cache(HUB_TOWER, original["tower_dir"])
    out = convert_sharegpt4v(src, tmp_path / "out")
    tensors = read_checkpoint_single(out)
    assert torch.equal(
        tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"],
        original["tower_state"]["vision_model.embeddings.patch_embedding.weight"],
    )


def test_a_hub_tower_name_neither_local_nor_cached_is_a_config_error(original, tmp_path, hf_cache):
    src = tmp_path / "src"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], HUB_TOWER)
    with pytest.raises(ConfigError) as e:
        convert_sharegpt4v(src, tmp_path / "out")
    assert "\n" not in str(e.value) and "--vision-tower DIR" in str(e.value)
    assert f"hf download {HUB_TOWER}" in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="not a CLIP checkpoint"):
        convert_sharegpt4v(src, tmp_path / "out", vision_tower=tmp_path)


def test_cli_converts_and_the_result_is_a_model_path(original, tmp_path, hf_cache, capsys):
    """`recaption convert sharegpt4v SRC DST` with the tower found in the cache, then DST as a model's path."""
    from recaption.captioners.models import resolve_model
    from recaption.cli import main

    src = tmp_path / "src"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], HUB_TOWER, fmt="safetensors")
    hf_cache(HUB_TOWER, original["tower_dir"])
    assert main(["convert", "sharegpt4v", str(src), str(tmp_path / "dst")]) == 0
    assert f"converted to {tmp_path / 'dst'}" in capsys.readouterr().out
    info = resolve_model(str(tmp_path / "dst"))
    assert (info.family, info.architectures) == ("llava", ["LlavaForConditionalGeneration"])
    assert main(["convert", "sharegpt4v", str(src), str(tmp_path / "dst")]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def read_checkpoint_single(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_bin_shards_are_loaded_weights_only(original, tmp_path):
    src = tmp_path / "src"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], str(original["tower_dir"]))
    shard = src / "pytorch_model-00001-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "payload": _NotATensor()}, shard)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        convert_sharegpt4v(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written is left


def test_refuses_a_non_empty_destination_and_a_llava_hf_source(original, converted, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        convert_sharegpt4v(original["src"], converted)
    with pytest.raises(ConfigError, match="needs no conversion"):
        convert_sharegpt4v(build_tiny("llava", tmp_path / "tiny-llava"), tmp_path / "out")


def test_a_tower_of_the_wrong_width_is_a_config_error(original, tmp_path):
    src = tmp_path / "src"
    write_tokenizer(src)
    config = _share4v_config(original["vocab"], str(original["tower_dir"]))
    write_share4v(src, original["vocab"], str(original["tower_dir"]))
    (src / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 2 * WIDTH}))
    with pytest.raises(ConfigError, match="mm_hidden_size"):
        convert_sharegpt4v(src, tmp_path / "out")


def test_a_sentencepiece_only_tokenizer_needs_sentencepiece(original, tmp_path):
    """The release ships tokenizer.model only; without sentencepiece transformers cannot read it."""
    from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_pb2

    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sentencepiece is installed; the message for its absence cannot be shown here")
    src = tmp_path / "src"
    proto = sentencepiece_pb2.ModelProto()
    for piece, kind in [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("▁the", 1)]:
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    src.mkdir()
    (src / "tokenizer.model").write_bytes(proto.SerializeToString())
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    write_share4v(src, original["vocab"], str(original["tower_dir"]))
    with pytest.raises(ConfigError, match="pip install sentencepiece"):
        convert_sharegpt4v(src, tmp_path / "out")

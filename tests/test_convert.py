"""ShareGPT4V → llava-hf conversion, on a tiny random checkpoint laid out like Lin-Chen/ShareGPT4V-7B and its
separately released CLIP tower, checked against the computation the original ShareGPT4V code performs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from recaption import convert  # noqa: E402
from recaption.config import GenerationConfig, ModelConfig  # noqa: E402
from recaption.convert import convert_sharegpt4v  # noqa: E402
from recaption.engines.hf import HFCaptioner  # noqa: E402
from recaption.errors import ConfigError  # noqa: E402
from recaption.tiny import HEADS, LAYERS, PATCH_SIZE, WIDTH, _train_tokenizer, build_tiny  # noqa: E402

SIDE = 32  # tower input size: 16 patches of 8 px, so 16 image tokens
IMAGE_TOKENS = (SIDE // PATCH_SIZE) ** 2
HUB_TOWER = "Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"


class _NotATensor:
    """Pickled into a .bin to prove the converter never unpickles arbitrary objects."""


def _llama_config(vocab_size: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _share4v_config(vocab_size: int, tower: str) -> dict:
    """Lin-Chen/ShareGPT4V-7B's config.json, every key as released, with tiny sizes."""
    return {
        "_name_or_path": "ShareGPT4V-7B",
        "architectures": ["Share4VLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": WIDTH,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": 2 * WIDTH,
        "max_position_embeddings": 1024,
        "mm_hidden_size": WIDTH,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": tower,
        "model_type": "share4v",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_entire_model": False,
        "tune_mm_mlp_adapter": False,
        "tune_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vision_tower_lr": None,
        "vocab_size": vocab_size,
    }


def write_tower(out: Path, seed: int = 1) -> transformers.CLIPVisionModel:
    """A CLIP tower directory as Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12 has it (transformers 4.31:
    `vision_model.*` names, a position_ids buffer, pytorch_model.bin, a CLIPFeatureExtractor-era preprocessor)."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=SIDE,
        patch_size=PATCH_SIZE,
        projection_dim=WIDTH,
    )
    tower = transformers.CLIPVisionModel(config).eval()
    out.mkdir(parents=True)
    config.save_pretrained(out)
    state = {"vision_model." + k: v for k, v in tower.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange((SIDE // PATCH_SIZE) ** 2 + 1)[None]
    torch.save(state, out / "pytorch_model.bin")
    preprocessor = {
        "crop_size": {"height": SIDE, "width": SIDE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": SIDE},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return tower


def write_tokenizer(out: Path) -> int:
    """A Llama-style tokenizer (<unk> <s> </s> = 0 1 2, pad = <unk>) with no <image>; returns its size."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(["<unk>", "<s>", "</s>"]),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        model_max_length=1024,
    )
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def write_share4v(out: Path, vocab_size: int, tower: str, fmt: str = "bin", seed: int = 0) -> dict:
    """Two weight shards with ShareGPT4V's names (LM, rotary inv_freq buffers, `model.mm_projector.0/2`), the
    projector in the second shard as in the release; returns the original tensors by name."""
    torch.manual_seed(seed)
    lm = transformers.LlamaForCausalLM(_llama_config(vocab_size))
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH))
    state = dict(lm.state_dict())
    for i in range(LAYERS):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1 / 10000 ** (torch.arange(0, 32, 2) / 32)
    state.update({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()})
    first = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    shards = [first, {k: v for k, v in state.items() if k not in first}]
    out.mkdir(parents=True, exist_ok=True)
    names = [
        f"pytorch_model-{i:05d}-of-00002.bin" if fmt == "bin" else f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)
    ]
    for name, shard in zip(names, shards, strict=True):
        if fmt == "bin":
            torch.save(shard, out / name)
        else:
            save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": {k: names[i] for i, shard in enumerate(shards) for k in shard},
    }
    index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (out / index_name).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(_share4v_config(vocab_size, tower), indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return state


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The source checkpoint (mm_vision_tower naming the local tower directory) and its reference modules."""
    root = tmp_path_factory.mktemp("share4v")
    tower = write_tower(root / "tower")
    vocab = write_tokenizer(root / "ShareGPT4V-7B")
    state = write_share4v(root / "ShareGPT4V-7B", vocab, str(root / "tower"))
    lm = transformers.LlamaForCausalLM(_llama_config(vocab)).eval()
    lm.load_state_dict(
        {
            k: v
            for k, v in state.items()
            if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head")) and not k.endswith("inv_freq")
        }
    )
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH)).eval()
    mlp.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items() if "mm_projector" in k})
    tower_state = torch.load(root / "tower" / "pytorch_model.bin", weights_only=True)
    return {
        "root": root,
        "src": root / "ShareGPT4V-7B",
        "tower_dir": root / "tower",
        "vocab": vocab,
        "state": state,
        "tower_state": tower_state,
        "lm": lm,
        "mlp": mlp,
        "tower": tower,
    }


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


def square_image() -> Image.Image:
    # Square, so the original code's pad-to-square step changes nothing; 48 px, so resizing is exercised.
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


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


def test_a_hub_tower_name_without_vision_tower_is_a_config_error(original, tmp_path):
    src = tmp_path / "src"
    write_tokenizer(src)
    write_share4v(src, original["vocab"], HUB_TOWER)
    with pytest.raises(ConfigError, match="--vision-tower"):
        convert_sharegpt4v(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="not a CLIP checkpoint"):
        convert_sharegpt4v(src, tmp_path / "out", vision_tower=tmp_path)


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

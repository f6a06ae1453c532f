"""A tiny random checkpoint laid out like Lin-Chen/ShareGPT4V-7B (model_type share4v, LLaVA-1.5's original repo
format) and its separately released CLIP tower, with the reference modules the original code builds from them.
Shared by the conversion tests (tests/captioners/test_convert.py) and the vLLM engine's test of a converted checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from recaption.captioners.tiny import HEADS, LAYERS, PATCH_SIZE, WIDTH, _train_tokenizer

SIDE = 32  # tower input size: 16 patches of 8 px, so 16 image tokens
IMAGE_TOKENS = (SIDE // PATCH_SIZE) ** 2
HUB_TOWER = "Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"


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


def build_original(root: Path) -> dict:
    """The source checkpoint under `root` (mm_vision_tower naming the local tower directory beside it) and the
    reference modules the original ShareGPT4V code would build from it."""
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


def square_image() -> Image.Image:
    # Square, so the original code's pad-to-square step changes nothing; 48 px, so resizing is exercised.
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)

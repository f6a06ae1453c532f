"""Towers from transformers configs: shapes, M class tokens, pretrained starts from disk, and the export round trip."""

from __future__ import annotations

import math

import pytest
import torch

from recaption.errors import ConfigError
from recaption.train.config import ModelConfig
from recaption.train.model import build_model, load_pretrained, save_pretrained
from recaption.train.tokenizer import encode, train_wordpiece

TINY = {
    "embed_dim": 16,
    "image": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
    },
    "text": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "context_length": 24,
        "short_context_length": 16,
        "num_corners": 2,
    },
}


def tiny_cfg(**image) -> ModelConfig:
    return ModelConfig.model_validate({**TINY, "image": {**TINY["image"], **image}})


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(["a red cube on a table.", "two blue spheres by the sea.", "a photo"] * 3, 120)


def test_forward_shapes_normalised_embeddings_and_scales(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_class_tokens=3), len(tokenizer), tokenizer.pad_token_id)
    ids, mask = encode(tokenizer, ["a red cube on a table.", "a photo"], 22)
    sids, smask = encode(tokenizer, ["a photo", "two", "cube", "sea"], 14)
    out = model(torch.randn(2, 3, 32, 32), ids, mask, sids, smask)
    assert out["branches"].shape == (2, 3, 16) and out["patches"].shape == (2, 16, 16)
    assert out["long"].shape == (2, 3, 16) and out["short_all"].shape == (4, 16)
    for v in (out[k] for k in ("branches", "patches", "long", "short_all")):
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:-1]))
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_scales(100.0)
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)
    # Branches differ: each class token is its own learned query.
    assert not torch.allclose(out["branches"][:, 0], out["branches"][:, 1])


def test_models_differing_only_in_corners_start_from_the_same_shared_weights(tokenizer):
    """Ablation arms are paired: the same seed gives K=0 and K=2 the same weights wherever both have them."""
    states = {}
    for k in (0, 2):
        torch.manual_seed(0)
        cfg = ModelConfig.model_validate({**TINY, "text": {**TINY["text"], "num_corners": k}})
        states[k] = build_model(cfg, len(tokenizer), tokenizer.pad_token_id).state_dict()
        states[k]["after"] = torch.rand(3)  # what the caller draws next does not depend on K either
    assert set(states[2]) - set(states[0]) == {"text.corners"}
    for name, value in states[0].items():
        torch.testing.assert_close(states[2][name], value, rtol=0, atol=0, msg=name)


def test_export_round_trip_and_pretrained_starts(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(num_class_tokens=2)
    model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id).eval()
    out_dir = save_pretrained(model, tokenizer, tmp_path / "export", cfg)
    assert {p.name for p in out_dir.iterdir()} >= {"image", "text", "heads.safetensors", "recaption_model.json"}
    loaded, tok, loaded_cfg = load_pretrained(out_dir)
    loaded.eval()
    assert loaded_cfg.text.num_corners == 2 and len(tok) == len(tokenizer)
    px = torch.randn(2, 3, 32, 32)
    ids, mask = encode(tok, ["a red cube", "a photo"], 22)
    with torch.no_grad():
        a, b = model(px, ids, mask), loaded(px, ids, mask)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # The exported towers are plain transformers checkpoints: a new run can start from them.
    started = build_model(
        ModelConfig.model_validate(
            {
                **TINY,
                "image": {**TINY["image"], "pretrained": str(out_dir / "image")},
                "text": {**TINY["text"], "pretrained": str(out_dir / "text")},
            }
        ),
        len(tokenizer),
        tokenizer.pad_token_id,
    )
    torch.testing.assert_close(
        started.text.encoder.embeddings.word_embeddings.weight, model.text.encoder.embeddings.word_embeddings.weight
    )
    torch.testing.assert_close(
        started.image.vision.embeddings.patch_embedding.weight, model.image.vision.embeddings.patch_embedding.weight
    )


def test_a_whole_clip_checkpoint_gives_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(
        CLIPConfig(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 50,
            },
            projection_dim=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    model = build_model(tiny_cfg(pretrained=str(tmp_path / "clip")), 50, 0)
    torch.testing.assert_close(
        model.image.vision.embeddings.class_embedding, clip.vision_model.embeddings.class_embedding
    )


def test_pretrained_paths_that_are_not_checkpoints_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.image.pretrained"):
        build_model(tiny_cfg(pretrained=str(tmp_path)), 50, 0)


def test_a_text_checkpoint_that_is_not_bert_is_refused_with_the_key(tmp_path):
    from transformers import BertConfig, RobertaConfig

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    RobertaConfig(vocab_size=50, **tiny).save_pretrained(tmp_path / "roberta")  # only config.json is read
    cfg = ModelConfig.model_validate({**TINY, "text": {**TINY["text"], "pretrained": str(tmp_path / "roberta")}})
    with pytest.raises(ConfigError, match=r"model.text.pretrained: .* is a 'roberta' checkpoint, expected a BERT"):
        build_model(cfg, 50, 0)
    # A BERT checkpoint of the same sizes loads.
    from transformers import BertModel

    BertModel(BertConfig(vocab_size=50, max_position_embeddings=32, **tiny)).save_pretrained(tmp_path / "bert")
    cfg.text.pretrained = str(tmp_path / "bert")
    assert build_model(cfg, 50, 0).text.encoder.config.model_type == "bert"

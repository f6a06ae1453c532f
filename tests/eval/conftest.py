"""A tiny random-weight CLIP checkpoint on disk, built once per test session (seconds, no download)."""

from __future__ import annotations

import pytest

from recaption.eval.synthetic import COLOURS, POSITIONS, SHAPES

MAX_POSITIONS = 24


def build_tiny_clip(out_dir) -> None:
    """CLIPModel + a word-level tokenizer over the synthetic captions' words + the PIL CLIP image processor."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = sorted({w for phrase in [*COLOURS, *SHAPES, *POSITIONS] for w in phrase.split()})
    words += ["a", "the", "is", "at", "of", "photo", "background", "large", "small", "grey", "beige", "dark"]
    vocab = {"<pad>": 0, "<unk>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_POSITIONS,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(out)
    return out

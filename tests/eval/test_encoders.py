"""The CLIP adapter on a tiny random CLIP saved to disk: shapes, unit norms, truncation, batch independence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from recaption.errors import InputError
from recaption.eval.encoders import CLIPEncoder, Encoder, load_encoder


def test_clip_encoder_embeds_images_and_texts(tiny_clip):
    enc = load_encoder("clip", tiny_clip)
    assert isinstance(enc, Encoder) and enc.max_length == 24
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    img = enc.encode_images(images)
    long_text = " ".join(["a red circle is at the top left"] * 10)  # far beyond 24 positions: truncated
    txt = enc.encode_texts(["a red circle", long_text, "a blue square"])
    assert img.shape == (2, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(img[0], img[1]) and not torch.allclose(txt[0], txt[2])
    # Padding is masked and pooling is at end-of-text: alone or beside a long text, the same embedding.
    alone = enc.encode_texts(["a red circle"])
    assert torch.allclose(alone[0], txt[0], atol=1e-5)


def test_bad_checkpoint_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot load a CLIP checkpoint"):
        CLIPEncoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="known: clip"):
        load_encoder("siglip", tmp_path)

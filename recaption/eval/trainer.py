"""The trainer's model (`recaption.train.model.ContrastiveModel` + its tokenizer) as an eval `Encoder`.

Images go through the image tower's main branch (class token 0; Holistic CLIP's extra branches are left out) after the
preprocessing the trainer's data loader applies (shorter side to `image_size`, centre crop, CLIP normalisation).
Texts are tokenised as the trainer tokenises long texts (`[CLS] text [SEP]`, at most `context_length` − K tokens) and
pooled in one of two ways, `text_slot`:

- `cls` (default): slot 0, the CLS token. This is the embedding the trainer's short-text and sub-caption losses
  train, the one that exists for every model (K = 0 or not), and the one LoTLIP's released model uses at eval:
  its `open_clip/model.py` `encode_text` keeps only the CLS slot of a single (2-D) text batch and returns all slots
  only for the 3-D training batch.
- `mean`: the mean of the K+1 normalised slots (CLS and the corners), normalised again. The long-text loss
  (`loss.long_slots: all`) trains every slot against the image, so this pools what it learnt. With K = 0 it equals
  `cls`. Not LoTLIP's eval; offered to see what the corner slots hold.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from recaption.train.config import ModelConfig
    from recaption.train.model import ContrastiveModel

TextSlot = Literal["cls", "mean"]


class TrainerEncoder:
    """A `ContrastiveModel` as an Encoder: from a live model during training, or `from_pretrained(export_dir)`.

    The encoder does not change the model's train/eval mode (the trainer's hook sets eval mode around the call);
    it runs under `torch.no_grad()` on the device the model's parameters are on.
    """

    def __init__(
        self,
        model: ContrastiveModel,
        tokenizer,
        model_cfg: ModelConfig,
        text_slot: TextSlot = "cls",
        max_length: int | None = None,
    ) -> None:
        if text_slot not in ("cls", "mean"):
            raise ValueError(f"text_slot must be cls or mean, not {text_slot!r}")
        self.model, self.tokenizer, self.cfg, self.text_slot = model, tokenizer, model_cfg, text_slot
        longest = model_cfg.text.context_length - model_cfg.text.num_corners
        self.max_tokens = min(max_length, longest) if max_length else longest

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        text_slot: TextSlot = "cls",
    ) -> TrainerEncoder:
        """An export written by the trainer (`<run>/final`, `recaption.train.model.save_pretrained`)."""
        import torch

        from recaption.errors import InputError
        from recaption.train.model import EXPORT_INFO, load_pretrained

        if not (Path(path) / EXPORT_INFO).is_file():
            raise InputError(f"{path} is not a recaption model export (no {EXPORT_INFO}); use <run.output>/final")
        model, tokenizer, model_cfg = load_pretrained(path)
        model = model.to(torch.device(device), getattr(torch, dtype)).eval()
        return cls(model, tokenizer, model_cfg, text_slot, max_length)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        import numpy as np
        import torch

        from recaption.train.data import load_image

        size = self.cfg.image.image_size
        arrays = []
        for im in images:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")  # lossless; then exactly the trainer's decode path
            arrays.append(load_image(buf.getvalue(), size))
        p = self._param()
        pixels = torch.from_numpy(np.stack(arrays)).to(p.device, p.dtype)
        with torch.no_grad():
            branches, _ = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(branches[:, 0].float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        from recaption.train.tokenizer import encode

        ids, mask = encode(self.tokenizer, list(texts), self.max_tokens)
        device = self._param().device
        with torch.no_grad():
            slots = self.model.encode_text(ids.to(device), mask.to(device)).float()  # (N, K+1, D), normalised
        pooled = slots[:, 0] if self.text_slot == "cls" else slots.mean(dim=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

"""What eval needs of a model (the `Encoder` protocol) and the adapter for transformers CLIP checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from recaption.errors import InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image


@runtime_checkable
class Encoder(Protocol):
    """Any model eval can measure. Both methods return L2-normalised float tensors (N, D) with one shared D,
    row i for input i, and are called under `torch.no_grad()` with batches of at most the eval batch size.
    Preprocessing (resize, crop, tokenise, truncate) is the encoder's business: eval hands over RGB PIL images
    and raw strings. The trainer's model gets its own adapter implementing these two methods."""

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


class CLIPEncoder:
    """A transformers `CLIPModel` checkpoint directory (with its tokenizer and image processor) as an Encoder.

    Texts longer than the text tower's positions are truncated (77 for OpenAI CLIP, 248 for Long-CLIP-style
    checkpoints), as every CLIP eval does; padding is masked, and the tower pools at the end-of-text token, so a
    text's embedding does not depend on the batch it came in.
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32", max_length: int | None = None):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        try:
            self.model = CLIPModel.from_pretrained(str(path)).to(self.device, self.dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise InputError(
                f"cannot load a CLIP checkpoint from {path}: {e}. Expected a directory written by "
                "CLIPModel.save_pretrained with the tokenizer and image processor saved beside it"
            ) from None
        self.max_length = max_length or self.model.config.text_config.max_position_embeddings

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        import torch

        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _unit(out)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _unit(out)


def _unit(out: Any) -> torch.Tensor:
    import torch

    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(emb.float(), dim=-1)


def load_encoder(kind: str, path: str | Path, **options: Any) -> Encoder:
    """The encoder for a model section of an eval config: `clip` (transformers CLIP) or `recaption` (a trainer export,
    `recaption.eval.trainer.TrainerEncoder`)."""
    if kind == "clip":
        return CLIPEncoder(path, **options)
    if kind == "recaption":
        from recaption.eval.trainer import TrainerEncoder

        return TrainerEncoder.from_pretrained(path, **options)
    raise ValueError(f"unknown encoder kind {kind!r}; known: clip, recaption")

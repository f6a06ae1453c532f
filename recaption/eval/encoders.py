"""What eval needs of a model (the `Encoder` protocol) and the adapter for transformers CLIP checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

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

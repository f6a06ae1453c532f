"""Eval sets: the common `EvalSet` of images and texts, and one loader per benchmark's on-disk format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from recaption.errors import InputError

# An image is named by its path, held in memory, or made on demand (generated scenes, archive members).
ImageRef = Union[str, Path, Image.Image, Callable[[], Image.Image]]  # noqa: UP007 (a runtime alias on 3.10)


@dataclass
class EvalSet:
    """A retrieval eval set: `texts[t]` describes `images[text_to_image[t]]`; an image may have several texts."""

    name: str
    images: list[ImageRef]
    texts: list[str]
    text_to_image: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.text_to_image):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.text_to_image)} text_to_image")
        if self.text_to_image and not 0 <= min(self.text_to_image) <= max(self.text_to_image) < len(self.images):
            raise ValueError(f"{self.name}: text_to_image points outside the {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)


def open_image(ref: ImageRef) -> Image.Image:
    """The RGB image a reference names; a missing or broken file is an InputError naming the path."""
    if isinstance(ref, Image.Image):
        img = ref
    elif callable(ref):
        img = ref()
    else:
        try:
            with Image.open(ref) as f:
                img = f.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read image {ref}: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def concat_eval_sets(name: str, sets: Sequence[EvalSet]) -> EvalSet:
    """One eval set from several (LoTLIP's IIW is its DOCCI, IIW-400 and DCI test subsets together)."""
    images: list[ImageRef] = []
    texts: list[str] = []
    owner: list[int] = []
    for s in sets:
        owner += [len(images) + i for i in s.text_to_image]
        texts += s.texts
        images += s.images
    return EvalSet(name, images, texts, owner)

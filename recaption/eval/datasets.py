"""Eval sets: the common `EvalSet` of images and texts, and one loader per benchmark's on-disk format."""

from __future__ import annotations

import json
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


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ClassificationSet:
    """A labelled image set for zero-shot classification: `images[i]` shows class `class_names[labels[i]]`."""

    name: str
    images: list[ImageRef]
    labels: list[int]
    class_names: list[str]


def load_image_folder(root: str | Path, class_names: str | Path | None = None, name: str = "") -> ClassificationSet:
    """ImageNet-style folders (torchvision's ImageFolder layout).

    On disk: `root/<class>/<image>` with one directory per class; files with an image suffix (.jpg, .JPEG,
    .png, …) anywhere under a class directory belong to it. Classes are the directory names in sorted order,
    so label i is the i-th name.

    The prompt text of a class is its directory name with `_` read as a space, unless `class_names` names a
    file: a JSON object {directory: name} (e.g. ImageNet's wnid → "goldfish"), a JSON list, or a text file with
    one name per line, both in sorted-directory order.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise InputError(f"{root}: no class directories (expected root/<class>/<image>)")
    images: list[ImageRef] = []
    labels: list[int] = []
    for label, d in enumerate(dirs):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        images += files
        labels += [label] * len(files)
    if not images:
        raise InputError(f"{root}: the class directories hold no images")
    names = _class_names([d.name for d in dirs], class_names)
    return ClassificationSet(name or root.name, images, labels, names)


def _class_names(dirs: list[str], spec: str | Path | None) -> list[str]:
    if spec is None:
        return [d.replace("_", " ") for d in dirs]
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"class names file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            missing = [d for d in dirs if d not in data]
            if missing:
                raise InputError(f"{path}: no name for class directories {missing[:5]}")
            return [str(data[d]) for d in dirs]
        names = [str(n) for n in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(dirs):
        raise InputError(f"{path}: {len(names)} class names for {len(dirs)} class directories")
    return names

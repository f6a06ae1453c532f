"""Zero-shot classification: class names × prompt templates → one text embedding per class, top-k accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from recaption.eval.retrieval import embed_images, embed_texts

if TYPE_CHECKING:
    from recaption.eval.datasets import ClassificationSet
    from recaption.eval.encoders import Encoder

# The 80 ImageNet prompts of CLIP (Radford et al. 2021), as listed in OpenAI's Prompt_Engineering_for_ImageNet
# notebook and reused by open_clip (OPENAI_IMAGENET_TEMPLATES) and the LoTLIP zero-shot eval.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 of those 80 that the same notebook's forward selection kept: an ensemble at a tenth of the text cost.
SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS = {
    "openai80": OPENAI_IMAGENET_TEMPLATES,
    "simple7": SIMPLE_IMAGENET_TEMPLATES,
    "photo": ("a photo of a {}.",),
}


def build_classifier(
    encoder: Encoder, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """(classes, D): per class, the mean of its L2-normalised prompt embeddings, normalised again (CLIP's recipe)."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template must hold exactly one '{{}}' for the class name: {bad}")
    prompts = [t.format(name) for name in class_names for t in templates]
    with torch.no_grad():
        emb = embed_texts(encoder, prompts, batch_size)  # already unit rows
    emb = emb.view(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zeroshot_metrics(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent, keys `top1`, `top5`, …. Ties count against the true class, as in retrieval:
    its rank is the number of other classes scoring at least as high, and a hit at k is rank < k."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"{labels.numel()} labels for {image_emb.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classifier.shape[0]):
        raise ValueError(f"labels must lie in [0, {classifier.shape[0]})")
    scores = image_emb.float() @ classifier.float().T
    correct = scores.gather(1, labels[:, None])
    rank = (scores >= correct).sum(1) - 1
    return {f"top{k}": 100.0 * int((rank < k).sum()) / max(1, rank.numel()) for k in sorted(set(ks))}


def evaluate_zeroshot(
    encoder: Encoder,
    dataset: ClassificationSet,
    templates: Sequence[str] = SIMPLE_IMAGENET_TEMPLATES,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Zero-shot top-k on a labelled image set with the encoder's own text tower as the classifier."""
    classifier = build_classifier(encoder, dataset.class_names, templates, batch_size)
    with torch.no_grad():
        image_emb = embed_images(encoder, dataset.images, batch_size)
    return zeroshot_metrics(image_emb, classifier, dataset.labels, ks)


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (`openai80`, `simple7`, `photo`) or an explicit list of '{}' templates."""
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {spec!r}; known: {', '.join(TEMPLATE_SETS)} (or give a list)")
        return TEMPLATE_SETS[spec]
    return tuple(spec)

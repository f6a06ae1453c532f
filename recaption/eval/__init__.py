"""Evaluation: retrieval, zero-shot classification, benchmark loaders, the synthetic scenes benchmark."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.eval.datasets import ClassificationSet, EvalSet
    from recaption.eval.retrieval import embed_images, evaluate_retrieval
    from recaption.eval.run import run_eval, trainer_hook
    from recaption.eval.synthetic import (
        BACKGROUNDS,
        COLOURS,
        MAX_OBJECTS,
        POSITION_ORDER,
        POSITIONS,
        SHAPES,
        SIZES,
        TEXTURES,
        SceneObject,
        make_scene,
    )
    from recaption.eval.trainer import TrainerEncoder
    from recaption.eval.zeroshot import build_classifier, zeroshot_metrics

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "BACKGROUNDS": "recaption.eval.synthetic",
    "COLOURS": "recaption.eval.synthetic",
    "ClassificationSet": "recaption.eval.datasets",
    "EvalSet": "recaption.eval.datasets",
    "MAX_OBJECTS": "recaption.eval.synthetic",
    "POSITIONS": "recaption.eval.synthetic",
    "POSITION_ORDER": "recaption.eval.synthetic",
    "SHAPES": "recaption.eval.synthetic",
    "SIZES": "recaption.eval.synthetic",
    "SceneObject": "recaption.eval.synthetic",
    "TEXTURES": "recaption.eval.synthetic",
    "TrainerEncoder": "recaption.eval.trainer",
    "build_classifier": "recaption.eval.zeroshot",
    "embed_images": "recaption.eval.retrieval",
    "evaluate_retrieval": "recaption.eval.retrieval",
    "make_scene": "recaption.eval.synthetic",
    "run_eval": "recaption.eval.run",
    "trainer_hook": "recaption.eval.run",
    "zeroshot_metrics": "recaption.eval.zeroshot",
}
__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "ClassificationSet",
    "EvalSet",
    "MAX_OBJECTS",
    "POSITIONS",
    "POSITION_ORDER",
    "SHAPES",
    "SIZES",
    "SceneObject",
    "TEXTURES",
    "TrainerEncoder",
    "build_classifier",
    "embed_images",
    "evaluate_retrieval",
    "make_scene",
    "run_eval",
    "trainer_hook",
    "zeroshot_metrics",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

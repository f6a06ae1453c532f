"""The demo: synthetic scenes captioned by the packaged scene captioner, scored, and the ablation it trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.demo.ablation import commit_captions, run_ablation
    from recaption.demo.run import (
        DEMO_SEED,
        FALLBACK_MODEL,
        demo_config,
        find_pipeline,
        format_retrieval,
        prepare_demo_dir,
        random_weights,
        read_truths,
        report_accuracy,
        run_demo,
        verdict,
        write_demo_shards,
    )
    from recaption.demo.scene_captioner import DEFAULT_STEPS, META_FILE, train_scene_captioner

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "DEFAULT_STEPS": "recaption.demo.scene_captioner",
    "DEMO_SEED": "recaption.demo.run",
    "FALLBACK_MODEL": "recaption.demo.run",
    "META_FILE": "recaption.demo.scene_captioner",
    "commit_captions": "recaption.demo.ablation",
    "demo_config": "recaption.demo.run",
    "find_pipeline": "recaption.demo.run",
    "format_retrieval": "recaption.demo.run",
    "prepare_demo_dir": "recaption.demo.run",
    "random_weights": "recaption.demo.run",
    "read_truths": "recaption.demo.run",
    "report_accuracy": "recaption.demo.run",
    "run_ablation": "recaption.demo.ablation",
    "run_demo": "recaption.demo.run",
    "train_scene_captioner": "recaption.demo.scene_captioner",
    "verdict": "recaption.demo.run",
    "write_demo_shards": "recaption.demo.run",
}
__all__ = [
    "DEFAULT_STEPS",
    "DEMO_SEED",
    "FALLBACK_MODEL",
    "META_FILE",
    "commit_captions",
    "demo_config",
    "find_pipeline",
    "format_retrieval",
    "prepare_demo_dir",
    "random_weights",
    "read_truths",
    "report_accuracy",
    "run_ablation",
    "run_demo",
    "train_scene_captioner",
    "verdict",
    "write_demo_shards",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

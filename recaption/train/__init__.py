"""The trainer: towers with corner tokens, sub-caption sampling, losses, data, loop, checkpoints, Ray Train."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.train.config import ModelConfig, load_train_config
    from recaption.train.data import Batches, load_image
    from recaption.train.loop import TENSOR_KEYS, train
    from recaption.train.losses import compute_losses, split_texts
    from recaption.train.model import EXPORT_INFO, ContrastiveModel, build_model, load_pretrained
    from recaption.train.run import prepare_run, run_training, train_command
    from recaption.train.tokenizer import encode, load_tokenizer

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "Batches": "recaption.train.data",
    "ContrastiveModel": "recaption.train.model",
    "EXPORT_INFO": "recaption.train.model",
    "ModelConfig": "recaption.train.config",
    "TENSOR_KEYS": "recaption.train.loop",
    "build_model": "recaption.train.model",
    "compute_losses": "recaption.train.losses",
    "encode": "recaption.train.tokenizer",
    "load_image": "recaption.train.data",
    "load_pretrained": "recaption.train.model",
    "load_tokenizer": "recaption.train.tokenizer",
    "load_train_config": "recaption.train.config",
    "prepare_run": "recaption.train.run",
    "run_training": "recaption.train.run",
    "split_texts": "recaption.train.losses",
    "train": "recaption.train.loop",
    "train_command": "recaption.train.run",
}
__all__ = [
    "Batches",
    "ContrastiveModel",
    "EXPORT_INFO",
    "ModelConfig",
    "TENSOR_KEYS",
    "build_model",
    "compute_losses",
    "encode",
    "load_image",
    "load_pretrained",
    "load_tokenizer",
    "load_train_config",
    "prepare_run",
    "run_training",
    "split_texts",
    "train",
    "train_command",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

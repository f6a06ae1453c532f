"""Engine name -> Captioner: the one module that knows every engine (each imported when it is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.captioners.engines.base import Captioner

if TYPE_CHECKING:
    from recaption.config import ModelConfig


def build_captioner(model: ModelConfig) -> Captioner:
    """Builds the engine a model config names. Heavy imports happen here, inside the actor, not at import time."""
    if model.engine == "hf":
        from recaption.captioners.engines.hf import HFCaptioner

        return HFCaptioner(model)
    if model.engine == "fake":
        from recaption.captioners.engines.fake import FakeCaptioner

        return FakeCaptioner(model)
    if model.engine == "vllm":
        from recaption.captioners.engines.vllm import VLLMCaptioner

        return VLLMCaptioner(model)
    raise ValueError(f"unknown engine {model.engine!r}")

"""The captioners: engine protocol and engines, model registry, prompts, caption cleaning, checkpoint conversion, tiny test models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.captioners.convert import convert_sharegpt4v
    from recaption.captioners.engines.base import Generation, engine_dead
    from recaption.captioners.engines.hf import HFCaptioner, check_generate_extra
    from recaption.captioners.engines.registry import build_captioner
    from recaption.captioners.engines.runner import Request, make_runner
    from recaption.captioners.engines.vllm import (
        VLLMCaptioner,
        check_sampling_extra,
        check_vllm_model,
        engine_args,
        sampling_kwargs,
        sampling_params,
        vllm_installed,
    )
    from recaption.captioners.models import resolve_model
    from recaption.captioners.postprocess import clean_caption
    from recaption.captioners.prompts import builtin_prompts, format_prompt, get_prompt, resolve_prompt_specs
    from recaption.captioners.prompts.template import ROW_FIELDS, MissingField, build_prompts, check_fields
    from recaption.captioners.tiny import CORPUS, EOS_ID, IMAGE_ID, build_tiny, llava_model

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "CORPUS": "recaption.captioners.tiny",
    "EOS_ID": "recaption.captioners.tiny",
    "Generation": "recaption.captioners.engines.base",
    "HFCaptioner": "recaption.captioners.engines.hf",
    "IMAGE_ID": "recaption.captioners.tiny",
    "MissingField": "recaption.captioners.prompts.template",
    "ROW_FIELDS": "recaption.captioners.prompts.template",
    "Request": "recaption.captioners.engines.runner",
    "VLLMCaptioner": "recaption.captioners.engines.vllm",
    "build_captioner": "recaption.captioners.engines.registry",
    "build_prompts": "recaption.captioners.prompts.template",
    "build_tiny": "recaption.captioners.tiny",
    "builtin_prompts": "recaption.captioners.prompts",
    "check_fields": "recaption.captioners.prompts.template",
    "check_generate_extra": "recaption.captioners.engines.hf",
    "check_sampling_extra": "recaption.captioners.engines.vllm",
    "check_vllm_model": "recaption.captioners.engines.vllm",
    "clean_caption": "recaption.captioners.postprocess",
    "convert_sharegpt4v": "recaption.captioners.convert",
    "engine_args": "recaption.captioners.engines.vllm",
    "engine_dead": "recaption.captioners.engines.base",
    "format_prompt": "recaption.captioners.prompts",
    "get_prompt": "recaption.captioners.prompts",
    "llava_model": "recaption.captioners.tiny",
    "make_runner": "recaption.captioners.engines.runner",
    "resolve_model": "recaption.captioners.models",
    "resolve_prompt_specs": "recaption.captioners.prompts",
    "sampling_kwargs": "recaption.captioners.engines.vllm",
    "sampling_params": "recaption.captioners.engines.vllm",
    "vllm_installed": "recaption.captioners.engines.vllm",
}
__all__ = [
    "CORPUS",
    "EOS_ID",
    "Generation",
    "HFCaptioner",
    "IMAGE_ID",
    "MissingField",
    "ROW_FIELDS",
    "Request",
    "VLLMCaptioner",
    "build_captioner",
    "build_prompts",
    "build_tiny",
    "builtin_prompts",
    "check_fields",
    "check_generate_extra",
    "check_sampling_extra",
    "check_vllm_model",
    "clean_caption",
    "convert_sharegpt4v",
    "engine_args",
    "engine_dead",
    "format_prompt",
    "get_prompt",
    "llava_model",
    "make_runner",
    "resolve_model",
    "resolve_prompt_specs",
    "sampling_kwargs",
    "sampling_params",
    "vllm_installed",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

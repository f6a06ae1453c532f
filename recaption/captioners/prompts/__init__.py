"""Prompt registry (named prompts in prompts.yaml) and the chat format each model family expects."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from recaption.errors import ConfigError

# Family → how a bare prompt is wrapped for the model. None: the processor's own chat template decides.
# `{prompt}` is replaced literally (no str.format), so prompts may contain braces.
PROMPT_FORMATS: dict[str, str | None] = {
    "llava": "USER: <image>\n{prompt} ASSISTANT:",  # LLaVA-1.5 (llava-hf conversation format)
    "sharegpt4v": "USER: <image>\n{prompt} ASSISTANT:",  # LLaVA-1.5 architecture and format
    "instructblip": "{prompt}",  # the processor puts the query tokens in front
    "blip2": "Question: {prompt} Answer:",  # BLIP-2's VQA format; the processor adds the query tokens
    "llava_next": None,  # its format depends on the LM (Vicuna, Mistral, …): use the checkpoint's template
    "chat": None,
}


@lru_cache(maxsize=1)
def builtin_prompts() -> dict[str, str]:
    """The named prompts shipped in prompts.yaml."""
    text = resources.files(__package__).joinpath("prompts.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return {str(k): str(v).strip() for k, v in data.items()}


def prompt_names(extra: dict[str, Any] | None = None) -> list[str]:
    """All prompt names known with `extra` (a config's `prompts:` section) merged in."""
    return sorted({**builtin_prompts(), **(extra or {})})


def get_prompt(name: str, extra: dict[str, Any] | None = None) -> str:
    """The text of a named prompt; `extra` (a config's `prompts:`: texts or {text, fallback}) overrides or adds
    names."""
    return prompt_spec(name, extra)[0]


def prompt_spec(name: str, extra: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """A named prompt's text and the name of its fallback (None: it has none)."""
    prompts = {**builtin_prompts(), **(extra or {})}
    if name not in prompts:
        raise ConfigError(
            f"prompt {name!r} is unknown; known prompts: {', '.join(sorted(prompts))} (add it under `prompts:`)"
        )
    value = prompts[name]
    if not isinstance(value, str):  # a PromptSpec, or its dict
        value = value if isinstance(value, dict) else value.model_dump()
        text, fallback = str(value.get("text") or ""), value.get("fallback")
    else:
        text, fallback = value, None
    if not text.strip():
        raise ConfigError(f"prompt {name!r} is empty")
    return text.strip(), fallback


def resolve_prompt_specs(names: list[str], extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """`{name: {"text", "fallback"}}` for the named prompts and every fallback they lead to."""
    specs: dict[str, dict[str, Any]] = {}
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in specs:
            continue
        text, fallback = prompt_spec(name, extra)
        specs[name] = {"text": text, "fallback": fallback}
        if fallback:
            todo.append(fallback)
    return specs


def format_prompt(family: str, prompt_text: str, processor: Any | None = None) -> str:
    """Wraps a bare prompt in the family's chat format; families without one need the model's `processor`."""
    if family not in PROMPT_FORMATS:
        raise ConfigError(f"model family {family!r} has no prompt format; known: {', '.join(sorted(PROMPT_FORMATS))}")
    template = PROMPT_FORMATS[family]
    if template is not None:
        return template.replace("{prompt}", prompt_text)
    if processor is None:
        raise ConfigError(f"model family {family!r} is formatted by its processor's chat template; pass the processor")
    return format_chat_prompt(processor, prompt_text)


def format_chat_prompt(processor: Any, prompt_text: str) -> str:
    """One user turn holding an image and the prompt, rendered by the processor's chat template."""
    if not getattr(processor, "chat_template", None):
        raise ConfigError(
            f"the processor of this model ({type(processor).__name__}) has no chat template; set the model's `family` "
            f"to one with a built-in format ({', '.join(sorted(k for k, v in PROMPT_FORMATS.items() if v))})"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

"""Prompt registry and per-family chat formatting."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recaption.captioners.prompts import PROMPT_FORMATS, builtin_prompts, format_prompt, get_prompt, prompt_names  # noqa: E402
from recaption.errors import ConfigError  # noqa: E402

NAMES = ["background", "detailed", "objects", "sharecaptioner", "short", "spatial", "style", "text"]


def test_builtin_prompts_are_all_there_and_non_empty():
    assert sorted(builtin_prompts()) == NAMES
    assert all(get_prompt(n) for n in NAMES)
    assert "detail" in get_prompt("detailed").lower()
    assert "\n" not in get_prompt("detailed")  # folded YAML: one line, as the model sees it
    # ShareGPT4V's Share-Captioner instruction, verbatim (share-cap_batch_infer.py in InternLM-XComposer)
    assert get_prompt("sharecaptioner") == "Analyze the image in a comprehensive and detailed manner."


def test_extra_prompts_override_and_add():
    extra = {"short": "One word, please.", "colours": "Name the colours."}
    assert get_prompt("short", extra) == "One word, please."
    assert get_prompt("colours", extra) == "Name the colours."
    assert get_prompt("short") != "One word, please."  # the registry itself is untouched
    assert prompt_names(extra) == sorted([*NAMES, "colours"])


def test_unknown_prompt_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        get_prompt("detial")
    assert "'detial'" in str(e.value) and all(n in str(e.value) for n in NAMES)


def test_empty_prompt_is_an_error():
    with pytest.raises(ConfigError, match="empty"):
        get_prompt("blank", {"blank": "  "})


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llava", "USER: <image>\nWhat is {this}? ASSISTANT:"),
        ("sharegpt4v", "USER: <image>\nWhat is {this}? ASSISTANT:"),
        ("instructblip", "What is {this}?"),
        ("blip2", "Question: What is {this}? Answer:"),
    ],
)
def test_family_formats(family, expected):
    assert format_prompt(family, "What is {this}?") == expected  # braces in a prompt survive


def test_chat_family_uses_the_processors_template(tmp_path):
    from transformers import AutoProcessor

    from recaption.captioners.tiny import build_tiny

    processor = AutoProcessor.from_pretrained(build_tiny("llava", tmp_path / "llava"))
    assert format_prompt("chat", "Describe it.", processor) == format_prompt("llava", "Describe it.")


def test_chat_family_needs_a_processor_with_a_template():
    with pytest.raises(ConfigError, match="pass the processor"):
        format_prompt("chat", "x")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        format_prompt("llava_next", "x", NoTemplate())


def test_unknown_family_is_an_error():
    with pytest.raises(ConfigError, match="no prompt format"):
        format_prompt("gpt", "x")
    assert set(PROMPT_FORMATS) >= {"llava", "instructblip", "blip2", "chat"}

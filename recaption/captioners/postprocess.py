"""Cleaning of generated captions: strip prompt echo, flag repetition loops and truncation, split into sub-captions."""

from __future__ import annotations

import re

from recaption.config import PostprocessConfig

# Chat-role prefixes some models repeat at the start of their answer.
_ROLE_PREFIX = re.compile(r"^\s*(?:ASSISTANT|Assistant|assistant|Answer|answer|A)\s*:\s*")
# A sentence ends at . ! or ? followed by whitespace; abbreviations and decimals are protected below.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "Mr.", "Mrs.", "Ms.", "Dr.", "St.", "approx.", "No.")
_WORD = re.compile(r"\w+", re.UNICODE)
_ABBREVIATION = re.compile("|".join(re.escape(a) for a in _ABBREVIATIONS))
_PROTECTED = re.compile("\x00(\\d+)\x00")


def strip_echo(text: str, prompt: str) -> str:
    """Removes a repeated prompt and role prefix from the start of a generation, and normalises whitespace."""
    out = text.strip()
    bare_prompt = prompt.replace("<image>", "").strip()
    if bare_prompt and out.startswith(bare_prompt):
        out = out[len(bare_prompt) :]
    out = _ROLE_PREFIX.sub("", out, count=1)
    return " ".join(out.split())


def split_sub_captions(text: str, min_chars: int = 3) -> list[str]:
    """Splits a caption into sentences (DreamLIP's sub-captions); fragments shorter than `min_chars` join the last."""
    if not text.strip():
        return []
    protected = _ABBREVIATION.sub(lambda m: f"\x00{_ABBREVIATIONS.index(m.group(0))}\x00", text)
    parts = [p.strip() for p in _SENTENCE_END.split(protected) if p.strip()]
    sentences: list[str] = []
    for part in parts:
        if "\x00" in part:
            part = _PROTECTED.sub(lambda m: _ABBREVIATIONS[int(m.group(1))], part)
        if sentences and len(part) < min_chars:
            sentences[-1] = f"{sentences[-1]} {part}"
        elif len(part) >= min_chars:
            sentences.append(part)
    return sentences


def repetition_ratio(text: str, n: int = 4) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram: near 0 for prose, near 1 for a looping generation."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 2 * n:
        return 0.0
    grams = len(words) - n + 1
    distinct = len(set(zip(*(words[i:] for i in range(n)), strict=False)))  # zip stops at the last whole n-gram
    return (grams - distinct) / grams  # each repeat of an earlier n-gram


def caption_flags(text: str, finish_reason: str, cfg: PostprocessConfig, error: str | None = None) -> list[str]:
    """Quality flags stored in `captions.flags`."""
    flags = []
    if error or finish_reason == "error":
        flags.append("error")
    elif not text:
        flags.append("empty")
    if finish_reason == "length":
        flags.append("truncated")
    if text and repetition_ratio(text, cfg.repetition_ngram) > cfg.repetition_threshold:
        flags.append("repetition")
    return flags


def clean_caption(raw: dict, prompt_text: str, cfg: PostprocessConfig) -> dict:
    """Turns one raw caption struct (text, n_tokens, finish_reason, flags, …) into its final form."""
    text = strip_echo(raw.get("text") or "", prompt_text)
    flags = list(dict.fromkeys([*(raw.get("flags") or []), *caption_flags(text, raw["finish_reason"], cfg)]))
    return {
        **raw,
        "text": text,
        "sub_captions": split_sub_captions(text, cfg.min_sub_caption_chars),
        "flags": flags,
    }

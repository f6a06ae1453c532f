"""Prompts that see their row: `{alt_text}`, `{url}` or any kept source field, filled in per image.

A prompt text names a field as `{name}`; `{{` and `}}` are literal braces and every other brace is kept as it is
(a prompt asking for JSON needs no escaping). Values are put in once and never read as a template again, so braces
in an alt text are only text. A field that is missing or blank in a row makes the prompt use its `fallback` (another
prompt, by name); a prompt without one fails that caption with an error that names the field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from recaption.errors import ConfigError

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_FIELD_CHARS = 1000  # a longer value (a scraped alt text can be pages long) is cut, so it cannot fill the context
ROW_FIELDS = ("key", "source", "unit", "url", "alt_text")  # what every row has; kept source fields come on top


class MissingField(ValueError):
    """A row lacks a field its prompt names, and the prompt has no fallback."""


def fields_of(text: str) -> tuple[str, ...]:
    """The row fields a prompt text names, in order of first use."""
    return tuple(dict.fromkeys(m.group(1) for m in _TOKEN.finditer(text) if m.group(1)))


@dataclass(frozen=True)
class Prompt:
    """A named prompt: its text, and the prompt to use instead for a row that lacks a field the text names."""

    name: str
    text: str
    fallback: Prompt | None = None

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:  # once: `fill` runs for every request and caption of a run
        return fields_of(self.text)

    def fill(self, row: Mapping[str, Any]) -> str:
        """The text the model gets for this row."""
        missing = [f for f in self.fields if _value(row.get(f)) is None]
        if missing:
            if self.fallback is not None:
                return self.fallback.fill(row)
            raise MissingField(
                f"prompt {self.name!r} needs field {missing[0]!r}, which this row lacks; give the prompt a `fallback`"
            )
        if not self.fields:
            return _literal(self.text)

        def put(m: re.Match) -> str:
            if m.group(1) is None:
                return m.group(0)[0]  # {{ → {, }} → }
            return _value(row.get(m.group(1)))

        return _TOKEN.sub(put, self.text)


def _literal(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


def _value(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    if not text:
        return None
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"


def build_prompts(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Prompt]:
    """Prompt objects from `{name: {"text", "fallback"}}` (what `resolve_prompts` gives); a fallback that names an
    unknown prompt or loops back is a ConfigError."""
    built: dict[str, Prompt] = {}

    def build(name: str, chain: tuple[str, ...]) -> Prompt:
        if name in built:
            return built[name]
        if name in chain:
            raise ConfigError(f"prompt fallbacks loop: {' → '.join([*chain, name])}")
        if name not in specs:
            raise ConfigError(f"prompt {chain[-1]!r} falls back to {name!r}, which is no known prompt")
        spec = specs[name]
        fallback = spec.get("fallback")
        prompt = Prompt(name, spec["text"], build(fallback, (*chain, name)) if fallback else None)
        built[name] = prompt
        return prompt

    for name in specs:
        build(name, ())
    return built


def check_fields(prompts: Mapping[str, Prompt], available: Collection[str]) -> None:
    """Before any work: every field a prompt names is one a row can have (the row's own fields and the kept source
    fields), else one line naming the prompt, the field and what is there."""
    for prompt in prompts.values():
        unknown = [f for f in prompt.fields if f not in available]
        if unknown:
            raise ConfigError(
                f"prompt {prompt.name!r} uses field {{{unknown[0]}}}, which rows of this input do not have; fields are "
                f"{', '.join(sorted(available))} (keep more with input.keep_columns, or write {{{{ }}}} for a brace)"
            )

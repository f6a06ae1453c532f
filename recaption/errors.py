"""The one exception family: every error a user sees is a RecaptionError with a message they can act on; and the
kinds failed rows' errors are counted by (in done markers, the run's `_stats.json`, the report)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_ERROR_CLAUSE = re.compile(r"[:;,(\[]")
_ERROR_VARIABLE = re.compile(r"""^['"].*|.*[\d/\\.'"].*""")
_MODEL_ERROR = re.compile(r"^model (\S+)(?: prompt \S+)?: (.*)$", re.S)
MAX_KINDS = 50  # error kinds kept per count (a marker, a total); the rest are summed under OTHER_KINDS
OTHER_KINDS = "(other kinds)"

EXIT_ENGINE_DEAD = 75  # the status of a process ended for a dead engine (EX_TEMPFAIL: Ray replaces it, a retry works)


class RecaptionError(Exception):
    """Base of all recaption errors; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(RecaptionError):
    """A config key, value or override is wrong. The message names the key."""

    exit_code = 2


class InputError(RecaptionError):
    """An input path is missing, unreadable, empty or of an unknown format. The message names the path."""

    exit_code = 2


class EngineError(RecaptionError):
    """A captioning engine could not be built or failed as a whole."""


class EngineDeadError(EngineError):
    """The engine can serve no more requests (its process died, the GPU faulted): an infrastructure fault, never a
    failed row. The caption actor ends so Ray starts a new one, and the unit is retried."""


class OutputWriteError(RecaptionError):
    """The output directory cannot be written (full disk, no permission): no unit can be committed."""


class ImageError(RecaptionError):
    """One image could not be used; it becomes a `failed` row with this message as its `error`."""


class TrainingError(RecaptionError):
    """Training cannot go on as configured (a non-finite loss or gradient, data of which no image decodes); the
    message says what happened, what was kept and what to change."""


def error_kind(error: str) -> str:
    """An error's kind: its first clause with names and numbers taken out; engine errors keep their model's id.

    `truncated tar 00003.tar: …` → `truncated tar`; `model llava prompt short: RuntimeError: …` →
    `model llava: RuntimeError`; `duplicate key 'k' in x.tar: …` → `duplicate key … in`."""
    match = _MODEL_ERROR.match(error.strip())
    if match:
        return f"model {match[1]}: {error_kind(match[2])}"
    head = _ERROR_CLAUSE.split(error.strip(), maxsplit=1)[0].split()
    kept = ["…" if _ERROR_VARIABLE.match(w) else w for w in head[:8]]
    kept = [w for i, w in enumerate(kept) if w != "…" or i == 0 or kept[i - 1] != "…"]
    while kept and kept[-1] == "…":
        kept.pop()
    return " ".join(kept) or "other"


def error_counts(errors: Iterable[str | None], most: int = MAX_KINDS) -> dict[str, int]:
    """Failed rows by error kind, most frequent first (img2dataset's `status_dict` habit); an error that is None
    counts as `unknown`; beyond `most` kinds, the rarest are summed under `(other kinds)`."""
    counts = Counter("unknown" if e is None else error_kind(e) for e in errors)
    return merge_error_counts([counts], most)


def merge_error_counts(counts: Iterable[dict[str, int]], most: int = MAX_KINDS) -> dict[str, int]:
    """The sum of several error-kind counts (units' markers into a total), kept to `most` kinds."""
    total: Counter = Counter()
    for c in counts:
        total.update({str(k): int(v) for k, v in (c or {}).items()})
    other = total.pop(OTHER_KINDS, 0)
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:most])
    other += sum(v for _, v in ranked[most:])
    return {**kept, OTHER_KINDS: other} if other else kept

"""The `Captioner` protocol every engine implements; engines/registry.py builds one from a model config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from recaption.config import GenerationConfig


@dataclass
class Generation:
    """What an engine produced for one (image, prompt) request."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string), "length" (hit max_new_tokens), "error"
    error: str | None = None
    flags: list[str] = field(default_factory=list)


def check_extra_keys(model_id: str, what: str, extra: dict, known: set[str]) -> None:
    """A ConfigError naming the first key of `generation.extra` that is not a `what` argument (with the closest one)."""
    import difflib

    from recaption.errors import ConfigError

    for key in sorted(extra):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"model {model_id}: generation.extra.{key} is not a {what} argument{hint}")


class Captioner(Protocol):
    """Captions a batch of images, each with the prompt text (not yet chat-formatted) at the same index."""

    model_id: str

    def caption(
        self, images: list[Image.Image], prompts: list[str], generation: GenerationConfig | None = None
    ) -> list[Generation]:
        """Returns `generation.n` Generations per (image, prompt) pair, in request order, the n of a pair together.

        `generation` overrides the model's sampling settings for this call (used to regenerate degenerate output).
        A failure of one request is a Generation with `finish_reason="error"` and `error` set, not an exception.
        """
        ...

    def versions(self) -> dict[str, str]:
        """Engine and model versions recorded in the run metadata."""
        ...


# What a CUDA context says once it is unusable: every later call on it fails too (out-of-memory is not among them:
# it is recoverable, and the hf engine halves its batch).
_DEAD_DEVICE_TEXT = (
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "cudnn error",
    "device-side assert",
    "illegal memory access",
    "nccl error",
    "uncorrectable ecc",
    "unspecified launch failure",
    "cuda driver error",
)


def engine_dead(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the engine is gone rather than that one request failed: vLLM's
    EngineDeadError (matched by name: its module moved between releases), a dead CUDA context, our EngineDeadError."""
    from recaption.errors import EngineDeadError

    seen: set[int] = set()
    stack = [exc]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, EngineDeadError) or type(x).__name__ in ("EngineDeadError", "AcceleratorError"):
            return True
        text = str(x).lower()
        if "out of memory" not in text and any(t in text for t in _DEAD_DEVICE_TEXT):
            return True
        stack += [x.__cause__, x.__context__]
    return False

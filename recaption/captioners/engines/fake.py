"""A deterministic fake engine for data-plane tests: captions derived from a hash of the pixels and the prompt."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import TYPE_CHECKING

from PIL import Image

from recaption.captioners.engines.base import Generation
from recaption.config import GenerationConfig

if TYPE_CHECKING:
    from recaption.config import ModelConfig

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
_OBJECTS = ["cube", "sphere", "dog", "boat", "tree", "house", "bicycle", "lamp"]
_PLACES = ["on a table", "in a field", "by the sea", "in a city street", "in a quiet room", "under a cloudy sky"]


class FakeCaptioner:
    """Same image and prompt → same caption, always; 3 or 4 sentences so sub-caption splitting has work."""

    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self.options = model.fake
        self.generation = model.generation or GenerationConfig()

    def caption(
        self, images: list[Image.Image], prompts: list[str], generation: GenerationConfig | None = None
    ) -> list[Generation]:
        gen = generation or self.generation
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they pair up by index")
        widths = {im.width for im in images}
        if self.options.crash_on_width in widths:
            os.kill(os.getpid(), signal.SIGKILL)  # a segfaulting CUDA kernel, as far as Ray can tell
        if self.options.raise_on_width in widths:
            raise RuntimeError(f"fake engine fault on an image {self.options.raise_on_width} pixels wide")
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            if self.options.delay_s:
                time.sleep(self.options.delay_s)
            for sample in range(gen.n):
                if image.width == self.options.loop_on_width and gen.repetition_penalty <= 1.0:
                    text = "a cat on a mat " * 12  # a repetition loop, which a repetition penalty breaks
                else:
                    text = fake_caption(image, prompt if sample == 0 else f"{prompt}#{sample}")
                out.append(Generation(text=text.strip(), n_tokens=len(text.split()), finish_reason="stop"))
        return out

    def versions(self) -> dict[str, str]:
        return {"engine": "fake", "model": self.model_id}


def fake_caption(image: Image.Image, prompt: str) -> str:
    """The caption FakeCaptioner writes for one image and prompt."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    # A 16×16 nearest-neighbour sample of the pixels: near zero cost, so benchmarks measure the data plane.
    h.update(image.resize((16, 16), Image.Resampling.NEAREST).tobytes())
    h.update(prompt.encode())
    digest = h.digest()
    # No sentence ends inside the quoted prompt, so every caption has exactly 3 or 4 sentences.
    short_prompt = " ".join(prompt.translate(str.maketrans("", "", ".!?")).split())
    short_prompt = short_prompt if len(short_prompt) <= 40 else short_prompt[:38].rstrip() + "…"
    sentences = [
        f"A fake caption {digest.hex()[:6]} of a {image.width}x{image.height} image.",
        f"The prompt was '{short_prompt}'.",
        f"It shows {digest[0] % 5 + 1} {_COLOURS[digest[1] % len(_COLOURS)]} {_OBJECTS[digest[2] % len(_OBJECTS)]}s"
        f" {_PLACES[digest[3] % len(_PLACES)]}.",
    ]
    if digest[4] % 2:
        sentences.append(f"In the background there is a {_COLOURS[digest[5] % len(_COLOURS)]} wall.")
    return " ".join(sentences)

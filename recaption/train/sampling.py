"""Per image per step: a short text, one long caption from the pool, K sub-captions (DreamLIP), Holistic texts."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from recaption.train.config import SamplingConfig


@dataclass
class Texts:
    """The texts one image trains with at one step."""

    short: str
    long: str
    subs: list[str]  # exactly K
    holistic: list[str]  # one per image branch


def example_rng(seed: int, epoch: int, key: str) -> random.Random:
    """A generator that depends only on (seed, epoch, key): the same choices in any process, order or worker."""
    digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sub_caption_units(sub_captions: list[str], merge: int) -> list[str]:
    """The units K are drawn from: single sub-captions, or every run of `merge` consecutive ones joined."""
    if merge <= 1 or len(sub_captions) <= 1:
        return list(sub_captions)
    width = min(merge, len(sub_captions))
    return [" ".join(sub_captions[i : i + width]) for i in range(len(sub_captions) - width + 1)]


def draw(units: list[str], k: int, rng: random.Random) -> list[str]:
    """K units: without replacement while there are enough, then each unit once more at random until K."""
    if len(units) >= k:
        return rng.sample(units, k)
    return rng.sample(units, len(units)) + rng.choices(units, k=k - len(units))


class TextSampler:
    """Chooses an image's texts from its output row; deterministic given (seed, epoch, key)."""

    def __init__(self, cfg: SamplingConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.short_prompts = {s.split(":", 1)[1] for s in cfg.short if s.startswith("prompt:")}

    def usable(self, row: dict) -> list[dict]:
        """Captions that may be sampled: from an `ok` row, with text, without a skip flag, from a chosen model."""
        if row.get("status") != "ok":
            return []
        skip = set(self.cfg.skip_flags)
        return [
            c
            for c in row.get("captions") or []
            if (c.get("text") or "").strip()
            and not skip & set(c.get("flags") or [])
            and (self.cfg.models is None or c.get("model") in self.cfg.models)
        ]

    def long_pool(self, captions: list[dict]) -> list[dict]:
        if self.cfg.long_prompts is not None:
            return [c for c in captions if c.get("prompt") in self.cfg.long_prompts]
        pool = [c for c in captions if c.get("prompt") not in self.short_prompts]
        return pool or captions  # a run with only short prompts still trains on them

    def trainable(self, row: dict) -> bool:
        return bool(self.long_pool(self.usable(row)))

    def sample(self, row: dict, epoch: int) -> Texts | None:
        """The texts of `row` at `epoch`, or None when the row has no usable long caption."""
        captions = self.usable(row)
        pool = self.long_pool(captions)
        if not pool:
            return None
        rng = example_rng(self.seed, epoch, row["key"])
        long = rng.choice(pool)
        subs = _sub_captions(long)
        chosen_subs = draw(self.units(long, pool), self.cfg.num_sub_captions, rng)
        short = self._first(self.cfg.short, row, captions, long, rng) or subs[0]
        holistic = [self._first([s], row, captions, long, rng) or long["text"] for s in self.cfg.holistic]
        return Texts(short=short, long=long["text"].strip(), subs=chosen_subs, holistic=holistic)

    def units(self, long: dict, pool: list[dict]) -> list[str]:
        """What the K sub-captions are drawn from, per `sampling.sub_caption_pool`.

        `all` (default): the units of every caption in the row's long pool (all chosen models × long prompts), each
        caption split and merged on its own (a merged unit never joins two captions), in the row's stored order, a
        sentence that several captions share kept once. DreamLIP's released `training/data.py` (`split_caption` on
        newline, `</s>` and `.`) concatenates the sentences of all MLLM captions of an image (InstructBLIP,
        LLaVA-1.5, ShareGPT4V, short and long) and samples K of them. `chosen`: the units of the sampled long caption
        only (so sub-captions and the long text agree). With one long caption of distinct sentences both give the
        same draws.
        """
        if self.cfg.sub_caption_pool == "chosen":
            return sub_caption_units(_sub_captions(long), self.cfg.merge)
        units = [u for c in pool for u in sub_caption_units(_sub_captions(c), self.cfg.merge)]
        return list(dict.fromkeys(units))

    def _first(self, sources: list[str], row: dict, captions: list[dict], long: dict, rng: random.Random) -> str | None:
        for source in sources:
            if source == "alt_text":
                text = (row.get("alt_text") or "").strip()
            elif source == "long":
                text = long["text"].strip()
            else:
                prompt = source.split(":", 1)[1]
                matches = [c for c in captions if c.get("prompt") == prompt]
                text = rng.choice(matches)["text"].strip() if matches else ""
            if text:
                return text
        return None


def _sub_captions(caption: dict) -> list[str]:
    """A caption's stored sub-captions, or its whole text as the one sub-caption when none were stored."""
    return [s for s in caption.get("sub_captions") or [] if s.strip()] or [caption["text"].strip()]

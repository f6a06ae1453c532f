"""A tiny LLaVA trained to describe generated scenes: a captioner small enough to ship that really sees.

`recaption tiny-model --family llava --train-on-scenes OUT` trains a `transformers.LlavaForConditionalGeneration`
(CLIP vision tower + Llama LM, the real classes) to write `Scene.long_caption` for a scene of
`recaption.eval.synthetic` when asked the `detailed` prompt, formatted exactly as the engines format llava prompts.
The checkpoint is saved in the llava-hf hub layout `recaption.captioners.tiny` uses, so the hf and vLLM engines both load it.

Design: 96-pixel images cut into 32-pixel patches give a 3×3 patch grid aligned with the scene's 3×3 grid (9 image
tokens, one per cell); a byte-level BPE trained on the scene sentences and the prompts makes every scene word one
token; scenes are drawn on the fly from seeds below `HELD_OUT_START`, so seeds from it up are never trained on.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from recaption.captioners.tiny import (
    CORPUS,
    EOS_ID,
    IMAGE_ID,
    _lm_tokenizer,
    _rewrite_llava_keys_to_hub_layout,
    llava_model,
)
from recaption.eval import (
    BACKGROUNDS,
    COLOURS,
    MAX_OBJECTS,
    POSITION_ORDER,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    SceneObject,
    make_scene,
)

# Bump when anything below changes what a given seed and step count train.
RECIPE_VERSION = 1
META_FILE = "captioner.json"
PROMPT = "detailed"
IMAGE_SIZE = 96
PATCH_SIZE = 32  # 96 / 32 = 3: one patch per scene grid cell
GRID_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
WIDTH = 128
HEADS = 4  # head_dim 32: vLLM's attention rejects smaller heads
VISION_LAYERS = 3  # LLaVA reads the second-to-last layer, so 2 are used
TEXT_LAYERS = 3
VOCAB_SIZE = 1024
HELD_OUT_START = 10_000_000  # training draws scene seeds below this; evaluation uses seeds from here up
DEFAULT_STEPS = 1600
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 60
PROBE_WEIGHT = 1.0  # the auxiliary per-cell loss (`cell_probe`) beside the caption loss
MAX_NEW_TOKENS = 96  # the longest caption (6 objects) is about 75 tokens

_VISION = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": VISION_LAYERS,
    "num_attention_heads": HEADS,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
_TEXT = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": TEXT_LAYERS,
    "num_attention_heads": HEADS,
}


def scene_sentences() -> list[str]:
    """Every sentence a scene caption can contain: the backgrounds, then every possible object."""
    objects = [
        SceneObject(shape, colour, size, position, texture).sentence()
        for size in SIZES
        for texture in TEXTURES
        for colour in COLOURS
        for shape in SHAPES
        for position in POSITIONS
    ]
    return [f"The background is {b}." for b in BACKGROUNDS] + objects


def scene_corpus() -> list[str]:
    """What the captioner's tokenizer is trained on: the scene sentences, every built-in prompt in the llava chat
    format, and the random tiny models' corpus."""
    from recaption.captioners import builtin_prompts, format_prompt

    return scene_sentences() + [format_prompt("llava", p) for p in builtin_prompts().values()] + CORPUS


def scene_words() -> set[str]:
    """The words of the scene captions as they follow a space, and the full stop: each must be a single token."""
    return {" " + w for c in scene_sentences() for w in c.replace(".", "").split()} | {"."}


def untrained_captioner(seed: int = 0) -> tuple[Any, Any]:
    """The (model, processor) before training: random weights from `seed`, the scene tokenizer."""
    import torch

    torch.manual_seed(seed)
    tokenizer = _lm_tokenizer(image_token_attribute=True, corpus=scene_corpus(), vocab_size=VOCAB_SIZE)
    return llava_model(tokenizer, _VISION, _TEXT)


class SceneBatches:
    """Training batches: the engines' formatted prompt (via the processor, so image tokens expand as at inference)
    followed by the caption and EOS; labels only on the caption and EOS, right padding."""

    def __init__(self, processor: Any) -> None:
        from recaption.captioners import format_prompt, get_prompt

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_text = format_prompt("llava", get_prompt(PROMPT), processor)
        scene = make_scene(HELD_OUT_START - 1, size=IMAGE_SIZE, max_objects=MAX_OBJECTS)
        encoded = processor(images=[scene.image], text=[self.prompt_text], return_tensors="pt")
        self.prompt_ids: list[int] = encoded["input_ids"][0].tolist()
        if self.prompt_ids.count(IMAGE_ID) != GRID_TOKENS:
            raise RuntimeError(f"expected {GRID_TOKENS} image tokens in the prompt, got {self.prompt_ids}")
        # Generation continues right after "ASSISTANT:", so the caption's ids must be what the tokenizer gives the
        # whole text after that prefix; checked once here.
        whole = self.tokenizer(self.prompt_text + " " + scene.long_caption)["input_ids"]
        n_text = len(self.tokenizer(self.prompt_text)["input_ids"])
        if whole[n_text:] != self.caption_ids(scene.long_caption) or len(whole) < n_text:
            raise RuntimeError("the caption does not tokenize the same after the prompt as on its own")
        unsplit = [w for w in scene_words() if len(self.tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
        if unsplit:
            raise RuntimeError(f"scene words that are not one token: {sorted(unsplit)[:10]}")

    def caption_ids(self, caption: str) -> list[int]:
        return self.tokenizer(" " + caption, add_special_tokens=False)["input_ids"]

    def __call__(self, seeds: list[int]) -> dict[str, Any]:
        import torch

        scenes = [make_scene(s, size=IMAGE_SIZE, max_objects=MAX_OBJECTS) for s in seeds]
        pixels = self.processor.image_processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
        rows = [self.prompt_ids + self.caption_ids(s.long_caption) + [EOS_ID] for s in scenes]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        n_prompt = len(self.prompt_ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, n_prompt : len(row)] = ids[i, n_prompt : len(row)]
        cells = torch.tensor([cell_targets(s) for s in scenes], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels, "cells": cells}


# What each of the 9 image tokens is taught to show (class 0: no object in that cell), and the background.
CELL_ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "size": tuple(SIZES),
}


def cell_targets(scene: Any) -> list[list[int]]:
    """Per grid cell in reading order (the order of the image tokens): each attribute's class index + 1 (0: the
    cell is empty), then the background's index."""
    at = {POSITION_ORDER[o.position]: o for o in scene.objects}
    background = sorted(BACKGROUNDS).index(scene.background)
    rows = []
    for cell in range(GRID_TOKENS):
        obj = at.get(cell)
        values = [0 if obj is None else names.index(getattr(obj, a)) + 1 for a, names in CELL_ATTRIBUTES.items()]
        rows.append([*values, background])
    return rows


def cell_probe() -> Any:
    """Linear heads on the projected image tokens that classify each cell's object and the background: an auxiliary
    loss used only in training (not saved) that teaches the vision tower what to see long before the caption loss
    alone would; the LM then only has to learn to read the cells out in order."""
    import torch

    sizes = [len(v) + 1 for v in CELL_ATTRIBUTES.values()] + [len(BACKGROUNDS)]
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, n) for n in sizes)


def probe_loss(probe: Any, features: Any, cells: Any) -> Any:
    import torch.nn.functional as F

    return sum(F.cross_entropy(head(features).flatten(0, 1), cells[..., i].flatten()) for i, head in enumerate(probe))


def train_scene_captioner(
    out_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    eval_scenes: int = 64,
    threads: int = 2,
    progress: bool = True,
) -> Path:
    """Trains the scene captioner and saves it (hub layout, fp16 weights) with `captioner.json` into `out_dir`.

    The same seed, steps and `threads` give the same weights on one machine and torch build (the thread count
    changes the order of float sums). `eval_scenes` held-out scenes (seeds from
    `HELD_OUT_START`) are captioned through the hf engine afterwards and the scores recorded; 0 skips that."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # restored below: a caller's (or test's) torch keeps its own count
    try:
        return _train(out_dir, steps, seed, batch_size, eval_scenes, threads, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_dir, steps: int, seed: int, batch_size: int, eval_scenes: int, threads: int, progress: bool) -> Path:
    import torch

    from recaption.job import Progress

    model, processor = untrained_captioner(seed)
    batches = SceneBatches(processor)
    probe = cell_probe()
    seen: dict[str, Any] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: seen.update(features=out))
    model.train()
    params = [*model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(WARMUP_STEPS, max(1, steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.97 + 0.03

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(seed)
    start = time.monotonic()
    losses: list[float] = []
    probe_losses: list[float] = []
    with Progress.for_steps(steps, desc="scene-llava", enabled=progress) as bar:
        for _ in range(steps):
            batch = batches([rng.randrange(HELD_OUT_START) for _ in range(batch_size)])
            cells = batch.pop("cells")
            loss = model(**batch).loss
            aux = probe_loss(probe, seen.pop("features"), cells)
            optimizer.zero_grad(set_to_none=True)
            (loss + PROBE_WEIGHT * aux).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            probe_losses.append(aux.item())
            bar.advance(
                1,
                {"samples": batch_size},
                loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
                probe=round(sum(probe_losses[-20:]) / len(probe_losses[-20:]), 4),
            )
    hook.remove()
    train_s = time.monotonic() - start
    model.eval()
    out = save_captioner(model, processor, out_dir)
    meta: dict[str, Any] = {
        "family": "llava",
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "threads": threads,
        "prompt": PROMPT,
        "image_size": IMAGE_SIZE,
        "held_out_seeds_from": HELD_OUT_START,
        "train_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
    }
    if eval_scenes:
        meta["held_out"] = summary(evaluate_captioner(out, n_scenes=eval_scenes))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def save_captioner(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """Saves like `recaption.captioners.tiny.build_tiny` (hub layout) with the weights stored as float16 to halve the size;
    the config keeps float32, so both engines load it as float32 unless told otherwise."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _rewrite_llava_keys_to_hub_layout(out)
    file = out / "model.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k).half().contiguous() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    save_file(tensors, str(file), metadata=metadata)
    return out


def held_out_scenes(n: int, start: int = HELD_OUT_START) -> list[Any]:
    return [make_scene(start + i, size=IMAGE_SIZE, max_objects=MAX_OBJECTS) for i in range(n)]


def score_captions(texts: list[str], scenes: list[Any]) -> dict[str, Any]:
    """`recaption.demo.scenes` scores of `texts` against `scenes`, plus `exact_text_rate`: the share of captions
    equal, character for character, to the scene's canonical `long_caption`."""
    from recaption.demo.scenes import aggregate, score_caption

    result = aggregate([score_caption(t, s.truth()) for t, s in zip(texts, scenes, strict=True)])
    exact_text = sum(t == s.long_caption for t, s in zip(texts, scenes, strict=True))
    return {**result, "exact_text": exact_text, "exact_text_rate": exact_text / len(scenes) if scenes else 0.0}


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of `score_captions`, rounded, as `captioner.json` records them."""
    keys = ("captions", "truth_objects", "correct_objects", "object_accuracy", "recall", "precision")
    keys += ("background_accuracy", "exact_rate", "exact_text_rate")
    return {k: round(scores[k], 4) if isinstance(scores[k], float) else scores[k] for k in keys}


def caption_scenes(path: str | Path, scenes: list[Any], engine: str = "hf", batch_size: int = 16) -> list[str]:
    """Greedy `detailed` captions of `scenes` through one of our engines."""
    from recaption.captioners import get_prompt
    from recaption.config import GenerationConfig, ModelConfig

    config = ModelConfig(
        path=str(path),
        engine=engine,
        dtype="float32",
        device="cpu",
        batch_size=batch_size,
        num_cpus=0,
        generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),
    )
    if engine == "hf":
        from recaption.captioners import HFCaptioner

        captioner: Any = HFCaptioner(config)
    else:
        from recaption.captioners import VLLMCaptioner

        captioner = VLLMCaptioner(config)
    prompt = get_prompt(PROMPT)
    out = captioner.caption([s.image for s in scenes], [prompt] * len(scenes))
    errors = [g.error for g in out if g.error]
    if errors:
        raise RuntimeError(f"{len(errors)} captions failed, first: {errors[0]}")
    return [g.text for g in out]


def evaluate_captioner(path: str | Path, n_scenes: int = 64, start: int = HELD_OUT_START) -> dict[str, Any]:
    """Held-out scores of a saved captioner, captioned greedily through the hf engine."""
    scenes = held_out_scenes(n_scenes, start)
    return score_captions(caption_scenes(path, scenes), scenes)

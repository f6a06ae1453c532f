"""Text sampling: deterministic per (seed, epoch, key), respects K and merge, never samples unusable captions."""

from __future__ import annotations

import pytest

from recaption.errors import ConfigError
from recaption.train.config import SamplingConfig, load_train_config
from recaption.train.sampling import TextSampler, draw, example_rng, sub_caption_units


def caption(prompt: str, subs: list[str], model: str = "m1", flags: list[str] | None = None) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "text": " ".join(subs),
        "sub_captions": subs,
        "n_tokens": 10,
        "finish_reason": "stop",
        "flags": flags or [],
    }


def row(key: str = "k1", status: str = "ok", alt: str | None = "a photo", captions: list[dict] | None = None) -> dict:
    if captions is None:
        captions = [
            caption("detailed", [f"{key} sentence {i}." for i in range(6)]),
            caption("detailed", [f"{key} other {i}." for i in range(5)], model="m2"),
            caption("short", [f"{key} in short."]),
        ]
    return {"key": key, "status": status, "alt_text": alt, "captions": captions}


def sampler(**kw) -> TextSampler:
    return TextSampler(SamplingConfig(**kw), seed=7)


def test_same_seed_epoch_and_key_give_the_same_texts_and_epochs_differ():
    s = sampler(num_sub_captions=3)
    first = [s.sample(row(f"k{i}"), epoch=0) for i in range(20)]
    again = [sampler(num_sub_captions=3).sample(row(f"k{i}"), epoch=0) for i in reversed(range(20))][::-1]
    assert first == again  # order of visits does not matter, only (seed, epoch, key)
    later = [s.sample(row(f"k{i}"), epoch=1) for i in range(20)]
    assert first != later
    other_seed = [TextSampler(SamplingConfig(num_sub_captions=3), seed=8).sample(row(f"k{i}"), 0) for i in range(20)]
    assert other_seed != first


def test_k_sub_captions_come_from_the_chosen_long_caption_without_repeats_when_enough():
    s = sampler(num_sub_captions=4, sub_caption_pool="chosen")
    for i in range(30):
        texts = s.sample(row(f"k{i}"), epoch=i)
        assert len(texts.subs) == 4 and len(set(texts.subs)) == 4
        long_caption = next(c for c in row(f"k{i}")["captions"] if c["text"] == texts.long)
        assert long_caption["prompt"] == "detailed"  # prompt:short is a short source, so not in the long pool
        assert set(texts.subs) <= set(long_caption["sub_captions"])
        assert texts.short == "a photo"


def test_fewer_sub_captions_than_k_repeats_each_at_least_once():
    s = sampler(num_sub_captions=5)
    texts = s.sample(row(captions=[caption("detailed", ["One.", "Two."])]), epoch=0)
    assert len(texts.subs) == 5 and set(texts.subs) == {"One.", "Two."}


def test_merge_joins_consecutive_sub_captions():
    subs = ["A.", "B.", "C.", "D."]
    assert sub_caption_units(subs, 1) == subs
    assert sub_caption_units(subs, 2) == ["A. B.", "B. C.", "C. D."]
    assert sub_caption_units(subs, 9) == ["A. B. C. D."]
    s = sampler(num_sub_captions=2, merge=3)
    for epoch in range(10):
        texts = s.sample(row(captions=[caption("detailed", subs)]), epoch)
        assert all(t in ("A. B. C.", "B. C. D.") for t in texts.subs)


def test_never_samples_failed_rows_flagged_or_empty_captions():
    s = sampler(num_sub_captions=2)
    assert s.sample(row(status="failed"), 0) is None and not s.trainable(row(status="failed"))
    assert s.sample(row(status="skipped"), 0) is None
    bad = [
        caption("detailed", ["Loop loop loop."], flags=["repetition"]),
        caption("detailed", ["Err."], flags=["error"]),
        {**caption("detailed", []), "text": "  "},
        caption("detailed", ["Good one.", "Good two."]),
    ]
    for epoch in range(20):
        texts = s.sample(row(captions=bad, alt=None), epoch)
        assert texts.long == "Good one. Good two."
        assert set(texts.subs) <= {"Good one.", "Good two."}
        assert texts.short == "Good one."  # no alt text and no short prompt: the first sub-caption
    assert s.sample(row(captions=bad[:3]), 0) is None


def test_model_filter_long_prompt_choice_and_holistic_sources():
    s = sampler(models=["m2"], num_sub_captions=1)
    assert all(s.sample(row(f"k{i}"), 0).long.startswith(f"k{i} other") for i in range(10))
    s = sampler(long_prompts=["short"], short=["prompt:detailed"], num_sub_captions=1)
    assert s.sample(row(), 0).long == "k1 in short."
    s = sampler(holistic=["alt_text", "prompt:short", "long", "prompt:missing"], num_sub_captions=1)
    texts = s.sample(row(), 0)
    assert texts.holistic[:3] == ["a photo", "k1 in short.", texts.long] and texts.holistic[3] == texts.long


def test_draw_and_rng_are_stable():
    assert example_rng(1, 2, "x").random() == example_rng(1, 2, "x").random()
    assert draw(["a", "b", "c"], 2, example_rng(0, 0, "k")) == draw(["a", "b", "c"], 2, example_rng(0, 0, "k"))


def test_unknown_text_source_is_a_config_error():
    with pytest.raises(ConfigError, match="sampling.short.*unknown text source 'caption'"):
        load_train_config(
            None,
            data={
                "data": {"path": "x"},
                "run": {"output": "o", "steps": 1, "batch_size": 2},
                "sampling": {"short": ["caption"]},
            },
        )


def test_pool_all_mixes_the_sub_captions_of_every_usable_long_caption():
    chosen, pooled = sampler(num_sub_captions=4, sub_caption_pool="chosen"), sampler(num_sub_captions=4)
    assert pooled.cfg.sub_caption_pool == "all"  # the default: DreamLIP's training/data.py pools all captions
    mixed = 0
    for i in range(40):
        r = row(f"k{i}")
        first, second = (set(c["sub_captions"]) for c in r["captions"][:2])  # models m1 and m2, prompt detailed
        texts = pooled.sample(r, epoch=0)
        assert texts == pooled.sample(row(f"k{i}"), epoch=0)  # deterministic given (seed, epoch, key)
        assert len(texts.subs) == 4 and len(set(texts.subs)) == 4
        assert set(texts.subs) <= first | second  # never the short prompt's caption
        mixed += bool(set(texts.subs) & first and set(texts.subs) & second)
        # `chosen` keeps to the long caption it sampled.
        alone = chosen.sample(r, epoch=0)
        assert set(alone.subs) <= first or set(alone.subs) <= second
    assert mixed >= 20, mixed  # with 11 units from two captions most draws of 4 take from both


def test_pool_all_respects_k_merge_flags_and_failed_rows():
    s = sampler(num_sub_captions=7, merge=2, sub_caption_pool="all")
    captions = [
        caption("detailed", ["A.", "B.", "C."]),
        caption("detailed", ["X.", "Y."], model="m2"),
        caption("detailed", ["Loop.", "Loop."], model="m3", flags=["repetition"]),
    ]
    texts = s.sample(row(captions=captions), epoch=3)
    # Merged within each caption, never across two; K larger than the 3 units: each unit once, then repeats.
    assert len(texts.subs) == 7 and set(texts.subs) == {"A. B.", "B. C.", "X. Y."}
    assert s.sample(row(status="failed"), 0) is None and not s.trainable(row(status="failed"))
    # A sentence two models share is one unit, not two chances.
    shared = [caption("detailed", ["Same.", "One."]), caption("detailed", ["Same.", "Two."], model="m2")]
    assert sorted(sampler(num_sub_captions=3, sub_caption_pool="all").units(shared[0], shared)) == [
        "One.",
        "Same.",
        "Two.",
    ]
    with pytest.raises(ConfigError, match="sampling.sub_caption_pool"):
        load_train_config(
            None,
            data={
                "data": {"path": "x"},
                "run": {"output": "o", "steps": 1, "batch_size": 2},
                "sampling": {"sub_caption_pool": "every"},
            },
        )

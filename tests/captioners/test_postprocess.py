"""Caption cleaning: echo stripping, sub-caption splitting, repetition and truncation flags."""

from recaption.captioners.postprocess import clean_caption, repetition_ratio, split_sub_captions, strip_echo
from recaption.config import PostprocessConfig


def test_strip_echo_removes_prompt_and_role():
    assert strip_echo("Describe it. ASSISTANT:  A  cat.", "Describe it.") == "A cat."
    assert strip_echo("  A dog\nruns. ", "unrelated") == "A dog runs."


def test_split_keeps_abbreviations_and_decimals():
    text = "A red car, e.g. a sedan, is parked. It is 3.5 m long! Is it new? Yes."
    assert split_sub_captions(text, min_chars=5) == [
        "A red car, e.g. a sedan, is parked.",
        "It is 3.5 m long!",
        "Is it new? Yes.",
    ]
    assert split_sub_captions("") == []


def test_repetition_ratio():
    assert repetition_ratio("a cat sits on a mat near the door of a house") == 0.0
    loop = "the cat is on the mat " * 10
    assert repetition_ratio(loop) > 0.8


def test_clean_caption_flags():
    cfg = PostprocessConfig()
    raw = {
        "model": "m",
        "prompt": "p",
        "text": "the cat is on the mat " * 10,
        "n_tokens": 64,
        "finish_reason": "length",
        "flags": [],
    }
    out = clean_caption(raw, "p", cfg)
    assert set(out["flags"]) == {"truncated", "repetition"}
    assert out["sub_captions"] == [out["text"]]
    empty = clean_caption({**raw, "text": "", "finish_reason": "stop"}, "p", cfg)
    assert empty["flags"] == ["empty"] and empty["sub_captions"] == []
    err = clean_caption({**raw, "text": "", "finish_reason": "error", "flags": ["error"]}, "p", cfg)
    assert err["flags"] == ["error"]

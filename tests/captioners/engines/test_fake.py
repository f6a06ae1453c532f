"""The fake engine: deterministic, multi-sentence, paced by fake.delay_s, faults on chosen images."""

from __future__ import annotations

import re
import time

import pytest
from PIL import Image

from recaption.captioners.engines.fake import FakeCaptioner
from recaption.captioners.engines.registry import build_captioner
from recaption.config import ModelConfig


def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255)), Image.new("L", (7, 9))]


def test_deterministic_and_sensitive_to_pixels_and_prompt():
    captioner = FakeCaptioner(ModelConfig(path="fake-model", engine="fake"))
    prompts = ["Describe the image in detail. Mention everything."] * 2 + ["x"]
    first = captioner.caption(images(), prompts)
    again = FakeCaptioner(ModelConfig(path="fake-model", engine="fake")).caption(images(), prompts)
    assert [g.text for g in first] == [g.text for g in again]
    assert first[0].text != first[1].text  # same size and prompt, other pixels
    assert captioner.caption(images()[:1], ["other"])[0].text != first[0].text
    assert "64x48" in first[0].text and "7x9" in first[2].text


def test_three_or_four_sentences_and_word_counts():
    captioner = FakeCaptioner(ModelConfig(path="fake-model", engine="fake"))
    imgs = [Image.new("RGB", (10 + i, 10), (i * 20, 0, 0)) for i in range(12)]
    out = captioner.caption(imgs, ["Describe. The image! In detail?"] * len(imgs))
    counts = {len(re.findall(r"[.!?](?:\s|$)", g.text)) for g in out}
    assert counts <= {3, 4} and len(counts) == 2  # both lengths occur, and the prompt adds no sentence ends
    for g in out:
        assert g.n_tokens == len(g.text.split()) and g.finish_reason == "stop" and g.error is None


def test_delay_per_image():
    captioner = FakeCaptioner(ModelConfig(path="fake-model", engine="fake", fake={"delay_s": 0.05}))
    start = time.perf_counter()
    captioner.caption(images()[:2], ["a", "b"])
    assert time.perf_counter() - start >= 0.1


def test_built_through_the_factory_and_reports_versions():
    captioner = build_captioner(ModelConfig(path="some/fake", engine="fake", name="f1"))
    assert isinstance(captioner, FakeCaptioner) and captioner.model_id == "f1"
    assert captioner.versions()["engine"] == "fake"
    assert captioner.caption([], []) == []


def test_mismatched_lengths_are_a_programming_error():
    with pytest.raises(ValueError, match="pair up"):
        FakeCaptioner(ModelConfig(path="m", engine="fake")).caption(images(), ["one prompt"])

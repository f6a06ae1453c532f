"""Scene captions parsed back and scored: hand-written captions with known errors against a hand-written truth."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.demo.ablation import commit_captions
from recaption.demo.scenes import aggregate, format_scores, parse_caption, score_caption, score_output
from recaption.eval.synthetic import make_scene
from recaption.job.writer import OUTPUT_SCHEMA
from recaption.sources.tar import write_webdataset

TRUTH = {
    "background": "grey",
    "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "texture": "striped", "position": "top left"},
        {"shape": "square", "colour": "blue", "size": "small", "texture": "dotted", "position": "centre"},
        {"shape": "triangle", "colour": "green", "size": "small", "texture": "solid", "position": "bottom right"},
    ],
}
BACKGROUND = "The background is grey."
CIRCLE = "A large striped red circle is at the top left."
SQUARE = "A small dotted blue square is at the centre."
TRIANGLE = "A small solid green triangle is at the bottom right."
CANONICAL = " ".join([BACKGROUND, CIRCLE, SQUARE, TRIANGLE])
PERFECT_ACCURACY = {"shape": 1.0, "colour": 1.0, "size": 1.0, "texture": 1.0}


def test_parse_reads_every_attribute_in_order():
    assert parse_caption(CANONICAL) == {"background": "grey", "objects": TRUTH["objects"]}


def test_parse_is_tolerant_of_case_spacing_order_spelling_and_unknown_words():
    text = (
        "  a SMALL dotted blue   square sits happily at the Center!\n The background is gray.  "
        "A large striped red circle is at the TOP LEFT. Lovely. A small solid green triangle is at the bottom right."
    )
    parsed = parse_caption(text)
    assert parsed["background"] == "grey"
    assert parsed["objects"] == [TRUTH["objects"][i] for i in (1, 0, 2)]  # the caption's order, "Lovely" no object


def test_parse_keeps_only_stated_attributes_and_drops_a_truncated_last_sentence():
    parsed = parse_caption("The background is dark blue. A red circle is at the top. A small solid green tri")
    assert parsed == {"background": "dark blue", "objects": [{"shape": "circle", "colour": "red", "position": "top"}]}
    # A sentence is complete only with its full stop: without it, it may have been cut off by the token limit.
    assert parse_caption(f"{BACKGROUND} {CIRCLE[:-1]}")["objects"] == []
    assert parse_caption("") == {"background": None, "objects": []}


def test_canonical_caption_scores_perfect():
    s = score_caption(CANONICAL, TRUTH)
    assert (s["truth_objects"], s["described"], s["matched"], s["extra"], s["correct_objects"]) == (3, 3, 3, 0, 3)
    assert s["recall"] == s["precision"] == s["object_accuracy"] == 1.0
    assert s["accuracy"] == PERFECT_ACCURACY
    assert s["background_correct"] is True and s["exact"] is True


@pytest.mark.parametrize("seed", range(40))
def test_every_generated_scene_long_caption_scores_perfect(seed):
    scene = make_scene(seed, max_objects=6)
    s = score_caption(scene.long_caption, scene.truth())
    assert s["exact"] and s["recall"] == s["precision"] == s["object_accuracy"] == 1.0
    assert s["accuracy"] == PERFECT_ACCURACY


def test_wrong_colour_costs_that_attribute_and_that_object():
    s = score_caption(CANONICAL.replace("red circle", "orange circle"), TRUTH)
    assert s["recall"] == s["precision"] == 1.0
    assert s["attributes"] == {"shape": 3, "colour": 2, "size": 3, "texture": 3}
    assert s["accuracy"]["colour"] == pytest.approx(2 / 3) and s["accuracy"]["shape"] == 1.0
    assert s["correct_objects"] == 2 and s["object_accuracy"] == pytest.approx(2 / 3)
    assert s["exact"] is False and s["background_correct"] is True


def test_missing_object_costs_recall_not_precision():
    s = score_caption(" ".join([BACKGROUND, CIRCLE, TRIANGLE]), TRUTH)
    assert (s["described"], s["matched"], s["extra"]) == (2, 2, 0)
    assert s["recall"] == pytest.approx(2 / 3) and s["precision"] == 1.0
    assert s["accuracy"] == PERFECT_ACCURACY  # over the objects found
    assert s["object_accuracy"] == pytest.approx(2 / 3) and s["exact"] is False


def test_hallucinated_object_at_an_empty_position_costs_precision():
    s = score_caption(CANONICAL + " A small solid white circle is at the top right.", TRUTH)
    assert (s["described"], s["matched"], s["hallucinated"], s["unplaced"], s["extra"]) == (4, 3, 1, 0, 1)
    assert s["recall"] == 1.0 and s["precision"] == 0.75 and s["object_accuracy"] == 1.0
    assert s["exact"] is False


def test_second_description_of_a_position_is_a_hallucination_and_the_first_one_counts():
    s = score_caption(
        " ".join([BACKGROUND, CIRCLE, SQUARE, "A large solid red triangle is at the centre.", TRIANGLE]), TRUTH
    )
    assert (s["described"], s["matched"], s["hallucinated"]) == (4, 3, 1)
    assert s["correct_objects"] == 3 and s["precision"] == 0.75 and s["exact"] is False


def test_wrong_position_is_a_miss_and_a_hallucination():
    s = score_caption(CANONICAL.replace("at the centre", "at the left"), TRUTH)
    assert (s["described"], s["matched"], s["hallucinated"]) == (3, 2, 1)
    assert s["recall"] == pytest.approx(2 / 3) and s["precision"] == pytest.approx(2 / 3)
    assert s["object_accuracy"] == pytest.approx(2 / 3) and s["accuracy"] == PERFECT_ACCURACY


def test_truncated_caption_scores_the_sentences_it_finished():
    s = score_caption(CANONICAL[: CANONICAL.index("triangle") + 3], TRUTH)
    assert (s["described"], s["matched"], s["correct_objects"]) == (2, 2, 2)
    assert s["recall"] == pytest.approx(2 / 3) and s["precision"] == 1.0 and s["exact"] is False


def test_missing_attributes_count_as_wrong_for_that_attribute():
    s = score_caption(" ".join([BACKGROUND, "A red circle is at the top left.", SQUARE, TRIANGLE]), TRUTH)
    assert s["matched"] == 3 and s["attributes"] == {"shape": 3, "colour": 3, "size": 2, "texture": 2}
    assert s["correct_objects"] == 2 and s["exact"] is False


def test_object_without_position_is_unplaced_and_extra():
    s = score_caption(CANONICAL + " A small dotted blue square.", TRUTH)
    assert (s["described"], s["matched"], s["hallucinated"], s["unplaced"], s["extra"]) == (4, 3, 0, 1, 1)
    assert s["precision"] == 0.75 and s["exact"] is False


def test_wrong_or_missing_background_and_empty_caption():
    wrong = score_caption(CANONICAL.replace("is grey", "is dark blue"), TRUTH)
    assert wrong["background_correct"] is False and wrong["exact"] is False and wrong["object_accuracy"] == 1.0
    assert score_caption(" ".join([CIRCLE, SQUARE, TRIANGLE]), TRUTH)["background_correct"] is False
    empty = score_caption("", TRUTH)
    assert (empty["described"], empty["matched"], empty["recall"], empty["precision"]) == (0, 0, 0.0, 0.0)
    assert empty["accuracy"] == {"shape": 0.0, "colour": 0.0, "size": 0.0, "texture": 0.0}
    assert empty["background_correct"] is False and empty["exact"] is False


def test_aggregate_micro_averages_counts_over_captions():
    one_object = {"background": "beige", "objects": [TRUTH["objects"][0]]}
    scores = [
        score_caption(CANONICAL, TRUTH),  # 3 of 3, exact
        score_caption(CANONICAL.replace("red circle", "orange circle"), TRUTH),  # colour wrong once
        score_caption("The background is beige. A large striped red circle is at the top right.", one_object),
    ]
    agg = aggregate(scores)
    assert agg["captions"] == 3 and agg["truth_objects"] == 7 and agg["described"] == 7
    assert agg["matched"] == 6 and agg["extra"] == 1 and agg["hallucinated"] == 1
    assert agg["recall"] == pytest.approx(6 / 7) and agg["precision"] == pytest.approx(6 / 7)
    assert agg["accuracy"]["colour"] == pytest.approx(5 / 6) and agg["accuracy"]["shape"] == 1.0
    assert agg["correct_objects"] == 5 and agg["object_accuracy"] == pytest.approx(5 / 7)
    assert agg["background_accuracy"] == 1.0 and agg["exact"] == 1 and agg["exact_rate"] == pytest.approx(1 / 3)
    assert agg["extra_per_caption"] == pytest.approx(1 / 3)
    assert aggregate([])["captions"] == 0 and aggregate([])["exact_rate"] == 0.0


def scene_input(tmp_path, n: int):
    """n generated scenes (up to 6 objects) as webdataset shards; returns (input dir, {key: scene})."""
    scenes = {f"{i:09d}": make_scene(i, max_objects=6) for i in range(n)}
    samples = [{"key": k, "jpg": s.jpeg(), "caption": s.short_caption} for k, s in scenes.items()]
    write_webdataset(str(tmp_path / "input"), samples, shard_size=4)
    return tmp_path / "input", scenes


def test_score_output_of_a_perfect_pipeline_output_is_perfect(tmp_path):
    input_dir, scenes = scene_input(tmp_path, 10)
    commit_captions(input_dir, tmp_path / "output", {k: s.long_caption for k, s in scenes.items()})
    result = score_output(str(tmp_path / "output"), {k: s.truth() for k, s in scenes.items()})
    assert result["captions"] == 10 and result["missing"] == result["failed"] == result["truncated"] == 0
    assert result["truth_objects"] == sum(len(s.objects) for s in scenes.values())
    assert result["recall"] == result["precision"] == result["object_accuracy"] == result["exact_rate"] == 1.0
    assert result["accuracy"] == PERFECT_ACCURACY and result["models"] == ["ground-truth"]
    assert "captions exactly right     100.0%  10 of 10" in format_scores(result)
    # The same output, read for a model or prompt it does not have: every caption is missing, nothing is right.
    none = score_output(str(tmp_path / "output"), {k: s.truth() for k, s in scenes.items()}, model="scene-llava")
    assert none["missing"] == 10 and none["recall"] == 0.0 and none["exact_rate"] == 0.0 and none["models"] == []
    assert (
        score_output(str(tmp_path / "output"), {k: s.truth() for k, s in scenes.items()}, prompt="short")["missing"]
        == 10
    )


def caption(model: str, prompt: str, text: str, finish: str = "stop") -> dict:
    return {
        "model": model, "prompt": prompt, "text": text, "sub_captions": [], "n_tokens": len(text.split()),
        "finish_reason": finish, "flags": [],
    }  # fmt: skip


def test_score_output_counts_failed_rows_missing_rows_and_other_prompts_as_misses(tmp_path):
    truths = {"a": TRUTH, "b": TRUTH, "c": TRUTH, "d": TRUTH, "e": TRUTH}
    rows = [
        {
            "key": "a",
            "status": "ok",
            "captions": [caption("m", "short", "a red circle"), caption("m", "detailed", CANONICAL)],
        },
        {"key": "b", "status": "ok", "captions": [caption("m", "detailed", CANONICAL[:-30], finish="length")]},
        {"key": "c", "status": "failed", "error": "bad image", "captions": []},
        {"key": "d", "status": "ok", "captions": [caption("m", "short", "a red circle")]},
        {"key": "x", "status": "ok", "captions": [caption("m", "detailed", CANONICAL)]},  # no truth: not scored
    ]  # "e" has no row at all
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    pq.write_table(table, tmp_path / "part-0.parquet")
    result = score_output(str(tmp_path), truths)
    assert result["captions"] == 5 and result["missing"] == 3 and result["failed"] == 1 and result["truncated"] == 1
    assert result["unscored_rows"] == 1 and result["models"] == ["m"]
    # a: 3 of 3 right; b: truncated after 2 objects, both right; c, d, e: nothing.
    assert result["truth_objects"] == 15 and result["matched"] == 5 and result["correct_objects"] == 5
    assert result["recall"] == pytest.approx(5 / 15) and result["precision"] == 1.0
    assert result["exact"] == 1 and result["exact_rate"] == pytest.approx(1 / 5)
    assert result["background_accuracy"] == pytest.approx(2 / 5)
    assert "5 (3 without a caption, scored as empty)" in format_scores(result)


def test_score_output_of_a_directory_that_is_no_output_says_so(tmp_path):
    from recaption.errors import InputError

    with pytest.raises(InputError, match="no part files"):
        score_output(str(tmp_path), {"a": TRUTH})


# Scenes with a written word (`make_scene(..., text=True)`).
WORD = 'The word "owl" is written at the bottom left.'
TEXT_TRUTH = {**TRUTH, "text": {"word": "owl", "position": "bottom left"}}
# sha256 of the pixels, captions and truth of four default scenes, computed from the scene code before text existed:
# the trained scene captioner and the demo depend on the default scene world staying byte-identical.
DEFAULT_SCENES_SHA256 = "260777e22aa7ea45c844857c6f0591315744b88dd609e0c6f90ef0ac85f159db"


def test_default_scenes_are_unchanged_by_the_text_option():
    import hashlib
    import json

    h = hashlib.sha256()
    for seed, size, max_objects in [(0, 64, 4), (1, 96, 6), (7, 64, 4), (1_000_000, 64, 4)]:
        scene = make_scene(seed, size=size, max_objects=max_objects)
        assert scene.text is None and "text" not in scene.truth() and "word" not in scene.long_caption
        h.update(scene.image.tobytes())
        h.update(scene.long_caption.encode())
        h.update(scene.short_caption.encode())
        h.update(json.dumps(scene.truth(), sort_keys=True).encode())
    assert h.hexdigest() == DEFAULT_SCENES_SHA256


@pytest.mark.parametrize("seed", [3, 11, 1_000_002])
def test_text_scene_is_deterministic_and_differs_from_its_plain_scene_only_in_the_word_box(seed):
    import numpy as np

    from recaption.eval.synthetic import WORDS, text_box

    plain, written = make_scene(seed, size=64, max_objects=6), make_scene(seed, size=64, max_objects=6, text=True)
    again = make_scene(seed, size=64, max_objects=6, text=True)
    assert written.image.tobytes() == again.image.tobytes() and written.long_caption == again.long_caption
    assert written.objects == plain.objects and written.background == plain.background
    assert written.text.word in WORDS and written.text.position not in {o.position for o in plain.objects}
    diff = (np.asarray(plain.image, dtype=int) != np.asarray(written.image, dtype=int)).any(axis=-1)
    left, top, right, bottom = text_box(written.text, 64)
    inside = np.zeros_like(diff)
    inside[top:bottom, left:right] = True
    assert diff[inside].sum() >= 15  # the word's strokes are drawn
    assert not diff[~inside].any()  # and nothing else changed
    assert written.long_caption == f'{plain.long_caption} The word "{written.text.word}" is written at the ' + (
        f"{written.text.position}."
    )
    assert written.truth() == {**plain.truth(), "text": written.text.to_dict()}
    assert written.short_caption == plain.short_caption


def test_text_scene_needs_room_for_the_word():
    with pytest.raises(ValueError, match="size >= 56"):
        make_scene(0, size=48, text=True)


@pytest.mark.parametrize("seed", range(20))
def test_every_generated_text_scene_long_caption_scores_perfect(seed):
    scene = make_scene(seed, max_objects=6, text=True)
    s = score_caption(scene.long_caption, scene.truth())
    assert s["exact"] and s["object_accuracy"] == 1.0 and s["text_accuracy"] == 1.0
    assert (s["text_truth"], s["text_described"], s["text_correct"]) == (1, 1, 1)


def test_parse_reads_the_written_word_and_scoring_checks_word_and_place():
    assert parse_caption(f"{CANONICAL} {WORD}") == {
        "background": "grey",
        "objects": TRUTH["objects"],
        "text": {"word": "owl", "position": "bottom left"},
    }
    assert parse_caption("It says the word cat at the Top.")["text"] == {"word": "cat", "position": "top"}
    perfect = score_caption(f"{CANONICAL} {WORD}", TEXT_TRUTH)
    assert perfect["exact"] and perfect["text_accuracy"] == 1.0 and perfect["extra"] == 0
    wrong_place = score_caption(f"{CANONICAL} {WORD.replace('bottom left', 'top')}", TEXT_TRUTH)
    assert (wrong_place["text_correct"], wrong_place["text_word_correct"]) == (0, 1) and not wrong_place["exact"]
    assert wrong_place["object_accuracy"] == 1.0  # the text sentence is no object, wherever it says the word is
    wrong_word = score_caption(f"{CANONICAL} {WORD.replace('owl', 'cat')}", TEXT_TRUTH)
    assert (wrong_word["text_correct"], wrong_word["text_word_correct"]) == (0, 0) and not wrong_word["exact"]
    unsaid = score_caption(CANONICAL, TEXT_TRUTH)
    assert (unsaid["text_described"], unsaid["text_accuracy"], unsaid["exact"]) == (0, 0.0, False)
    # Text stated where the truth has none: not exact; a caption and truth without text score as before.
    invented = score_caption(f"{CANONICAL} {WORD}", TRUTH)
    assert invented["text_truth"] == 0 and invented["text_described"] == 1 and not invented["exact"]
    assert "text_truth" not in score_caption(CANONICAL, TRUTH) and "text" not in parse_caption(CANONICAL)


def test_aggregate_and_table_count_text_only_where_some_caption_has_it():
    scores = [
        score_caption(f"{CANONICAL} {WORD}", TEXT_TRUTH),
        score_caption(CANONICAL, TEXT_TRUTH),
        score_caption(CANONICAL, TRUTH),  # no text on either side: counts 0 for text
    ]
    agg = aggregate(scores)
    assert (agg["text_truth"], agg["text_described"], agg["text_correct"]) == (2, 1, 1)
    assert agg["text_accuracy"] == 0.5 and agg["exact"] == 2
    assert "text right                  50.0%  1 of 2" in format_scores(agg)
    assert "text_accuracy" not in aggregate(scores[2:]) and "text right" not in format_scores(aggregate(scores[2:]))


def test_score_output_of_text_scenes_through_the_pipeline_path(tmp_path):
    scenes = {f"{i:09d}": make_scene(i, size=64, text=True) for i in range(6)}
    samples = [{"key": k, "jpg": s.jpeg(), "caption": s.short_caption} for k, s in scenes.items()]
    write_webdataset(str(tmp_path / "input"), samples, shard_size=4)
    commit_captions(tmp_path / "input", tmp_path / "output", {k: s.long_caption for k, s in scenes.items()})
    result = score_output(str(tmp_path / "output"), {k: s.truth() for k, s in scenes.items()})
    assert result["exact_rate"] == result["text_accuracy"] == 1.0 and result["text_truth"] == 6

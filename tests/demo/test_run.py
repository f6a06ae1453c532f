"""The demo's pieces without Ray: truth in the shards and back, the captioner it picks, the accuracy it prints."""

from __future__ import annotations

import json

import pytest

from recaption.catalog import REGISTRY
from recaption.demo import (
    DEMO_SEED,
    FALLBACK_MODEL,
    demo_config,
    format_retrieval,
    prepare_demo_dir,
    random_weights,
    read_truths,
    report_accuracy,
    verdict,
    write_demo_shards,
)
from recaption.demo.ablation import commit_captions
from recaption.demo.scenes import aggregate, score_caption
from recaption.eval.synthetic import MAX_OBJECTS, make_scene


def test_demo_shards_carry_each_scene_truth_and_read_back(tmp_path):
    keys = write_demo_shards(tmp_path / "input", 20)
    truths = read_truths(tmp_path / "input")
    assert list(truths) == keys == [f"{i:09d}" for i in range(20)]
    assert truths == {
        k: make_scene(DEMO_SEED + i, size=96, max_objects=MAX_OBJECTS).truth() for i, k in enumerate(keys)
    }
    assert max(len(t["objects"]) for t in truths.values()) == MAX_OBJECTS  # the 6-object world, not the 4 of before


def test_report_accuracy_of_a_perfect_output_is_perfect_and_says_so(tmp_path, capsys):
    keys = write_demo_shards(tmp_path / "input", 12)
    truths = read_truths(tmp_path / "input")
    captions = {k: make_scene(DEMO_SEED + i, size=96, max_objects=MAX_OBJECTS).long_caption for i, k in enumerate(keys)}
    commit_captions(tmp_path / "input", tmp_path / "output", captions)
    scores = report_accuracy(tmp_path, truths, "ground-truth", "detailed", random=False, max_new_tokens=96)
    printed = capsys.readouterr().out
    assert scores["recall"] == scores["precision"] == scores["object_accuracy"] == scores["exact_rate"] == 1.0
    assert json.loads((tmp_path / "accuracy.json").read_text()) == json.loads(json.dumps(scores))
    n_objects = sum(len(t["objects"]) for t in truths.values())
    assert f"objects found (recall)     100.0%  {n_objects} of {n_objects}" in printed
    assert "captions exactly right     100.0%  12 of 12" in printed
    assert "ground-truth describes these scenes: 100% of its captions are exactly right." in printed
    assert "RANDOM" not in printed


def test_report_accuracy_of_half_wrong_captions(tmp_path, capsys):
    """Every other caption loses its last object: recall, exact rate and the verdict follow."""
    keys = write_demo_shards(tmp_path / "input", 8)
    truths = read_truths(tmp_path / "input")
    scenes = [make_scene(DEMO_SEED + i, size=96, max_objects=MAX_OBJECTS) for i in range(8)]
    captions = {
        k: s.long_caption if i % 2 else s.long_caption.rsplit(" A ", 1)[0]
        for i, (k, s) in enumerate(zip(keys, scenes, strict=True))
    }
    commit_captions(tmp_path / "input", tmp_path / "output", captions)
    scores = report_accuracy(tmp_path, truths, "ground-truth", "detailed", random=False, max_new_tokens=96)
    n_objects = sum(len(s.objects) for s in scenes)
    assert scores["truth_objects"] == n_objects and scores["matched"] == n_objects - 4
    assert scores["precision"] == 1.0 and scores["exact"] == 4 and scores["exact_rate"] == 0.5
    printed = capsys.readouterr().out
    assert "describes these scenes in part: it finds" in printed


def test_verdict_of_a_partly_right_captioner_names_its_weakest_attribute():
    scenes = [make_scene(DEMO_SEED + i, size=96, max_objects=MAX_OBJECTS) for i in range(4)]
    wrong = []
    for scene in scenes:  # the first object of each scene in another colour
        obj = scene.truth()["objects"][0]
        other = "red" if obj["colour"] != "red" else "blue"
        wrong.append(scene.long_caption.replace(f"{obj['colour']} {obj['shape']}", f"{other} {obj['shape']}", 1))
    scores = aggregate([score_caption(t, s.truth()) for t, s in zip(wrong, scenes, strict=True)])
    n = scores["truth_objects"]
    assert scores["attributes"]["colour"] == n - 4 and scores["exact"] == 0
    said = verdict({**scores, "truncated": 0}, "scene-llava", random=False, max_new_tokens=96)
    assert said.startswith("scene-llava describes these scenes in part: it finds 100% of the objects")
    assert f"Its weakest attribute is colour: right for {(n - 4) / n:.0%} of the objects found." in said


def test_verdict_for_random_weights_for_nothing_found_and_for_truncated_captions():
    empty = {**score_caption("", make_scene(0).truth()), "exact_rate": 0.0, "truncated": 3}
    assert "RANDOM weights" in verdict(empty, "tiny-llava", random=True, max_new_tokens=96)
    assert "max_new_tokens" not in verdict(empty, "tiny-llava", random=True, max_new_tokens=96)
    said = verdict(empty, "scene-llava", random=False, max_new_tokens=96)
    assert "say almost nothing true about these scenes (0% of objects found)" in said
    assert "3 caption(s) hit max_new_tokens (96)" in said
    assert random_weights("tiny-llava") and not random_weights("scene-llava") and not random_weights("llava-1.5-7b")


def test_demo_falls_back_to_tiny_llava_only_when_its_captioner_is_missing(tmp_path, monkeypatch):
    # scene-llava as a registry entry whose checkpoint is not there (not built, not shipped), then one that is.
    monkeypatch.setitem(
        REGISTRY, "scene-llava", {"repo": str(tmp_path / "scene-llava"), "family": "llava", "engine": "hf"}
    )
    cfg, note = demo_config(tmp_path / "in", tmp_path / "out", [])
    assert cfg.models[0].path == FALLBACK_MODEL and cfg.models[0].id == "tiny-llava"
    assert note.startswith("scene-llava is not available here (model path not found: scene-llava)")
    assert note.endswith("the demo captions with tiny-llava instead")
    assert cfg.models[0].prompts == ["detailed"] and cfg.generation.max_new_tokens >= 80
    # A model the user names is run as named, with no fallback.
    cfg, note = demo_config(tmp_path / "in", tmp_path / "out", ["models.0.path=tiny-llava"])
    assert cfg.models[0].path == "tiny-llava" and note is None
    # Once scene-llava resolves, the demo runs it.
    (tmp_path / "scene-llava").mkdir()
    (tmp_path / "scene-llava" / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    cfg, note = demo_config(tmp_path / "in", tmp_path / "out", [])
    assert cfg.models[0].path == "scene-llava" and cfg.models[0].id == "scene-llava" and note is None
    assert str(cfg.input.path) == str(tmp_path / "in") and str(cfg.output.path) == str(tmp_path / "out")


def test_prepare_demo_dir_resumes_and_starts_over_when_size_or_config_change(tmp_path):
    input_dir, output_dir, start_over = prepare_demo_dir(tmp_path, 4, "hash-a")
    assert len(read_truths(input_dir)) == 4 and start_over
    output_dir.mkdir()
    (output_dir / "part-x.parquet").write_text("kept on a rerun")
    (input_dir / "notes.txt").write_text("the user's")
    assert prepare_demo_dir(tmp_path, 4, "hash-a")[2] is False
    assert (output_dir / "part-x.parquet").is_file()
    # Another model or generation setting: the output starts over, cleared by the run (only files runs wrote).
    assert prepare_demo_dir(tmp_path, 4, "hash-b")[2] is True
    assert (output_dir / "part-x.parquet").is_file()
    prepare_demo_dir(tmp_path, 6, "hash-b")  # another size: new scenes; only the demo's own shards are replaced
    assert len(read_truths(input_dir)) == 6 and (input_dir / "notes.txt").read_text() == "the user's"


def test_the_demo_refuses_a_directory_that_is_not_its_own(tmp_path, capsys):
    from recaption.cli import main

    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "photo.jpg").write_bytes(b"mine")
    assert main(["demo", "--out", str(tmp_path), "--images", "2"]) == 2
    assert "is not a demo directory" in capsys.readouterr().err
    assert (tmp_path / "input" / "photo.jpg").read_bytes() == b"mine" and not (tmp_path / "demo.json").exists()


@pytest.mark.parametrize("old_stamp", [{"images": 4}, {}])
def test_prepare_demo_dir_replaces_shards_of_an_older_demo_without_truths(tmp_path, old_stamp):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "00000.tar").write_bytes(b"")
    (tmp_path / "demo.json").write_text(json.dumps(old_stamp))
    input_dir, _, _ = prepare_demo_dir(tmp_path, 4, "h")
    assert len(read_truths(input_dir)) == 4


def retrieval_results(value: float) -> dict[str, float]:
    cells = {
        f"{s}/{c}": value for s in ("long/cls", "long/mean", "short/cls") for c in ("i2t@1", "i2t@5", "t2i@1", "t2i@5")
    }
    return {**cells, "final_loss": 3.5, "seconds": 40.0, "eval_scenes_long": 48, "eval_scenes_short": 20}


def test_format_retrieval_shows_chance_and_says_when_the_model_is_near_it():
    near = format_retrieval(retrieval_results(10.4))
    assert "long captions (CLS)         48    10.4    10.4    10.4    10.4   2.1 / 10.4" in near.splitlines()
    assert "short captions (CLS)        20    10.4    10.4    10.4    10.4   5.0 / 25.0" in near.splitlines()
    assert "within twice chance" in near
    assert "within twice chance" not in format_retrieval(retrieval_results(60.0))

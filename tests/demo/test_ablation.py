"""`recaption eval synthetic` end to end at a tiny size (data through the writer, 3 paired arms, table/JSON/PNG), its
statistics on a hand-made case, and the arms' configs."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.demo.ablation import (
    ARMS,
    MARKER,
    METRICS,
    PATCH_SIZE,
    SCENE_SIZE,
    arm_config,
    class_names,
    commit_captions,
    eval_sets,
    format_ablation_table,
    paired,
    summarise,
    write_train_split,
)
from recaption.eval.synthetic import make_scene
from recaption.train.config import load_train_config
from recaption.train.data import output_parts, source_input


def test_train_split_is_a_pipeline_output_with_ground_truth_captions(tmp_path):
    out = write_train_split(tmp_path, 10, shard_size=4)
    parts = output_parts(str(out))
    assert len(parts) == 3 and source_input(parts, None).path == str(tmp_path / "input")
    rows = {r["key"]: r for p in parts for r in pq.read_table(p).to_pylist()}
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows.values())
    scene = make_scene(0, size=SCENE_SIZE)
    row = rows["000000000"]
    assert row["alt_text"] == scene.short_caption and row["captions"][0]["text"] == scene.long_caption
    assert (row["width"], row["height"]) == (SCENE_SIZE, SCENE_SIZE)
    # No written word: at 48 px it would be unreadable while its sentence sat in the caption.
    assert not any("written" in r["captions"][0]["text"] for r in rows.values())


def test_one_patch_per_grid_cell_and_arms_differ_only_in_the_text_side(tmp_path):
    assert SCENE_SIZE // PATCH_SIZE == 3  # the scenes' 3×3 grid
    cfgs = {arm: load_train_config(None, data=arm_config(arm, tmp_path, tmp_path / arm, 10, 0, 8)) for arm in ARMS}
    assert [cfgs[a].model.text.num_corners for a in ("none", "corners", "control")] == [0, 2, 0]
    for cfg in cfgs.values():
        assert (cfg.model.image.image_size, cfg.model.image.patch_size) == (SCENE_SIZE, PATCH_SIZE)
        assert cfg.loss.slot_weighting == "per_slot" and not cfg.loss.multi_positive
    # Per-slot weights: corners gives short 1/4 and long 3/4 (3 slots of 1/4); the control matches it at K=0.
    c = cfgs["control"].loss
    assert math.isclose(c.short / 2, 1 / 4) and math.isclose(c.long / 2, 3 / 4)
    plain = {k: v for k, v in cfgs["none"].model_dump().items() if k not in ("loss", "model", "run")}
    assert all(
        {k: v for k, v in cfgs[a].model_dump().items() if k not in ("loss", "model", "run")} == plain for a in ARMS
    )


def test_eval_sets_hold_held_out_scenes_and_every_short_caption_class():
    long_set, short_set = eval_sets(12, 30)
    assert len(long_set.images) == 12 and len(short_set.images) == 30
    assert len(class_names()) == 24 and short_set.class_names == class_names()
    scene = make_scene(1_000_000 + 3, size=SCENE_SIZE)
    assert long_set.texts[3] == scene.long_caption
    assert f"a {short_set.class_names[short_set.labels[3]]}" == scene.short_caption


def test_statistics_on_a_hand_made_case():
    def run(value: float) -> dict[str, float]:
        return {**{k: value for k in METRICS}, "final_loss": 1.0, "seconds": 3.0}

    corners = [run(50.0), run(54.0), run(52.0)]
    none = [run(49.0), run(55.0), run(50.0)]
    summary = summarise(corners)
    # mean 52, sample s.d. 2, s.e. 2/√3
    assert summary["short/top1"] == {"mean": 52.0, "se": round(2 / math.sqrt(3), 3), "n": 3}
    assert "seconds" not in summary and summary["final_loss"]["se"] == 0.0
    diff = paired(corners, none)["short/top1"]
    assert diff["per_seed"] == [1.0, -1.0, 2.0] and diff["signs"] == {"+": 2, "-": 1, "0": 0}
    assert diff["mean"] == round(2 / 3, 3) and diff["se"] == round(math.sqrt(7 / 3) / math.sqrt(3), 3)
    assert summarise([run(5.0)])["short/top1"]["se"] is None  # one seed has no standard error
    with pytest.raises(ValueError, match="same seeds"):
        paired(corners, none[:2])
    payload = {
        "setup": {"repeats": 3, "train_scenes": 9, "scene_size": 48, "patch_size": 16, "steps": 1, "batch_size": 2,
                  "eval_scenes_long": 5, "eval_scenes_short": 6, "short_classes": 24},
        "arms": {"corners": {"label": "C", "summary": summary}, "none": {"label": "N", "summary": summarise(none)}},
        "paired": {"corners-none": paired(corners, none)},
    }  # fmt: skip
    table = format_ablation_table(payload)
    assert "52.00 ± 1.16" in table and "0.67 ± 0.88 2/1/0" in table


def test_cli_runs_the_ablation_end_to_end_and_a_rerun_replaces_its_own_output(tmp_path, capsys):
    args = ["eval", "synthetic", "--steps", "2", "--eval-long", "10", "--eval-short", "12", "--batch-size", "8"]
    args += ["--out", str(tmp_path)]
    assert main([*args, "--size", "48", "--repeats", "2", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "ablation.json").read_text())
    assert set(payload["arms"]) == set(ARMS) and set(payload["paired"]) == {"corners-none", "corners-control"}
    for arm in payload["arms"].values():
        assert arm["label"] in printed and len(arm["runs"]) == 2
        for key in METRICS:
            assert 0.0 <= arm["summary"][key]["mean"] <= 100.0 and arm["summary"][key]["n"] == 2
    runs = {arm: payload["arms"][arm]["runs"] for arm in ARMS}
    for base in ("none", "control"):
        for key, m in payload["paired"][f"corners-{base}"].items():
            assert m["per_seed"] == [
                round(c[key] - b[key], 3) for c, b in zip(runs["corners"], runs[base], strict=True)
            ]
            assert sum(m["signs"].values()) == 2
    setup = payload["setup"]
    assert (setup["train_scenes"], setup["eval_scenes_long"], setup["eval_scenes_short"]) == (48, 10, 12)
    assert setup["complete"] and setup["seeds_done"] == 2 and setup["jobs"] == 2
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / MARKER).is_file()
    # A rerun with fewer scenes into the same --out rebuilds the data instead of mixing with the old shards.
    assert main([*args, "--size", "40", "--repeats", "1", "--jobs", "1"]) == 0
    rows = sum(pq.read_metadata(p).num_rows for p in output_parts(str(tmp_path / "data" / "output")))
    assert rows == 40 and json.loads((tmp_path / "ablation.json").read_text())["setup"]["repeats"] == 1


def test_bad_settings_and_a_foreign_out_are_one_line(tmp_path, capsys):
    assert main(["eval", "synthetic", "--repeats", "0", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip() == "error: --repeats 0: must be at least 1"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["eval", "synthetic", "--size", "64", "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ground_truth_captions_go_through_the_caption_stage_cleaning(tmp_path):
    """The Parquet holds what the caption stage would write for these texts: cleaned, flagged, token-counted."""
    from recaption.captioners.postprocess import repetition_ratio
    from recaption.sources.tar import write_webdataset

    samples = [{"key": k, "jpg": make_scene(i, size=SCENE_SIZE).jpeg(), "caption": "x"} for i, k in enumerate("abc")]
    write_webdataset(str(tmp_path / "input"), samples, shard_size=8)
    loop = "a red circle is here " * 6
    assert repetition_ratio(loop) > 0.5
    texts = {"a": "  The background is grey.\n A red circle is at the top.  ", "b": loop, "c": ""}
    commit_captions(tmp_path / "input", tmp_path / "output", texts)
    rows = {r["key"]: r for p in output_parts(str(tmp_path / "output")) for r in pq.read_table(p).to_pylist()}
    a, b, c = (rows[k]["captions"][0] for k in "abc")
    assert a["text"] == "The background is grey. A red circle is at the top." and a["flags"] == []
    assert a["sub_captions"] == ["The background is grey.", "A red circle is at the top."] and a["n_tokens"] == 11
    assert a["model"] == "ground-truth" and a["prompt"] == "detailed" and a["finish_reason"] == "stop"
    assert b["flags"] == ["repetition"] and b["n_tokens"] == 30
    assert c["flags"] == ["empty"] and c["text"] == "" and c["sub_captions"] == []

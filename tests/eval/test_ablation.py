"""`recaption eval synthetic` end to end at a tiny size: data through the writer, 4 arms trained, table/JSON/PNG."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.eval.ablation import ARMS, COLUMNS, SCENE_SIZE, commit_captions, run_ablation, write_train_split
from recaption.eval.synthetic import make_scene
from recaption.train.data import output_parts, source_input


def test_train_split_is_a_pipeline_output_with_ground_truth_captions(tmp_path):
    out = write_train_split(tmp_path, 10, shard_size=4)
    parts = output_parts(str(out))
    assert len(parts) == 3 and source_input(parts, None).path == str(tmp_path / "input")
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    row = rows[0]
    assert row["alt_text"].startswith("a ") and row["captions"][0]["text"].startswith("The background is")
    assert len(row["captions"][0]["sub_captions"]) >= 2
    # Scenes carry a written word by default: its sentence ends the caption and is a sub-caption of its own.
    scene = make_scene(0, size=SCENE_SIZE, text=True)
    by_key = {r["key"]: r for r in rows}
    assert by_key["000000000"]["captions"][0]["text"] == scene.long_caption
    assert by_key["000000000"]["captions"][0]["sub_captions"][-1] == scene.text.sentence()


def test_ground_truth_captions_go_through_the_caption_stage_cleaning(tmp_path):
    """The Parquet holds what the caption stage would write for these texts: cleaned, flagged, token-counted."""
    from recaption.postprocess import repetition_ratio
    from recaption.shards.tar import write_webdataset

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


def test_cli_runs_the_ablation_end_to_end(tmp_path, capsys):
    code = main(["eval", "synthetic", "--size", "32", "--repeats", "1", "--steps", "6", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "ablation.json").read_text())
    assert set(payload["arms"]) == set(ARMS)
    for arm in payload["arms"].values():
        assert arm["label"] in printed
        for s, slot, d in COLUMNS:
            assert 0.0 <= arm["summary"][f"{s}/{slot}/{d}"]["mean"] <= 100.0
    assert payload["setup"]["train_scenes"] == 32 and payload["setup"]["eval_scenes_long"] == 16
    assert payload["setup"]["scene_text"] is True and "with a written word" in printed
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bigger_ablation_runs_with_several_seeds(tmp_path):
    payload = run_ablation(tmp_path, size=200, repeats=2, steps=60)
    for arm in payload["arms"].values():
        assert len(arm["runs"]) == 2 and arm["summary"]["long/cls/t2i@1"]["std"] >= 0.0


def test_no_text_flag_reaches_the_ablation(monkeypatch, tmp_path):
    import recaption.eval.ablation as ablation

    calls = []
    monkeypatch.setattr(ablation, "run_ablation", lambda out, **kw: calls.append(kw))
    assert main(["eval", "synthetic", "--size", "8", "--out", str(tmp_path)]) == 0
    assert main(["eval", "synthetic", "--size", "8", "--no-text", "--out", str(tmp_path)]) == 0
    assert [c["text"] for c in calls] == [True, False] and calls[0]["size"] == 8

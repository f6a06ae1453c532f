"""The `recaption` command: exit codes and one-line errors for bad configs and inputs, the demo end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from recaption.cli import main
from recaption.demo import DEMO_SEED, read_truths
from recaption.demo.scenes import score_output
from recaption.eval.synthetic import make_scene


def write_config(tmp_path: Path, **changes) -> Path:
    data = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "models": [{"path": "fake", "engine": "fake"}],
    }
    for section, value in changes.items():
        data[section] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("recaption")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_bad_config_key_exits_2_naming_the_key(tmp_path):
    (tmp_path / "in").mkdir()
    config = write_config(tmp_path, input={"path": str(tmp_path / "in"), "shard_glob": "*.tar"})
    proc = run_cli(["run", str(config)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {config}: input.shard_glob: unknown key"]


def test_missing_input_path_exits_2(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "in") in err[0]


def test_empty_input_exits_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("no images here")
    assert main(["run", str(write_config(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no usable input at {tmp_path / 'in'}: looked for ")
    assert err[0].endswith("found 1 files notes.md")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_override_wrong_type_and_missing_model_exit_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    config = write_config(tmp_path)
    assert main(["run", str(config), "--set", "models.0.batch_size=-1"]) == 2
    assert one_error_line(capsys) == f"error: {config}: models.0.batch_size: Input should be greater than 0 (got -1)"
    assert main(["run", str(config), "--set", "models.0.batch_size=many"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {config}: models.0.batch_size: Input should be a valid integer") and "many" in line
    assert main(["run", str(config), "--set", "models.0.engine=hf", "--set", f"models.0.path={tmp_path}/nope"]) == 2
    assert one_error_line(capsys).startswith(f"error: model path not found: {tmp_path}/nope;")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its mode")
def test_unreadable_input_exits_2(tmp_path, capsys):
    from tests.data import write_webdataset_dir

    write_webdataset_dir(tmp_path / "in", 2, shard_size=2)
    (tmp_path / "in").chmod(0)
    try:
        assert main(["run", str(write_config(tmp_path))]) == 2
        assert str(tmp_path / "in") in one_error_line(capsys)
    finally:
        (tmp_path / "in").chmod(0o755)


def test_rerun_with_another_config_needs_overwrite(tmp_path, capsys, ray_session):
    from tests.data import write_webdataset_dir

    keys = write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    config = str(write_config(tmp_path))
    assert main(["run", config, "--no-progress"]) == 0
    changed = ["--set", "generation.max_new_tokens=99", "--no-progress"]
    capsys.readouterr()
    assert main(["run", config, *changed]) == 2
    line = one_error_line(capsys)
    assert "another config (changed: generation.max_new_tokens, models.0.generation.max_new_tokens)" in line
    assert "--overwrite" in line
    assert main(["run", config, *changed, "--overwrite"]) == 0
    assert "units:    2 run, 0 already done" in capsys.readouterr().out
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("key").to_pylist()) == keys


def test_tiny_model_command(tmp_path, capsys):
    assert main(["tiny-model", "--family", "blip2", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert "random weights" in capsys.readouterr().out


TINY_DEMO = ["--no-progress", "--set", "models.0.path=tiny-llava"]  # what runs whether scene-llava is there or not


def test_demo_end_to_end(tmp_path, capsys, ray_session):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "20", *TINY_DEMO]) == 0
    out = capsys.readouterr().out
    assert "rows:     20 (20 ok, 0 failed, 0 skipped)" in out
    assert "captioned by tiny-llava (prompt detailed)" in out
    assert "RANDOM weights" in out and "pipelines/llava15.yaml" in out
    table = pads.dataset(str(tmp_path / "demo" / "output"), format="parquet").to_table()
    assert table.num_rows == 20
    # The accuracy it printed is the one score_output gives on that output and the shards' truths.
    accuracy = json.loads((tmp_path / "demo" / "accuracy.json").read_text())
    truths = read_truths(tmp_path / "demo" / "input")
    assert truths == {f"{i:09d}": make_scene(DEMO_SEED + i, size=96, max_objects=6).truth() for i in range(20)}
    assert accuracy == json.loads(json.dumps(score_output(str(tmp_path / "demo" / "output"), truths, "tiny-llava")))
    assert accuracy["captions"] == 20 and accuracy["missing"] == 0 and accuracy["models"] == ["tiny-llava"]
    assert accuracy["truth_objects"] == sum(len(t["objects"]) for t in truths.values())
    assert f"captions exactly right     {accuracy['exact_rate']:6.1%}  {accuracy['exact']} of 20" in out
    assert f"{accuracy['matched']} of {accuracy['truth_objects']}" in out
    # A second demo run resumes: every unit is already done.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "20", *TINY_DEMO]) == 0
    assert "0 run, 2 already done" in capsys.readouterr().out
    # What users look at next: the report, one row with its image, an export.
    output = str(tmp_path / "demo" / "output")
    assert main(["report", output]) == 0
    assert "20 rows (20 ok, 0 failed, 0 skipped)" in capsys.readouterr().out
    assert (tmp_path / "demo" / "output" / "_report" / "index.html").is_file()
    assert main(["inspect", output, "--key", "000000001"]) == 0
    assert "000000001" in capsys.readouterr().out and (tmp_path / "demo/output/_inspect/000000001.png").is_file()
    assert main(["export", output, "--to", "jsonl", str(tmp_path / "rows.jsonl")]) == 0
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 20


def test_demo_train_trains_on_the_captions_and_prints_retrieval(tmp_path, capsys, ray_session):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--images", "8", "--train", "--steps", "4", "--eval-scenes", "10"]
    assert main([*argv, *TINY_DEMO, "--set", "generation.max_new_tokens=16"]) == 0
    printed = capsys.readouterr().out
    assert "rows:     8 (8 ok, 0 failed, 0 skipped)" in printed
    assert json.loads((out / "accuracy.json").read_text())["captions"] == 8
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert retrieval["eval_scenes_long"] == 10 and 1 <= retrieval["eval_scenes_short"] <= 10
    for prefix, n in (("long/cls", 10), ("long/mean", 10), ("short/cls", retrieval["eval_scenes_short"])):
        values = [retrieval[f"{prefix}/{d}@{k}"] for d in ("i2t", "t2i") for k in (1, 5)]
        # R@k of n items is a multiple of 100/n and R@5 ≥ R@1.
        assert all(0.0 <= v <= 100.0 and abs(v * n / 100 - round(v * n / 100)) < 1e-6 for v in values)
        assert values[1] >= values[0] and values[3] >= values[2]
    assert "retrieval R@k (%)" in printed
    line = next(row for row in printed.splitlines() if row.startswith("long captions (CLS)"))
    cells = [f"{retrieval[f'long/cls/{c}']:.1f}" for c in ("i2t@1", "i2t@5", "t2i@1", "t2i@5")]
    assert line.split()[3:] == ["10", *cells, "10.0", "/", "50.0"]  # n, R@k, and chance: 1 and 5 in 10
    assert Path(retrieval["model"]).is_dir() and f"the trained model: {retrieval['model']}" in printed


def scene_llava_available() -> bool:
    from recaption.captioners.models import resolve_model
    from recaption.errors import ConfigError

    try:
        resolve_model("scene-llava")
    except ConfigError:
        return False
    return True


@pytest.mark.skipif(not scene_llava_available(), reason="scene-llava is not built or shipped here")
def test_demo_with_the_scene_captioner_describes_the_scenes(tmp_path, capsys, ray_session):
    """The demo as it ships, with its trained captioner: the captions are scored and mostly right."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--images", "12", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "captioned by scene-llava (prompt detailed)" in out and "not available" not in out
    accuracy = json.loads((tmp_path / "demo" / "accuracy.json").read_text())
    assert accuracy["models"] == ["scene-llava"] and accuracy["captions"] == 12 and accuracy["missing"] == 0
    assert accuracy["recall"] >= 0.8 and accuracy["precision"] >= 0.8, accuracy
    assert "RANDOM" not in out and "scene-llava describes these scenes" in out


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "recaption" in capsys.readouterr().out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("llava-1.5-7b", "llava-1.5-13b", "instructblip-vicuna-7b", "sharegpt4v-7b", "blip2-opt-2.7b"):
        assert name in out


def test_convert_sharegpt4v_without_a_tower_exits_2(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(
        '{"architectures": ["Share4VLlamaForCausalLM"], "model_type": "share4v", "mm_projector_type": "mlp2x_gelu",'
        ' "mm_vision_tower": "Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12"}'
    )
    assert main(["convert", "sharegpt4v", str(src), str(tmp_path / "dst")]) == 2
    assert "--vision-tower" in capsys.readouterr().err

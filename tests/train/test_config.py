"""Train configs: the ready YAMLs load, overrides apply, mistakes name their key, and the command's output."""

from __future__ import annotations

import pytest

from recaption.errors import ConfigError, InputError
from recaption.train.config import load_train_config
from recaption.train.run import train_command
from tests.train.conftest import PIPELINES, tiny_config

MINIMAL = {"data": {"path": "out"}, "run": {"output": "runs/x", "steps": 10, "batch_size": 4}}


def test_ready_configs_load_and_say_what_their_comments_say():
    tiny = load_train_config(PIPELINES / "train-tiny.yaml")
    assert tiny.run.device == "cpu" and tiny.distributed.num_workers == 1 and tiny.model.text.num_corners == 2
    big = load_train_config(PIPELINES / "train-vitb16-bert.yaml")
    image, text = big.model.image, big.model.text
    assert (image.image_size, image.patch_size, image.hidden_size, image.num_layers) == (224, 16, 768, 12)
    assert (text.hidden_size, text.num_layers, text.context_length, text.num_corners) == (768, 12, 128, 2)
    assert big.distributed.use_gpu and big.distributed.backend == "nccl" and big.run.precision == "auto"


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("train-*.yaml")), ids=lambda p: p.name)
def test_every_train_yaml_loads_and_its_commented_eval_example_too(path, tmp_path):
    """Each ready config validates; a commented-out `# eval:` example validates once uncommented and then drives
    the loop's eval hook (run.eval_every)."""
    text = path.read_text()
    cfg = load_train_config(path)
    assert cfg.eval is None or cfg.run.eval_every > 0
    assert cfg.eval is not None or not cfg.run.eval_every, "run.eval_every does nothing without an eval section"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# eval:")), None)
    if start is None:
        return
    block = [lines[start][2:]]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    yaml = tmp_path / path.name
    yaml.write_text(text + "\n" + "\n".join(block) + "\n")
    uncommented = load_train_config(yaml)
    assert uncommented.eval is not None and uncommented.eval.config.endswith(".yaml")
    assert uncommented.run.eval_every == uncommented.eval.every > 0


def test_overrides_and_defaults():
    cfg = load_train_config(None, ["model.text.num_corners=0", "loss.grouping=0.5", "run.steps=3"], data=MINIMAL)
    assert cfg.model.text.num_corners == 0 and cfg.loss.grouping == 0.5 and cfg.run.steps == 3
    assert cfg.sampling.short == ["alt_text", "prompt:short"] and cfg.loss.long_slots == "all"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.stepz=3"], "run.stepz: unknown key"),
        (["model.text.context_length=1024"], "model.text.context_length"),
        (["model.text.short_context_length=4"], "model.text.short_context_length 4 leaves no room.*num_corners 2"),
        (["model.text.context_length=8", "model.text.num_corners=6"], "model.text.context_length 8 leaves no room"),
        (["model.image.image_size=30"], "multiple of model.image.patch_size"),
        (["loss.holistic=1"], "one sampling.holistic source per image branch"),
        (["loss.long=0", "loss.short=0", "loss.multi_positive=0"], "nothing to train"),
        (["sampling.holistic=[caption]"], "unknown text source"),
    ],
)
def test_mistakes_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides, data=MINIMAL)


def test_train_command_prints_where_the_results_are(caption_output, tmp_path, capsys):
    yaml = tmp_path / "train.yaml"
    yaml.write_text((PIPELINES / "train-tiny.yaml").read_text())
    overrides = [f"data.path={caption_output}", f"run.output={tmp_path / 'run'}", "run.steps=2"]
    assert train_command(str(yaml), overrides, progress=False) == 0
    out = capsys.readouterr().out
    assert f"run:      {tmp_path / 'run'}" in out and "steps:    2, last loss" in out and "final" in out
    with pytest.raises(InputError, match="no part files"):
        train_command(str(yaml), [f"data.path={tmp_path}", f"run.output={tmp_path / 'r2'}"], progress=False)
    assert tiny_config(caption_output, tmp_path).run.log_every == 1

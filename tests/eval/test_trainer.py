"""The trainer's model as an eval Encoder: periodic eval inside a training run, and `model: {kind: recaption}`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from recaption.demo.ablation import arm_config, write_train_split
from recaption.errors import ConfigError
from recaption.eval.encoders import Encoder, load_encoder
from recaption.eval.run import run_eval
from recaption.eval.synthetic import make_scene
from recaption.eval.trainer import TrainerEncoder
from recaption.train.config import load_train_config
from recaption.train.run import run_training

EVAL_SETS = [
    {"format": "synthetic", "size": 8, "text": "long", "image_size": 64, "name": "syn-long"},
    {"format": "synthetic", "size": 8, "text": "short", "image_size": 64, "name": "syn-short"},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run on 24 scenes with 2 corner tokens and eval every 2 steps; returns (run dir, eval YAML)."""
    root = tmp_path_factory.mktemp("trainer-eval")
    data = write_train_split(root / "data", 24)
    eval_yaml = root / "eval.yaml"
    eval_yaml.write_text(yaml.safe_dump({"sets": EVAL_SETS, "batch_size": 8, "ks": [1, 5]}))
    raw = arm_config("corners", data, root / "run", steps=4, seed=0, batch_size=8)
    raw["eval"] = {"config": str(eval_yaml), "every": 2, "text_slot": "mean"}
    summary = run_training(load_train_config(None, data=raw), progress=False)
    return root / "run", eval_yaml, summary


def test_periodic_eval_writes_metrics_every_n_steps(trained):
    run_dir, _, summary = trained
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "syn-long/i2t@1" in x]
    assert [x["step"] for x in evals] == [2, 4]
    for record in evals:
        for key in ("syn-long/i2t@1", "syn-long/t2i@5", "syn-short/t2i@1"):
            assert 0.0 <= record[key] <= 100.0
    assert summary["step"] == 4


def test_eval_config_path_is_made_absolute_and_eval_needs_a_period(trained, tmp_path):
    run_dir, eval_yaml, _ = trained
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["eval"]["config"] == str(eval_yaml) and saved["run"]["eval_every"] == 2
    raw = arm_config("none", run_dir, tmp_path / "run", steps=4, seed=0, batch_size=8)
    raw["eval"] = {"config": str(eval_yaml)}
    with pytest.raises(ConfigError, match="eval.every"):
        load_train_config(None, data=raw)


def test_export_loads_as_an_eval_model_and_matches_the_live_model(trained, tmp_path, capsys):
    run_dir, eval_yaml, _ = trained
    encoder = load_encoder("recaption", run_dir / "final", device="cpu", text_slot="cls")
    assert isinstance(encoder, Encoder)
    scenes = [make_scene(i, size=64) for i in range(3)]
    images = encoder.encode_images([s.image for s in scenes])
    texts = encoder.encode_texts([s.long_caption for s in scenes] + ["a red circle"])
    assert images.shape == (3, 64) and texts.shape == (4, 64)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(4))
    # A text's embedding does not depend on the batch it came in (padding is masked).
    torch.testing.assert_close(encoder.encode_texts(["a red circle"])[0], texts[3], atol=1e-5, rtol=1e-5)
    # `mean` pools CLS and the two corners; it differs from CLS alone.
    mean = TrainerEncoder(encoder.model, encoder.tokenizer, encoder.cfg, text_slot="mean")
    assert not torch.allclose(mean.encode_texts(["a red circle"]), texts[3:])

    config = yaml.safe_load(eval_yaml.read_text())
    config["model"] = {"kind": "recaption", "path": str(run_dir / "final")}
    config["output"] = str(tmp_path / "out.json")
    payload = run_eval(config)
    assert set(payload["results"]) == {"syn-long", "syn-short"}
    assert "syn-long" in capsys.readouterr().out and (tmp_path / "out.json").is_file()


def test_a_directory_that_is_no_export_is_refused(tmp_path):
    from recaption.errors import InputError

    with pytest.raises(InputError, match="final"):
        load_encoder("recaption", tmp_path)

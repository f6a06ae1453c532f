"""The loop on a real pipeline output: the loss falls below chance, a killed run resumes to the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recaption.errors import ConfigError
from recaption.train.model import load_pretrained
from recaption.train.run import run_training
from tests.train.conftest import PIPELINES, tiny_config

REPO = Path(__file__).resolve().parents[2]


def chance_loss(cfg) -> float:
    """The total loss of a model that cannot tell the batch's images apart (every softmax uniform)."""
    b, k, w = cfg.run.batch_size, cfg.sampling.num_sub_captions, cfg.loss
    multi = (math.log(b) + math.log(b * k)) / 2
    return w.long * math.log(b) + w.short * math.log(b) + w.multi_positive * multi + w.grouping * math.log(b * k)


def test_tiny_model_learns_on_a_pipeline_output_and_exports(caption_output, tmp_path):
    calls = []

    def probe(model, tokenizer, step):
        calls.append(step)
        return {"probe": float(step)}

    cfg = tiny_config(caption_output, tmp_path / "run", "run.eval_every=50")
    summary = run_training(cfg, progress=False, eval_hook=probe)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == cfg.run.steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Not just the fall to uniform guessing: the model matches images and texts better than chance.
    assert last < first and last < chance_loss(cfg) - 0.7, (first, last, chance_loss(cfg))
    assert calls == [50, 100]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["probe"] for x in lines if "probe" in x] == [50.0, 100.0]
    model, tokenizer, model_cfg = load_pretrained(summary["export"])
    assert model_cfg.text.num_corners == 2 and tokenizer.cls_token_id is not None
    exported = dict(model.named_parameters())
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-00000100" / "model.pt", weights_only=True)
    for name in ("text.corners", "image.proj.weight", "logit_scale", "text.encoder.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(exported[name].detach(), saved[name])


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(caption_output, tmp_path):
    overrides = ["run.steps=14", "run.checkpoint_every=5", "run.keep_checkpoints=5", "data.shuffle_buffer=16"]
    killed = tmp_path / "killed"
    code = (
        "import sys\n"
        "from recaption.train.config import load_train_config\n"
        "from recaption.train.run import run_training\n"
        f"run_training(load_train_config({str(PIPELINES / 'train-tiny.yaml')!r}, sys.argv[1:]), progress=False)\n"
    )
    args = [f"data.path={caption_output}", f"run.output={killed}", *overrides]
    env = {**os.environ, "RECAPTION_FAULT": "train:after-checkpoint"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, start_new_session=True, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (killed / "checkpoints" / "latest").read_text() == "step-00000005"

    resumed = run_training(tiny_config(caption_output, killed, *overrides), progress=False)
    straight = run_training(tiny_config(caption_output, tmp_path / "straight", *overrides), progress=False)
    assert [h["step"] for h in resumed["history"]] == list(range(6, 15))
    assert resumed["history"] == [{**h, "samples_per_s": r["samples_per_s"]} for h, r in
                                  zip(straight["history"][5:], resumed["history"], strict=True)]  # fmt: skip
    a = torch.load(killed / "checkpoints" / "step-00000014" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000014" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_with_accumulation_and_a_refused_resume(caption_output, tmp_path):
    cfg = tiny_config(
        caption_output, tmp_path, "run.steps=3", "run.precision=bf16", "run.grad_accum=2", "run.checkpoint_every=2"
    )
    summary = run_training(cfg, progress=False)
    assert all(math.isfinite(h["loss"]) for h in summary["history"]) and summary["step"] == 3
    assert summary["history"][0]["global_batch"] == cfg.run.batch_size  # accumulation does not widen the negatives
    changed = tiny_config(caption_output, tmp_path, "run.steps=4", "model.embed_dim=24")
    with pytest.raises(ConfigError, match="another model config"):
        run_training(changed, progress=False)


def test_holistic_branches_without_corners_and_other_switches_train(caption_output, tmp_path):
    cfg = tiny_config(
        caption_output,
        tmp_path,
        "run.steps=2",
        "model.image.num_class_tokens=3",
        "sampling.holistic=[alt_text, 'prompt:short', long]",
        "loss.holistic=1.0",
        "loss.grouping_scope=image",
        "loss.long_slots=cls",
        "model.text.num_corners=0",
        "sampling.merge=2",
    )
    summary = run_training(cfg, progress=False)
    first = summary["history"][0]
    assert {"long", "short", "multi_positive", "grouping", "holistic"} <= first.keys()
    assert all(math.isfinite(first[k]) for k in ("long", "holistic", "grouping"))

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
from recaption.job.progress import parse_progress_line
from recaption.train.checkpoint import latest_checkpoint
from recaption.train.model import load_pretrained
from recaption.train.run import run_training
from tests.train.conftest import PIPELINES, tiny_config

REPO = Path(__file__).resolve().parents[2]


def chance_loss(cfg) -> float:
    """The total loss of a model that cannot tell the batch's images apart (every softmax uniform)."""
    b, k, w = cfg.run.batch_size, cfg.sampling.num_sub_captions, cfg.loss
    # Per slot (LoTLIP/DreamLIP): every text slot's InfoNCE is log b at chance; the slots' weighted mean.
    slots = [(w.long, cfg.model.text.num_corners + 1), (w.short, 1), (w.multi_positive, k)]
    per_slot = math.log(b) * sum(weight * n for weight, n in slots) / sum(n for weight, n in slots if weight)
    return per_slot + w.grouping * math.log(b * k)


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


def train_until_fault(point: str, *overrides: str) -> None:
    """pipelines/train-tiny.yaml with `overrides` in a child process that `RECAPTION_FAULT=point` SIGKILLs there."""
    code = (
        "import sys\n"
        "from recaption.train.config import load_train_config\n"
        "from recaption.train.run import run_training\n"
        f"run_training(load_train_config({str(PIPELINES / 'train-tiny.yaml')!r}, sys.argv[1:]), progress=False)\n"
    )
    env = {**os.environ, "RECAPTION_FAULT": point}
    proc = subprocess.run(
        [sys.executable, "-c", code, *overrides], cwd=REPO, env=env, start_new_session=True, capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(caption_output, tmp_path):
    overrides = ["run.steps=14", "run.checkpoint_every=5", "run.keep_checkpoints=5", "data.shuffle_buffer=16"]
    killed = tmp_path / "killed"
    train_until_fault("train:after-checkpoint", f"data.path={caption_output}", f"run.output={killed}", *overrides)
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
    with pytest.raises(ConfigError, match="model.embed_dim 32 → 24"):
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


def test_a_kill_before_the_checkpoint_rename_leaves_the_previous_one_latest(caption_output, tmp_path):
    """The temp directory of step 4 is complete when the run dies, but `latest` still names step 2, and resuming
    from step 2 recomputes exactly the weights the dead run had written under the temp name."""
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = ["run.checkpoint_every=2", "run.keep_checkpoints=3", "data.shuffle_buffer=16"]
    run_training(tiny_config(caption_output, run_dir, "run.steps=2", *overrides), progress=False)
    assert (root / "latest").read_text() == "step-00000002"

    args = [f"data.path={caption_output}", f"run.output={run_dir}", "run.log_every=1", "run.steps=4", *overrides]
    train_until_fault("train:before-rename", *args)
    assert (root / "latest").read_text() == "step-00000002"
    assert latest_checkpoint(run_dir) == root / "step-00000002"
    assert not (root / "step-00000004").exists() and (root / ".tmp-step-00000004" / "trainer.pt").is_file()
    written = torch.load(root / ".tmp-step-00000004" / "model.pt", weights_only=True)

    resumed = run_training(tiny_config(caption_output, run_dir, "run.steps=4", *overrides), progress=False)
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert (root / "latest").read_text() == "step-00000004" and not (root / ".tmp-step-00000004").exists()
    final = torch.load(root / "step-00000004" / "model.pt", weights_only=True)
    assert final.keys() == written.keys() and all(torch.equal(final[k], written[k]) for k in final)


def test_progress_lines_off_a_terminal_parse_and_end_at_the_last_step(caption_output, tmp_path, capsys):
    """Not on a TTY the loop prints `train progress: …` lines and a final `train done: …` line; the loss is passed at
    log steps only (reading it is a device sync), so the first line (step 1, not a log step) has none."""
    cfg = tiny_config(caption_output, tmp_path / "run", "run.steps=3", "run.log_every=2")
    summary = run_training(cfg, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train ")]
    parsed = [parse_progress_line(line) for line in lines]
    assert len(parsed) >= 2 and all(p is not None for p in parsed), lines
    assert parsed[0]["event"] == "progress" and parsed[0]["done"] == 1 and "loss" not in parsed[0]
    last = parsed[-1]
    assert last["event"] == "done" and last["desc"] == "train" and (last["done"], last["total"]) == (3, 3)
    assert last["samples"] == 3 * cfg.run.batch_size
    assert math.isclose(last["loss"], summary["history"][-1]["loss"], rel_tol=1e-3)

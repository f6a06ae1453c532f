"""`recaption train --report-to tensorboard`: the loss, learning rate and the eval hook's metrics in event files."""

from __future__ import annotations

import pytest

from recaption.train.run import run_training
from tests.train.conftest import tiny_config

pytest.importorskip("tensorboard")


def test_trainer_reports_losses_lr_and_eval_metrics(caption_output, tmp_path):
    from tests.job.test_tracking import read_scalars

    calls = []

    def eval_hook(model, tokenizer, step):
        calls.append(step)
        return {"long": {"i2t_r1": 0.25 * step}, "note": "text is not a scalar"}

    out = tmp_path / "run"
    cfg = tiny_config(caption_output, out, "run.steps=4", "run.eval_every=2")
    run_training(cfg, progress=False, eval_hook=eval_hook, report_to=["tensorboard"])
    found = read_scalars(out / "tracking")
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in found["train/lr"]] == [1, 2, 3, 4]
    assert found["train/long/i2t_r1"] == [(2, 0.5), (4, 1.0)] and calls == [2, 4]
    assert "train/samples_per_s" in found

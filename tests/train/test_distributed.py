"""Two Ray Train workers on CPU (gloo): the run completes and its contrastive losses see the global batch."""

from __future__ import annotations

import json
import re
import time

import torch

from recaption.train.data import Batches
from recaption.train.loop import TENSOR_KEYS, freeze_unused
from recaption.train.losses import compute_losses, split_texts
from recaption.train.model import build_model
from recaption.train.run import run_training
from recaption.train.tokenizer import load_tokenizer
from tests.train.conftest import tiny_config


def first_step_loss(cfg, tokenizer, batches: list[dict]) -> float:
    """The step-1 loss of the fresh model (same seed, same init as the workers) on these batches taken together."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    freeze_unused(model, cfg)
    inputs = {}
    for key in TENSOR_KEYS:  # texts are padded per batch: pad to the longest before joining
        parts = [b[key] for b in batches]
        width = max(p.shape[-1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) if p.ndim == 2 else p for p in parts]
        if key.startswith("short"):  # one worker's rows are [its shorts, its sub-captions]: join group by group
            groups, start = [], 0
            for _, n in batches[0]["layout"]:
                size = len(batches[0]["keys"]) * n
                groups += [p[start : start + size] for p in parts]
                start += size
            parts = groups
        inputs[key] = torch.cat(parts)
    with torch.no_grad():
        out = model(**inputs)
        out.update(split_texts(out.pop("short_all"), batches[0]["layout"], len(inputs["pixel_values"])))
        ids = {k: torch.cat([b["text_ids"][k] for b in batches]) for k in batches[0]["text_ids"]}
        return compute_losses(out, cfg.loss, ids)["loss"].item()


def test_two_ray_train_workers_train_on_the_global_batch(caption_output, tmp_path, ray_session, capfd):
    cfg = tiny_config(
        caption_output,
        tmp_path / "run",
        "run.steps=4",
        "run.checkpoint_every=2",
        "distributed.num_workers=2",
        "distributed.cpus_per_worker=0.5",
    )
    summary = run_training(cfg, progress=False)
    assert summary["step"] == 4 and summary["export"]
    first = summary["history"][0]
    assert first["global_batch"] == 2 * cfg.run.batch_size
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert {p.name for p in checkpoint.iterdir()} >= {"model.pt", "optimizer.pt", "rank-0.pt", "rank-1.pt"}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # one writer: rank 0
    # Each metrics line reaches the console once (Ray Train's print patch used to send it twice). Ray forwards the
    # workers' output a moment later: wait until every step has shown, then a little more for any second copy.
    seen, deadline = "", time.monotonic() + 20
    while time.monotonic() < deadline and not all(re.search(rf"\bstep {n} ", seen) for n in range(1, 5)):
        time.sleep(0.5)
        seen += "".join(capfd.readouterr())
    time.sleep(2)
    seen += "".join(capfd.readouterr())
    assert [len(re.findall(rf"\bstep {n}  long", seen)) for n in range(1, 5)] == [1, 1, 1, 1], seen[-3000:]

    # The logged step-1 loss is the loss of both workers' first batches together, not of either one alone.
    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer")
    batches = [next(iter(Batches(cfg, tokenizer, rank, 2))) for rank in range(2)]
    assert not set(batches[0]["keys"]) & set(batches[1]["keys"])
    # (Each worker pads its texts to its own longest one, hence float noise, not equality.)
    assert abs(first_step_loss(cfg, tokenizer, batches) - first["loss"]) < 2e-3
    assert abs(first_step_loss(cfg, tokenizer, batches[:1]) - first["loss"]) > 0.5

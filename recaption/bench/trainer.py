"""Trainer bench: samples/s against a plain PyTorch CLIP step; the cost of corner tokens."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from recaption.bench.result import BenchResult, BenchSizes, Measurement, _ratio, median

# The towers the trainer bench times: small enough for a CPU, big enough that compute, not Python, sets the pace.
TRAIN_MODEL = [
    "model.embed_dim=64",
    "model.image.image_size=64",
    "model.image.patch_size=8",
    "model.image.hidden_size=128",
    "model.image.num_layers=4",
    "model.image.num_heads=4",
    "model.image.intermediate_size=256",
    "model.text.hidden_size=128",
    "model.text.num_layers=4",
    "model.text.num_heads=4",
    "model.text.intermediate_size=256",
    "model.text.context_length=96",
]


def trainer_data(root: Path, n_images: int) -> Path:
    """A pipeline output of n generated scenes whose caption is the scene's long description (no Ray needed)."""
    from recaption.demo import commit_captions
    from recaption.eval import make_scene
    from recaption.sources import write_webdataset

    output = root / "output"
    stamp = root / "data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"images": n_images}:
        return output
    shutil.rmtree(root, ignore_errors=True)
    samples, captions = [], {}
    for i in range(n_images):
        scene, key = make_scene(i, size=96, max_objects=6), f"{i:09d}"
        samples.append({"key": key, "jpg": scene.jpeg(), "caption": scene.short_caption, "url": f"bench://{key}"})
        captions[key] = scene.long_caption
    write_webdataset(str(root / "input"), samples, shard_size=64)
    commit_captions(root / "input", output, captions)
    stamp.write_text(json.dumps({"images": n_images}))
    return output


def train_config(data: Path, run_dir: Path, sizes: BenchSizes, extra: list[str] = ()):
    from recaption.demo import find_pipeline
    from recaption.train import load_train_config

    overrides = [
        f"data.path={data}",
        f"run.output={run_dir}",
        f"run.steps={sizes.train_steps}",
        f"run.batch_size={sizes.train_batch}",
        "run.log_every=1",
        f"run.checkpoint_every={sizes.train_steps}",
        "run.resume=false",
        *TRAIN_MODEL,
        *extra,
    ]
    return load_train_config(find_pipeline("train-tiny.yaml"), overrides)


def bench_trainer(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    """`recaption train`'s loop (data loading, logging, checkpoint included) vs the same towers stepped on one batch
    already in memory; and corner tokens' cost in that plain loop."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    try:
        _bench_trainer(result, work, sizes, cpus)
    finally:
        torch.set_num_threads(previous_threads)


def _bench_trainer(result: BenchResult, work: Path, sizes: BenchSizes, cpus: int) -> None:
    from recaption.train import prepare_run, train

    data = trainer_data(work / "trainer" / "data", max(4 * sizes.train_batch, 64))
    cfg = prepare_run(train_config(data, work / "trainer" / "run", sizes))
    shutil.rmtree(Path(cfg.run.output) / "checkpoints", ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-step log lines; the bench prints its own
        history = train(cfg, progress=False)["history"]
    skip = min(3, len(history) - 1)  # first steps: allocations, the prefetch queue filling
    ours = median([h["samples_per_s"] for h in history[skip:]])
    bare = plain_loop_samples_per_s(cfg, sizes.train_steps)
    result.add(
        Measurement(
            "trainer step", ours, "samples/s", bare, _ratio(ours, bare), ">= 0.9",
            f"batch {sizes.train_batch}, ViT 4x128 on 64px + BERT 4x128, K=2 corners, fp32, {cpus} threads; "
            "bare loop: same towers, losses and AdamW on one batch held in memory",
        )
    )  # fmt: skip
    no_corners = prepare_run(train_config(data, work / "trainer" / "run-k0", sizes, ["model.text.num_corners=0"]))
    k2, k0 = corner_cost(cfg, no_corners, 2 * sizes.train_steps)
    k2_ms, k0_ms = 1000 * k2, 1000 * k0
    result.add(
        Measurement(
            "corner tokens K=2 vs K=0", k2_ms, "ms/step", k0_ms, _ratio(k2_ms, k0_ms), "<= 1.05",
            "plain loop step time with 2 corner tokens vs without (1.05 = 5% slower); the two loops' steps "
            "interleaved, medians",
        )
    )  # fmt: skip


def plain_loop_samples_per_s(cfg, steps: int) -> float:
    """Samples/s of a hand-written CLIP step of the trainer's towers and losses (median step, warm-up left out)."""
    step, n = plain_step(cfg)
    return n / median(_step_times(step, steps))


def _step_times(step: Callable[[], None], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times[min(3, steps - 1) :]


def plain_step(cfg) -> tuple[Callable[[], None], int]:
    """One optimizer step of the trainer's towers, losses and AdamW on one batch made once by the trainer's loader,
    as a closure; and the batch size."""
    import torch

    from recaption.train import TENSOR_KEYS, Batches, build_model, compute_losses, load_tokenizer, split_texts

    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(Path(cfg.run.output) / "tokenizer")
    loader = Batches(cfg, tokenizer)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    inputs = {k: batch[k] for k in TENSOR_KEYS if k in batch}
    n = len(batch["keys"])

    def step() -> None:
        out = model(**inputs)
        if "short_all" in out:
            out.update(split_texts(out.pop("short_all"), batch["layout"], n))
        compute_losses(out, cfg.loss, batch["text_ids"])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, n


def corner_cost(with_corners, without_corners, steps: int) -> tuple[float, float]:
    """Median step times (s) of two configs' plain loops, their steps interleaved so machine noise hits both alike."""
    a, _ = plain_step(with_corners)
    b, _ = plain_step(without_corners)
    times_a, times_b = [], []
    for _ in range(steps):
        times_a += _step_times(a, 1)
        times_b += _step_times(b, 1)
    skip = min(3, steps - 1)
    return median(times_a[skip:]), median(times_b[skip:])

"""Engine bench: the pipeline against one bare engine call over the same images."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from recaption.bench.inputs import photo_like
from recaption.bench.result import BenchResult, BenchSizes, compared, interleaved


def bench_engine(
    result: BenchResult,
    work: Path,
    sizes: BenchSizes,
    engine: str,
    model: str | None,
    cpus: int,
    pipeline: str | None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    if engine == "vllm":  # bench_vllm.py: the pipeline vs one bare LLM.generate and vs ray.data.llm; k prompts
        from recaption.bench.engine_vllm import bench_engine_vllm

        return bench_engine_vllm(result, work, sizes, pipeline, model, cpus)
    return bench_engine_hf(result, sizes, model or "tiny-llava", device, dtype)


def on_a_thread(fn: Callable[[], int]) -> Callable[[], int]:
    """`fn` run on a new thread, its result (or exception) returned to the caller."""
    from concurrent.futures import ThreadPoolExecutor

    def run() -> int:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(fn).result()

    return run


def engine_images(n: int, side: int = 336) -> list:
    from PIL import Image

    from recaption.sources import load_rgb

    return [load_rgb(photo_like(10_000 + i, side)) for i in range(n)] or [Image.new("RGB", (side, side))]


def bench_engine_hf(
    result: BenchResult, sizes: BenchSizes, model: str, device: str | None = None, dtype: str | None = None
) -> None:
    """Our HFCaptioner through the engine runner the caption stage uses (the next batch prepared while one generates)
    vs `model.generate` on the very batches the processor makes (made before the clock, already on the device),
    greedy, same token budget; and vs a hand-written loop (the processor, then generate, per batch). Device: CUDA
    where there is one; dtype: bfloat16 on CUDA, float32 on the CPU."""
    import torch

    from recaption.captioners import Request, make_runner
    from recaption.captioners.engines.hf import HFCaptioner, _to
    from recaption.config import GenerationConfig, ModelConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    generation = GenerationConfig(max_new_tokens=sizes.max_new_tokens, temperature=0.0)
    cfg = ModelConfig(path=model, engine="hf", batch_size=sizes.engine_batch, dtype=dtype, device=device,
                      generation=generation)  # fmt: skip
    captioner = HFCaptioner(cfg)
    sync = torch.cuda.synchronize if captioner.device.type == "cuda" else (lambda: None)
    images = engine_images(sizes.engine_images)
    prompt = captioner._format("Describe this image in detail.")
    prompts = ["Describe this image in detail."] * len(images)
    gen_config = captioner._generation_config()
    chunks = [images[i : i + sizes.engine_batch] for i in range(0, len(images), sizes.engine_batch)]

    def encode(chunk: list) -> dict:  # the processor's batch, on the device
        enc = captioner.processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        return {k: _to(v, captioner.device, captioner.dtype) for k, v in enc.items()}

    def generate(enc: dict) -> int:  # the tokens it generated
        out = captioner.model.generate(**enc, generation_config=gen_config)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]

    batches = [encode(chunk) for chunk in chunks]

    def bare() -> int:
        with torch.inference_mode():
            tokens = sum(generate(enc) for enc in batches)
        sync()
        return tokens

    def hand() -> int:  # what a user writes by hand: the processor on each batch, then generate, in turn
        with torch.inference_mode():
            tokens = sum(generate(encode(chunk)) for chunk in chunks)
        sync()
        return tokens

    def ours() -> int:  # as the caption stage runs it: the runner prepares the next batch while one generates
        runner = make_runner(captioner, cfg)
        try:
            futures = [
                runner.submit(Request(im, p, generation, i, "bench"))
                for i, (im, p) in enumerate(zip(images, prompts, strict=True))
            ]
            tokens = sum(g.n_tokens for f in futures for g in f.result())
        finally:
            runner.close()
        sync()
        return tokens

    # Each side's generate on a thread of its own, as the runner's engine thread is. On the CPU, generate on this
    # thread for the bare loop and on the runner's thread for ours made two OpenMP teams in one process, and the
    # runner's then ran at 0.4x the speed it has alone (0.56 s against 0.22 s for 64 images): that measured the
    # bench, not the engine.
    bare_alone, hand_alone, ours_alone = on_a_thread(bare), on_a_thread(hand), on_a_thread(ours)
    bare_alone(), hand_alone(), ours_alone()  # warm-up: first-call allocations and lazy inits off the clock
    n, tokens = len(images), [0]

    def timed(fn: Callable[[], int], keep: bool = False) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            count = fn()
            seconds = time.perf_counter() - start
            if keep:
                tokens[0] = count / seconds
            return n / seconds

        return run

    values = interleaved(
        {"bare": timed(bare_alone), "hand": timed(hand_alone), "ours": timed(ours_alone, keep=True)},
        max(sizes.repeats, 5),
        "hf engine (images/s)",
    )
    result.add(
        compared(
            f"hf engine ({model})", "images/s", values["ours"], values["bare"], ">= 0.9",
            f"{n} images, batch {sizes.engine_batch}, greedy, {sizes.max_new_tokens} new tokens, {dtype} on {device}; "
            f"{tokens[0]:.0f} generated tokens/s; ours: the caption stage's engine runner (the processor on the next "
            "batch while one generates); bare loop: model.generate on the processor's batches, made before the clock",
        )
    )  # fmt: skip
    result.add(
        compared(
            f"hf engine vs processor + generate in turn ({model})", "images/s", values["ours"], values["hand"],
            note="the same runs against what a hand-written loop does: the processor on each batch, then "
            "model.generate, one after the other. Against the bare loop above the difference is the processor's "
            "work; against this one, what the runner itself costs or saves",
        )
    )  # fmt: skip

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


def engine_images(n: int, side: int = 336) -> list:
    from PIL import Image

    from recaption.sources import load_rgb

    return [load_rgb(photo_like(10_000 + i, side)) for i in range(n)] or [Image.new("RGB", (side, side))]


def bench_engine_hf(
    result: BenchResult, sizes: BenchSizes, model: str, device: str | None = None, dtype: str | None = None
) -> None:
    """Our HFCaptioner vs `model.generate` on the very batches the processor makes (already on the device), greedy,
    same token budget. Device: CUDA where there is one; dtype: bfloat16 on CUDA, float32 on the CPU."""
    import torch

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
    batches = [
        captioner.processor(images=images[i : i + sizes.engine_batch], text=[prompt] * len(images[i : i + sizes.engine_batch]),
                            return_tensors="pt", padding=True)
        for i in range(0, len(images), sizes.engine_batch)
    ]  # fmt: skip
    batches = [{k: _to(v, captioner.device, captioner.dtype) for k, v in enc.items()} for enc in batches]

    def bare() -> int:
        tokens = 0
        with torch.inference_mode():
            for enc in batches:
                out = captioner.model.generate(**enc, generation_config=gen_config)
                tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        sync()
        return tokens

    def ours() -> int:
        tokens = sum(g.n_tokens for g in captioner.caption(images, prompts))
        sync()
        return tokens

    bare(), ours()  # warm-up: first-call allocations and lazy inits off the clock
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
        {"bare": timed(bare), "ours": timed(ours, keep=True)}, max(sizes.repeats, 5), "hf engine (images/s)"
    )
    result.add(
        compared(
            f"hf engine ({model})", "images/s", values["ours"], values["bare"], ">= 0.9",
            f"{n} images, batch {sizes.engine_batch}, greedy, {sizes.max_new_tokens} new tokens, {dtype} on {device}; "
            f"{tokens[0]:.0f} generated tokens/s; bare loop: model.generate on the processor's batches",
        )
    )  # fmt: skip

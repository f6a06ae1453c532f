"""The hf engine on a CUDA GPU (bf16, batched), alone and as a GPU actor of the Ray job. Run with `pytest -m gpu`."""

from __future__ import annotations

import importlib.util

import pytest
from PIL import Image

import recaption.captioners.engines.hf as hf_engine
from recaption.captioners.engines.hf import HFCaptioner
from recaption.captioners.tiny import build_tiny
from recaption.config import GenerationConfig, ModelConfig, load_config

torch = pytest.importorskip("torch")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, gpu]
# bf16 keeps 8 bits of mantissa: its next-token logits stay close to float32's without being equal. bf16 on a CPU gave
# a cosine of 0.99997 (min over 16 requests, each tiny family); no GPU was there to measure CUDA's bf16 kernels, so the
# bound leaves them room while a broken bf16 path (weights or pixel values cast wrongly) falls far below it.
MIN_LOGIT_COSINE = 0.999


def first_step_logits(engine: HFCaptioner, images: list[Image.Image], prompt: str) -> torch.Tensor:
    """The next-token logits after each (image, prompt), as the engine's own preprocessing feeds its model."""
    texts = [engine._format(prompt)] * len(images)
    encoding = engine.processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs = {k: hf_engine._to(v, engine.device, engine.dtype) for k, v in encoding.items()}
    with torch.inference_mode():
        return engine.model(**inputs).logits[:, -1].float().cpu()  # left padding: the last position is the prompt's


@pytest.mark.parametrize("family", ["llava", "instructblip", "blip2"])
def test_bf16_on_cuda_generates_and_its_logits_match_float32_on_cpu(tmp_path, family):
    path = build_tiny(family, tmp_path / family)
    images = [Image.new("RGB", (40 + 4 * i, 30), (20 * i, 90, 200)) for i in range(16)]
    prompt = "Describe the image in detail."
    gen = GenerationConfig(max_new_tokens=8)
    bf16 = HFCaptioner(ModelConfig(path=str(path), device="cuda", batch_size=16, generation=gen))  # dtype auto
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cuda"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and next(bf16.model.parameters()).is_cuda
    assert bf16.versions()["dtype"] == "bfloat16" and bf16.versions()["device"].startswith("cuda")
    out = bf16.caption(images, [prompt] * len(images))
    assert all(g.error is None and 0 < g.n_tokens <= 8 for g in out)
    cpu = HFCaptioner(ModelConfig(path=str(path), device="cpu", batch_size=16, generation=gen))
    assert cpu.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(
        first_step_logits(bf16, images, prompt), first_step_logits(cpu, images, prompt), dim=-1
    )
    assert float(cosine.min()) >= MIN_LOGIT_COSINE, cosine
    # float32 on the GPU and on the CPU: same weights, same preprocessing, the same greedy text.
    fp32 = HFCaptioner(ModelConfig(path=str(path), device="cuda", dtype="float32", batch_size=16, generation=gen))
    assert [g.text for g in fp32.caption(images, [prompt] * 16)] == [g.text for g in cpu.caption(images, [prompt] * 16)]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (scripts/gpu-check.sh)")
def test_gpu_actor_in_the_ray_job(tmp_path, ray_session):
    """A caption actor that asks Ray for a GPU runs its engine on CUDA. `device: cuda` makes that checkable: the
    engine moves the model to CUDA in the actor, which fails (and with it every row) unless Ray handed the actor a
    visible GPU; the pool is sized from the GPUs Ray detected (`concurrency: auto`)."""
    from recaption.job.pipeline import run_pipeline
    from recaption.job.placement import cluster_gpus
    from tests.data import write_webdataset_dir

    assert cluster_gpus(ray_session.nodes()) >= 1, "Ray detected no GPU on a machine where torch sees one"
    keys = write_webdataset_dir(tmp_path / "in", 8, shard_size=4)
    data = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "models": [{"path": "tiny-llava", "engine": "hf", "device": "cuda", "num_gpus": 1, "concurrency": "auto"}],
        "generation": {"max_new_tokens": 8},
    }
    summary = run_pipeline(load_config(None, data=data), progress=False)
    assert summary.ok == len(keys) and not summary.unit_errors

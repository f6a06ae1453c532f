"""The hf engine on a CUDA GPU (bf16, batched), alone and as a GPU actor of the Ray job. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
from PIL import Image

from recaption.config import GenerationConfig, ModelConfig, load_config
from recaption.engines.hf import HFCaptioner
from recaption.tiny import build_tiny

torch = pytest.importorskip("torch")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, gpu]


@pytest.mark.parametrize("family", ["llava", "instructblip", "blip2"])
def test_bf16_on_cuda_generates_and_matches_cpu_tokens_at_first(tmp_path, family):
    path = build_tiny(family, tmp_path / family)
    images = [Image.new("RGB", (40 + 4 * i, 30), (20 * i, 90, 200)) for i in range(16)]
    prompts = ["Describe the image in detail."] * len(images)
    gen = GenerationConfig(max_new_tokens=8)
    cuda = HFCaptioner(ModelConfig(path=str(path), device="cuda", batch_size=16, generation=gen))
    assert str(cuda.dtype) == "torch.bfloat16" and cuda.device.type == "cuda"
    out = cuda.caption(images, prompts)
    assert all(g.error is None and 0 < g.n_tokens <= 8 for g in out)
    fp32 = HFCaptioner(ModelConfig(path=str(path), device="cuda", dtype="float32", batch_size=16, generation=gen))
    cpu = HFCaptioner(ModelConfig(path=str(path), device="cpu", batch_size=16, generation=gen))
    # Same weights, same preprocessing: float32 on the GPU and on the CPU agree on the greedy text.
    assert [g.text for g in fp32.caption(images, prompts)] == [g.text for g in cpu.caption(images, prompts)]


def test_gpu_actor_in_the_ray_job(tmp_path, ray_session):
    from recaption.pipeline import run_pipeline
    from tests.data import write_webdataset_dir

    keys = write_webdataset_dir(tmp_path / "in", 8, shard_size=4)
    data = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "models": [{"path": "tiny-llava", "engine": "hf", "device": "cuda", "num_gpus": 1, "concurrency": "auto"}],
        "generation": {"max_new_tokens": 8},
    }
    summary = run_pipeline(load_config(None, data=data), progress=False)
    assert summary.ok == len(keys) and not summary.unit_errors

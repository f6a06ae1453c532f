"""A dead engine is an infrastructure fault, not a bad image: the actor ends, Ray replaces it, the unit is retried and
every row ends `ok`, each once. Only the error of one request becomes a failed row."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from recaption.captioners.engines.base import engine_dead
from recaption.config import load_config
from recaption.errors import EngineDeadError
from recaption.job.pipeline import run_pipeline
from tests.data import write_webdataset_dir
from tests.job.test_captioning import stage, unit_table


@pytest.mark.parametrize(
    "error, dead",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
        (type("EngineDeadError", (Exception,), {})("EngineCore encountered an issue"), True),
        (EngineDeadError("gone"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (ValueError("image too small for the processor"), False),
        (RuntimeError("shape mismatch in a request"), False),
    ],
)
def test_engine_dead_tells_a_dead_engine_from_a_bad_request(error, dead):
    assert engine_dead(error) is dead
    wrapped = RuntimeError("generate failed")
    wrapped.__cause__ = error
    assert engine_dead(wrapped) is dead


def test_a_dead_engine_is_raised_by_the_stage_not_turned_into_failed_rows(tmp_path, monkeypatch):
    s = stage(tmp_path)
    calls = []

    def dead(images, prompts, gen=None):
        calls.append(len(images))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(s.captioner, "caption", dead)
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        s.caption_unit("u", unit_table([50, 51, 52]))
    assert len(calls) == 1, "a dead engine must not be called again, nor retried image by image"


def test_a_request_error_still_fails_only_its_row(tmp_path):
    rows = stage(tmp_path, fake={"raise_on_width": 61}).caption_unit("u", unit_table([50, 61])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed"]


def test_hf_engine_raises_engine_dead_on_a_cuda_fault(monkeypatch, tmp_path):
    from recaption.captioners.engines.hf import HFCaptioner
    from recaption.config import GenerationConfig, ModelConfig
    from tests.job.test_captioning import png

    monkeypatch.setenv("RECAPTION_FAULT", "engine:cuda-error")
    captioner = HFCaptioner(
        ModelConfig(path="tiny-llava", engine="hf", batch_size=2, generation=GenerationConfig(max_new_tokens=4))
    )
    from io import BytesIO

    from PIL import Image

    images = [Image.open(BytesIO(png(40 + i))) for i in range(4)]
    with pytest.raises(EngineDeadError, match="device failed.*illegal memory access"):
        captioner.caption(images, ["Describe."] * 4)


def test_a_cuda_fault_mid_unit_ends_the_actor_and_the_unit_is_retried_to_every_row_ok(tmp_path, ray_session):
    """The hf engine faults on the second batch of the first unit (once, across actors): that actor ends, Ray
    starts another, the unit is captioned again; no row is failed, none is written twice."""
    keys = write_webdataset_dir(tmp_path / "in", 8, shard_size=4)
    once = tmp_path / "fault-fired"
    model = {
        "path": "tiny-llava",
        "engine": "hf",
        "prompts": ["short"],
        "batch_size": 2,
        "num_cpus": 0.25,
        "max_unit_attempts": 2,
        "env": {
            "RECAPTION_FAULT": "engine:cuda-error",
            "RECAPTION_FAULT_SKIP": "1",
            "RECAPTION_FAULT_ONCE": str(once),
        },
    }
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    cfg = load_config(None, ["generation.max_new_tokens=4"], data=data)
    summary = run_pipeline(cfg, progress=False)
    assert once.exists(), "the fault never fired: the test proves nothing"
    assert (summary.ok, summary.failed, summary.unit_errors) == (8, 0, {})
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert sorted(r["key"] for r in rows) == keys
    assert all(r["status"] == "ok" and len(r["captions"]) == 1 for r in rows)

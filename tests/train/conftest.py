"""A real pipeline output to train on: synthetic scenes in webdataset shards, captioned by the fake engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from recaption.config import load_config
from recaption.eval.synthetic import make_scene
from recaption.job.pipeline import run_pipeline
from recaption.sources.tar import write_webdataset
from recaption.train.config import TrainConfig, load_train_config

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
N_IMAGES = 40
BROKEN_KEY = "000005"  # its image bytes are not an image: the pipeline writes a failed row


@pytest.fixture(scope="session")
def caption_output(tmp_path_factory, ray_session) -> Path:
    """`recaption run` over 40 scenes (5 tar shards) with prompts detailed + short; alt texts are the scenes' short
    captions (`a red circle`), one row is failed."""
    root = tmp_path_factory.mktemp("train-data")
    samples = (
        {
            "key": f"{i:06d}",
            "jpg": b"not an image" if f"{i:06d}" == BROKEN_KEY else scene.jpeg(),
            "caption": scene.short_caption,
            "url": f"http://example.com/{i}.jpg",
        }
        for i, scene in ((i, make_scene(i, size=64)) for i in range(N_IMAGES))
    )
    write_webdataset(str(root / "input"), samples, shard_size=8)
    fake = {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["detailed", "short"], "num_cpus": 0.25}
    cfg = load_config(None, data={"input": {"path": str(root / "input")}, "output": {"path": str(root / "out")},
                                  "models": [fake]})  # fmt: skip
    summary = run_pipeline(cfg, progress=False)
    assert summary.failed == 1 and summary.ok == N_IMAGES - 1
    return root / "out"


def tiny_config(data_path: Path, output: Path, *overrides: str) -> TrainConfig:
    """pipelines/train-tiny.yaml on `data_path`, writing to `output`, quiet."""
    base = [f"data.path={data_path}", f"run.output={output}", "run.log_every=1"]
    return load_train_config(PIPELINES / "train-tiny.yaml", [*base, *overrides])

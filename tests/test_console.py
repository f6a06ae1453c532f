"""A quiet console: Ray's noise hidden unless --verbose (filtered on fd 2, the rest untouched), the scene captioner
warns on images that are not the demo's, and `recaption --version`."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from recaption.config import load_config
from recaption.console import is_noise

RAY_E_LINE = (
    "[2026-12-02 13:14:36,769 E 18225 18225] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(CaptionStage))' and ID: 'e6d1' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart will fail."
)
TOKEN_LINE = (
    "2026-12-02 13:13:52,609\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray "
    "cluster. Set RAY_AUTH_MODE=disabled to opt out."
)

SCRIPT = """
import logging, os, sys
from recaption import console
console.quiet(verbose={verbose})
os.write(2, b"first line\\n" + {ray!r}.encode() + b"\\n\\rpartial bar")
os.write(2, b" 50%\\n")
logging.basicConfig()
logging.getLogger("ray._private.authentication.authentication_token_setup").warning("Token authentication is enabled")
print("to stderr from python", file=sys.stderr)
os.write(2, b"last line without newline")
print("VLLM_LOGGING_LEVEL=" + os.environ.get("VLLM_LOGGING_LEVEL", "unset"))
"""


def test_noise_lines():
    assert is_noise(RAY_E_LINE) and is_noise(TOKEN_LINE)
    assert is_noise(
        "\x1b[36m(RayTrainWorker pid=28705)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, "
        "metrics={'step': 3}, validation=False) from rank 1"
    )
    assert is_noise(
        "\x1b[36m(PlacementGroupCleaner pid=28641)\x1b[0m Failed to query Ray Train Controller actor state. State API "
        "may be temporarily unavailable. Continuing to monitor."
    )
    assert not is_noise("(RayTrainWorker pid=1) train done: steps=3/3 samples=12 loss=3.206")
    assert not is_noise("[2026-12-02 13:14:36,769 E 1 1] core_worker.cc:100: Failed to connect to GCS")
    assert not is_noise("recaption progress: units=1/1")


@pytest.mark.parametrize("verbose", [False, True])
def test_fd2_filter_in_a_process(verbose):
    code = SCRIPT.format(verbose=verbose, ray=RAY_E_LINE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env_without_vllm_level())
    err = done.stderr.decode()  # bytes as written: a bar's \r stays a \r
    assert "first line\n" in err and "\rpartial bar 50%\n" in err and "to stderr from python" in err
    assert err.endswith("last line without newline")  # what is left at exit is passed on
    assert ("has constructor arguments" in err) == verbose
    assert ("Token authentication" in err) == verbose
    # a local Ray's actors inherit it: vLLM's INFO lines only with --verbose
    assert f"VLLM_LOGGING_LEVEL={'unset' if verbose else 'WARNING'}" in done.stdout.decode()
    mine = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**env_without_vllm_level(), "VLLM_LOGGING_LEVEL": "DEBUG"},
    )  # fmt: skip
    assert "VLLM_LOGGING_LEVEL=DEBUG" in mine.stdout  # the user's own setting stays


def env_without_vllm_level() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}


def test_version():
    exe = Path(sys.executable).with_name("recaption")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("recaption 0.")


def test_scene_captioner_warns_on_other_images(tmp_path, caplog):
    from recaption.demo import write_demo_shards
    from recaption.job.pipeline import warn_scene_captioner
    from recaption.sources.plan import plan_units
    from tests.data import write_webdataset_dir

    write_webdataset_dir(tmp_path / "photos", 2, 2)
    write_demo_shards(tmp_path / "scenes", 2)
    for src, warned in (("photos", True), ("scenes", False)):
        cfg = load_config(
            None,
            data={
                "input": {"path": str(tmp_path / src)},
                "output": {"path": str(tmp_path / "out")},
                "models": [{"path": "scene-llava", "engine": "hf"}],
            },
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="recaption.job.pipeline"):
            warn_scene_captioner(cfg, plan_units(cfg.input))
        assert ("only knows the demo's generated scenes" in caplog.text) == warned, src
        assert not warned or "pipelines/llava15.yaml" in caplog.text

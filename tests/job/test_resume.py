"""Kill -9 at any moment, rerun the same command: every input row appears exactly once, and readers of the output
never see a partial file. The run is a real `recaption run` process killed with its whole Ray session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from tests.data import write_webdataset_dir

N_IMAGES, SHARD_SIZE = 24, 3


def write_config(tmp_path: Path) -> Path:
    cfg = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        # One attempt per unit: a kill of the whole run is no engine crash and must not use it up.
        "models": [
            {"path": "fake", "engine": "fake", "prompts": ["short"], "fake": {"delay_s": 0.15}, "max_unit_attempts": 1}
        ],
        "ray": {"num_cpus": 2},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, fault: str | None, log: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RECAPTION_FAULT")}
    if fault:
        env["RECAPTION_FAULT"] = fault
    exe = Path(sys.executable).with_name("recaption")
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(exe), "run", str(config), "--no-progress", *args],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the run's session (driver, GCS, raylet, workers), as a power cut would."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the run never reached the point to kill it at")
        time.sleep(0.05)


def output_keys(out: Path) -> list[str]:
    """What a reader sees: every visible file must be a whole Parquet file."""
    if not list(out.glob("part-*.parquet")):
        return []
    return pads.dataset(str(out), format="parquet").to_table(columns=["key"]).column("key").to_pylist()


# A kill between data and marker is also covered, faster and without a kill, by test_reliability's orphan-part test.
AFTER_DATA = pytest.param("commit:after-data", marks=pytest.mark.slow)


def rerun_to_the_end(config: Path, log: Path, out: Path, keys: list[str]) -> None:
    """Reruns the killed run to completion: every input key is in the output exactly once."""
    rerun = start(config, None, log)
    try:
        assert rerun.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_session(rerun)
    final = output_keys(out)
    assert sorted(final) == sorted(keys) and len(final) == len(set(final))


@pytest.mark.parametrize("fault", [None, "caption:start", "commit:before-rename", AFTER_DATA])
def test_kill_anywhere_then_rerun_gives_every_row_exactly_once(tmp_path, fault):
    keys = write_webdataset_dir(tmp_path / "in", N_IMAGES, SHARD_SIZE)
    config, out, log = write_config(tmp_path), tmp_path / "out", tmp_path / "run.log"
    proc = start(config, fault, log)
    try:
        if fault is None:  # an arbitrary moment while units are being captioned and committed
            wait_for(lambda: (out / "_done").is_dir() and len(list((out / "_done").iterdir())) >= 2)
            kill_session(proc)
        else:  # the run kills its own session at the fault point
            proc.wait(timeout=180)
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    if fault == "caption:start":  # with max_unit_attempts 1, counting this kill as an engine crash would fail rows
        assert list((out / "_attempts").iterdir()), "the kill should have left an attempt count behind"

    seen = output_keys(out)  # readable as it is: no partial file visible
    assert len(seen) == len(set(seen)) and len(seen) < N_IMAGES
    if fault == "commit:before-rename":
        assert list(out.glob(".recaption-tmp-*")), "the kill should have left a temp file behind"
    if fault == "commit:after-data":
        parts = {p.name.removeprefix("part-").removesuffix(".recaption.parquet") for p in out.glob("part-*.parquet")}
        markers = {p.name.removesuffix(".recaption.json") for p in (out / "_done").glob("*.json")}
        assert parts - markers, "the kill should have left a part file without its marker"

    rerun_to_the_end(config, log, out, keys)
    statuses = pads.dataset(str(out), format="parquet").to_table(columns=["status"]).column("status").to_pylist()
    assert set(statuses) == {"ok"}, log.read_text()[-3000:]  # no kill was counted as an engine crash
    assert not [p for p in out.rglob("*") if p.name.startswith(".recaption-tmp-")]
    markers = {p.name.removesuffix(".recaption.json") for p in (out / "_done").iterdir()}
    parts = {p.name.removeprefix("part-").removesuffix(".recaption.parquet") for p in out.glob("part-*.parquet")}
    assert len(markers) == N_IMAGES // SHARD_SIZE and parts == markers
    assert not (out / "_attempts").exists() or not list((out / "_attempts").iterdir())
    bookkeeping = {p.name for p in out.iterdir() if not p.name.startswith("part-")}
    assert bookkeeping <= {
        "_done",
        "_attempts",
        "_manifest",
        "_run.json",
        "_progress.json",
        "_recaption.json",
        "_stats.json",
    }, bookkeeping

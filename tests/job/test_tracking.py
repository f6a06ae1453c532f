"""--report-to: the run's and the trainer's figures in TensorBoard event files (read back) and in an offline W&B run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recaption.errors import ConfigError
from recaption.job.progress import Progress
from recaption.job.tracking import make_trackers, parse_report_to, require, scalars

pytest.importorskip("tensorboard")


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `log_dir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for run in {p.parent for p in log_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_parse_report_to():
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert parse_report_to(None) == [] and parse_report_to("none") == []
    with pytest.raises(ConfigError, match="known trackers are tensorboard, wandb"):
        parse_report_to("mlflow")


def test_missing_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'recaption\[wandb\]'"):
        require(["tensorboard", "wandb"])


def test_progress_to_tensorboard(tmp_path):
    trackers = make_trackers(["tensorboard"], tmp_path, "r1")
    metrics = json.dumps({"m": {"busy": 0.5, "in_flight": 3, "waiting": 1, "output_tokens": 10, "wall_s": 2.0}})
    with Progress.for_units(3, enabled=False, trackers=trackers) as p:
        for i in range(3):
            p.unit_done({"unit": str(i), "rows": 10, "ok": 9, "failed": 1, "tokens": 100, "metrics": metrics})
    found = read_scalars(tmp_path / "tensorboard")
    assert [v for _, v in found["recaption/rows"]] == [10, 20, 30]
    assert [s for s, _ in found["recaption/units_done"]] == [1, 2, 3]
    assert found["recaption/engine/m/busy"][-1][1] == pytest.approx(0.5)
    assert "recaption/images_per_s" in found


def test_scalars_keep_finite_numbers_only():
    state = {"ok": 3, "loss": float("nan"), "lr": 1e-4, "desc": "x", "finished": True, "errors": {"a": "b"}}
    assert scalars(state, "train") == {"train/ok": 3.0, "train/lr": 1e-4}


def test_pipeline_run_reports_to_tensorboard(ray_session, tmp_path):
    import recaption
    from tests.data import write_webdataset_dir

    write_webdataset_dir(tmp_path / "in", 6, 3)
    cfg = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "models": [{"path": "fake", "engine": "fake", "num_cpus": 0.25}],
    }
    summary = recaption.run(cfg, progress=False, report_to="tensorboard")
    assert summary.ok == 6
    found = read_scalars(tmp_path / "out" / "_tracking" / "tensorboard")
    assert found["recaption/rows"][-1] == (2, 6.0) and found["recaption/ok"][-1][1] == 6
    # The output still reads as before: the tracker's files are not part files.
    assert recaption.read_output(tmp_path / "out").count() == 6


def read_wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The logged rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records: crc32, length,
    kind) of wandb's own protobuf records, after a 7-byte header."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, rows, block = run_file.read_bytes(), 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        pending += data[pos : pos + n]
        pos += n
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


WANDB_RUN = """
import sys
from recaption.job.progress import Progress
from recaption.job.tracking import make_trackers
trackers = make_trackers(["wandb"], sys.argv[1], "run-a", {"model": "tiny"}, kind="train")
with Progress.for_steps(4, enabled=False, trackers=trackers) as p:
    for step in range(4):
        p.advance(1, {"samples": 8}, loss=1.0 / (step + 1), lr=0.1)
"""


def test_wandb_offline(tmp_path):
    """An offline W&B run, in a process of its own (wandb keeps process-wide state that other tests' imports touch),
    read back from its run file."""
    import subprocess
    import sys

    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-c", WANDB_RUN, str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0])
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert history[-1]["train/samples"] == 32 and history[-1]["train/steps_done"] == 4

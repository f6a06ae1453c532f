"""Kill -9 a run over a tar split into units, rerun: every sample of the tar appears exactly once, resumed at the
grain of the units (`<tar>-sNNNN`), and the tar is indexed once for all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import yaml

from tests.data import write_webdataset_dir
from tests.job.test_resume import kill_session, rerun_to_the_end, start, wait_for

N_IMAGES, UNIT_SIZE = 24, 3


def write_config(tmp_path: Path) -> Path:
    cfg = {
        "input": {"path": str(tmp_path / "in"), "unit_size": UNIT_SIZE},
        "output": {"path": str(tmp_path / "out")},
        "models": [{"path": "fake", "engine": "fake", "prompts": ["short"], "fake": {"delay_s": 0.15}}],
        "ray": {"num_cpus": 2},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill_then_rerun_resumes_a_split_tar_at_unit_grain(tmp_path):
    keys = write_webdataset_dir(tmp_path / "in", N_IMAGES, N_IMAGES)  # one tar, with img2dataset's _stats.json
    config, out, log = write_config(tmp_path), tmp_path / "out", tmp_path / "run.log"
    proc = start(config, None, log)
    try:
        wait_for(lambda: (out / "_done").is_dir() and len(list((out / "_done").iterdir())) >= 2)
        kill_session(proc)
    finally:
        kill_session(proc)
    first = {p.name: json.loads(p.read_text())["committed_at"] for p in (out / "_done").iterdir()}
    assert 2 <= len(first) < N_IMAGES // UNIT_SIZE

    rerun_to_the_end(config, log, out, keys)
    units = [f"00000-s{i:04d}" for i in range(N_IMAGES // UNIT_SIZE)]
    assert sorted(p.name.removesuffix(".recaption.json") for p in (out / "_done").iterdir()) == units
    again = {p.name: json.loads(p.read_text())["committed_at"] for p in (out / "_done").iterdir()}
    assert {name: again[name] for name in first} == first  # the units done before the kill were not redone
    table = pads.dataset(str(out), format="parquet").to_table(columns=["key", "unit", "status"]).to_pylist()
    assert {r["status"] for r in table} == {"ok"}
    assert all(r["unit"] == f"00000-s{int(r['key']) // UNIT_SIZE:04d}" for r in table)
    assert [p.name for p in (out / "_index").iterdir()] == ["00000.recaption.json"]

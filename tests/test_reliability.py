"""Faults at run level: an engine that kills its process, a rerun with another config, paths that cannot work."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from recaption.cli import main
from recaption.config import load_config
from recaption.errors import ConfigError
from recaption.pipeline import run_pipeline
from recaption.shards.tar import write_webdataset
from tests.data import make_image, write_webdataset_dir

FAKE = {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25}


def config(tmp_path, models=(FAKE,), **overrides):
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": list(models)}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()], data=data)


def test_an_engine_that_kills_its_process_fails_its_unit_and_the_job_goes_on(tmp_path, ray_session):
    samples = [{"key": f"{i:03d}", "jpg": make_image(i, size=(61 if i == 4 else 64, 48))} for i in range(9)]
    write_webdataset(str(tmp_path / "in"), samples, shard_size=3)  # image 4 (61 px wide) is in unit 00001
    crashing = {**FAKE, "fake": {"crash_on_width": 61}, "max_unit_attempts": 2}
    summary = run_pipeline(config(tmp_path, [crashing]), progress=False)
    assert (summary.rows, summary.ok, summary.failed, summary.unit_errors) == (9, 6, 3, {})
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    failed = sorted(r["key"] for r in rows if r["status"] == "failed")
    assert failed == ["003", "004", "005"]
    assert all("crashed on this unit 2 times" in r["error"] for r in rows if r["status"] == "failed")
    assert not list((tmp_path / "out" / "_attempts").iterdir())  # counts are forgotten once a unit commits


def test_rerun_with_another_config_is_refused_unless_overwrite(tmp_path, ray_session, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    run_pipeline(config(tmp_path), progress=False)
    # What only changes speed or placement is not another config.
    assert run_pipeline(config(tmp_path, **{"models.0.concurrency": 2, "ray.read_num_cpus": 0.5})).units_skipped == 2
    with pytest.raises(
        ConfigError,
        match=r"another config \(changed: generation.max_new_tokens, models.0.generation.max_new_tokens\).*--overwrite",
    ):
        run_pipeline(config(tmp_path, **{"generation.max_new_tokens": 99}), progress=False)
    summary = run_pipeline(config(tmp_path, **{"generation.max_new_tokens": 99}), progress=False, overwrite=True)
    assert (summary.units_done, summary.rows) == (2, 4)


def test_cli_exit_codes_for_bad_paths(tmp_path, capsys):
    write_webdataset_dir(tmp_path / "in", 2, shard_size=2)
    path = tmp_path / "p.yaml"
    path.write_text(
        f"input: {{path: {tmp_path / 'in'}}}\noutput: {{path: {tmp_path / 'in' / 'out'}}}\nmodels: [{{path: fake, engine: fake}}]\n"
    )
    assert main(["run", str(path)]) == 2
    assert "lies inside input.path" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a dataset")
    assert (
        main(
            [
                "run",
                str(path),
                "--set",
                f"input.path={tmp_path / 'notes.txt'}",
                "--set",
                f"output.path={tmp_path / 'o'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0]
    assert main(["run", str(path), "--set", "input.format=tarballs"]) == 2
    assert "input.format" in capsys.readouterr().err

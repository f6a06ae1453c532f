"""Faults at run level: an engine that kills its process, a rerun with another config, paths that cannot work."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from recaption.cli import main
from recaption.config import load_config
from recaption.errors import ConfigError, EngineError
from recaption.job.pipeline import run_pipeline
from recaption.job.writer import open_output
from recaption.sources.tar import write_webdataset
from tests.data import make_image, write_webdataset_dir
from tests.job.test_captioning import stage, unit_table

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


def test_attempts_of_an_earlier_run_do_not_count(tmp_path):
    """A run killed while captioning (driver, Ctrl-C) is no engine crash: a new run starts counting afresh."""
    for n in (1, 2):  # what a killed run left
        assert stage(tmp_path, max_unit_attempts=1).begin_attempt("u") == n
    open_output(str(tmp_path / "out")).prepare()  # what every run does first
    s = stage(tmp_path, max_unit_attempts=1)
    assert {r["status"] for r in s.caption_unit("u", unit_table([50, 51])).to_pylist()} == {"ok"}
    # An attempt that ends well is no crash; one that started and never ended is, within this run.
    assert s.attempts_so_far("u") == 0
    s.begin_attempt("u")  # the actor died after this: the next one may not try again (max 1)
    rows = stage(tmp_path, max_unit_attempts=1).caption_unit("u", unit_table([50, 51])).to_pylist()
    assert all("crashed on this unit 1 times" in r["error"] for r in rows)


def test_an_engine_that_returns_the_wrong_number_of_generations_fails_loudly(tmp_path, monkeypatch):
    s = stage(tmp_path, generation={"n": 2, "temperature": 1.0})
    real = s.captioner.caption
    monkeypatch.setattr(s.captioner, "caption", lambda images, prompts, gen=None: real(images, prompts, gen)[:-1])
    with pytest.raises(EngineError, match=r"returned (\d+) generations for (\d+) requests × n=2 \(expected \d+\)"):
        s.caption_unit("u", unit_table([50, 51]))


def test_a_shard_that_becomes_unreadable_after_planning_exits_1_and_is_retried(
    tmp_path, ray_session, monkeypatch, capsys
):
    """As the README says: reported, no marker for its unit, exit 1; the next run redoes only that unit."""
    import recaption.sources.plan as plan

    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    path = tmp_path / "p.yaml"
    path.write_text(
        f"input: {{path: {tmp_path / 'in'}}}\noutput: {{path: {tmp_path / 'out'}}}\n"
        "models: [{path: fake, engine: fake, num_cpus: 0.25}]\n"
    )
    shard = tmp_path / "in" / "00001.tar"
    saved, real_plan = shard.read_bytes(), plan.plan_units

    def plan_then_lose_a_shard(input_cfg, *args):
        units = real_plan(input_cfg, *args)
        shard.unlink()  # a node's disk, a deleted object: gone between the plan and the read
        return units

    monkeypatch.setattr(plan, "plan_units", plan_then_lose_a_shard)
    assert main(["run", str(path), "--no-progress"]) == 1
    markers = sorted(p.name for p in (tmp_path / "out" / "_done").iterdir())
    assert markers == ["00000.recaption.json"] and not (tmp_path / "out" / "part-00001.recaption.parquet").exists()
    monkeypatch.setattr(plan, "plan_units", real_plan)
    shard.write_bytes(saved)
    assert main(["run", str(path), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "_done").iterdir()) == [
        "00000.recaption.json",
        "00001.recaption.json",
    ]
    assert "units:    1 run, 1 already done" in capsys.readouterr().out
    assert pads.dataset(str(tmp_path / "out")).count_rows() == 4


def test_part_files_without_a_marker_are_removed_before_readers_see_them(tmp_path, ray_session):
    """A part file a killed run left without its marker, for a unit this run does not plan, is no output."""
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    run_pipeline(config(tmp_path), progress=False)
    out = tmp_path / "out"
    part = (out / "part-00000.recaption.parquet").read_bytes()
    (out / "part-00007.recaption.parquet").write_bytes(part)  # no marker: not done
    (out / "_attempts" / "00000.fake.recaption.json").write_text('{"attempts": 1}')  # a stray count of a done unit
    assert run_pipeline(config(tmp_path), progress=False).units_skipped == 2
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.recaption.parquet",
        "part-00001.recaption.parquet",
    ]
    assert not list((out / "_attempts").iterdir())
    assert pads.dataset(str(out), format="parquet").count_rows() == 4
    # Killed between a unit's data and its marker: the part file is there, the marker not. The rerun redoes that
    # unit alone and readers see each row once (tests/job/test_resume.py kills a real run there, marked slow).
    (out / "_done" / "00001.recaption.json").unlink()
    summary = run_pipeline(config(tmp_path), progress=False)
    assert (summary.units_skipped, summary.units_done) == (1, 1)
    keys = pads.dataset(str(out), format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 4

"""`recaption plan`: units and rows (counted, or estimated from a sample of shards), what the output holds, the pools
and where they fit, and a calibration run in a temporary output; never a write into the output directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

import recaption
from recaption.cli import main
from recaption.config import InputConfig, load_config
from recaption.job.pipeline import run_pipeline
from recaption.job.planning import Plan, PoolPlan, _extrapolate, plan_input
from tests.data import write_parquet_dataset, write_webdataset_dir

FAKE = {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its size and modification time (absent root: nothing)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def write_config(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_counts_units_and_rows_sees_done_units_and_writes_nothing(tmp_path, ray_session, capsys):
    write_webdataset_dir(tmp_path / "in", 10, shard_size=4)  # 3 tars: 4, 4, 2 samples
    data = {"input": {"path": str(tmp_path / "in"), "unit_size": 3}, "output": {"path": str(tmp_path / "out")},
            "models": [FAKE]}  # fmt: skip
    config = write_config(tmp_path / "p.yaml", data)
    assert main(["plan", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "3 shards, 5 units, 10 rows (counted)" in printed  # 00000-s0000/1, 00001-s0000/1, 00002
    assert "does not exist yet" in printed and "to do:    5 units, 10 rows" in printed
    assert "pool:     fake [fake: fake] prompts short: 1 actors × 0 GPUs, 0.25 CPUs" in printed
    assert not (tmp_path / "out").exists()

    # Two units done by a trial run (max_units is not part of the config's identity): the plan sees them.
    run_pipeline(load_config(None, data={**data, "input": {**data["input"], "max_units": 2}}), progress=False)
    (tmp_path / "out" / "_done" / "00000-s0000.recaption.json").touch()  # a marker the manifest holds an old copy of
    before = snapshot(tmp_path / "out")
    plan = recaption.plan(config)
    assert (plan.input.units, plan.input.rows, plan.input.exact) == (5, 10, True)
    assert (plan.output.state, plan.output.done_units, plan.output.done_rows) == ("ours", 2, 4)  # 00000: 3 + 1
    assert (plan.output.todo_units, plan.output.todo_rows, plan.output.ok) == (3, 6, 4)
    assert plan.problems == [] and plan.output.holder is None
    assert snapshot(tmp_path / "out") == before  # no manifest, count cache, index or lease written

    # Another config: the plan says a run would refuse the output, and exits 2.
    assert main(["plan", str(config), "--set", "generation.max_new_tokens=7"]) == 2
    printed = capsys.readouterr().out
    assert "problem:  output.path" in printed and "2 units written with another config" in printed
    assert snapshot(tmp_path / "out") == before


def test_plan_json_and_a_refused_output(tmp_path, ray_session, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "busy")}, "models": [FAKE]}
    assert main(["plan", str(write_config(tmp_path / "p.yaml", data)), "--json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["input"] == {"path": str(tmp_path / "in"), "format": "webdataset", "shards": 2, "units": 2,
                             "rows": 4, "exact": True, "counted_shards": 2}  # fmt: skip
    assert plan["output"]["state"] == "refused" and "is not empty and is not a recaption output" in plan["problems"][0]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_many_shards_are_estimated_from_a_sample(tmp_path):
    write_webdataset_dir(tmp_path / "tars", 40, shard_size=4)  # 10 tars of 4 samples
    for p in (tmp_path / "tars").glob("*_stats.json"):
        p.unlink()  # no sidecars: each counted tar is indexed
    cfg = InputConfig(path=str(tmp_path / "tars"), unit_size=3)
    estimated = plan_input(cfg, None, sample_shards=3)
    assert not estimated.exact and estimated.counted_shards == 3 and estimated.shards == 10
    assert abs(estimated.rows - 40) <= 4 and estimated.units == 20
    exact = plan_input(cfg, None, sample_shards=10)
    assert exact.exact and (exact.rows, exact.units) == (40, 20)

    write_parquet_dataset(tmp_path / "pq", 60, files=10)  # 6 rows each
    parquet = plan_input(InputConfig(path=str(tmp_path / "pq"), unit_size=4), None, sample_shards=4)
    assert not parquet.exact and parquet.counted_shards == 4 and abs(parquet.rows - 60) <= 6
    assert parquet.units == 20  # ceil(6 / 4) per file
    trial = plan_input(InputConfig(path=str(tmp_path / "pq"), unit_size=4, max_units=5), None, sample_shards=4)
    assert trial.units == 5 and abs(trial.rows - 15) <= 2  # a quarter of the units: a quarter of the rows


def test_calibration_runs_in_a_temporary_output_and_extrapolates(tmp_path, ray_session, monkeypatch, capsys):
    write_webdataset_dir(tmp_path / "in", 12, shard_size=4)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = {**FAKE, "prompts": ["short", "detailed"], "fake": {"delay_s": 0.05}, "concurrency": 2}
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    plan = recaption.plan(data, calibrate=5)
    cal = plan.calibration
    assert cal.images == 5 and cal.failed == 0
    fake = cal.models["fake"]
    # The fake engine sleeps delay_s per request: 2 prompts per image, so at most 10 images per second of engine time.
    assert fake["images"] == 5 and 0 < fake["images_per_s_per_actor"] <= 10.5 and 0 < fake["batch_fill"] <= 1
    assert set(fake["tokens_per_caption"]) == {"short", "detailed"} and all(
        t > 3 for t in fake["tokens_per_caption"].values()
    )
    e = cal.estimate
    assert e["rows"] == 12 and e["bottleneck"] == "fake" and e["exact_rows"]
    assert e["images_per_s"] == pytest.approx(2 * fake["images_per_s_per_actor"], rel=1e-3)  # 2 actors
    assert e["wall_s"] == pytest.approx(12 / e["images_per_s"], rel=1e-2) and e["gpu_hours"] == 0
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path / "tmp") == []  # the scratch output is gone

    # The same figures from the CLI, worded.
    assert main(["plan", str(write_config(tmp_path / "p.yaml", data)), "--calibrate", "3"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 3 images in" in printed and "images/s per actor; tokens per caption: short" in printed
    assert "(paced by fake) on 0 GPUs" in printed and "whole input, 12 rows:" in printed
    assert "left to do" not in printed  # nothing done yet: the whole input is what is left


def test_gpu_hours_are_what_the_pools_hold_while_the_slowest_paces_the_run():
    pools = [PoolPlan("a", "vllm", "a", ["detailed"], 4, 4, 1.0, 1.0, None),
             PoolPlan("b", "vllm", "b", ["short"], 2, 2, 2.0, 1.0, None)]  # fmt: skip
    plan = Plan("h", type("I", (), {"exact": False, "rows": 72_000})(), type("O", (), {"todo_rows": 36_000})(), {},
                pools)  # fmt: skip
    e = _extrapolate(plan, None, {"a": {"images_per_s_per_actor": 5.0}, "b": {"images_per_s_per_actor": 4.0}})
    # a: 4 actors × 5 = 20 images/s; b: 2 × 4 = 8 images/s → b paces the run: 36000 / 8 = 4500 s on 4 + 4 GPUs
    assert (e["bottleneck"], e["images_per_s"], e["wall_s"], e["gpus"], e["gpu_hours"]) == ("b", 8.0, 4500.0, 8.0, 10.0)
    assert e["exact_rows"] is False and (e["input_rows"], e["input_wall_s"], e["input_gpu_hours"]) == (72_000, 9000, 20)
    none = _extrapolate(plan, None, {"a": {"images_per_s_per_actor": 5.0}})
    assert "no speed measured for b" in none["note"]


def test_pools_that_do_not_fit_are_problems(tmp_path, ray_session, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
            "models": [{**FAKE, "num_cpus": 1.0, "concurrency": 3}, {**FAKE, "name": "gpu", "num_gpus": 1}]}  # fmt: skip
    config = write_config(tmp_path / "p.yaml", data)
    assert main(["plan", str(config)]) == 2
    printed = capsys.readouterr().out
    assert "problem:  models[fake]: 2 of its 3 actors fit on the cluster" in printed
    assert "problem:  models[gpu]: each actor needs 1 GPUs but no node of the Ray cluster has one" in printed
    assert main(["plan", str(config), "--calibrate", "2"]) == 1  # no calibration with a pool that cannot start
    assert "not calibrating: models[fake]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_secret_is_printed(tmp_path, ray_session, s3_endpoint, capfd):
    from tests.test_secrets import KEY, SECRET

    write_webdataset_dir(f"s3://bucket/plan/in?{s3_endpoint}", 4, 2)
    src = f"s3://{KEY}:{SECRET}@bucket/plan/in?{s3_endpoint}"
    data = {"input": {"path": src}, "output": {"path": str(tmp_path / "out")}, "models": [FAKE]}
    assert main(["plan", str(write_config(tmp_path / "p.yaml", data)), "--calibrate", "2"]) == 0
    assert main(["plan", str(tmp_path / "p.yaml"), "--json"]) == 0
    captured = capfd.readouterr()
    assert "s3://bucket/plan/in?endpoint_override" in captured.out and "calibration: 2 images" in captured.out
    assert SECRET not in captured.out + captured.err and KEY not in captured.out + captured.err


def test_a_calibration_on_a_cluster_writes_beside_the_output_never_into_it(tmp_path):
    from recaption.job.planning import scratch_dir

    cfg = load_config(None, data={"input": {"path": "/in"}, "output": {"path": "s3://b/runs/out?scheme=http"},
                                  "models": [FAKE]})  # fmt: skip
    beside = scratch_dir(cfg, {"nodes": 3})  # read and commit tasks run on other nodes: shared storage
    assert beside.startswith("s3://b/runs/.recaption-calibrate-") and beside.endswith("?scheme=http")
    assert scratch_dir(cfg, {"nodes": 3}) != beside
    local = scratch_dir(cfg, {"nodes": 1})  # one node: a local temporary directory
    assert os.path.isdir(local) and os.path.basename(local).startswith("recaption-calibrate-")
    os.rmdir(local)


def test_calibration_uses_images_that_decode_and_says_when_none_does(tmp_path, ray_session, capsys):
    from recaption.sources.tar import write_webdataset
    from tests.data import make_image

    broken = [{"key": "a", "jpg": b""}, {"key": "b", "jpg": b"not an image"}]
    write_webdataset(str(tmp_path / "in"), [*broken, {"key": "c", "jpg": make_image(1)}], shard_size=5)
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [FAKE]}
    cal = recaption.plan(data, calibrate=3).calibration
    assert (cal.images, cal.failed, cal.models["fake"]["images"]) == (1, 0, 1)
    write_webdataset(str(tmp_path / "bad"), broken, shard_size=5)
    config = write_config(tmp_path / "p.yaml", {**data, "input": {"path": str(tmp_path / "bad")}})
    assert main(["plan", str(config), "--calibrate", "2"]) == 1
    assert f"not calibrating: no image of the input {tmp_path / 'bad'} decodes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_calibration_carries_the_kept_source_fields_its_prompts_name(tmp_path, ray_session, capsys):
    from recaption.sources.tar import write_webdataset
    from tests.data import make_image

    samples = [{"key": f"k{i}", "jpg": make_image(i), "caption": f"alt {i}", "json": {"similarity": 0.25 + i}}
               for i in range(3)]  # fmt: skip
    write_webdataset(str(tmp_path / "in"), samples, shard_size=5)
    model = {**FAKE, "prompts": ["sim"]}
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model],
            "prompts": {"sim": "Alt text: {alt_text}; CLIP similarity {similarity}. Describe the image."}}  # fmt: skip
    plan = recaption.plan(data, calibrate=2)  # keep_columns auto keeps img2dataset's similarity
    assert plan.problems == [] and plan.calibration.images == 2 and plan.calibration.failed == 0
    assert plan.calibration.models["fake"]["failed_captions"] == 0
    assert set(plan.calibration.models["fake"]["tokens_per_caption"]) == {"sim"}
    # A prompt naming a field the rows lack is a problem the plan reports (a run would stop on it).
    config = write_config(tmp_path / "p.yaml", {**data, "prompts": {"sim": "Seen on {nope}. Describe it."}})
    assert main(["plan", str(config)]) == 2
    assert "nope" in capsys.readouterr().out


def test_the_plan_names_a_run_that_holds_the_output(tmp_path):
    from recaption.job.lease import Lease
    from recaption.job.planning import InputPlan, plan_output
    from recaption.job.writer import open_output

    cfg = load_config(None, data={"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
                                  "models": [FAKE]})  # fmt: skip
    out = open_output(cfg.output.path)
    out.claim()
    inp = InputPlan(str(tmp_path / "in"), "webdataset", 1, 1, 2, True, 1, {"u": 2})
    with Lease(out, 60).acquire() as lease:
        plan, problems = plan_output(cfg, inp)
        assert plan.holder and lease.run_id in plan.holder
        assert (plan.todo_units, plan.todo_rows) == (1, 2)
        # What a run started now would stop on: `recaption plan` exits 2 with the run's own words.
        (problem,) = problems
        assert "is in use by" in problem and lease.run_id in problem and "choose another output.path" in problem
    assert plan_output(cfg, inp) == (plan_output(cfg, inp)[0], [])  # released: nothing in the way
    assert plan_output(cfg, inp)[0].holder is None


def test_a_compressed_tar_is_counted_by_reading_it(tmp_path):
    import io
    import tarfile

    from tests.data import make_image

    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "a.tar.gz", "w:gz") as tf:  # no random access, no _stats.json
        for name, data in [("k0.jpg", make_image(0)), ("k1.jpg", make_image(1)), ("k1.txt", b"alt"), ("k2.jpg", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    planned = plan_input(InputConfig(path=str(tmp_path / "in"), unit_size=2), None)
    assert (planned.units, planned.rows, planned.exact) == (1, 3, True)  # one unit whatever its size, 3 samples


def test_a_calibration_with_an_underfilled_batch_says_its_speed_is_understated():
    from recaption.job.planning import Calibration, InputPlan, OutputPlan, format_plan

    pool = PoolPlan("m", "vllm", "m", ["detailed"], 2, 2, 1.0, 1.0, None, {"10.0.0.1 (abcd)": 2})
    figures = {"images": 64, "engine_s": 8.0, "batch_fill": 0.25, "images_per_s_per_actor": 8.0,
               "tokens_per_caption": {"detailed": 120.0}, "failed_captions": 0, "gpus_per_actor": 1.0}  # fmt: skip
    cluster = {"address": "ray://head:10001", "nodes": 2, "cpus": 64, "gpus": 2, "accelerators": {"H100": 2},
               "autoscaling": False}  # fmt: skip
    plan = Plan("h", InputPlan("s3://b/in", "webdataset", 10, 10, 3200, False, 4), OutputPlan("/o", "new"), cluster,
                [pool])  # fmt: skip
    plan.output.todo_rows = 3200
    plan.calibration = Calibration(64, 30.0, 0, {"m": figures}, _extrapolate(plan, None, {"m": figures}))
    text = format_plan(plan)
    assert "ESTIMATED from 4 of 10 shards" in text and "to do:    about 0 units, about 3200 rows" in text
    assert "2 on 10.0.0.1 (abcd)" in text and "2 GPUs (H100 2)" in text
    assert "m: its engine's batch was 25% full on average: the speed is understated" in text
    assert "estimate: 16 images/s (paced by m) on 2 GPUs, rows estimated" in text
    assert "whole input, 3200 rows: 3 min wall, 0.1111 GPU-hours" in text  # 3200 / (2 × 8/s) = 200 s, 2 GPUs
    figures["batch_fill"] = 0.9
    assert "understated" not in format_plan(plan)

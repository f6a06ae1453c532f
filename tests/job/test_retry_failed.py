"""`recaption run --retry-failed`: the failed rows of finished units are captioned again and replace their rows in
one step; rows that were ok are not touched; exactly once holds under kill -9 during it."""

from __future__ import annotations

import signal

import pyarrow as pa
import pyarrow.dataset as pads
import yaml

from recaption.cli import main
from recaption.job.writer import OUTPUT_SCHEMA, merge_rows
from recaption.sources.tar import write_webdataset
from tests.data import make_image
from tests.job.test_resume import kill_session, start

N_IMAGES, SHARD_SIZE = 9, 3
FAULTY = {"RECAPTION_FAULT": "engine:request-error", "RECAPTION_FAULT_UNIT": "00002"}  # that unit's requests fail


def write_input(tmp_path) -> list[str]:
    samples = [{"key": f"{i:03d}", "jpg": make_image(i)} for i in range(N_IMAGES)]
    samples[4]["jpg"] = b"not an image"  # fails for good: retried, fails again, stays one row
    write_webdataset(str(tmp_path / "in"), samples, shard_size=SHARD_SIZE)
    return [s["key"] for s in samples]


def write_config(tmp_path, env: dict | None = None):
    model = {"path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25, "env": env or {}}
    cfg = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(tmp_path) -> list[dict]:
    return pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()


def part_bytes(tmp_path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("part-*"))}


def test_merge_rows_replaces_rows_by_key_in_place():
    def table(keys, status):
        return pa.Table.from_pylist([{"key": k, "status": status, "captions": []} for k in keys], schema=OUTPUT_SCHEMA)

    merged = merge_rows(table(["a", "b", "c"], "failed"), table(["c", "a"], "ok"))
    assert [(r["key"], r["status"]) for r in merged.to_pylist()] == [("a", "ok"), ("b", "failed"), ("c", "ok")]


def test_retry_failed_captions_only_the_failed_rows_again(tmp_path, ray_session, capsys):
    keys = write_input(tmp_path)
    main(["run", str(write_config(tmp_path, FAULTY)), "--no-progress"])
    first = {r["key"]: r for r in rows(tmp_path)}
    failed = sorted(k for k, r in first.items() if r["status"] == "failed")
    assert len(failed) >= 4 and "004" in failed, first  # two units' rows failed, and the bad image
    ok_before = {k: r for k, r in first.items() if r["status"] == "ok"}
    parts_before = part_bytes(tmp_path)
    capsys.readouterr()

    config = write_config(tmp_path)  # the engine is fine now (env is no part of the config's hash)
    assert main(["run", str(config), "--no-progress"]) == 0  # a plain rerun: everything is done, nothing changes
    assert part_bytes(tmp_path) == parts_before
    assert main(["run", str(config), "--no-progress", "--retry-failed"]) == 0
    assert "to retry failed rows" in capsys.readouterr().out
    after = {r["key"]: r for r in rows(tmp_path)}
    assert sorted(after) == sorted(keys) and len(rows(tmp_path)) == N_IMAGES
    assert {k for k, r in after.items() if r["status"] == "failed"} == {"004"}
    assert "cannot identify image" in after["004"]["error"] or "image" in after["004"]["error"]
    for key, row in ok_before.items():  # rows that were ok are exactly as they were
        assert after[key] == row
    parts_after = part_bytes(tmp_path)
    unchanged = [n for n in parts_before if parts_before[n] == parts_after[n]]
    assert len(unchanged) == 1, "only units with failed rows are rewritten"
    import json

    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_done").iterdir()]
    assert sum(m["failed"] for m in markers) == 1 and sum(m.get("retried_rows", 0) for m in markers) == len(failed)


def test_a_kill_while_replacing_a_part_file_leaves_every_row_once(tmp_path, ray_session):
    keys = write_input(tmp_path)
    assert main(["run", str(write_config(tmp_path, FAULTY)), "--no-progress"]) == 0
    log = tmp_path / "run.log"
    config = write_config(tmp_path)
    proc = start(config, "retry:before-replace", log, "--retry-failed")
    try:
        proc.wait(timeout=180)
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    seen = [r["key"] for r in rows(tmp_path)]
    assert sorted(seen) == sorted(keys)  # the old part file or the new one, never both, never half
    rerun = start(config, None, log, "--retry-failed")
    try:
        assert rerun.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_session(rerun)
    final = rows(tmp_path)
    assert sorted(r["key"] for r in final) == sorted(keys)
    assert {r["key"] for r in final if r["status"] == "failed"} == {"004"}
    assert not list((tmp_path / "out").glob(".recaption-tmp-*"))

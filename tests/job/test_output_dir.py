"""The output directory is the user's: a run writes only into a new, empty or recaption-owned directory, deletes
only names it writes, removes markers before data on --overwrite, and holds the directory alone (a lease)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pyarrow.dataset as pads
import pytest
import yaml

from recaption.cli import main
from recaption.errors import ConfigError
from recaption.job.lease import LEASE_FILE, Lease, OutputBusyError, check_holder
from recaption.job.writer import open_output
from tests.data import write_webdataset_dir
from tests.job.test_resume import kill_session, start, wait_for


def write_config(tmp_path, delay_s: float = 0.0, name: str = "pipeline.yaml", **extra) -> str:
    model = {"path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25, "fake": {"delay_s": delay_s}}
    cfg = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    for key, value in extra.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def output_keys(out) -> list[str]:
    return pads.dataset(str(out), format="parquet").to_table(columns=["key"]).column("key").to_pylist()


USER_FILES = {
    "part-00007.parquet": b"the user's own parquet",
    "part-00000-1b2c-c000.snappy.parquet": b"spark's",
    ".tmp-mywork": b"work in progress",
    "_attempts/notes.txt": b"mine",
    "_done/readme.json": b'{"mine": true}',
}


def test_a_foreign_non_empty_directory_is_refused_untouched(tmp_path, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    out = tmp_path / "out"
    for name, data in USER_FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for extra in ([], ["--overwrite"], ["--retry-failed"]):
        assert main(["run", write_config(tmp_path), "--no-progress", *extra]) == 2
        line = one_line_error(capsys)
        assert "is not empty and is not a recaption output" in line and "choose a new or empty directory" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert all((out / n).read_bytes() == d for n, d in USER_FILES.items())


def test_user_files_inside_an_output_survive_runs_and_overwrite(tmp_path, ray_session, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    out = tmp_path / "out"
    assert main(["run", write_config(tmp_path), "--no-progress"]) == 0
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)
    assert main(["run", write_config(tmp_path), "--no-progress"]) == 0  # a resume: prepare() runs
    config = write_config(tmp_path, delay_s=0.001)  # another config: needs --overwrite
    capsys.readouterr()
    assert main(["run", config, "--no-progress"]) == 2
    assert "another config (changed: models.0.fake.delay_s)" in one_line_error(capsys)
    assert main(["run", config, "--no-progress", "--overwrite"]) == 0
    assert all((out / n).read_bytes() == d for n, d in USER_FILES.items())
    ours = sorted(p.name for p in out.glob("part-*.recaption.parquet"))
    assert ours == ["part-00000.recaption.parquet", "part-00001.recaption.parquet"]
    assert open_output(str(out)).part_paths() == [str(out / n) for n in ours]  # readers see only ours


def test_output_directories_written_by_others_or_as_files_are_refused(tmp_path, capsys):
    write_webdataset_dir(tmp_path / "in", 2, shard_size=2)
    (tmp_path / "out").write_text("a file")
    assert main(["run", write_config(tmp_path), "--no-progress"]) == 2
    assert "is a file" in one_line_error(capsys)
    (tmp_path / "out").unlink()
    (tmp_path / "out" / "_done").mkdir(parents=True)  # an output of the layout before ownership records
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"old")
    (tmp_path / "out" / "_run.json").write_text('{"config_hash": "abc", "config": {}}')
    assert main(["run", write_config(tmp_path), "--no-progress"]) == 2
    assert "written by an older recaption" in one_line_error(capsys)
    out = open_output(str(tmp_path / "train-run"))
    (tmp_path / "train-run").mkdir()
    (tmp_path / "train-run" / "_recaption.json").write_text('{"tool": "recaption", "kind": "train"}')
    with pytest.raises(ConfigError, match="is a recaption train directory"):
        out.claim()


def test_empty_and_dot_paths_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    write_webdataset_dir(tmp_path / "in", 2, shard_size=2)
    monkeypatch.chdir(tmp_path)
    for override, expected in (("output.path=", "output.path is empty"), ("input.path=", "input.path is empty")):
        assert main(["run", write_config(tmp_path), "--no-progress", "--set", override]) == 2
        assert expected in one_line_error(capsys)
    assert not (tmp_path / "_recaption.json").exists()
    assert main(["run", write_config(tmp_path), "--set", f"output.path={tmp_path}"]) == 2
    assert "choose an output directory apart from the input" in one_line_error(capsys)


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"input: {path: \xff\xfe}\n", "not UTF-8 text"),
        (b"input: {path: [unclosed\n", "not valid YAML"),
        (b"input:\n  path: a\n   bad: indent\n", "not valid YAML"),
        (b"- a list\n", "the top level must be a mapping"),
        (b"input: {path: in}\noutput: {path: out}\nmodels: [{path: fake, engine: fake, concurrency: 0}]\n",
         "models.0.concurrency: Value error, a model needs at least 1 actor"),
    ],
)  # fmt: skip
def test_bad_yaml_files_end_in_one_line_exit_2(tmp_path, capsys, text, expected):
    path = tmp_path / "p.yaml"
    path.write_bytes(text)
    assert main(["run", str(path)]) == 2
    assert expected in one_line_error(capsys)


def test_overwrite_killed_between_markers_and_data_leaves_a_state_the_next_run_completes(tmp_path, ray_session):
    keys = write_webdataset_dir(tmp_path / "in", 6, shard_size=2)
    out, log = tmp_path / "out", tmp_path / "run.log"
    assert main(["run", write_config(tmp_path), "--no-progress"]) == 0
    config = write_config(tmp_path, delay_s=0.001)
    proc = start(config, "overwrite:after-markers", log, "--overwrite")
    try:
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    assert not list((out / "_done").iterdir()) and len(list(out.glob("part-*"))) == 3  # data without markers
    rerun = start(config, None, log)  # no --overwrite needed: no marker of the old config is left
    try:
        assert rerun.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_session(rerun)
    seen = output_keys(out)
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))
    hashes = {json.loads(p.read_text())["config_hash"] for p in (out / "_done").iterdir()}
    assert len(hashes) == 1


def test_a_second_run_is_refused_while_the_first_holds_the_output_and_takes_over_after_a_kill(
    tmp_path, ray_session, capsys
):
    keys = write_webdataset_dir(tmp_path / "in", 12, shard_size=2)
    out, log = tmp_path / "out", tmp_path / "run.log"
    first = start(write_config(tmp_path, delay_s=0.5), None, log)
    try:
        wait_for(lambda: (out / "_done").is_dir() and any((out / "_done").iterdir()))
        other = write_config(tmp_path, name="other.yaml", **{"generation.max_new_tokens": 7})
        capsys.readouterr()
        assert main(["run", other, "--no-progress"]) == 1
        line = one_line_error(capsys)
        assert "is in use by run" in line and f"pid {first.pid}" in line and "since" in line, line
        assert socket.gethostname() in line
    finally:
        kill_session(first)  # kill -9: its lease stays behind, naming a process that is gone
    assert json.loads((out / LEASE_FILE).read_text())["pid"] == first.pid
    assert main(["run", write_config(tmp_path, delay_s=0.5), "--no-progress"]) == 0
    assert sorted(output_keys(out)) == sorted(keys)
    assert not (out / LEASE_FILE).exists()  # released at the end


def test_two_runs_started_together_never_mix(tmp_path, ray_session):
    """The issue's case: two runs on one output, seconds apart, with different generation settings."""
    write_webdataset_dir(tmp_path / "in", 8, shard_size=2)
    procs = []
    for tokens in (11, 12):
        path = write_config(tmp_path, delay_s=0.2, name=f"p{tokens}.yaml", **{"generation.max_new_tokens": tokens})
        procs.append(start(path, None, tmp_path / f"run{tokens}.log"))
    try:
        codes = sorted(p.wait(timeout=300) for p in procs)
    finally:
        for p in procs:
            kill_session(p)
    assert codes == [0, 1], codes
    logs = "".join((tmp_path / f"run{t}.log").read_text() for t in (11, 12))
    assert "is in use by run" in logs
    hashes = {json.loads(p.read_text())["config_hash"] for p in (tmp_path / "out" / "_done").iterdir()}
    assert len(hashes) == 1


def test_a_stale_lease_of_another_host_is_taken_over_after_its_timeout(tmp_path):
    out = open_output(str(tmp_path / "out"))
    out.claim()
    record = {"run_id": "r1", "host": "node-7", "pid": 1, "pid_started": None, "timeout_s": 60.0}
    now = time.time()
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps({**record, "since": now - 30, "heartbeat_at": now - 5}))
    with pytest.raises(OutputBusyError, match=r"in use by run r1 \(host node-7, pid 1\).*taken over 60 s after"):
        Lease(out, 5.0).acquire()
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps({**record, "since": now - 90, "heartbeat_at": now - 61}))
    with Lease(out, 5.0).acquire() as lease:
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["run_id"] == lease.run_id
        assert check_holder(out, lease.run_id) is None
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_a_run_whose_lease_was_taken_stops_and_may_not_commit(tmp_path):
    out = open_output(str(tmp_path / "out"))
    out.claim()
    lease = Lease(out, 0.2).acquire()
    stolen = json.loads((tmp_path / "out" / LEASE_FILE).read_text()) | {"run_id": "thief", "host": "node-9"}
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(stolen))
    assert "now held by run thief" in check_holder(out, lease.run_id)
    wait_for(lambda: lease.lost is not None, timeout=5)
    with pytest.raises(Exception, match="now names run thief"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["run_id"] == "thief"  # not ours to delete


def test_a_full_disk_ends_the_run_in_one_line_and_a_rerun_completes(tmp_path, ray_session):
    """ENOSPC from every commit (injected in the run's own Ray, so its commit tasks see it): the run stops at the
    first unit it cannot write, in one line, exit 1; nothing is marked done; the rerun completes."""
    keys = write_webdataset_dir(tmp_path / "in", 6, shard_size=2)
    config, log = write_config(tmp_path), tmp_path / "run.log"
    proc = start(config, "commit:enospc", log)
    try:
        assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("error: unit ") and "No space left on device" in lines[-1], lines[-5:]
    assert "rerun to resume" in lines[-1]
    assert not any("Traceback" in line for line in lines), lines
    assert not list((tmp_path / "out" / "_done").iterdir())
    assert main(["run", config, "--no-progress"]) == 0
    assert sorted(output_keys(tmp_path / "out")) == sorted(keys)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk(tmp_path, small_disk, ray_session, capfd):
    """The same on a real 400 KB filesystem, filled up by a file of the user's before the run."""
    keys = write_webdataset_dir(tmp_path / "in", 24, shard_size=2)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (400 * 1024 - 48 * 1024))
    config = write_config(tmp_path)
    override = ["--set", f"output.path={small_disk / 'out'}"]
    code = main(["run", config, "--no-progress", *override])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and "No space left on device" in err[-1], err[-5:]
    assert not any("Traceback" in line for line in err), err
    filler.unlink()
    assert main(["run", config, "--no-progress", *override]) == 0
    seen = output_keys(small_disk / "out")
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))


def test_a_resume_with_the_input_written_another_way_is_the_same_config(tmp_path, ray_session, monkeypatch, capsys):
    write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    config = write_config(tmp_path)
    assert main(["run", config, "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    for path in ("in/", "./in", f"{tmp_path}/in/", "in//"):
        capsys.readouterr()
        assert main(["run", config, "--no-progress", "--set", f"input.path={path}", "--set", "output.path=out/"]) == 0
        assert "units:    0 run, 2 already done" in capsys.readouterr().out
    assert main(["run", config, "--no-progress", "--set", "input.max_units=1"]) == 0
    assert "units:    0 run, 1 already done, 1 in total" in capsys.readouterr().out

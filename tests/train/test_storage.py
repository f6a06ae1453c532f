"""A training run's output on object storage: checkpoints go up files first and `latest` last, rotation follows,
and a resume on a machine without the staging copy brings down only what it needs (local S3 server)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from recaption.train.storage import RunStore, is_remote, staging_dir


def _checkpoint(local: Path, step: int) -> Path:
    d = local / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    for name in ("model.pt", "optimizer.pt", "trainer.pt", "rank-0.pt"):
        (d / name).write_bytes(f"{name}@{step}".encode() * 100)
    (local / "checkpoints" / "latest").write_text(d.name)
    return d


def _remote_files(fs: pafs.FileSystem, root: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File}


def test_local_output_is_the_run_directory(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert not store.remote and store.local == (tmp_path / "run").resolve()
    store.pull()
    store.push("anything")  # nothing to carry


def test_checkpoints_up_and_a_resume_elsewhere_brings_down_the_latest(s3_endpoint, tmp_path, monkeypatch):
    uri = f"s3://bucket/runs/r1?{s3_endpoint}"
    assert is_remote(uri) and staging_dir(uri) == staging_dir(uri.replace("runs/r1", "runs/r1/"))
    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path / "machine-a"))
    a = RunStore(uri)
    assert str(a.local).startswith(str(tmp_path / "machine-a"))
    a.local.mkdir(parents=True)
    (a.local / "config.yaml").write_text("run: {}\n")
    (a.local / "tokenizer").mkdir()
    (a.local / "tokenizer" / "tokenizer.json").write_text("{}")
    a.push("config.yaml", "tokenizer")
    for step in (10, 20, 30):
        d = _checkpoint(a.local, step)
        if step == 30:  # local rotation (keep 2) removed step 10; the remote copy follows
            import shutil

            shutil.rmtree(a.local / "checkpoints" / "step-00000010")
        (a.local / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')
        a.push("metrics.jsonl")
        a.push_checkpoint(d)
    remote = _remote_files(a.fs, a.root)
    assert "checkpoints/step-00000010/model.pt" not in remote
    assert {
        "checkpoints/step-00000020/model.pt",
        "checkpoints/step-00000030/trainer.pt",
        "checkpoints/latest",
    } <= remote
    # A user's own file beside the checkpoints is never deleted by rotation.
    a.fs.open_output_stream(f"{a.root}/checkpoints/step-00000020-keep/model.pt").close()
    a.push_checkpoint(a.local / "checkpoints" / "step-00000030")
    assert "checkpoints/step-00000020-keep/model.pt" in _remote_files(a.fs, a.root)

    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path / "machine-b"))
    b = RunStore(uri)
    assert b.local != a.local and "config.yaml" in b.names()
    b.pull()
    got = {p.relative_to(b.local).as_posix() for p in b.local.rglob("*") if p.is_file()}
    assert got == {
        "config.yaml",
        "metrics.jsonl",
        "tokenizer/tokenizer.json",
        "checkpoints/latest",
        *(f"checkpoints/step-00000030/{n}" for n in ("model.pt", "optimizer.pt", "trainer.pt", "rank-0.pt")),
    }
    assert (b.local / "checkpoints" / "step-00000030" / "model.pt").read_bytes() == b"model.pt@30" * 100
    assert (b.local / "metrics.jsonl").read_text() == '{"step": 30}\n'


def test_credentials_in_the_uri_are_never_shown(s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path))
    store = RunStore(f"s3://AKIAXXXXSECRETKEY:hunter2@bucket/r?{s3_endpoint}")
    assert "hunter2" not in store.shown and "hunter2" not in str(store.local)


@pytest.mark.parametrize("uri", ["s3://bucket/a", "gs://b/c", "s3://bucket/a?region=x"])
def test_staging_dirs_differ_by_place_not_by_options(uri):
    path, _, query = uri.partition("?")
    assert staging_dir(uri) != staging_dir(path + "x" + ("?" + query if query else ""))
    assert staging_dir(uri) == staging_dir(path + "?scheme=http")


def test_training_on_object_storage_resumes_elsewhere_to_the_same_weights(caption_output, s3_endpoint, tmp_path):
    """`run.output: s3://…`: a run killed after its first checkpoint's upload resumes on a machine without its
    staging copy and ends with the weights of an uninterrupted local run; the output holds the whole run."""
    import os

    import torch

    from recaption.train.run import run_training
    from tests.train.conftest import tiny_config
    from tests.train.test_loop import train_until_fault

    uri = f"s3://bucket/runs/tiny?{s3_endpoint}"
    overrides = ["run.steps=14", "run.checkpoint_every=5", "run.keep_checkpoints=2", "data.shuffle_buffer=16"]
    os.environ["RECAPTION_CACHE"], saved = str(tmp_path / "machine-a"), os.environ.get("RECAPTION_CACHE")
    try:
        train_until_fault("train:after-upload", f"data.path={caption_output}", f"run.output={uri}", *overrides)
        store = RunStore(uri)
        assert store._read_text("checkpoints/latest") == "step-00000005"
        os.environ["RECAPTION_CACHE"] = str(tmp_path / "machine-b")  # a resume on another machine
        resumed = run_training(tiny_config(caption_output, uri, *overrides), progress=False)
    finally:
        os.environ["RECAPTION_CACHE"] = saved or ""
    straight = run_training(tiny_config(caption_output, tmp_path / "straight", *overrides), progress=False)
    assert [h["step"] for h in resumed["history"]] == list(range(6, 15))
    assert resumed["export"] == "s3://bucket/runs/tiny/final"
    remote = _remote_files(store.fs, store.root)
    assert {"_recaption.json", "config.yaml", "metrics.jsonl", "summary.json", "checkpoints/latest"} <= remote
    assert any(f.startswith("final/") for f in remote) and any(f.startswith("tokenizer/") for f in remote)
    assert {f.split("/")[1] for f in remote if f.startswith("checkpoints/step-")} == {"step-00000010", "step-00000014"}
    with store.fs.open_input_stream(f"{store.root}/checkpoints/step-00000014/model.pt") as f:
        a = torch.load(__import__("io").BytesIO(f.read()), weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000014" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["history"][-1]["loss"] == pytest.approx(resumed["history"][-1]["loss"])


def test_a_foreign_prefix_is_refused_untouched(caption_output, s3_endpoint):
    from recaption.errors import ConfigError
    from recaption.train.run import run_training
    from tests.train.conftest import tiny_config

    uri = f"s3://bucket/someone/else?{s3_endpoint}"
    store = RunStore(uri)
    with store.fs.open_output_stream(f"{store.root}/data.csv") as f:
        f.write(b"a,b\n")
    with pytest.raises(ConfigError, match="not empty and is not a training run"):
        run_training(tiny_config(caption_output, uri, "run.steps=2"), progress=False)
    assert _remote_files(store.fs, store.root) == {"data.csv"}

"""The whole pipeline on a local Ray: every input format in, the output contract out, a rerun does no work."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from recaption.config import load_config
from recaption.fields import IMG2DATASET_FIELDS
from recaption.job.pipeline import run_pipeline
from recaption.job.writer import OUTPUT_SCHEMA, read_run_metadata
from tests.data import (
    img2dataset_download,
    make_image,
    write_hf_dataset,
    write_image_folder,
    write_parquet_dataset,
    write_webdataset_dir,
)

FAKE = {"name": "fake", "path": "fake", "engine": "fake", "prompts": ["detailed", "short"], "num_cpus": 0.25}


def make_config(input_path, out, models=(FAKE,), **sections):
    data = {"input": {"path": str(input_path)}, "output": {"path": str(out)}, "models": list(models), **sections}
    return load_config(None, data=data)


def read_output(out: Path) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


def check_contract(out: Path, expected_keys: list[str], n_captions: int) -> pa.Table:
    """Output rows == input rows, keys equal and unique, every row ok (with captions) or failed (with an error)."""
    table = read_output(out)
    schema = table.schema.remove_metadata()
    assert pa.schema(list(schema)[: len(OUTPUT_SCHEMA)]) == OUTPUT_SCHEMA  # then the kept source fields, if any
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys in the output"
    assert sorted(keys) == sorted(expected_keys)
    for row in table.to_pylist():
        assert row["status"] in ("ok", "failed"), row
        if row["status"] == "ok":
            assert row["error"] is None and row["width"] > 0 and len(row["image_sha256"]) == 64
            assert len(row["captions"]) == n_captions
            assert all(c["text"] and c["sub_captions"] and c["n_tokens"] > 0 for c in row["captions"])
        else:
            assert row["error"], row
    return table


def tar_keys(root: Path) -> list[str]:
    """Input keys read with plain tarfile, independently of the reader under test."""
    keys = []
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def test_img2dataset_webdataset_shards(tmp_path, ray_session):
    shards = img2dataset_download(tmp_path, 10, output_format="webdataset", number_sample_per_shard=4)
    cfg = make_config(shards, tmp_path / "out")
    summary = run_pipeline(cfg, progress=False)
    keys = tar_keys(shards)
    assert len(keys) == 10 and summary.units_total == len(list(shards.glob("*.tar"))) >= 3
    table = check_contract(tmp_path / "out", keys, n_captions=2)
    rows = table.to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:  # url and alt text are carried through from img2dataset's metadata
        i = r["url"].rsplit("/", 1)[1].split(".")[0]
        assert r["alt_text"] == f"caption {i}" and r["source"].endswith(".tar")
    assert [c["prompt"] for c in rows[0]["captions"]] == ["detailed", "short"]
    # keep_columns: auto keeps img2dataset's own fields, typed
    kept = table.schema.names[len(OUTPUT_SCHEMA) :]
    assert {"original_width", "original_height", "sha256"} <= set(kept) <= set(IMG2DATASET_FIELDS), kept
    assert all(r["original_width"] == r["width"] and len(r["sha256"]) == 64 for r in rows)
    meta = read_run_metadata(str(next((tmp_path / "out").glob("part-*.parquet"))))
    assert meta["config_hash"] == cfg.hash() and meta["config"]["input"]["path"] == str(shards)


def test_img2dataset_parquet_output_keeps_failed_downloads(tmp_path, ray_session):
    shards = img2dataset_download(tmp_path, 6, output_format="parquet", missing=2, number_sample_per_shard=4)
    files = sorted(shards.glob("[0-9]*.parquet"))
    inputs = pa.concat_tables([pq.read_table(f, columns=["key", "status"]) for f in files])
    run_pipeline(make_config(shards, tmp_path / "out"), progress=False)
    table = check_contract(tmp_path / "out", inputs.column("key").to_pylist(), n_captions=2)
    failed = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert len(failed) == inputs.column("status").to_pylist().count("failed_to_download") == 2
    assert all("failed_to_download" in r["error"] for r in failed)


@pytest.mark.parametrize("image_as", ["bytes", "struct", "path"])
def test_parquet_with_image_column(tmp_path, ray_session, image_as):
    keys = write_parquet_dataset(tmp_path / "in", 9, image_as=image_as, files=2)
    cfg = make_config(tmp_path / "in", tmp_path / "out", input={"path": str(tmp_path / "in"), "unit_size": 4})
    summary = run_pipeline(cfg, progress=False)
    assert summary.units_total >= 3  # files are sliced into units of unit_size rows
    table = check_contract(tmp_path / "out", keys, n_captions=2)
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_hf_dataset_saved_to_disk(tmp_path, ray_session):
    keys = write_hf_dataset(tmp_path / "in", 7)
    run_pipeline(make_config(tmp_path / "in", tmp_path / "out"), progress=False)
    check_contract(tmp_path / "out", keys, n_captions=2)


def test_parquet_written_by_datasets_to_parquet(tmp_path, ray_session):
    """A 🤗 dataset with an Image feature exported with `Dataset.to_parquet`: image structs, its own key column."""
    import datasets

    ids = [f"img-{i:03d}" for i in range(5)]
    data = {
        "image": [{"bytes": make_image(i), "path": None} for i in range(5)],
        "text": [f"caption {i}" for i in range(5)],
    }
    ds = datasets.Dataset.from_dict({**data, "key": ids}).cast_column("image", datasets.Image())
    (tmp_path / "in").mkdir()
    ds.to_parquet(str(tmp_path / "in" / "train.parquet"))
    run_pipeline(make_config(tmp_path / "in", tmp_path / "out"), progress=False)
    rows = check_contract(tmp_path / "out", ids, n_captions=2).to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["key"]: r["alt_text"] for r in rows} == {k: f"caption {i}" for i, k in enumerate(ids)}


def test_image_folder(tmp_path, ray_session):
    keys = write_image_folder(tmp_path / "in", 7)
    cfg = make_config(tmp_path / "in", tmp_path / "out", input={"path": str(tmp_path / "in"), "unit_size": 3})
    run_pipeline(cfg, progress=False)
    table = check_contract(tmp_path / "out", keys, n_captions=2)
    assert len(set(table.column("unit").to_pylist())) == 3


def test_each_tiny_family_generates_through_the_hf_engine(tmp_path, ray_session):
    keys = write_webdataset_dir(tmp_path / "in", 6, shard_size=3)
    models = [
        {"path": f"tiny-{family}", "engine": "hf", "prompts": prompts, "batch_size": 4, "num_cpus": 0.25}
        for family, prompts in (("llava", ["detailed", "short"]), ("instructblip", ["short"]), ("blip2", ["short"]))
    ]
    cfg = make_config(tmp_path / "in", tmp_path / "out", models, generation={"max_new_tokens": 6})
    summary = run_pipeline(cfg, progress=False)
    assert summary.ok == 6 and summary.tokens > 0
    rows = read_output(tmp_path / "out").to_pylist()
    assert sorted(r["key"] for r in rows) == keys
    for row in rows:
        order = [(c["model"], c["prompt"]) for c in row["captions"]]
        assert order == [
            ("tiny-llava", "detailed"),
            ("tiny-llava", "short"),
            ("tiny-instructblip", "short"),
            ("tiny-blip2", "short"),
        ]
        for c in row["captions"]:
            assert 0 < c["n_tokens"] <= 6 and c["finish_reason"] in ("stop", "length")


def test_output_opens_with_common_readers_and_rerun_does_no_work(tmp_path, ray_session):
    import datasets
    import duckdb
    import pandas as pd

    keys = write_webdataset_dir(tmp_path / "in", 8, shard_size=3)
    out = tmp_path / "out"
    cfg = make_config(tmp_path / "in", out)
    first = run_pipeline(cfg, progress=False)
    assert (first.units_done, first.rows) == (3, 8)
    assert sorted(pd.read_parquet(out)["key"]) == keys
    hf = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    assert sorted(hf["key"]) == keys and hf[0]["captions"][0]["sub_captions"]
    n = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet') where status = 'ok'").fetchall()[0][0]
    assert n == 8
    assert sorted(p.name for p in (out / "_done").iterdir()) == [f"0000{i}.recaption.json" for i in range(3)]
    before = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    second = run_pipeline(cfg, progress=False)
    assert (second.units_done, second.units_skipped, second.rows) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before


def test_object_storage_in_and_out(tmp_path, ray_session, s3_endpoint):
    src = f"s3://bucket/pipeline/in?{s3_endpoint}"
    dst = f"s3://bucket/pipeline/out?{s3_endpoint}"
    keys = write_webdataset_dir(src, 5, shard_size=3)
    cfg = make_config(src, dst)
    assert run_pipeline(cfg, progress=False).rows == 5
    from recaption.sources.fs import resolve

    fs, root = resolve(dst)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("key").to_pylist()) == keys
    assert run_pipeline(cfg, progress=False).units_skipped == 2


def test_several_samples_per_prompt_keep_model_and_prompt_order(tmp_path, ray_session):
    keys = write_webdataset_dir(tmp_path / "in", 4, shard_size=4)
    models = [
        {**FAKE, "name": "a", "prompts": ["short", "objects"]},
        {**FAKE, "name": "b", "prompts": ["style"], "generation": {"n": 2, "temperature": 0.8}},
    ]
    cfg = make_config(tmp_path / "in", tmp_path / "out", models)
    run_pipeline(cfg, progress=False)
    rows = check_contract(tmp_path / "out", keys, n_captions=4).to_pylist()
    for row in rows:
        assert [(c["model"], c["prompt"]) for c in row["captions"]] == [
            ("a", "short"),
            ("a", "objects"),
            ("b", "style"),
            ("b", "style"),
        ]
        assert row["captions"][2]["text"] != row["captions"][3]["text"]
    meta = read_run_metadata(str(next((tmp_path / "out").glob("part-*.parquet"))))
    assert set(meta["prompts"]) == {"short", "objects", "style"} and meta["prompts"]["style"].startswith("Describe")


@pytest.mark.parametrize(
    ("config_address", "env_address", "expected"),
    [
        (None, None, None),
        (None, "10.0.0.5:6379", "10.0.0.5:6379"),
        ("ray://head:10001", "10.0.0.5:6379", "ray://head:10001"),
    ],
)
def test_init_ray_joins_the_configured_or_environment_address(monkeypatch, config_address, env_address, expected):
    """The address `ray.init` gets: `ray.address`, else RAY_ADDRESS, else none (a local Ray of `ray.num_cpus`)."""
    import ray

    from recaption.job.pipeline import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(make_config("in", "out", ray={"address": config_address, "num_cpus": 2}))
    assert len(calls) == 1 and calls[0].get("address") == expected
    assert ("num_cpus" in calls[0]) == (expected is None)  # a cluster's size is the cluster's, not the config's


@pytest.mark.slow  # ~70 s on 2 shared cores (a second Ray); the address logic is tested above without one
def test_recaption_run_joins_a_separate_ray_through_ray_address(tmp_path):
    """`recaption run` with RAY_ADDRESS set joins that cluster (here a `ray start --head` of its own, in its own
    temp dir) instead of starting a local Ray: the driver's log lands in that cluster's session."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    import yaml

    from tests.job.test_resume import kill_session

    keys = write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    config = tmp_path / "p.yaml"
    models = [{"path": "fake", "engine": "fake", "num_cpus": 0.25}]
    config.write_text(
        yaml.safe_dump(
            {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": models}
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="rc-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    bin_dir = Path(sys.executable).parent
    # No token: a test cluster on loopback; `ray start` turns token authentication on by default.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--temp-dir", ray_tmp, "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        started = []
        for line in head.stdout:
            started.append(line)
            if "Ray runtime started" in line:
                break
        assert any("Ray runtime started" in line for line in started), "".join(started)[-3000:]
        run = subprocess.run(
            [str(bin_dir / "recaption"), "run", str(config), "--no-progress"],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert "rows:     4 (4 ok, 0 failed, 0 skipped)" in run.stdout
        assert list(Path(ray_tmp).glob("session_latest/logs/python-core-driver-*"))  # the run was this cluster's
    finally:
        kill_session(head)  # the head, its GCS, raylet and workers: nothing else of this machine's Ray
        shutil.rmtree(ray_tmp, ignore_errors=True)
    table = check_contract(tmp_path / "out", keys, n_captions=1)
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_an_output_with_an_empty_unit_and_failed_rows_loads_in_every_reader(tmp_path, ray_session):
    """An img2dataset shard whose downloads all failed is an empty tar: its unit is a Parquet file without row groups
    (an empty row group breaks `datasets`); failed rows are rows like the others."""
    import datasets
    import duckdb

    keys = write_webdataset_dir(tmp_path / "in", 4, shard_size=2)
    with tarfile.open(tmp_path / "in" / "00002.tar", "w"):
        pass  # no members
    with (tmp_path / "in" / "00001.tar").open("r+b") as f:  # one image of unit 00001 corrupt: a failed row
        data = bytearray(f.read())
        at = data.index(b"\xff\xd8")  # the first JPEG of the shard
        data[at : at + 64] = b"\0" * 64
        f.seek(0)
        f.write(data)
    out = tmp_path / "out"
    summary = run_pipeline(make_config(tmp_path / "in", out), progress=False)
    assert (summary.units_done, summary.rows, summary.failed) == (3, 4, 1)
    assert pq.ParquetFile(out / "part-00002.recaption.parquet").metadata.num_row_groups == 0
    assert sorted(pads.dataset(str(out), format="parquet").to_table().column("key").to_pylist()) == keys
    hf = datasets.load_dataset(
        "parquet", data_files=str(out / "*.parquet"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert sorted(hf["key"]) == keys and sorted(hf["status"]) == ["failed", "ok", "ok", "ok"]
    counts = duckdb.sql(f"select status, count(*) from read_parquet('{out}/*.parquet') group by status order by 1")
    assert counts.fetchall() == [("failed", 1), ("ok", 3)]


def test_a_stage_that_raises_ends_the_run_naming_the_error_it_raised(ray_session):
    """Ray wraps what a stage raises (RayTaskError(UserCodeException): "UDF failed to process a data block"): the
    one line that ends the run names the stage's own error, not the wrapper."""
    import ray.data

    from recaption.errors import RecaptionError
    from recaption.job.pipeline import iter_units

    def broken(batch):
        raise KeyError("s3://bucket/x?X-Amz-Signature=abcdef0123456789 has no field 'jpg'")

    ds = ray.data.range(2, override_num_blocks=1).map_batches(broken)
    with pytest.raises(RecaptionError) as info:
        list(iter_units(ds))
    message = str(info.value)
    assert message.startswith("the run stopped: KeyError: "), message
    assert "has no field 'jpg'" in message and "abcdef0123456789" not in message  # a signed URL stays secret
    assert "UDF failed" not in message and "\n" not in message


IDLE_WORKERS_SCRIPT = """
import os, time
import ray
from recaption.config import load_config
from recaption.job.pipeline import init_ray
data = {"input": {"path": "in"}, "output": {"path": "out"}, "models": [{"path": "fake", "engine": "fake"}]}
init_ray(load_config(None, ["ray.num_cpus=2"], data=data))
@ray.remote(num_cpus=0.25)
def pid(_):
    time.sleep(0.5)
    return os.getpid()
first = set(ray.get([pid.remote(i) for i in range(8)]))
time.sleep(4)
second = set(ray.get([pid.remote(i) for i in range(8)]))
print("REUSED", len(first & second), "OF", len(first), "IN", len(second))
"""


def test_a_local_ray_keeps_its_idle_workers_so_reads_do_not_import_everything_again():
    """Reads reserve a quarter of a CPU, so 8 run at once on 2 CPUs; after 4 s of nothing, Ray left alone replaces
    half of those workers (each new one imports Ray Data and pyarrow again, ~1 s of CPU); the local Ray `recaption
    run` starts reuses all of them. (A slow start can leave the first 8 tasks on 7 workers, two on one; the second
    8 then start one more, but every one of the first workers still comes back.)"""
    import os
    import subprocess
    import sys

    from recaption.job.pipeline import KEEP_IDLE_WORKERS

    env = {k: v for k, v in os.environ.items() if k not in KEEP_IDLE_WORKERS and k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", IDLE_WORKERS_SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("REUSED")), None)
    assert line is not None, done.stderr[-2000:]
    _, reused, _, first, _, second = line.split()
    assert int(first) >= 6 and int(reused) == min(int(first), int(second)), line

"""The trainer left running overnight: bad data, a diverging loss, a changed resume and a wrong run.output each stop
with one clear line (or are skipped and counted), and nothing a user keeps is deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recaption.cli import main
from recaption.demo.ablation import write_train_split
from recaption.errors import ConfigError, InputError
from recaption.eval.synthetic import make_scene
from recaption.sources.tar import write_webdataset
from recaption.train.checkpoint import latest_checkpoint
from recaption.train.data import ExampleStream, output_parts
from recaption.train.run import run_training
from recaption.train.sampling import TextSampler
from tests.train.conftest import tiny_config

N = 12
QUICK = ["run.steps=2", "run.batch_size=4", "run.checkpoint_every=1", "run.keep_checkpoints=1", "loss.grouping=0"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A captions output of 12 scenes in 3 source shards (`input/`), written through the pipeline's writer."""
    root = tmp_path_factory.mktemp("scenes")
    write_train_split(root, N, shard_size=4)
    return root


def copy_of(scenes: Path, tmp_path: Path) -> Path:
    shutil.copytree(scenes, tmp_path / "data")
    return tmp_path / "data"


def cfg(data: Path, run: Path, *overrides: str):
    """train-tiny on a copy of `scenes` (its shards found where they are now)."""
    return tiny_config(data / "output", run, f"data.input_path={data / 'input'}", *QUICK, *overrides)


def replace_images(data: Path, image_of) -> None:
    """Rewrite the source shards with the same keys and `image_of(i)` as each image's bytes."""
    shutil.rmtree(data / "input")
    samples = [{"key": f"{i:09d}", "jpg": image_of(i), "caption": "x"} for i in range(N)]
    write_webdataset(str(data / "input"), samples, shard_size=4)


def rehash(data: Path) -> None:
    """Set each row's image_sha256 to that of the bytes now in the shards (as if the pipeline had seen them)."""
    import hashlib

    from recaption.sources.tar import read_samples

    sha = {}
    for tar in sorted((data / "input").glob("*.tar")):
        with tar.open("rb") as f:
            sha |= {r.key: hashlib.sha256(r.image).hexdigest() for r in read_samples(f, tar.name)}
    for part in output_parts(str(data / "output")):
        table = pq.read_table(part)
        column = pa.array([sha[k] for k in table.column("key").to_pylist()], pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("image_sha256"), "image_sha256", column), part)


def test_when_no_image_decodes_the_run_stops_with_one_line(scenes, tmp_path):
    data = copy_of(scenes, tmp_path)
    replace_images(data, lambda i: b"\xff\xd8\xff not a jpeg at all")
    rehash(data)
    with pytest.raises(InputError, match=f"none of the {N} images of worker 0 decodes"):
        run_training(cfg(data, tmp_path / "run"), progress=False)


def test_changed_source_images_are_skipped_counted_and_reported(scenes, tmp_path, capsys):
    data = copy_of(scenes, tmp_path)
    other = {i: make_scene(500 + i, size=48).jpeg() for i in range(N)}
    replace_images(data, lambda i: other[i] if i % 3 == 0 else make_scene(i, size=48).jpeg())
    summary = run_training(cfg(data, tmp_path / "run"), progress=False)
    assert summary["skipped"]["images"]["changed since captioning"] == N // 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"] == summary["skipped"]
    assert f"{N // 3} changed since captioning" in capsys.readouterr().out
    # Every image replaced: nothing to train on, said in one line.
    replace_images(data, lambda i: other[i])
    with pytest.raises(InputError, match=f"no usable image for worker 0 of 1 .*{N} changed since captioning"):
        run_training(cfg(data, tmp_path / "run2"), progress=False)


def test_skipped_rows_are_reported_at_the_start_and_in_the_summary(scenes, tmp_path, capsys):
    data = copy_of(scenes, tmp_path)
    part = output_parts(str(data / "output"))[0]
    table = pq.read_table(part)
    status = ["failed"] + table.column("status").to_pylist()[1:]
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", pa.array(status)), part)
    summary = run_training(cfg(data, tmp_path / "run"), progress=False)
    assert summary["skipped"]["rows"] == {"failed status": 1}
    assert f"data: {N - 1} of {N} rows trainable; skipped 1 failed status" in capsys.readouterr().out


def test_a_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_exports_nothing(scenes, tmp_path, capsys):
    data = copy_of(scenes, tmp_path)
    run = tmp_path / "run"
    bad = ["run.steps=6", "optim.lr=1e30", "optim.grad_clip=null", "optim.warmup_steps=0"]
    config = cfg(data, run, *bad)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config.resolved()))
    assert main(["train", str(tmp_path / "train.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss or gradient" in errors[0] and "Lower optim.lr" in errors[0]
    assert not any("Traceback" in line for line in err) and any(line.startswith("train stopped:") for line in err)
    last = latest_checkpoint(run)
    assert last is not None and last.name in errors[0]
    weights = torch.load(last / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (run / "final").exists() and not (run / "summary.json").exists()


def test_a_resume_under_another_training_config_is_refused_naming_the_keys(scenes, tmp_path):
    data = copy_of(scenes, tmp_path)
    run = tmp_path / "run"
    run_training(cfg(data, run), progress=False)
    saved = (run / "config.yaml").read_text()
    changed = cfg(data, run, "run.steps=3", "optim.lr=0.01", "run.seed=4")
    with pytest.raises(ConfigError, match=r"optim.lr 0.005 → 0.01, run.seed 0 → 4;"):
        run_training(changed, progress=False)
    assert (run / "config.yaml").read_text() == saved  # written only after the check passes
    two = cfg(data, run, "run.steps=3", "distributed.num_workers=2")  # refused before any Ray worker starts
    with pytest.raises(ConfigError, match=r"distributed.num_workers 1 → 2"):
        run_training(two, progress=False)
    # How often it logs and saves may change, and run.steps (the cosine then ends at the new last step).
    assert run_training(cfg(data, run, "run.log_every=5", "run.steps=3"), progress=False)["step"] == 3


def test_run_output_must_be_a_training_run_and_a_users_copies_are_kept(scenes, tmp_path):
    data = copy_of(scenes, tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty and is not a training run"):
        run_training(cfg(data, foreign), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    before = sorted(p.name for p in (data / "output").iterdir())
    with pytest.raises(ConfigError, match=r"is a captions output \(recaption run\), not a training run"):
        run_training(cfg(data, data / "output"), progress=False)
    assert sorted(p.name for p in (data / "output").iterdir()) == before
    run = tmp_path / "run"
    run_training(cfg(data, run, "run.steps=1"), progress=False)
    shutil.copytree(run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000001-keep")
    run_training(cfg(data, run, "run.steps=3", "run.resume=false"), progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-00000001-keep", "step-00000003"]


def test_data_path_at_the_source_shards_or_a_wrong_parquet_is_one_line(scenes, tmp_path):
    data = copy_of(scenes, tmp_path)
    with pytest.raises(InputError, match="tar shards without captions"):
        run_training(tiny_config(data / "input", tmp_path / "a", *QUICK), progress=False)
    part = output_parts(str(data / "output"))[0]
    table = pq.read_table(part)
    as_text = pa.array([c[0]["text"] for c in table.column("captions").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("captions"), "captions", as_text), part)
    with pytest.raises(InputError, match="captions are string, not a list of caption structs"):
        run_training(cfg(data, tmp_path / "b"), progress=False)
    pq.write_table(table.drop_columns(["captions"]), part)
    with pytest.raises(InputError, match="lacks the column"):
        run_training(cfg(data, tmp_path / "c"), progress=False)


def test_rows_not_files_are_split_over_workers(scenes, tmp_path):
    """Failed rows gathered in some part files never leave a worker without data: each worker takes its share of
    every part."""
    data = copy_of(scenes, tmp_path)
    parts = output_parts(str(data / "output"))
    for part in parts[1:]:  # only the first part file keeps trainable rows
        table = pq.read_table(part)
        failed = pa.array(["failed"] * table.num_rows)
        pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", failed), part)
    c = cfg(data, tmp_path / "run")
    sampler = TextSampler(c.sampling, c.run.seed)
    shares = [[ex.key for ex in ExampleStream(c, sampler, rank, 2).epoch(0)] for rank in range(2)]
    assert sorted(map(len, shares)) == [2, 2] and not set(shares[0]) & set(shares[1])

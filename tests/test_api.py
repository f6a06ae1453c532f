"""The Python API a notebook user reaches with `import recaption`: load a config, run it, caption an existing Ray
Dataset, read an output back as a Ray Dataset or a `datasets.Dataset`."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

import recaption
from tests.data import make_image, write_webdataset_dir

FAKE = {"path": "fake", "engine": "fake", "prompts": ["short"], "num_cpus": 0.25}


def test_import_recaption_is_light():
    """The API module imports no heavy library until a function needs it."""
    code = "import sys, recaption; print(sorted(m for m in ('ray', 'torch', 'datasets', 'vllm') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_load_config_from_a_file_or_a_dict_with_overrides(tmp_path):
    data = {"input": {"path": "in"}, "output": {"path": "out"}, "models": [FAKE]}
    cfg = recaption.load_config(data, ["generation.max_new_tokens=17"])
    assert cfg.generation.max_new_tokens == 17 and cfg.models[0].generation.max_new_tokens == 17
    cfg = recaption.load_config("pipelines/demo.yaml", ["input.path=/x"])
    assert cfg.input.path == "/x"
    with pytest.raises(recaption.ConfigError, match="models.0.prompts: required key|unknown key"):
        recaption.load_config(data, ["models.0.promts=[short]"])


def test_run_then_read_the_output_back(tmp_path, ray_session):
    keys = write_webdataset_dir(tmp_path / "in", 5, shard_size=2)
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [FAKE]}
    summary = recaption.run(data, progress=False)
    assert (summary.rows, summary.ok, summary.units_done) == (5, 5, 3)
    assert recaption.run(data, progress=False).units_skipped == 3  # a rerun resumes: nothing left
    ds = recaption.read_output(str(tmp_path / "out"))
    assert sorted(ds.to_pandas()["key"]) == keys
    assert recaption.read_output(str(tmp_path / "out"), ok_only=True, columns=["key", "captions"]).count() == 5
    hf = recaption.read_output_hf(str(tmp_path / "out"))
    assert sorted(hf["key"]) == keys and '"config_hash"' in hf.info.description


def test_caption_an_existing_ray_dataset(tmp_path, ray_session):
    """A user's own dataset, filtered with Ray Data first, captioned by two models, written where they like."""
    import ray.data

    rows = [{"id": i, "image": make_image(i), "keep": i % 2 == 0} for i in range(6)]
    rows.append({"id": 6, "image": b"not an image", "keep": True})
    ds = ray.data.from_items(rows).filter(lambda r: r["keep"])
    models = [{**FAKE, "name": "a"}, {**FAKE, "name": "b", "prompts": ["short", "objects"]}]
    out = recaption.caption(ds, {"models": models}, keep_image=False).take_all()
    assert sorted(r["id"] for r in out) == [0, 2, 4, 6] and "image" not in out[0]
    by_id = {r["id"]: r for r in out}
    assert by_id[6]["status"] == "failed" and "cannot identify" in by_id[6]["error"].lower() or by_id[6]["error"]
    for i in (0, 2, 4):
        row = by_id[i]
        assert row["status"] == "ok" and row["width"] == 64 and len(row["image_sha256"]) == 64
        assert [(c["model"], c["prompt"]) for c in row["captions"]] == [
            ("a", "short"),
            ("b", "short"),
            ("b", "objects"),
        ]
    written = recaption.caption(ds, {"models": models[:1]})
    written.write_parquet(str(tmp_path / "mine"))
    table = pa.concat_tables(
        [pa.parquet.read_table(p) for p in sorted((tmp_path / "mine").glob("*.parquet"))]
    )  # fmt: skip
    assert table.num_rows == 4 and "captions" in table.column_names and "image" in table.column_names


def test_caption_takes_decoded_arrays_as_ray_read_images_gives_them(tmp_path, ray_session):
    import numpy as np
    import ray.data

    arrays = [np.full((40, 56, 3), i * 20, dtype=np.uint8) for i in range(3)]
    ds = ray.data.from_items([{"image": a} for a in arrays])
    out = recaption.caption(ds, {"models": [FAKE]}).take_all()
    assert [(r["status"], r["width"], r["height"]) for r in out] == [("ok", 56, 40)] * 3


def test_caption_fills_prompts_from_the_users_columns(ray_session):
    """A prompt naming `{TEXT}` (a LAION column) and `{alt_text}` takes them from the user's rows; a row without
    `TEXT` gets the fallback prompt."""
    import ray.data

    rows = [{"image": make_image(i), "TEXT": f"a photo {i}" if i else None, "alt_text": "alt"} for i in range(3)]
    prompts = {"cond": {"text": "Alt: {TEXT} / {alt_text}. Describe.", "fallback": "short"}}
    cfg = {"models": [{**FAKE, "prompts": ["cond"]}], "prompts": prompts}
    out = sorted(
        recaption.caption(ray.data.from_items(rows), cfg, keep_image=False).take_all(), key=lambda r: r["TEXT"] or ""
    )
    asked = [r["captions"][0]["prompt_text"] for r in out]
    assert asked == [
        "Describe this image in one short sentence.",
        "Alt: a photo 1 / alt. Describe.",
        "Alt: a photo 2 / alt. Describe.",
    ]

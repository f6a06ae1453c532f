"""`recaption plan`: what a run of a config would do, before it spends GPU hours.

The input's units and rows (counted, or estimated from a sample of shards when there are many), what the output
already holds, and each model's pool with where its actors fit on the cluster, without starting an engine. With
`calibrate=N`, a short real run on N images of the input into a temporary output (never the configured one) measures
tokens per caption and images/s per actor, and extrapolates the wall time and GPU-hours of the whole input.

Planning never writes into the output directory: the tar count cache and the done manifest are read, not written.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from recaption.config import ImageConfig, InputConfig, PipelineConfig, load_config
from recaption.errors import RecaptionError
from recaption.fields import TYPES, KeptField
from recaption.redact import redact_text
from recaption.sources import FileEntry, WorkUnit, display, join, parent

log = logging.getLogger(__name__)

SAMPLE_SHARDS = 64  # shards counted at most; an input with more (not counted before) is estimated from a sample
SAMPLE_SEED = 0
LOW_FILL = 0.5  # a calibration whose engine batch was fuller than this on average measured a fair speed
CALIBRATION_UNITS = 4  # the calibration images are cut into this many units: per-unit timings, several in flight


@dataclass
class InputPlan:
    """The input as planned: format, shards, units and rows; `exact` False when rows and units are estimated."""

    path: str
    format: str
    shards: int
    units: int
    rows: int
    exact: bool
    counted_shards: int  # shards whose rows were counted (or found counted in the output's cache)
    unit_rows: dict[str, int] | None = field(default=None, repr=False)  # exact: rows per unit id

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "unit_rows"}


@dataclass
class OutputPlan:
    """What the output holds now and what a run would have left to do."""

    path: str
    state: str  # new, empty, ours, refused
    done_units: int = 0
    done_rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    other_config_units: int = 0  # done units written with another config (a run refuses without --overwrite)
    gone_units: int = 0  # done units the input no longer has (exact plans only)
    todo_units: int = 0
    todo_rows: int = 0
    holder: str | None = None  # the run holding the output's lease now, if any


@dataclass
class PoolPlan:
    """One model's pool: its size and each actor's resources, and where the actors fit on the cluster now."""

    model: str
    engine: str
    path: str
    prompts: list[str]
    actors_min: int | None
    actors_max: int | None  # None: grows as the cluster does
    gpus_per_actor: float
    cpus_per_actor: float
    accelerator_type: str | None
    placed: dict[str, int] = field(default_factory=dict)  # node → actors that fit there now
    problem: str | None = None


@dataclass
class Calibration:
    """A short real run: per model, images/s of one actor and tokens per caption; and the whole input extrapolated."""

    images: int
    seconds: float
    failed: int
    models: dict[str, dict[str, Any]]
    estimate: dict[str, Any]


@dataclass
class Plan:
    """Everything `recaption plan` prints; `problems` are what would stop a run (exit code 2)."""

    config_hash: str
    input: InputPlan
    output: OutputPlan
    cluster: dict[str, Any]
    pools: list[PoolPlan]
    problems: list[str] = field(default_factory=list)
    calibration: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"] = self.input.to_dict()
        return d


def plan_run(cfg: PipelineConfig, *, sample_shards: int = SAMPLE_SHARDS, calibrate: int = 0) -> Plan:
    """Plans a run of `cfg` without running it (and without writing to its output); with `calibrate` > 0, also
    captions that many images of the input in a temporary output to measure speed and extrapolate the whole run."""
    from recaption.job.pipeline import check_models, check_paths, check_prompt_fields, resolve_prompts

    resolve_prompts(cfg)
    check_paths(cfg)
    problems: list[str] = []
    try:
        check_models(cfg)
    except RecaptionError as e:
        problems.append(str(e))
    inp = plan_input(cfg.input, cfg.output.path, sample_shards)
    try:  # every field a prompt names is one the rows have (their own and the kept source fields)
        check_prompt_fields(cfg, kept_of(cfg))
    except RecaptionError as e:
        problems.append(str(e))
    out, out_problems = plan_output(cfg, inp)
    cluster, pools = plan_pools(cfg)
    problems += [p.problem for p in pools if p.problem]  # these stop a calibration run too; the output's do not
    plan = Plan(cfg.hash(), inp, out, cluster, pools, [redact_text(p) for p in problems + out_problems])
    if calibrate > 0:
        if problems:
            raise RecaptionError("not calibrating: " + redact_text("; ".join(problems)))
        plan.calibration = calibrate_run(cfg, plan, calibrate)
    return plan


# -- input ---------------------------------------------------------------------------------------------------------


def plan_input(input_cfg: InputConfig, output: str | None, sample_shards: int = SAMPLE_SHARDS) -> InputPlan:
    """Units and rows of the input: counted where that takes at most `sample_shards` shards' reads (tar counts the
    output's cache holds cost none), else estimated from a seeded sample of that many shards, scaled by size."""
    from recaption.sources.plan import _detect, _scan

    scanned = _scan(input_cfg)
    fmt = _detect(input_cfg, scanned)
    where = display(input_cfg.path)
    if fmt == "folder":
        return _exact(input_cfg, output, fmt, where, 1, {})
    shards = _shard_files(scanned, fmt)
    if not shards:  # the planner says why in one line
        return _exact(input_cfg, output, fmt, where, 0, {})
    if fmt == "webdataset":
        return _plan_tars(input_cfg, output, scanned, shards, where, sample_shards)
    if len(shards) <= sample_shards:
        return _exact(input_cfg, output, fmt, where, len(shards), {})
    count = _row_counter(fmt)
    sample = random.Random(SAMPLE_SEED).sample(shards, sample_shards)
    counted = {f.path: count(join(scanned.root, f.path)) for f in sample}
    return _estimate(input_cfg, fmt, where, shards, counted, _row_units_of(input_cfg.unit_size))


def _plan_tars(
    input_cfg: InputConfig, output: str | None, scanned, tars: list[FileEntry], where: str, sample_shards: int
) -> InputPlan:
    from recaption.sources import COMPRESSED_TARS, cached_counts, count_samples
    from recaption.sources.plan import _unique_ids

    counts = cached_counts(output, tars) if output else {}
    missing = [t for t in tars if t.path not in counts]
    listed = {f.path for f in scanned.files}
    ids = _unique_ids([t.path for t in tars])

    def count(entries: list[FileEntry]) -> dict[str, int]:
        plain = [t for t in entries if not t.path.endswith(COMPRESSED_TARS)]
        found = count_samples(scanned.root, plain, listed, ids)
        for t in entries:  # no random access into a compressed tar: its records are read as a run reads them
            if t.path.endswith(COMPRESSED_TARS):
                found[t.path] = _records(WorkUnit(ids[t.path], t.path, join(scanned.root, t.path), "webdataset"),
                                         input_cfg)  # fmt: skip
        return found

    if len(missing) <= sample_shards:
        counts.update(count(missing))
        return _exact(input_cfg, output, "webdataset", where, len(tars), counts)
    sample = random.Random(SAMPLE_SEED).sample(missing, sample_shards)
    sampled = count(sample)
    unit_size = input_cfg.unit_size

    def units_of(entry: FileEntry, rows: float) -> int:
        return 1 if entry.path.endswith(COMPRESSED_TARS) else max(1, math.ceil(rows / unit_size))

    return _estimate(input_cfg, "webdataset", where, tars, {**counts, **sampled}, units_of)


def _records(unit, input_cfg: InputConfig) -> int:
    """The rows a run gets from a unit: its records, read."""
    from recaption.sources import read_unit

    return sum(1 for _ in read_unit(unit, input_cfg))


def _row_units_of(unit_size: int):
    return lambda entry, rows: math.ceil(rows / unit_size)


def _exact(
    input_cfg: InputConfig, output: str | None, fmt: str, where: str, shards: int, tar_counts: dict[str, int]
) -> InputPlan:
    from recaption.sources import plan_units

    units = plan_units(input_cfg, output, read_only=True, known_counts=tar_counts)
    rows = {}
    for u in units:
        stop = u.stop if u.stop is not None else tar_counts.get(u.source)
        rows[u.unit] = (stop - u.start) if stop is not None else 0
    shards = shards or len({u.source for u in units})
    return InputPlan(where, fmt, shards, len(units), sum(rows.values()), True, shards, rows)


def _estimate(
    input_cfg: InputConfig,
    fmt: str,
    where: str,
    shards: list[FileEntry],
    counted: dict[str, int],
    units_of,
) -> InputPlan:
    """Rows of the shards not counted, from the counted ones: rows per byte where sizes are known, else the mean."""
    sized = [f for f in shards if f.path in counted and f.size]
    per_byte = sum(counted[f.path] for f in sized) / sum(f.size for f in sized) if sized else None
    mean = sum(counted.values()) / len(counted)
    rows = units = 0.0
    for f in shards:
        n = counted.get(f.path)
        if n is None:
            n = f.size * per_byte if per_byte is not None and f.size is not None else mean
        rows += n
        units += units_of(f, n)
    if input_cfg.max_units and units > input_cfg.max_units:
        rows, units = rows * input_cfg.max_units / units, input_cfg.max_units
    return InputPlan(where, fmt, len(shards), round(units), round(rows), False, len(counted))


def _shard_files(scanned, fmt: str) -> list[FileEntry]:
    from recaption.sources import TAR_SUFFIXES, arrow_files

    if fmt == "webdataset":
        return [f for f in scanned.files if f.path.endswith(TAR_SUFFIXES)]
    if fmt == "hf":
        wanted = set(arrow_files(scanned.root, scanned.files))
        return [f for f in scanned.files if f.path in wanted]
    return [f for f in scanned.files if f.path.endswith(".parquet")]


def _row_counter(fmt: str):
    from recaption.sources import arrow_rows, parquet_rows

    count = arrow_rows if fmt == "hf" else parquet_rows
    return lambda uri: count(uri)[0]


# -- output --------------------------------------------------------------------------------------------------------


def plan_output(cfg: PipelineConfig, inp: InputPlan) -> tuple[OutputPlan, list[str]]:
    """What the output holds (read only: its markers, manifest and lease are read, nothing is written)."""
    from recaption.job.lease import Lease
    from recaption.job.manifest import DoneManifest
    from recaption.job.writer import open_output, output_totals

    out = open_output(cfg.output.path)
    state, refusal = out.state()
    plan = OutputPlan(out.uri, state, todo_units=inp.units, todo_rows=inp.rows)
    if refusal:
        return plan, [refusal]
    if state != "ours":
        return plan, []
    problems = []
    done = DoneManifest(out, read_only=True).refresh()
    ours = {u: m for u, m in done.items() if m.get("config_hash") == cfg.hash()}
    plan.other_config_units = len(done) - len(ours)
    if plan.other_config_units:
        problems.append(
            f"output.path {out.uri} holds {plan.other_config_units} units written with another config: a run "
            "refuses it; rerun with --overwrite to replace them, or choose a new output.path"
        )
    if inp.unit_rows is not None:
        plan.gone_units = len(set(ours) - set(inp.unit_rows))
        ours = {u: m for u, m in ours.items() if u in inp.unit_rows}
    totals = output_totals(ours)
    plan.done_units, plan.done_rows = totals["units"], totals["rows"]
    plan.ok, plan.failed, plan.skipped, plan.errors = (
        totals["ok"],
        totals["failed"],
        totals["skipped"],
        totals["errors"],
    )
    if inp.unit_rows is not None:
        plan.todo_units = len(inp.unit_rows) - len(ours)
        plan.todo_rows = sum(n for u, n in inp.unit_rows.items() if u not in ours)
    else:
        plan.todo_units = max(0, inp.units - plan.done_units)
        plan.todo_rows = max(0, inp.rows - plan.done_rows)
    lease = Lease(out, cfg.output.lease_timeout_s)
    holder = lease.read()
    if holder is not None and lease.stale_reason(holder) is None:
        plan.holder = holder.describe()
        problems.append(str(lease.busy_error(holder)))  # a run started now would stop on the lease, saying this
    return plan, problems


# -- pools ---------------------------------------------------------------------------------------------------------


def plan_pools(cfg: PipelineConfig) -> tuple[dict[str, Any], list[PoolPlan]]:
    """The cluster (starting a local Ray as a run would, or joining the configured one) and each model's pool:
    its bounds as a run would size it, and a first-fit of its actors onto the nodes' free resources now, pool after
    pool. No actor is started."""
    import ray

    from recaption.job.pipeline import init_ray
    from recaption.job.placement import ACCELERATOR_PREFIX, pool_bounds

    init_ray(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive", True)]
    free = {_node_name(n): dict(n.get("Resources") or {}) for n in nodes}
    accelerators: dict[str, float] = {}
    for n in nodes:
        for key in n.get("Resources") or {}:
            if key.startswith(ACCELERATOR_PREFIX):
                kind = key[len(ACCELERATOR_PREFIX) :]
                accelerators[kind] = accelerators.get(kind, 0.0) + (n["Resources"].get("GPU") or 0.0)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    cluster = {
        "address": redact_text(address) if address else "local (started for the plan, as a run would)",
        "nodes": len(nodes),
        "cpus": sum((n.get("Resources") or {}).get("CPU", 0.0) for n in nodes),
        "gpus": sum((n.get("Resources") or {}).get("GPU", 0.0) for n in nodes),
        "accelerators": accelerators,
        "autoscaling": cfg.ray.autoscaling,
    }
    pools = []
    for model in cfg.models:
        pool = PoolPlan(model.id, model.engine, redact_text(model.path), list(model.prompts), None, None,
                        model.gpus_per_actor, model.num_cpus, model.accelerator_type)  # fmt: skip
        try:
            pool.actors_min, pool.actors_max = pool_bounds(model, nodes, cfg.ray.autoscaling)
        except RecaptionError as e:
            pool.problem = str(e)
            pools.append(pool)
            continue
        want = pool.actors_min
        for name, resources in free.items():
            while sum(pool.placed.values()) < want and _fits(resources, model):
                resources["CPU"] = resources.get("CPU", 0.0) - model.num_cpus
                resources["GPU"] = resources.get("GPU", 0.0) - model.gpus_per_actor
                pool.placed[name] = pool.placed.get(name, 0) + 1
        placed = sum(pool.placed.values())
        if placed < want and not cfg.ray.autoscaling:
            pool.problem = (
                f"models[{model.id}]: {placed} of its {want} actors fit on the cluster beside the pools before it "
                f"(each takes {model.num_cpus:g} CPUs, {model.gpus_per_actor:g} GPUs): the rest would wait; lower "
                "concurrency or num_cpus, or add nodes"
            )
        pools.append(pool)
    return cluster, pools


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', ''))[:8]})"


def _fits(resources: dict[str, float], model) -> bool:
    from recaption.job.placement import ACCELERATOR_PREFIX

    if model.accelerator_type and f"{ACCELERATOR_PREFIX}{model.accelerator_type}" not in resources:
        return False
    eps = 1e-9
    return resources.get("CPU", 0.0) + eps >= model.num_cpus and resources.get("GPU", 0.0) + eps >= model.gpus_per_actor


# -- calibration ---------------------------------------------------------------------------------------------------


def calibrate_run(cfg: PipelineConfig, plan: Plan, n: int) -> Calibration:
    """Captions the first `n` images of the input (one actor per model, the configured engines and settings) in a
    temporary output that is removed afterwards, and extrapolates to the rows still to do with the planned pools."""
    from recaption.job.pipeline import run_pipeline
    from recaption.sources import resolve

    scratch = scratch_dir(cfg, plan.cluster)
    fs, scratch_path = resolve(scratch)
    try:
        kept = [KeptField(**f) for f in kept_of(cfg)]
        images = _first_images(cfg.input, n, join(scratch, "in/images.parquet"), cfg.images, kept)
        if not images:
            raise RecaptionError(f"not calibrating: no image of the input {display(cfg.input.path)} decodes")
        per_unit = max(1, math.ceil(images / CALIBRATION_UNITS))
        data = cfg.model_dump(mode="json")
        # The kept source fields come along under their source names, so prompts that name them fill as in the run.
        data["input"] = {"path": join(scratch, "in"), "format": "parquet", "image_column": CAL["image"],
                         "key_column": CAL["key"], "caption_column": CAL["alt_text"], "url_column": CAL["url"],
                         "unit_size": per_unit, "keep_columns": [f"{f.source}:{_cal_type(f)}" for f in kept]}  # fmt: skip
        data["output"] = {**data["output"], "path": join(scratch, "out")}
        for model in data["models"]:
            model["concurrency"] = 1
        cal_cfg = load_config(None, data=data)
        metrics: dict[str, dict] = {}

        def on_unit(row: dict) -> None:
            import json

            for model, snap in json.loads(row.get("metrics") or "{}").items():
                # One actor per model, its figures cumulative; units commit out of order, so keep the fullest.
                if snap.get("requests", 0) >= metrics.get(model, {}).get("requests", 0):
                    metrics[model] = snap

        started = time.time()
        summary = run_pipeline(cal_cfg, progress=False, on_unit=on_unit)
        seconds = time.time() - started
        if summary.unit_errors:
            unit, error = next(iter(summary.unit_errors.items()))
            raise RecaptionError(f"the calibration run failed: unit {unit}: {error}")
        models = _model_figures(cal_cfg, join(scratch, "out"), metrics)
        estimate = _extrapolate(plan, cfg, models)
        return Calibration(images, round(seconds, 2), summary.failed, models, estimate)
    finally:
        try:
            fs.delete_dir(scratch_path)
        except (OSError, pa.ArrowException) as e:
            log.warning("could not remove the calibration's scratch %s: %s", display(scratch), redact_text(str(e)))


def scratch_dir(cfg: PipelineConfig, cluster: dict[str, Any]) -> str:
    """Where a calibration writes its input and output: a local temporary directory on a one-node Ray; on a cluster,
    where read and commit tasks run on other nodes, a new directory beside `output.path` (on the storage the output
    is on, which the cluster shares), `.recaption-calibrate-<random>`, never inside the output."""
    if cluster.get("nodes", 1) <= 1:
        return tempfile.mkdtemp(prefix="recaption-calibrate-")
    return join(parent(cfg.output.path), f".recaption-calibrate-{uuid.uuid4().hex[:12]}")


# The calibration input's own columns: names no source field takes, so every kept field keeps its name.
CAL = {name: f"__recaption_{name}" for name in ("key", "image", "url", "alt_text")}


def _cal_type(field: KeptField) -> str:
    return "string" if field.type == "json" else field.type  # a json field is carried as its JSON text


def kept_of(cfg: PipelineConfig) -> list[dict]:
    """The source fields a run of `cfg` would keep as columns, as the run finds them (its first unit's first row)."""
    from recaption.job.pipeline import kept_columns

    first = next(iter(_whole_shards(cfg.input)), None)
    return kept_columns(cfg, [first] if first is not None else [])


def _first_images(input_cfg: InputConfig, n: int, dest: str, image_cfg: ImageConfig, kept: list[KeptField] = ()) -> int:
    """Writes the first `n` images of the input that decode within the run's image limits (in shard order, with their
    keys, URLs, alt texts and `kept` source fields) as one Parquet file; returns how many it found. Broken ones are
    left out: a calibration measures captioning, and the plan's counts already include every row."""
    import pyarrow.parquet as pq

    from recaption.sources import decode_image, read_unit, resolve

    rows: list[dict] = []
    for unit in _whole_shards(input_cfg):
        for rec in read_unit(unit, input_cfg):
            if rec.error is None and rec.image and _decodes(decode_image, rec.image, image_cfg):
                row = {CAL["key"]: f"{unit.unit}/{rec.key}", CAL["image"]: rec.image, CAL["url"]: rec.url,
                       CAL["alt_text"]: rec.alt_text}  # fmt: skip
                rows.append(row | {f.source: f.value(rec.meta) for f in kept})
            if len(rows) >= n:
                break
        if len(rows) >= n:
            break
    if rows:
        fs, path = resolve(dest)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        schema = pa.schema([(CAL["key"], pa.string()), (CAL["image"], pa.binary()), (CAL["url"], pa.string()),
                            (CAL["alt_text"], pa.string())] + [(f.source, TYPES[_cal_type(f)]) for f in kept])  # fmt: skip
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    return len(rows)


def _decodes(decode_image, data: bytes, image_cfg: ImageConfig) -> bool:
    try:
        decode_image(data, image_cfg)
    except RecaptionError:
        return False
    return True


def _whole_shards(input_cfg: InputConfig):
    """Units of whole shards in path order, lazily (no counting: a huge input costs one listing); folders as
    planned (their listing is their plan)."""
    from recaption.sources import WorkUnit
    from recaption.sources.plan import _detect, _scan, plan_units, unit_id

    scanned = _scan(input_cfg)
    fmt = _detect(input_cfg, scanned)
    if fmt == "folder":
        yield from plan_units(input_cfg.model_copy(update={"max_units": None}))
        return
    for f in sorted(_shard_files(scanned, fmt), key=lambda f: f.path):
        yield WorkUnit(unit_id(f.path), f.path, join(scanned.root, f.path), fmt)


def _model_figures(cfg: PipelineConfig, out_path: str, metrics: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per model: images/s of its one actor (images over the engine's own time: a full run keeps it fed), tokens per
    caption per prompt, and captions that failed."""
    import pyarrow.dataset as pads

    from recaption.job.writer import open_output

    out = open_output(out_path)
    table = pads.dataset(out.part_paths(), filesystem=out.fs, format="parquet").to_table(columns=["captions"])
    figures: dict[str, dict[str, Any]] = {}
    for model in cfg.models:
        tokens: dict[str, list[int]] = {}
        images, failed = set(), 0
        for i, caps in enumerate(table.column("captions").to_pylist()):
            for c in caps or []:
                if c["model"] != model.id:
                    continue
                if "error" in (c["flags"] or []):
                    failed += 1
                    continue
                images.add(i)
                tokens.setdefault(c["prompt"], []).append(c["n_tokens"] or 0)
        snap = metrics.get(model.id) or {}
        engine_s = float(snap.get("engine_s") or 0.0)
        # Images and engine time from one snapshot of the actor (one request per image and prompt; regenerated
        # captions are extra requests, so never more than the images captioned).
        engine_images = min(float(snap.get("requests") or 0) / len(model.prompts), len(images))
        figures[model.id] = {
            "images": len(images),
            "engine_s": round(engine_s, 3),
            # how full the engine's batch was on average (a run keeps it full): a low fill understates the speed
            "batch_fill": round(float(snap.get("busy_s") or 0.0) / engine_s, 3) if engine_s > 0 else None,
            "images_per_s_per_actor": round(engine_images / engine_s, 3) if engine_s > 0 and images else None,
            "tokens_per_caption": {p: round(sum(v) / len(v), 1) for p, v in tokens.items()},
            "failed_captions": failed,
            "gpus_per_actor": model.gpus_per_actor,
        }
    return figures


def _extrapolate(plan: Plan, cfg: PipelineConfig, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rows still to do (and the whole input's: `input_*`) at the measured per-actor speed with the planned
    pools (their size now; an elastic pool at its minimum): the pools run at once, so the slowest pool sets the pace;
    GPU-hours are what the pools hold for that time."""
    rows = plan.output.todo_rows
    pace: dict[str, float] = {}
    for pool in plan.pools:
        rate = models.get(pool.model, {}).get("images_per_s_per_actor")
        if rate and pool.actors_min:
            pace[pool.model] = rate * pool.actors_min
    if len(pace) < len(plan.pools):
        missing = sorted({p.model for p in plan.pools} - set(pace))
        return {"rows": rows, "note": f"no speed measured for {', '.join(missing)}: no estimate"}
    bottleneck = min(pace, key=pace.get)
    images_per_s = pace[bottleneck]
    wall_s = rows / images_per_s if images_per_s else 0.0
    input_wall_s = plan.input.rows / images_per_s if images_per_s else 0.0
    gpus = sum((p.actors_min or 0) * p.gpus_per_actor for p in plan.pools)
    return {
        "input_rows": plan.input.rows,
        "input_wall_s": round(input_wall_s, 3),
        "input_gpu_hours": round(gpus * input_wall_s / 3600, 4),
        "rows": rows,
        "exact_rows": plan.input.exact,
        "images_per_s": round(images_per_s, 3),
        "pool_images_per_s": {m: round(v, 3) for m, v in pace.items()},
        "bottleneck": bottleneck,
        "wall_s": round(wall_s, 3),
        "gpus": gpus,
        "gpu_hours": round(gpus * wall_s / 3600, 4),
    }


# -- text ----------------------------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    inp, out = plan.input, plan.output
    how = "counted" if inp.exact else f"ESTIMATED from {inp.counted_shards} of {inp.shards} shards (sampled, seed 0)"
    lines = [
        f"input:    {inp.path} ({inp.format})",
        f"          {inp.shards} shards, {inp.units} units, {inp.rows} rows ({how})",
        f"output:   {out.path} ({_STATES[out.state]})",
    ]
    if out.state == "ours":
        lines.append(f"          done: {out.done_units} units, {out.done_rows} rows ({out.ok} ok, {out.failed} failed, "
                     f"{out.skipped} skipped)")  # fmt: skip
        if out.errors:
            lines.append("          failed rows by error kind: " + ", ".join(f"{k} {n}" for k, n in out.errors.items()))
        if out.gone_units:
            lines.append(f"          {out.gone_units} done units are not in the input any more")
        if out.holder:
            lines.append(f"          a run holds the output now: {out.holder}")
    est = "" if inp.exact else "about "
    lines.append(f"to do:    {est}{out.todo_units} units, {est}{out.todo_rows} rows")
    c = plan.cluster
    kinds = ", ".join(f"{k} {v:g}" for k, v in c["accelerators"].items())
    lines.append(f"cluster:  {c['address']}: {c['nodes']} node{'' if c['nodes'] == 1 else 's'}, {c['cpus']:g} CPUs, {c['gpus']:g} GPUs"
                 + (f" ({kinds})" if kinds else "") + (", autoscaling" if c["autoscaling"] else ""))  # fmt: skip
    for p in plan.pools:
        size = "?" if p.actors_min is None else str(p.actors_min)
        if p.actors_min is not None and p.actors_max != p.actors_min:
            size += f"..{'(grows with the cluster)' if p.actors_max is None else p.actors_max}"
        kind = f" {p.accelerator_type}" if p.accelerator_type else ""
        lines.append(f"pool:     {p.model} [{p.engine}: {p.path}] prompts {', '.join(p.prompts)}: {size} actors × "
                     f"{p.gpus_per_actor:g} GPUs{kind}, {p.cpus_per_actor:g} CPUs")  # fmt: skip
        for node, k in p.placed.items():
            lines.append(f"          {k} on {node}")
    cal = plan.calibration
    if cal is not None:
        lines.append(f"calibration: {cal.images} images in {cal.seconds:g} s (one actor per model, a temporary "
                     f"output), {cal.failed} failed")  # fmt: skip
        for model, f in cal.models.items():
            speed = "-" if f["images_per_s_per_actor"] is None else f"{f['images_per_s_per_actor']:g}"
            toks = ", ".join(f"{p} {t:g}" for p, t in f["tokens_per_caption"].items()) or "-"
            lines.append(f"          {model}: {speed} images/s per actor; tokens per caption: {toks}")
            if f["batch_fill"] is not None and f["batch_fill"] < LOW_FILL:
                lines.append(f"          {model}: its engine's batch was {f['batch_fill']:.0%} full on average: the "
                             "speed is understated; calibrate on more images (a run keeps the batch full)")  # fmt: skip
        e = cal.estimate
        if "wall_s" in e:
            about = "" if e["exact_rows"] else ", rows estimated"
            lines.append(f"estimate: {e['images_per_s']:g} images/s (paced by {e['bottleneck']}) on {e['gpus']:g} "
                         f"GPUs{about}")  # fmt: skip
            lines.append(f"          whole input, {e['input_rows']} rows: {_duration(e['input_wall_s'])} wall, "
                         f"{e['input_gpu_hours']:g} GPU-hours")  # fmt: skip
            if e["rows"] != e["input_rows"]:
                lines.append(f"          left to do, {e['rows']} rows: {_duration(e['wall_s'])} wall, "
                             f"{e['gpu_hours']:g} GPU-hours")  # fmt: skip
        else:
            lines.append(f"estimate: {e['note']}")
    for problem in plan.problems:
        lines.append(f"problem:  {problem}")
    return "\n".join(lines)


_STATES = {
    "new": "does not exist yet: a run creates it",
    "empty": "empty: a run takes it",
    "ours": "a recaption output",
    "refused": "a run refuses it",
}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

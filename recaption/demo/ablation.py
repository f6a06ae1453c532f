"""`recaption eval synthetic`: LoTLIP's corner-token ablation (its Table 3) on generated scenes, small enough for a
CPU and stated with its uncertainty.

The question: do corner tokens keep long-text retrieval while recovering short-text accuracy?

1. Data. `size` train scenes (`recaption.eval.synthetic`, seeds 0…size−1) at 48 pixels, so that with patch 16 one
   image patch covers one cell of the scenes' 3×3 grid; no written word (at 48 pixels it would be unreadable while
   its sentence sat in every long caption). They are written as webdataset shards and turned into a captions
   Parquet output by the pipeline's own data path (`commit_captions`): the scenes' ground-truth long captions stand
   in for a captioner's, the alt text is the scene's short caption (`a red circle`, its largest object).
2. Arms, identical but for the text side (sizes, optimiser, steps, batch, data order and, per seed, every initial
   weight they share: the corner embeddings are drawn on a forked generator):
   - `none`: 0 corner tokens; short text and long text, one slot each, weighted 1:1 (LoTLIP per-slot weighting).
   - `corners`: 2 corner tokens and LoTLIP's mask; short CLS and the long text's 3 slots, each 1/4 (LoTLIP).
   - `control`: 0 corners with short : long = 1 : 3 (weights 0.5 and 1.5, so each term is what it is in `corners`:
     short 1/4, long 3/4), which separates the effect of the corners from that of putting more weight on long text.
   Each arm is trained with `repeats` seeds (0…repeats−1); seed s of every arm shares data order and initial
   weights, so arms are compared seed by seed (paired differences).
3. Metrics on held-out scenes (seeds 1 000 000 + i, never trained on), texts embedded by their CLS slot (LoTLIP's
   eval, `open_clip/model.py` `encode_text`):
   - long-text retrieval on `eval_long` scenes (≥ 500 by default): i2t and t2i R@1 and R@5 of the long captions;
   - short-text zero-shot classification on `eval_short` scenes (≥ 1000): the image's short caption among the 24
     colour × shape classes, with templates never seen in training (`UNSEEN_TEMPLATES`; training saw only
     `a {}`), top-1; also top-1 with the training template, for reference.
4. Per arm, mean ± standard error over seeds; the paired differences `corners − none` and `corners − control` per
   seed, their mean ± standard error and sign counts; `ablation.json`, `ablation.png` and a table on stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from recaption.demo.run import cpu_run
from recaption.errors import ConfigError

ARMS: dict[str, dict[str, Any]] = {
    "none": {"corners": 0, "loss": {"long": 1.0, "short": 1.0}},
    "corners": {"corners": 2, "loss": {"long": 1.0, "short": 1.0}},
    "control": {"corners": 0, "loss": {"long": 1.5, "short": 0.5}},
}
ARM_LABELS = {
    "none": "0 corners (short:long 1:1)",
    "corners": "2 corners + mask (short:CLS:C1:C2 1:1:1:1)",
    "control": "0 corners, short:long 1:3",
}
# The paired differences reported: (arm, baseline).
CONTRASTS = [("corners", "none"), ("corners", "control")]
# Metric → column title; long-text recall and short-text zero-shot, in percent.
METRICS = {
    "long/i2t@1": "long i2t R@1",
    "long/i2t@5": "long i2t R@5",
    "long/t2i@1": "long t2i R@1",
    "long/t2i@5": "long t2i R@5",
    "short/top1": "short zero-shot top-1",
    "short/seen_top1": "short top-1 (train template)",
}
SEEN_TEMPLATE = "a {}"
UNSEEN_TEMPLATES = ("a picture of a {}.", "there is a {} in it.", "an image with a {}.", "the largest thing is a {}.")
SCENE_SIZE = 48
PATCH_SIZE = 16
EVAL_SEED = 1_000_000
GROUND_TRUTH = "ground-truth"
MARKER = ".recaption-ablation"  # names a directory this command made (and may clear when run again)


def write_train_split(root: Path, size: int, shard_size: int = 256) -> Path:
    """Scenes 0…size−1 as webdataset shards in `root/input`, their captions output in `root/output` (see module)."""
    from recaption.eval import make_scene
    from recaption.sources import write_webdataset

    input_dir, output_dir = root / "input", root / "output"
    long_captions = {}
    samples = []
    for i in range(size):
        scene = make_scene(i, size=SCENE_SIZE)
        key = f"{i:09d}"
        long_captions[key] = scene.long_caption
        samples.append({"key": key, "jpg": scene.jpeg(), "caption": scene.short_caption, "url": f"synthetic://{key}"})
    write_webdataset(str(input_dir), samples, shard_size=shard_size)
    commit_captions(input_dir, output_dir, long_captions)
    return output_dir


def commit_captions(input_dir: Path, output_dir: Path, long_captions: dict[str, str]) -> None:
    """A pipeline output over `input_dir` whose one caption per image is `long_captions[key]` (prompt `detailed`).

    Each text is a `Generation` of the `fake` engine handed to the caption stage's `caption_struct`, so the struct
    is the one the pipeline writes: cleaned, flagged, split into sub-captions; `n_tokens` counts whitespace-separated
    words, as the fake engine counts its tokens (the ground truth has no tokenizer)."""
    import pyarrow as pa

    from recaption.captioners import Generation
    from recaption.config import load_config
    from recaption.job import (
        OUTPUT_SCHEMA,
        RUN_INFO,
        CaptionStage,
        open_output,
        resolve_prompts,
        run_metadata,
        unit_stats,
    )
    from recaption.sources import decode_image, plan_units, read_unit

    model = {"name": GROUND_TRUTH, "path": GROUND_TRUTH, "engine": "fake", "prompts": ["detailed"]}
    cfg = load_config(
        None, data={"input": {"path": str(input_dir)}, "output": {"path": str(output_dir)}, "models": [model]}
    )
    prompt_texts = resolve_prompts(cfg)
    run_meta = run_metadata(cfg, prompt_texts)
    stage = CaptionStage(
        cfg.models[0].model_dump(), prompt_texts, cfg.postprocess.model_dump(), cfg.output.path, cfg.images.model_dump()
    )
    out = open_output(cfg.output.path)
    out.claim()
    out.prepare()
    out.write_json(out.path(RUN_INFO), {**run_meta, "started_at": time.time()})
    for unit in plan_units(cfg.input):
        start, rows = time.time(), []
        for rec in read_unit(unit, cfg.input):
            img = decode_image(rec.image or b"", cfg.images)
            text = long_captions[rec.key]
            row = {
                "key": rec.key, "source": rec.source or unit.source, "unit": unit.unit, "url": rec.url,
                "alt_text": rec.alt_text, "width": img.width, "height": img.height,
                "image_sha256": img.sha256, "status": "ok", "error": None,
            }  # fmt: skip
            generation = Generation(text=text, n_tokens=len(text.split()), finish_reason="stop")
            rows.append(row | {"captions": [stage.caption_struct(row, "detailed", generation)]})
        table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        out.commit_unit(unit.unit, table, run_meta, unit_stats(table, time.time() - start, cfg.hash()), "zstd")


def class_names() -> list[str]:
    """Every short caption a scene can have, without its article: `red circle`, … (colour × shape)."""
    from recaption.eval import COLOURS, SHAPES

    return [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES]


def eval_sets(n_long: int, n_short: int):
    """Held-out scenes: the long-text retrieval set (the first `n_long`) and the zero-shot set (`n_short`)."""
    from recaption.eval import ClassificationSet, EvalSet, make_scene

    scenes = [make_scene(EVAL_SEED + i, size=SCENE_SIZE) for i in range(max(n_long, n_short))]
    long_set = EvalSet("synthetic-long", [s.image for s in scenes[:n_long]], [s.long_caption for s in scenes[:n_long]],
                       list(range(n_long)))  # fmt: skip
    names = class_names()
    labels = [names.index(s.short_caption.removeprefix("a ")) for s in scenes[:n_short]]
    short_set = ClassificationSet("synthetic-short", [s.image for s in scenes[:n_short]], labels, names)
    return long_set, short_set


def arm_config(arm: str, data_path: Path, output: Path, steps: int, seed: int, batch_size: int) -> dict[str, Any]:
    """The train config of one arm: a tiny ViT on 48-pixel images with 16-pixel patches and a tiny BERT."""
    spec = ARMS[arm]
    tower = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
    return {
        "data": {"path": str(data_path), "shuffle_buffer": 256, "open_parts": 4, "decode_threads": 1},
        "sampling": {"short": ["alt_text"], "num_sub_captions": 1},
        "model": {
            "embed_dim": 64,
            "image": {"image_size": SCENE_SIZE, "patch_size": PATCH_SIZE, **tower},
            "text": {
                "vocab_size": 400,
                "context_length": 80,
                "short_context_length": 16,
                "num_corners": spec["corners"],
                **tower,
            },
        },  # fmt: skip
        "loss": {**spec["loss"], "multi_positive": 0.0, "grouping": 0.0, "slot_weighting": "per_slot"},
        "optim": {"lr": 2e-3, "warmup_steps": max(1, steps // 20), "weight_decay": 0.05, "grad_clip": 1.0},
        **cpu_run(output, steps, batch_size, seed),
    }


def train_and_measure(cfg_data: dict[str, Any], long_set, short_set) -> dict[str, float]:
    """Train one model, then its metrics (`METRICS`, percent) on the held-out sets."""
    from recaption.eval import TrainerEncoder, build_classifier, embed_images, evaluate_retrieval, zeroshot_metrics
    from recaption.train import load_train_config, run_training

    log_path = Path(cfg_data["run"]["output"] + ".log")  # beside the run directory, which the trainer owns
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, contextlib.redirect_stdout(log):  # the trainer's step lines: kept, not shown
        summary = run_training(load_train_config(None, data=cfg_data), progress=False)
    encoder = TrainerEncoder.from_pretrained(summary["export"], text_slot="cls")
    long = evaluate_retrieval(encoder, long_set, batch_size=256, ks=[1, 5])
    results = {f"long/{k}": long[k] for k in ("i2t@1", "i2t@5", "t2i@1", "t2i@5")}
    images = embed_images(encoder, short_set.images, batch_size=256)
    for key, templates in (("short/top1", UNSEEN_TEMPLATES), ("short/seen_top1", (SEEN_TEMPLATE,))):
        classifier = build_classifier(encoder, short_set.class_names, templates, batch_size=256)
        results[key] = zeroshot_metrics(images, classifier, short_set.labels, ks=(1,))["top1"]
    results["final_loss"] = summary["history"][-1]["loss"] if summary["history"] else float("nan")
    return results


def claim_out(out: Path) -> None:
    """Make `out` this command's: a new or empty directory gets the marker; one with the marker (an earlier run)
    loses what that run wrote (data, runs, results), so a rerun with other settings never mixes with it; anything
    else is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out} is not empty and was not written by `recaption eval synthetic`; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("data", "runs"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("ablation.json", "ablation.png"):
        (out / name).unlink(missing_ok=True)
    (out / MARKER).write_text("written by recaption eval synthetic\n")


def run_ablation(
    out: str | Path,
    size: int = 2000,
    repeats: int = 5,
    steps: int = 1000,
    eval_long: int = 500,
    eval_short: int = 1000,
    batch_size: int = 32,
    jobs: int = 2,
    arms: list[str] | None = None,
) -> dict[str, Any]:
    """Build the data, train every arm once per seed (0…repeats−1) in `jobs` processes of one thread each, measure,
    write the JSON (again after each whole seed, so a stopped run leaves whole pairs) and the PNG, print the tables;
    returns the JSON's content. One thread per model keeps results independent of `jobs`."""
    import logging

    checks = {"--batch-size": (batch_size, 2), "--size": (size, batch_size), "--repeats": (repeats, 1), "--steps": (steps, 1),
              "--eval-long": (eval_long, 10), "--eval-short": (eval_short, 10), "--jobs": (jobs, 1)}  # fmt: skip
    for flag, (value, least) in checks.items():
        if value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    arms = arms or list(ARMS)
    out = Path(out)
    claim_out(out)
    from transformers.utils import logging as hf_logging

    logging.getLogger("recaption").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    started = time.time()
    setup = {
        "train_scenes": size,
        "scene_size": SCENE_SIZE,
        "patch_size": PATCH_SIZE,
        "eval_scenes_long": eval_long,
        "eval_scenes_short": eval_short,
        "short_classes": len(class_names()),
        "unseen_templates": list(UNSEEN_TEMPLATES),
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "seeds": list(range(repeats)),
        "jobs": jobs,
        "threads_per_job": 1,
        "loadavg_at_start": loadavg(),
    }
    data_path = write_train_split(out / "data", size)
    tasks = [(seed, arm) for seed in range(repeats) for arm in arms]
    configs = {
        t: arm_config(t[1], data_path, out / "runs" / f"{t[1]}-seed{t[0]}", steps, t[0], batch_size) for t in tasks
    }
    results: dict[tuple[int, str], dict[str, float]] = {}
    done_seeds = 0

    def finished(task: tuple[int, str], result: dict[str, float]) -> None:
        nonlocal done_seeds
        results[task] = result
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
        print(f"{task[1]} seed {task[0]}: {shown}", flush=True)
        while done_seeds < repeats and all((done_seeds, a) in results for a in arms):
            done_seeds += 1
            partial = payload_of(setup, arms, results, done_seeds, time.time() - started)
            (out / "ablation.json").write_text(json.dumps(partial, indent=1))

    if jobs == 1:
        for task in tasks:
            finished(task, measure_job(configs[task], eval_long, eval_short))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no forked Ray/torch state in the workers
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(measure_job, configs[t], eval_long, eval_short): t for t in tasks}
            for future in futures:  # in submission order: seed-major, so whole seeds finish first
                finished(futures[future], future.result())
    payload = payload_of(setup, arms, results, repeats, time.time() - started)
    (out / "ablation.json").write_text(json.dumps(payload, indent=1))
    plot_ablation(payload, out / "ablation.png")
    print(format_ablation_table(payload))
    print(f"\nresults: {out / 'ablation.json'}, {out / 'ablation.png'}")
    return payload


_EVAL_SETS: dict[tuple[int, int], Any] = {}


def measure_job(cfg_data: dict[str, Any], eval_long: int, eval_short: int) -> dict[str, float]:
    """One (arm, seed): train on one thread and measure; the held-out sets are drawn once per process."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if (eval_long, eval_short) not in _EVAL_SETS:
            _EVAL_SETS[(eval_long, eval_short)] = eval_sets(eval_long, eval_short)
        t0 = time.time()
        result = train_and_measure(cfg_data, *_EVAL_SETS[(eval_long, eval_short)])
        return {**result, "seconds": round(time.time() - t0, 1)}
    finally:
        torch.set_num_threads(threads)


def payload_of(setup: dict, arms: list[str], results: dict, seeds: int, seconds: float) -> dict[str, Any]:
    """The JSON of the first `seeds` whole seeds."""
    runs = {arm: [results[(s, arm)] for s in range(seeds)] for arm in arms}
    return {
        "setup": {
            **setup,
            "seeds_done": seeds,
            "complete": seeds == setup["repeats"],
            "seconds": round(seconds, 1),
            "loadavg_now": loadavg(),
        },  # fmt: skip
        "arms": {arm: {"label": ARM_LABELS[arm], "runs": runs[arm], "summary": summarise(runs[arm])} for arm in arms},
        "paired": {f"{a}-{b}": paired(runs[a], runs[b]) for a, b in CONTRASTS if a in runs and b in runs},
    }


def loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load (the ablation's time depends on what else runs), where the OS tells it."""
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def mean_se(values: list[float]) -> dict[str, float | None]:
    """Mean and standard error of the mean (sample s.d. / √n; None for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"mean": round(mean, 3), "se": None if se is None else round(se, 3), "n": n}


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """{metric: {mean, se, n}} over seeds."""
    return {k: mean_se([r[k] for r in runs]) for k in runs[0] if k != "seconds"}


def paired(runs: list[dict[str, float]], base: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric, the per-seed differences `runs[s] − base[s]`, their mean ± s.e. and sign counts."""
    if len(runs) != len(base):
        raise ValueError(f"paired differences need the same seeds: {len(runs)} runs against {len(base)}")
    result = {}
    for key in METRICS:
        diffs = [round(r[key] - b[key], 3) for r, b in zip(runs, base, strict=True)]
        signs = {"+": sum(d > 0 for d in diffs), "-": sum(d < 0 for d in diffs), "0": sum(d == 0 for d in diffs)}
        result[key] = {"per_seed": diffs, **mean_se(diffs), "signs": signs}
    return result


def _cell(m: dict[str, Any]) -> str:
    return f"{m['mean']:6.2f}" + (f" ± {m['se']:4.2f}" if m["se"] is not None else "       ")


def format_ablation_table(payload: dict[str, Any]) -> str:
    """Per arm mean ± s.e. over seeds, then the paired differences with their sign counts."""
    setup = payload["setup"]
    width = max(len(v["label"]) for v in payload["arms"].values())
    lines = [
        f"percent, mean ± standard error over {setup['repeats']} seed(s); {setup['train_scenes']} train scenes of "
        f"{setup['scene_size']} px (patch {setup['patch_size']}), {setup['steps']} steps × batch "
        f"{setup['batch_size']}; held out: {setup['eval_scenes_long']} scenes (long-text retrieval), "
        f"{setup['eval_scenes_short']} scenes (short-text zero-shot over {setup['short_classes']} classes, unseen "
        f"templates)",
        " | ".join(["arm".ljust(width), *(h.rjust(15) for h in METRICS.values())]),
    ]
    lines.append("-" * len(lines[-1]))
    for arm in payload["arms"].values():
        lines.append(" | ".join([arm["label"].ljust(width), *(_cell(arm["summary"][k]).rjust(15) for k in METRICS)]))
    if payload.get("paired"):
        lines += ["", "paired differences per seed (mean ± s.e.; + / − / = seeds)"]
        for name, metrics in payload["paired"].items():
            cells = [f"{_cell(m)} {m['signs']['+']}/{m['signs']['-']}/{m['signs']['0']}" for m in metrics.values()]
            lines.append(" | ".join([name.ljust(width), *(c.rjust(15) for c in cells)]))
    return "\n".join(lines)


def plot_ablation(payload: dict[str, Any], path: Path) -> Path:
    """Left: mean ± s.e. per arm and metric. Right: the paired differences, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(payload["arms"].values())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        means = [arm["summary"][k]["mean"] for k in METRICS]
        errors = [arm["summary"][k]["se"] or 0.0 for k in METRICS]
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(METRICS))]
        left.bar(xs, means, width, yerr=errors, capsize=3, label=arm["label"])
    left.set_xticks(range(len(METRICS)), [h.replace(" ", "\n", 1) for h in METRICS.values()], fontsize=8)
    left.set_ylabel("percent (mean ± s.e. over seeds)")
    left.legend(fontsize=8)
    contrasts = list(payload.get("paired", {}).items())
    for j, (name, metrics) in enumerate(contrasts):
        offset = (j - (len(contrasts) - 1) / 2) * 0.3
        for i, m in enumerate(metrics.values()):
            right.scatter([i + offset] * len(m["per_seed"]), m["per_seed"], s=12, color=f"C{j}",
                          label=name if i == 0 else None)  # fmt: skip
            right.errorbar(i + offset, m["mean"], yerr=m["se"] or 0.0, fmt="_", color="k", capsize=4)
    right.axhline(0, color="grey", lw=0.8)
    right.set_xticks(range(len(METRICS)), [h.replace(" ", "\n", 1) for h in METRICS.values()], fontsize=8)
    right.set_ylabel("paired difference (points)")
    right.legend(fontsize=8)
    setup = payload["setup"]
    fig.suptitle(f"Synthetic corner-token ablation: {setup['train_scenes']} scenes, {setup['steps']} steps, "
                 f"{setup['repeats']} seeds")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""`recaption eval synthetic`: the LoTLIP-style ablation on generated scenes, small enough for a CPU.

1. A train split of `size` scenes (`recaption.eval.synthetic`, seeds 0…size−1) is written as webdataset shards and
   turned into a captions Parquet output. No captioning model is run: a random tiny model (`recaption demo`) or the
   fake engine would give captions unrelated to the pixels, so the scenes' ground-truth long captions stand in for
   the captioner's answer. They go through the pipeline's own data path all the same: units planned and read with
   `recaption.shards` (`plan_units`/`read_unit`), images decoded and hashed as the read stage does, captions split
   into a caption struct by the caption stage's own `CaptionStage.caption_struct` (echo stripping, quality flags,
   sub-captions), as if the fake engine had generated them, rows committed with `OutputDir.commit_unit` under the
   pipeline's run metadata; the alt text is the scene's short caption. Scenes carry a written word by default
   (`text=False`: the scene world without it). The trainer reads this output as it
   reads any `recaption run` output.
2. Tiny models are trained on it (in this process, CPU) for four arms, each with `repeats` training seeds:
   - `short`: the short caption (alt text) only; no corner tokens.
   - `long-k0`: long captions (long loss on CLS) + the short caption; 0 corner tokens.
   - `long-k2`: as `long-k0` with 2 corner tokens and LoTLIP's attention mask (long loss on all 3 slots).
   - `long-k2-subs`: as `long-k2` + DreamLIP's multi-positive loss on 3 sampled sub-captions.
   Everything else (sizes, optimiser, steps, batch, data) is the same for all arms.
3. Each model is measured on a held-out split (seeds 1 000 000 + i): long-text retrieval (every scene, its long
   caption; text from the CLS slot, and from the mean of all slots) and short-text retrieval. Many scenes share a
   short caption (`a red circle`), and identical texts tie, which pessimistic tie-breaking would count as misses
   whatever the model; the short-text set therefore keeps the first held-out scene of each distinct short caption
   (at most ~24 scenes, so short-text numbers are coarse).

Results: a table (mean ± std over repeats of R@1, percent) on stdout, `ablation.json`, `ablation.png`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

ARMS: dict[str, dict[str, Any]] = {
    "short": {"loss": {"long": 0.0, "short": 1.0, "multi_positive": 0.0}, "corners": 0},
    "long-k0": {"loss": {"long": 1.0, "short": 1.0, "multi_positive": 0.0}, "corners": 0},
    "long-k2": {"loss": {"long": 1.0, "short": 1.0, "multi_positive": 0.0}, "corners": 2},
    "long-k2-subs": {"loss": {"long": 1.0, "short": 1.0, "multi_positive": 1.0}, "corners": 2},
}
ARM_LABELS = {
    "short": "(a) short captions only",
    "long-k0": "(b) long, 0 corner tokens",
    "long-k2": "(c) long, 2 corners + mask",
    "long-k2-subs": "(d) (c) + sub-captions",
}
# Metric columns: (set, text slot, direction).
COLUMNS = [
    ("long", "cls", "i2t@1"),
    ("long", "cls", "t2i@1"),
    ("long", "mean", "i2t@1"),
    ("long", "mean", "t2i@1"),
    ("short", "cls", "i2t@1"),
    ("short", "cls", "t2i@1"),
]
SCENE_SIZE = 64
EVAL_SEED = 1_000_000
GROUND_TRUTH = "ground-truth"


def write_train_split(root: Path, size: int, shard_size: int = 64, text: bool = True) -> Path:
    """Scenes 0…size−1 as webdataset shards in `root/input`, their captions output in `root/output` (see module)."""
    from recaption.eval.synthetic import make_scene
    from recaption.shards.tar import write_webdataset

    input_dir, output_dir = root / "input", root / "output"
    long_captions = {}
    samples = []
    for i in range(size):
        scene = make_scene(i, size=SCENE_SIZE, text=text)
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

    from recaption.captioning import CaptionStage
    from recaption.config import load_config
    from recaption.engines.base import Generation
    from recaption.images import decode_image
    from recaption.pipeline import resolve_prompts, run_metadata
    from recaption.shards.plan import plan_units
    from recaption.shards.read import read_unit
    from recaption.writer import OUTPUT_SCHEMA, RUN_INFO, open_output, unit_stats

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


def eval_sets(n_eval: int, max_objects: int = 4, size: int = SCENE_SIZE, text: bool = True):
    """The held-out long-text set (n_eval scenes) and the short-text set (first scene of each distinct short caption)."""
    import functools

    from recaption.eval.datasets import EvalSet
    from recaption.eval.synthetic import make_scene

    scenes = [make_scene(EVAL_SEED + i, size=size, max_objects=max_objects, text=text) for i in range(n_eval)]
    images = [functools.partial(_scene_image, EVAL_SEED + i, size, max_objects, text) for i in range(n_eval)]
    long_set = EvalSet("synthetic-long", images, [s.long_caption for s in scenes], list(range(n_eval)))
    seen: dict[str, int] = {}
    for i, scene in enumerate(scenes):
        seen.setdefault(scene.short_caption, i)
    picked = sorted(seen.values())
    short_set = EvalSet(
        "synthetic-short",
        [images[i] for i in picked],
        [scenes[i].short_caption for i in picked],
        list(range(len(picked))),
    )
    return long_set, short_set


def _scene_image(seed: int, size: int, max_objects: int, text: bool = True):
    """A held-out scene's image, drawn again when the eval needs it rather than kept."""
    from recaption.eval.synthetic import make_scene

    return make_scene(seed, size=size, max_objects=max_objects, text=text).image


def arm_config(arm: str, data_path: Path, output: Path, steps: int, seed: int, batch_size: int) -> dict[str, Any]:
    """The train config of one arm (the sizes of pipelines/train-tiny.yaml)."""
    spec = ARMS[arm]
    return {
        "data": {"path": str(data_path), "shuffle_buffer": 64, "open_parts": 2, "decode_threads": 2},
        "sampling": {"short": ["alt_text"], "num_sub_captions": 3, "merge": 1},
        "model": {
            "embed_dim": 32,
            "image": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
            },
            "text": {
                "vocab_size": 800,
                "context_length": 64,
                "short_context_length": 32,
                "num_corners": spec["corners"],
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
            },
        },
        "loss": {**spec["loss"], "grouping": 0.0},
        "optim": {"lr": 5e-3, "warmup_steps": min(10, steps // 10), "weight_decay": 0.05, "grad_clip": 1.0},
        "run": {
            "output": str(output),
            "steps": steps,
            "batch_size": batch_size,
            "precision": "fp32",
            "device": "cpu",
            "seed": seed,
            "log_every": steps,
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
            "resume": False,
        },
        "distributed": {"num_workers": 1},
    }


def train_and_measure(cfg_data: dict[str, Any], long_set, short_set, ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Train one model, then {"long/cls/i2t@1": …, …} (R@k for each k in `ks`) on the held-out sets."""
    from recaption.eval.retrieval import evaluate_retrieval
    from recaption.eval.trainer import TrainerEncoder
    from recaption.train.config import load_train_config
    from recaption.train.run import run_training

    log_path = Path(cfg_data["run"]["output"]) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, contextlib.redirect_stdout(log):  # the trainer's step lines: kept, not shown
        summary = run_training(load_train_config(None, data=cfg_data), progress=False)
    results = {}
    for set_name, data in (("long", long_set), ("short", short_set)):
        for slot in ("cls", "mean") if set_name == "long" else ("cls",):
            encoder = TrainerEncoder.from_pretrained(summary["export"], text_slot=slot)
            metrics = evaluate_retrieval(encoder, data, batch_size=64, ks=list(ks))
            for direction in (f"{d}@{k}" for k in ks for d in ("i2t", "t2i")):
                results[f"{set_name}/{slot}/{direction}"] = metrics[direction]
    results["final_loss"] = summary["history"][-1]["loss"] if summary["history"] else float("nan")
    return results


def run_ablation(
    out: str | Path,
    size: int = 400,
    repeats: int = 3,
    steps: int = 150,
    eval_size: int | None = None,
    batch_size: int = 16,
    arms: list[str] | None = None,
    text: bool = True,
) -> dict[str, Any]:
    """Build the data, train every arm `repeats` times (training seeds 0…repeats−1), measure, write the JSON and PNG,
    print the table; returns the JSON's content. `text=False`: scenes without a written word."""
    import logging

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_size = eval_size or max(16, size // 4)
    arms = arms or list(ARMS)
    from transformers.utils import logging as hf_logging

    logging.getLogger("recaption").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    started = time.time()
    data_path = write_train_split(out / "data", size, text=text)
    long_set, short_set = eval_sets(eval_size, text=text)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for seed in range(repeats):
        for arm in arms:
            t0 = time.time()
            cfg = arm_config(arm, data_path, out / "runs" / f"{arm}-seed{seed}", steps, seed, batch_size)
            runs[arm].append({**train_and_measure(cfg, long_set, short_set), "seconds": round(time.time() - t0, 1)})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in runs[arm][-1].items())
            print(f"{arm} seed {seed}: {shown}", flush=True)
    payload = {
        "setup": {
            "train_scenes": size,
            "scene_text": text,
            "eval_scenes_long": len(long_set.images),
            "eval_scenes_short": len(short_set.images),
            "steps": steps,
            "batch_size": batch_size,
            "repeats": repeats,
            "seeds": list(range(repeats)),
            "seconds": round(time.time() - started, 1),
        },
        "arms": {arm: {"label": ARM_LABELS[arm], "runs": runs[arm], "summary": summarise(runs[arm])} for arm in arms},
    }
    (out / "ablation.json").write_text(json.dumps(payload, indent=1))
    plot_ablation(payload, out / "ablation.png")
    print(format_ablation_table(payload))
    print(f"\nresults: {out / 'ablation.json'}, {out / 'ablation.png'}")
    return payload


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std}} over repeats (std 0 for one run)."""
    keys = [k for k in runs[0] if k != "seconds"]
    return {
        k: {
            "mean": round(statistics.fmean(r[k] for r in runs), 2),
            "std": round(statistics.stdev(r[k] for r in runs), 2) if len(runs) > 1 else 0.0,
        }
        for k in keys
    }


def format_ablation_table(payload: dict[str, Any]) -> str:
    """R@1 (%) mean ± std per arm: long-text (CLS / mean of slots) and short-text retrieval."""
    heads = [f"{s} {slot} {d.replace('@1', '')}" for s, slot, d in COLUMNS]
    width = max(len(v["label"]) for v in payload["arms"].values())
    setup = payload["setup"]
    lines = [
        f"R@1 (%), mean ± std over {setup['repeats']} seed(s); {setup['train_scenes']} train scenes"
        f"{' with a written word' if setup.get('scene_text') else ''}, "
        f"{setup['steps']} steps × batch {setup['batch_size']}; held-out: {setup['eval_scenes_long']} scenes (long), "
        f"{setup['eval_scenes_short']} (short, one per distinct short caption)",
        " | ".join(["arm".ljust(width), *(h.rjust(13) for h in heads)]),
    ]
    lines.append("-" * len(lines[-1]))
    for arm in payload["arms"].values():
        cells = []
        for s, slot, d in COLUMNS:
            m = arm["summary"][f"{s}/{slot}/{d}"]
            cells.append(f"{m['mean']:5.1f} ± {m['std']:4.1f}".rjust(13))
        lines.append(" | ".join([arm["label"].ljust(width), *cells]))
    return "\n".join(lines)


def plot_ablation(payload: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per metric column, one bar per arm, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(payload["arms"].values())
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        means = [arm["summary"][f"{s}/{slot}/{d}"]["mean"] for s, slot, d in COLUMNS]
        stds = [arm["summary"][f"{s}/{slot}/{d}"]["std"] for s, slot, d in COLUMNS]
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(COLUMNS))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arm["label"])
    ax.set_xticks(range(len(COLUMNS)), [f"{s}-text\n{slot} {d}" for s, slot, d in COLUMNS])
    ax.set_ylabel("R@1 (%)")
    setup = payload["setup"]
    ax.set_title(
        f"Synthetic ablation: {setup['train_scenes']} train scenes, {setup['steps']} steps, {setup['repeats']} seed(s)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""`recaption demo`: generated scenes → webdataset shards → the real pipeline → Parquet → caption accuracy against
the scenes' truth; with `--train`, a tiny corner-token CLIP trained on those captions and its retrieval."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

from recaption.errors import ConfigError

SHARD_SIZE = 16
MAX_OBJECTS = 6  # the scene captioner's world: up to six objects, each in its own cell of a 3×3 grid
FALLBACK_MODEL = "tiny-llava"
SCENE_PIXELS = 96
# Scene i of the demo is seed DEMO_SEED + i: a range the scene captioner never trains on (it draws its training
# scenes below 10 000 000) and the demo's held-out retrieval scenes (DEMO_EVAL_SEED) do not touch.
DEMO_SEED = 20_000_000
DEMO_EVAL_SEED = 1_000_000


def find_pipeline(name: str) -> Path:
    """A ready YAML from `pipelines/`: the current directory's, else the source checkout's."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "pipelines" / name
        if path.is_file():
            return path
    raise ConfigError(f"pipelines/{name} not found; run from a recaption checkout (git clone …; pip install -e .)")


# The files write_demo_shards writes (img2dataset's layout): the only ones the demo deletes from its input.
DEMO_SHARD_FILE = re.compile(r"\d{5}(\.tar|\.parquet|_stats\.json)")


def write_demo_shards(input_dir: Path, n_images: int) -> list[str]:
    """Writes n generated scenes as img2dataset-style webdataset shards, each sample's ground truth in its `.json`
    (`truth`: background and objects, as `Scene.truth()`); returns their keys."""
    from recaption.eval import make_scene
    from recaption.sources import write_webdataset

    input_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n_images):
        scene = make_scene(seed=DEMO_SEED + i, size=SCENE_PIXELS, max_objects=MAX_OBJECTS)
        key = f"{i:09d}"
        samples.append(
            {
                "key": key,
                "jpg": scene.jpeg(),
                "caption": scene.short_caption,
                "url": f"synthetic://scene/{DEMO_SEED + i}",
                "json": {"truth": scene.truth()},
            }
        )
    write_webdataset(str(input_dir), samples, shard_size=SHARD_SIZE)
    return [s["key"] for s in samples]


def read_truths(input_dir: Path) -> dict[str, dict[str, Any]]:
    """{key: truth} read back from the shards' `.json` members with the pipeline's own readers."""
    from recaption.config import InputConfig
    from recaption.sources import plan_units, read_unit

    input_cfg = InputConfig(path=str(input_dir))
    truths = {}
    for unit in plan_units(input_cfg):
        for rec in read_unit(unit, input_cfg):
            if rec.meta and isinstance(rec.meta.get("truth"), dict):
                truths[rec.key] = rec.meta["truth"]
    return truths


def prepare_demo_dir(out: Path, n_images: int, config_hash: str) -> tuple[Path, Path, bool]:
    """Input and output dirs under `out`, and whether the output must start over: another size starts the demo
    over, another pipeline config (a model override) the output, a rerun of the same resumes. `out` must be new,
    empty or a demo directory (its `demo.json`); the demo deletes only the shards it generated, and an output it
    starts over is cleared by the run itself (`--overwrite`: only files runs wrote)."""
    input_dir, output_dir, stamp = out / "input", out / "output", out / "demo.json"
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not stamp.is_file()):
        raise ConfigError(f"--out {out} is not empty and is not a demo directory (no demo.json); choose a new one")
    previous = json.loads(stamp.read_text()) if stamp.is_file() else {}
    scenes = {"images": n_images, "first_seed": DEMO_SEED, "max_objects": MAX_OBJECTS, "pixels": SCENE_PIXELS}
    if previous.get("scenes") != scenes:
        for old in input_dir.glob("*"):
            if DEMO_SHARD_FILE.fullmatch(old.name):
                old.unlink()
        write_demo_shards(input_dir, n_images)
    start_over = previous.get("scenes") != scenes or previous.get("config") != config_hash
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"scenes": scenes, "config": config_hash}))
    return input_dir, output_dir, start_over


def demo_config(input_dir: Path, output_dir: Path, overrides: list[str]):
    """pipelines/demo.yaml on the demo's dirs. Its captioner (`scene-llava`) may not be available here (not built
    or not registered): then, unless an override names the model, the demo runs the random-weight tiny LLaVA and
    says so. Returns (config, a note for the user or None)."""
    from recaption.captioners import resolve_model
    from recaption.config import load_config

    config = find_pipeline("demo.yaml")
    paths = [f"input.path={input_dir}", f"output.path={output_dir}"]
    cfg = load_config(config, [*paths, *overrides])
    if any(o.split("=", 1)[0] in ("models.0.path", "models") for o in overrides):
        return cfg, None
    wanted = cfg.models[0].path
    try:
        resolve_model(wanted)
    except ConfigError as e:
        reason = str(e).split(";")[0]  # the first clause says what is missing; the rest lists the whole registry
        note = f"{wanted} is not available here ({reason}); the demo captions with {FALLBACK_MODEL} instead"
        return load_config(config, [*paths, f"models.0.path={FALLBACK_MODEL}", *overrides]), note
    return cfg, None


def random_weights(model_path: str) -> bool:
    """A registry model built by recaption/captioners/tiny.py with random weights (tiny-llava, …)."""
    from recaption.catalog import REGISTRY

    return REGISTRY.get(model_path, {}).get("tiny") in ("llava", "instructblip", "blip2")


def run_demo(
    out: str,
    n_images: int = 48,
    progress: bool = True,
    overrides: list[str] = (),
    train: bool = False,
    train_steps: int = 100,
    eval_scenes: int = 48,
) -> int:
    from recaption.job import print_summary, run_pipeline

    if n_images < 1:
        raise ConfigError(f"--images must be at least 1, got {n_images}")
    out_dir = Path(out)
    cfg, note = demo_config(out_dir / "input", out_dir / "output", list(overrides))
    input_dir, output_dir, start_over = prepare_demo_dir(out_dir, n_images, cfg.hash())
    model = cfg.models[0]
    prompt = model.prompts[0]
    if note:
        print(f"note: {note}")
    print(f"demo: {n_images} generated scenes in {input_dir}, captioned by {model.id} (prompt {prompt})")
    summary = run_pipeline(cfg, progress=progress, overwrite=start_over and output_dir.exists())
    print_summary(summary)
    truths = read_truths(input_dir)
    print_samples(output_dir, truths)
    report_accuracy(out_dir, truths, model.id, prompt, random_weights(model.path), cfg.generation.max_new_tokens)
    if train:
        if summary.unit_errors:
            print("\nnot training: some units were not captioned (rerun to retry them first)")
        else:
            train_and_report(output_dir, out_dir, train_steps, eval_scenes)
    print(
        textwrap.dedent(f"""
        Read the output with pyarrow/pandas/DuckDB/datasets: {output_dir}/*.parquet
        To caption your own images with a real model on a GPU machine:
          recaption run pipelines/llava15.yaml --set input.path=/data/shards --set output.path=/data/captions""")
    )
    return 1 if summary.unit_errors else 0


def report_accuracy(
    out_dir: Path, truths: dict[str, dict[str, Any]], model: str, prompt: str, random: bool, max_new_tokens: int
) -> dict[str, Any]:
    """Scores the demo output's `model`/`prompt` captions against the truths; prints the table and what it means,
    writes `accuracy.json`."""
    from recaption.demo.scenes import format_scores, score_output

    scores = score_output(str(out_dir / "output"), truths, model=model, prompt=prompt)
    (out_dir / "accuracy.json").write_text(json.dumps(scores, indent=1))
    print(f"\ncaption accuracy of {model}/{prompt} against the scenes' ground truth ({out_dir / 'accuracy.json'}):")
    print(format_scores(scores))
    print("\n" + verdict(scores, model, random, max_new_tokens))
    return scores


def verdict(scores: dict[str, Any], model: str, random: bool, max_new_tokens: int) -> str:
    """What the accuracy numbers say, in words, for whichever model ran."""
    found, exact = scores["recall"], scores["exact_rate"]
    lines = []
    if random:
        lines.append(
            f"{model} has RANDOM weights: its captions are noise, so ~0% is the expected accuracy; the plumbing "
            "(shards → Ray → model → Parquet → scoring) is what this run shows."
        )
    elif exact >= 0.9:
        lines.append(f"{model} describes these scenes: {exact:.0%} of its captions are exactly right.")
    elif found < 0.2:
        lines.append(f"{model}'s captions say almost nothing true about these scenes ({found:.0%} of objects found).")
    else:
        lines.append(
            f"{model} describes these scenes in part: it finds {found:.0%} of the objects, gets "
            f"{scores['object_accuracy']:.0%} of them fully right and {exact:.0%} of captions exactly right."
        )
        weakest = min(scores["accuracy"], key=scores["accuracy"].get)
        lines.append(
            f"Its weakest attribute is {weakest}: right for {scores['accuracy'][weakest]:.0%} of the objects found."
        )
    if scores["truncated"] and not random:
        lines.append(
            f"{scores['truncated']} caption(s) hit max_new_tokens ({max_new_tokens}); their cut last sentence is not "
            "scored (--set generation.max_new_tokens=N to allow more)."
        )
    return "\n".join(lines)


def train_and_report(output_dir: Path, out_dir: Path, steps: int, eval_scenes: int) -> dict[str, float]:
    """Trains a tiny CLIP with corner tokens on the demo's captions (+ alt text), then prints R@1/R@5 on held-out
    scenes: their long captions and their short ones (one scene per distinct short caption)."""
    import logging
    import time

    from transformers.utils import logging as hf_logging

    logging.getLogger("recaption").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    long_set, short_set = demo_eval_sets(eval_scenes, max_objects=MAX_OBJECTS, size=SCENE_PIXELS)
    run_dir = out_dir / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = demo_train_config(output_dir, run_dir, steps, seed=0, batch_size=16)
    print(
        f"\ntraining a tiny CLIP (2 corner tokens + mask) on {output_dir}: {steps} steps × batch 16 "
        f"(log: {run_dir}.log) …",
        flush=True,
    )
    start = time.time()
    results = demo_train_and_measure(cfg, long_set, short_set, ks=(1, 5))
    results["seconds"] = round(time.time() - start, 1)
    results["eval_scenes_long"], results["eval_scenes_short"] = len(long_set.texts), len(short_set.texts)
    model = json.loads((run_dir / "summary.json").read_text())["export"]
    (out_dir / "retrieval.json").write_text(json.dumps({**results, "model": model}, indent=1))
    print(format_retrieval(results))
    print(f"the trained model: {model} (for recaption eval: model.kind=recaption, model.path=that directory)")
    return results


def format_retrieval(results: dict[str, float]) -> str:
    """R@1/R@5 (%) image→text and text→image per text set, with what chance would give."""
    rows = [("long captions (CLS)", "long/cls", "eval_scenes_long")]
    rows += [("long captions (all slots)", "long/mean", "eval_scenes_long")]
    rows += [("short captions (CLS)", "short/cls", "eval_scenes_short")]
    cols = ["i2t@1", "i2t@5", "t2i@1", "t2i@5"]
    head = f"{'held-out scenes':<26} {'n':>3}  " + "  ".join(f"{c:>6}" for c in cols) + "   chance R@1/R@5"
    lines = [f"retrieval R@k (%), final train loss {results['final_loss']:.3f}, {results['seconds']} s", head]
    for label, prefix, n_key in rows:
        n = int(results[n_key])
        cells = "  ".join(f"{results[f'{prefix}/{c}']:6.1f}" for c in cols)
        lines.append(f"{label:<26} {n:>3}  {cells}   {100 / n:.1f} / {min(100.0, 500 / n):.1f}")
    n_long = int(results["eval_scenes_long"])
    best = max(results[f"long/{slot}/{c}"] for slot in ("cls", "mean") for c in ("i2t@5", "t2i@5"))
    if best < 2 * min(100.0, 500 / n_long):
        lines.append(
            "Long-text retrieval is within twice chance: at this size the model has learned little from the captions "
            "(more scenes and steps: --images N --steps S)."
        )
    return "\n".join(lines)


def print_samples(output_dir: Path, truths: dict[str, dict[str, Any]], n: int = 3) -> None:
    import pyarrow.dataset as pads

    from recaption.eval import SceneObject

    table = pads.dataset(str(output_dir), format="parquet").head(n)
    for row in table.to_pylist():
        print(f"\n{row['key']}  [{row['status']}]  alt-text: {row['alt_text']!r}")
        truth = truths.get(row["key"])
        if truth:
            sentences = [f"The background is {truth['background']}."]
            sentences += [SceneObject(**o).sentence() for o in truth["objects"]]
            print(f"  truth: {textwrap.shorten(' '.join(sentences), 120, placeholder=' …')}")
        for cap in row["captions"]:
            text = textwrap.shorten(cap["text"], 120, placeholder=" …")
            print(f"  {cap['model']}/{cap['prompt']} ({cap['n_tokens']} tokens, {cap['finish_reason']}): {text}")


def demo_eval_sets(n_eval: int, max_objects: int, size: int, text: bool = True):
    """The held-out long-text set (n_eval scenes) and the short-text set (first scene of each distinct short caption)."""
    import functools

    from recaption.eval import EvalSet, make_scene

    scenes = [make_scene(DEMO_EVAL_SEED + i, size=size, max_objects=max_objects, text=text) for i in range(n_eval)]
    images = [functools.partial(_scene_image, DEMO_EVAL_SEED + i, size, max_objects, text) for i in range(n_eval)]
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
    from recaption.eval import make_scene

    return make_scene(seed, size=size, max_objects=max_objects, text=text).image


def demo_train_config(data_path: Path, output: Path, steps: int, seed: int, batch_size: int) -> dict[str, Any]:
    """The demo's tiny CLIP (the sizes of pipelines/train-tiny.yaml): long captions + alt text, 2 corner tokens."""
    spec = {"loss": {"long": 1.0, "short": 1.0, "multi_positive": 0.0}, "corners": 2}
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
        **cpu_run(output, steps, batch_size, seed),
    }


def cpu_run(output, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    """The `run` and `distributed` sections of a train config for one short fp32 run on the CPU, saved once at the
    end (the demo's and the ablation's small models)."""
    run = {"output": str(output), "steps": steps, "batch_size": batch_size, "precision": "fp32", "device": "cpu"}
    run |= {"seed": seed, "log_every": steps, "checkpoint_every": steps, "keep_checkpoints": 1, "resume": False}
    return {"run": run, "distributed": {"num_workers": 1}}


def demo_train_and_measure(
    cfg_data: dict[str, Any], long_set, short_set, ks: tuple[int, ...] = (1,)
) -> dict[str, float]:
    """Train one model, then {"long/cls/i2t@1": …, …} (R@k for each k in `ks`) on the held-out sets."""
    from recaption.eval import TrainerEncoder, evaluate_retrieval
    from recaption.train import load_train_config, run_training

    log_path = Path(cfg_data["run"]["output"] + ".log")  # beside the run directory, which the trainer owns
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

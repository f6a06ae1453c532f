"""The one entry point, `recaption <command>`: parse arguments, load the config, call one function."""

from __future__ import annotations

import argparse
import logging
import sys

from recaption import console
from recaption.errors import RecaptionError
from recaption.job import format_kinds, print_summary
from recaption.redact import install_log_redaction, redact_text


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("recaption")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    install_log_redaction()
    console.quiet(args.verbose)  # Ray's chatter only with --verbose
    try:
        return args.func(args) or 0
    except RecaptionError as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, no permission, a store that is down: one line, the traceback with --verbose
        if args.verbose:
            logging.exception("the run stopped on an operating-system error")
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {redact_text(f'{e.strerror or e}{where}')}: fix it and rerun to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume; finished units are kept", file=sys.stderr)
        return 130


def add_report_to(parser: argparse.ArgumentParser, where: str = "the output's _tracking/") -> None:
    parser.add_argument(
        "--report-to",
        default=None,
        metavar="TRACKERS",
        help="also send progress figures to tensorboard, wandb or both (comma-separated; optional extras "
        f"recaption[tensorboard], recaption[wandb]); files go under {where}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recaption", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="re-caption a dataset as a pipeline YAML describes")
    run.add_argument("config", help="pipeline YAML, e.g. pipelines/llava15.yaml")
    add_overrides(run, "input.path=/data/shards")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's output in output.path written with another config (only the files runs wrote)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="also caption the failed rows of finished units again (after an OOM, a fixed bug, a bigger GPU); "
        "each unit's part file is replaced in one step",
    )
    add_report_to(run)
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser(
        "plan",
        help="before a run: units and rows of the input, what the output holds, the pools and where they fit; "
        "--calibrate N measures speed on N images and estimates wall time and GPU-hours (writes nothing to the output)",
    )
    plan.add_argument("config", help="pipeline YAML, e.g. pipelines/llava15.yaml")
    add_overrides(plan, "input.path=/data/shards")
    plan.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="caption the input's first N images (one actor per model, a temporary output) and extrapolate",
    )
    plan.add_argument(
        "--sample-shards",
        type=int,
        default=64,
        metavar="N",
        help="count the rows of at most N shards; an input with more is estimated from a seeded sample of N",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="train a long-text CLIP model on a pipeline output, as a train YAML describes")
    train.add_argument("config", help="train YAML, e.g. pipelines/train-tiny.yaml")
    add_overrides(train, "data.path=/data/captions")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_report_to(train, "RUN/tracking/")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser(
        "demo", help="caption generated scenes with the scene captioner and score the captions against the scenes"
    )
    demo.add_argument("--out", default="demo-out", help="directory for the demo's input shards and output")
    demo.add_argument("--images", type=int, default=48, help="how many scenes to generate")
    demo.add_argument(
        "--train", action="store_true", help="then train a tiny corner-token CLIP on the captions and measure retrieval"
    )
    demo.add_argument("--steps", type=int, default=100, help="--train: training steps (batch 16)")
    demo.add_argument("--eval-scenes", type=int, default=48, help="--train: held-out scenes for retrieval")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overrides(demo, "models.0.path=tiny-llava")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="list the model registry (names usable as a model's `path`)")
    models.set_defaults(func=cmd_models)

    tiny = sub.add_parser(
        "tiny-model",
        help="build a tiny random-weight model (tests, demo), or train the scene captioner, into a directory",
    )
    tiny.add_argument("out", help="directory to save the model and processor to")
    tiny.add_argument("--family", choices=["llava", "instructblip", "blip2"], default="llava")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--train-on-scenes",
        action="store_true",
        help="llava only: train it to describe generated scenes (the scene-llava captioner) instead of random weights",
    )
    tiny.add_argument("--steps", type=int, default=None, help="--train-on-scenes: training steps (batch 32)")
    tiny.add_argument(
        "--eval-scenes", type=int, default=64, help="--train-on-scenes: held-out scenes to score afterwards (0: none)"
    )
    tiny.add_argument(
        "--threads", type=int, default=2, help="--train-on-scenes: torch CPU threads (part of what makes a run repeat)"
    )
    tiny.add_argument("--no-progress", action="store_true", help="--train-on-scenes: no progress bar")
    tiny.set_defaults(func=cmd_tiny_model)

    ev = sub.add_parser(
        "eval", help="measure a model: image-text retrieval R@k and zero-shot top-k on the sets an eval YAML lists"
    )
    ev.add_argument(
        "config",
        help="eval YAML: model (a CLIP checkpoint dir, or kind: recaption and a trainer export), sets (format + "
        "path), batch_size, output; or `synthetic`: "
        "train tiny models on generated scenes for the short/long/corner-token ablation and report it",
    )
    ev.add_argument("--size", type=int, default=2000, help="synthetic: train scenes")
    ev.add_argument("--repeats", type=int, default=5, help="synthetic: training seeds per arm (paired across arms)")
    ev.add_argument("--steps", type=int, default=1000, help="synthetic: training steps per model")
    ev.add_argument("--batch-size", type=int, default=32, help="synthetic: images per step")
    ev.add_argument("--jobs", type=int, default=2, help="synthetic: models trained at once (one thread each)")
    ev.add_argument("--eval-long", type=int, default=500, help="synthetic: held-out scenes for long-text retrieval")
    ev.add_argument("--eval-short", type=int, default=1000, help="synthetic: held-out scenes for short zero-shot")
    ev.add_argument("--out", default="eval-synthetic", help="synthetic: directory for data, runs, JSON and PNG")
    add_overrides(ev, "model.path=/ckpt/clip")
    ev.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="statistics and plots of an output: OUTPUT/_report/index.html, report.json")
    report.add_argument("output", help="the output directory of a run (its output.path)")
    report.add_argument(
        "--text-sample",
        type=int,
        default=10_000,
        metavar="N",
        help="rows (chosen by key hash) for the word statistics: vocabulary, n-grams, openings, agreement; 0: all",
    )
    report.add_argument(
        "--gallery", type=int, default=24, metavar="N", help="rows in the gallery that opens the page (0: none)"
    )
    report.add_argument("--seed", type=int, default=0, help="seed of the gallery's sample")
    report.add_argument("--input", metavar="PATH", help="the input's path, when its shards moved since the run")
    report.set_defaults(func=cmd_report)

    inspect = sub.add_parser("inspect", help="print rows' captions beside their metadata; save their images as PNG")
    inspect.add_argument("output", help="the output directory of a run")
    inspect.add_argument("--key", action="append", default=[], metavar="K", help="a row's key (repeatable)")
    inspect.add_argument("--unit", metavar="U", help="only rows of work unit U (a key may be in several units)")
    inspect.add_argument("--sample", type=int, default=0, metavar="N", help="N rows chosen at random")
    inspect.add_argument("--seed", type=int, default=0, help="seed of --sample")
    inspect.add_argument("--out", metavar="DIR", help="where the PNGs and index.html go (default OUTPUT/_inspect)")
    inspect.add_argument("--input", metavar="PATH", help="the input's path, when its shards moved since the run")
    inspect.set_defaults(func=cmd_inspect)

    export = sub.add_parser("export", help="an output as webdataset tars (with images), a HF dataset, or JSONL")
    export.add_argument("output", help="the output directory of a run")
    export.add_argument("--to", required=True, choices=["webdataset", "hf", "jsonl"], help="the format")
    export.add_argument("dest", help="a directory (webdataset, hf) or a file (jsonl; .jsonl.gz compresses)")
    export.add_argument(
        "--include-failed",
        action="store_true",
        help="export failed and skipped rows too (hf: image null; jsonl: as rows; webdataset: DEST/failed.jsonl)",
    )
    export.add_argument(
        "--caption",
        default="first",
        metavar="first|alt_text|MODEL[/PROMPT]",
        help="the text of each sample's `caption` (.txt in webdataset); first: the first model's first prompt",
    )
    export.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per webdataset tar")
    export.add_argument("--input", metavar="PATH", help="the input's path, when its shards moved since the run")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser("convert", help="rewrite a released checkpoint into a format the engines load")
    formats = convert.add_subparsers(dest="format", required=True)
    sharegpt4v = formats.add_parser(
        "sharegpt4v", help="ShareGPT4V (model_type share4v) → transformers' LLaVA format (llava-hf layout)"
    )
    sharegpt4v.add_argument("src", help="the original checkpoint directory, e.g. a download of Lin-Chen/ShareGPT4V-7B")
    sharegpt4v.add_argument("dst", help="new directory for the converted checkpoint")
    sharegpt4v.add_argument(
        "--vision-tower",
        metavar="DIR",
        help="the CLIP tower checkpoint directory (Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12); "
        "default: the config's mm_vision_tower, a local directory or a Hub repo id in the Hugging Face cache",
    )
    sharegpt4v.set_defaults(func=cmd_convert_sharegpt4v)

    bench = sub.add_parser(
        "bench", help="measure each stage against its own limit (a bare loop of the same work): a table of ratios"
    )
    bench.add_argument("sections", nargs="*", help="data, engine, trainer, scaling, plan (default: all)")
    bench.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that the bench runs, figures mean little"
    )
    bench.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="engine section: hf (CPU) or vllm (GPU)")
    bench.add_argument("--model", help="engine section's model (default: tiny-llava for hf; the --pipeline's for vllm)")
    bench.add_argument(
        "--pipeline",
        metavar="YAML",
        help="vllm: the pipeline whose first model (engine options, generation) is benched (default: llava15.yaml)",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the measurements and machine facts as JSON")
    bench.add_argument("--cpus", type=int, help="CPUs for Ray and the bare loops (default: all)")
    bench.add_argument(
        "--workdir",
        help="generated inputs and outputs, reused between runs (default: $RECAPTION_CACHE/bench, else "
        "~/.cache/recaption/bench)",
    )
    bench.add_argument(
        "--repeats", type=int, help="interleaved repeats behind each figure (default 3, --quick 2; the hf engine 5+)"
    )
    bench.add_argument("--device", help="hf engine section: cpu or cuda (default: cuda where there is one)")
    bench.add_argument(
        "--dtype", help="hf engine section: float32, bfloat16 … (default: bfloat16 on cuda, else float32)"
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from recaption.api import run

    summary = run(
        args.config,
        args.overrides,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        report_to=args.report_to,
    )
    print_summary(summary)
    return 1 if summary.unit_errors else 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from recaption.api import plan
    from recaption.errors import ConfigError
    from recaption.job import format_plan

    if args.calibrate < 0 or args.sample_shards < 1:
        raise ConfigError("--calibrate takes N >= 0 images and --sample-shards N >= 1 shards")
    result = plan(args.config, args.overrides, calibrate=args.calibrate, sample_shards=args.sample_shards)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 2 if result.problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    from recaption.job import parse_report_to
    from recaption.train import train_command

    report_to = parse_report_to(args.report_to)
    return train_command(args.config, args.overrides, progress=not args.no_progress, report_to=report_to)


def cmd_demo(args: argparse.Namespace) -> int:
    from recaption.demo import run_demo

    return run_demo(
        args.out,
        n_images=args.images,
        progress=not args.no_progress,
        overrides=args.overrides,
        train=args.train,
        train_steps=args.steps,
        eval_scenes=args.eval_scenes,
    )


def cmd_models(args: argparse.Namespace) -> int:
    from recaption.catalog import REGISTRY

    rows = [("name", "family", "engine", "chat format", "revision", "checkpoint")]
    for name, entry in REGISTRY.items():
        if "asset" in entry:
            source = "bundled with the package (trained by recaption tiny-model --family llava --train-on-scenes)"
        else:
            source = entry.get("repo") or f"built locally (recaption tiny-model --family {entry['tiny']})"
        if entry.get("convert"):
            source += f"  [convert first: recaption convert {entry['convert']} SRC DST; then path: DST]"
        row = (name, entry["family"], entry["engine"], entry["chat_format"], entry.get("revision", "-"), source)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[5])
    print("\nAny Hugging Face repo id or local checkpoint directory works too; its family is read from config.json.")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    if args.train_on_scenes:
        return _train_scene_captioner(args)
    from recaption.captioners import build_tiny

    path = build_tiny(args.family, args.out, seed=args.seed)
    print(f"tiny {args.family} model (random weights) saved to {path}")
    return 0


def _train_scene_captioner(args: argparse.Namespace) -> int:
    import json

    from recaption.demo import DEFAULT_STEPS, META_FILE, train_scene_captioner
    from recaption.errors import ConfigError

    if args.family != "llava":
        raise ConfigError("--train-on-scenes trains a llava; drop --family or give --family llava")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    path = train_scene_captioner(
        args.out,
        steps=steps,
        seed=args.seed,
        eval_scenes=args.eval_scenes,
        threads=args.threads,
        progress=not args.no_progress,
    )
    meta = json.loads((path / META_FILE).read_text())
    print(f"scene captioner (llava, {steps} steps, seed {args.seed}, {meta['train_seconds']} s) saved to {path}")
    if "held_out" in meta:
        print("held-out scenes: " + json.dumps(meta["held_out"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from recaption.eval import run_eval

    if args.config == "synthetic":
        from recaption.demo import run_ablation

        run_ablation(
            args.out, size=args.size, repeats=args.repeats, steps=args.steps, eval_long=args.eval_long,
            eval_short=args.eval_short, batch_size=args.batch_size, jobs=args.jobs,
        )  # fmt: skip
        return 0
    run_eval(args.config, args.overrides)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from recaption.errors import ConfigError
    from recaption.outputs import build_report

    if args.gallery < 0:
        raise ConfigError("--gallery takes N >= 0 rows")
    report = build_report(
        args.output, text_sample=args.text_sample or None, gallery=args.gallery, seed=args.seed, input_path=args.input
    )
    s, units = report["status"], report["units"]
    print(f"{report['rows']} rows ({s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped) in {units['units']} "
          f"done units: {report['page']}")  # fmt: skip
    if units["errors"]:
        print(f"failed rows by error kind: {format_kinds(units['errors'])}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from recaption.outputs import inspect_output

    inspect_output(
        args.output,
        keys=args.key,
        sample=args.sample,
        seed=args.seed,
        out_dir=args.out,
        input_path=args.input,
        unit=args.unit,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from recaption.outputs import export_output

    result = export_output(
        args.output,
        args.to,
        args.dest,
        include_failed=args.include_failed,
        caption=args.caption,
        shard_size=args.shard_size,
        input_path=args.input,
    )
    print(f"exported {result['rows']} rows as {result['format']} to {result['dest']}")
    if result.get("renamed"):
        print(f"{result['renamed']} samples named KEY@UNIT: their key is in more than one unit (see the README)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from recaption.bench import run_bench

    run_bench(
        args.workdir, args.sections, args.quick, args.engine, args.model, args.json, args.cpus, args.pipeline,
        args.repeats, args.device, args.dtype,
    )  # fmt: skip
    return 0


def cmd_convert_sharegpt4v(args: argparse.Namespace) -> int:
    from recaption.captioners import convert_sharegpt4v

    path = convert_sharegpt4v(args.src, args.dst, vision_tower=args.vision_tower)
    print(f"converted to {path}: use it as a model `path` (family llava, engine hf or vllm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`recaption demo`: generated scenes → webdataset shards → the real pipeline with a tiny local LLaVA → Parquet."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from recaption.errors import ConfigError

SHARD_SIZE = 16


def find_pipeline(name: str) -> Path:
    """A ready YAML from `pipelines/`: the current directory's, else the source checkout's."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "pipelines" / name
        if path.is_file():
            return path
    raise ConfigError(f"pipelines/{name} not found; run from a recaption checkout (git clone …; pip install -e .)")


def write_demo_shards(input_dir: Path, n_images: int) -> list[str]:
    """Writes n generated scenes as img2dataset-style webdataset shards; returns their keys."""
    from recaption.eval.synthetic import make_scene
    from recaption.shards.tar import write_webdataset

    input_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n_images):
        scene = make_scene(seed=i)
        key = f"{i:09d}"
        samples.append({"key": key, "jpg": scene.jpeg(), "caption": scene.short_caption, "url": f"synthetic://{key}"})
    write_webdataset(str(input_dir), samples, shard_size=SHARD_SIZE)
    return [s["key"] for s in samples]


def prepare_demo_dir(out: Path, n_images: int) -> tuple[Path, Path]:
    """Input and output dirs under `out`; a change of size starts the demo over, a rerun resumes."""
    input_dir, output_dir, stamp = out / "input", out / "output", out / "demo.json"
    previous = json.loads(stamp.read_text()) if stamp.is_file() else None
    if previous != {"images": n_images}:
        shutil.rmtree(input_dir, ignore_errors=True)
        shutil.rmtree(output_dir, ignore_errors=True)
        write_demo_shards(input_dir, n_images)
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"images": n_images}))
    return input_dir, output_dir


def run_demo(out: str, n_images: int = 48, progress: bool = True) -> int:
    from recaption.cli import print_summary
    from recaption.config import load_config
    from recaption.pipeline import run_pipeline

    if n_images < 1:
        raise ConfigError(f"--images must be at least 1, got {n_images}")
    input_dir, output_dir = prepare_demo_dir(Path(out), n_images)
    config = find_pipeline("demo.yaml")
    cfg = load_config(config, [f"input.path={input_dir}", f"output.path={output_dir}"])
    print(f"demo: {n_images} generated images in {input_dir}, pipeline {config}")
    summary = run_pipeline(cfg, progress=progress)
    print_summary(summary)
    print_samples(output_dir)
    print(
        textwrap.dedent(f"""
        The tiny model has RANDOM weights: the plumbing above is real, its captions are noise.
        Read the output with pyarrow/pandas/DuckDB/datasets: {output_dir}/*.parquet
        To caption with a real model on a GPU machine:
          recaption run pipelines/llava15.yaml --set input.path=/data/shards --set output.path=/data/captions""")
    )
    return 1 if summary.unit_errors else 0


def print_samples(output_dir: Path, n: int = 3) -> None:
    import pyarrow.dataset as pads

    table = pads.dataset(str(output_dir), format="parquet").head(n)
    for row in table.to_pylist():
        print(f"\n{row['key']}  [{row['status']}]  alt-text: {row['alt_text']!r}")
        for cap in row["captions"]:
            text = textwrap.shorten(cap["text"], 100, placeholder=" …")
            print(f"  {cap['model']}/{cap['prompt']} ({cap['n_tokens']} tokens, {cap['finish_reason']}): {text}")

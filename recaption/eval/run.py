"""`recaption eval CONFIG`: the eval YAML's schema, running every set it lists, and the trainer's periodic hook."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from recaption.config import Strict, load_model
from recaption.errors import ConfigError, InputError, RecaptionError

if TYPE_CHECKING:
    from recaption.eval.datasets import ClassificationSet, EvalSet
    from recaption.eval.encoders import Encoder

from typing import TYPE_CHECKING

from recaption.eval.trainer import TextSlot, TrainerEncoder

if TYPE_CHECKING:
    from recaption.train.config import ModelConfig
    from recaption.train.model import ContrastiveModel

log = logging.getLogger(__name__)


class ModelSection(Strict):
    """The model to measure: a transformers CLIP checkpoint directory, or a `recaption train` export."""

    kind: Literal["clip", "recaption"] = Field("clip", description="clip, or recaption: <run.output>/final")
    path: str = Field(description="checkpoint directory written by CLIPModel.save_pretrained (+ tokenizer, processor)")
    text_slot: Literal["cls", "mean"] = Field(
        "cls", description="recaption models: text embedding from the CLS slot or the mean of CLS and corner slots"
    )
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_length: int | None = Field(None, ge=1, description="text tokens kept; default: the text tower's positions")


class _Set(Strict):
    name: str | None = Field(None, description="row name in the table and key in the JSON; default from the format")
    limit: int | None = Field(None, ge=1, description="keep only the first N images (and their texts)")


class ShareGPT4VSet(_Set):
    format: Literal["sharegpt4v"]
    path: str = Field(description="the ShareGPT4V json (list of {image, conversations})")
    images: str = Field(description="folder the entries' `image` paths are relative to")
    limit: int | None = Field(1000, ge=1, description="1000 for ShareGPT4V-1k, 10000 for -10k")
    normalize: bool = True

    def load(self) -> EvalSet:
        from recaption.eval.datasets import load_sharegpt4v

        return load_sharegpt4v(self.path, self.images, self.limit, self.normalize, self.name or "")


class DCISet(_Set):
    format: Literal["dci"]
    path: str = Field(description="folder holding densely_captioned_images/ (or that folder)")
    text: Literal["long", "short", "summary"] = "long"
    splits: list[str] | None = Field(None, description="splits of splits.json to use; default all, as LoTLIP")

    def load(self) -> EvalSet:
        from recaption.eval.datasets import load_dci

        return load_dci(self.path, self.text, self.splits, self.name or "")


class IIWSet(_Set):
    format: Literal["iiw"]
    path: str | list[str] = Field(description="data.jsonl of a subset, or a list of them evaluated as one set")
    images: str | list[str] = Field(description="image folder of each data.jsonl (same order)")
    text_key: str = "IIW"
    normalize: bool = True

    @model_validator(mode="after")
    def _pairs(self) -> IIWSet:
        if isinstance(self.path, list) != isinstance(self.images, list) or (
            isinstance(self.path, list) and len(self.path) != len(self.images)
        ):
            raise ValueError("path and images must both be one path or lists of the same length")
        return self

    def load(self) -> EvalSet:
        from recaption.eval.datasets import concat_eval_sets, load_iiw

        if isinstance(self.path, str):
            return load_iiw(self.path, self.images, self.text_key, self.normalize, self.name or "")
        parts = [load_iiw(p, i, self.text_key, self.normalize) for p, i in zip(self.path, self.images, strict=True)]
        return concat_eval_sets(self.name or "iiw", parts)


class Urban1kSet(_Set):
    format: Literal["urban1k"]
    path: str = Field(description="folder with image/ and caption/")
    normalize: bool = True

    def load(self) -> EvalSet:
        from recaption.eval.datasets import load_urban1k

        return load_urban1k(self.path, self.normalize, self.name or "urban1k")


class KarpathySet(_Set):
    format: Literal["karpathy"]
    path: str = Field(description="dataset_coco.json or dataset_flickr30k.json")
    images: str = Field(description="image root (COCO: the folder holding val2014/)")
    split: str = "test"

    def load(self) -> EvalSet:
        from recaption.eval.datasets import load_karpathy

        return load_karpathy(self.path, self.images, self.split, self.name or "")


class SyntheticSet(_Set):
    format: Literal["synthetic"]
    size: int = Field(200, ge=1, description="number of generated scenes")
    seed: int = Field(1_000_000, description="scene i uses seed + i; keep clear of the training scenes' seeds")
    text: Literal["long", "short"] = "long"
    image_size: int = Field(96, ge=8, description="pixels; scenes with text need 56 or more")
    scene_text: bool = Field(True, description="write a short word in each scene (its long caption says where)")

    def load(self) -> EvalSet:
        from recaption.eval.datasets import load_synthetic

        return load_synthetic(self.size, self.seed, self.text, self.image_size, self.name or "", self.scene_text)


class ImageFolderSet(_Set):
    format: Literal["image-folder"]
    path: str = Field(description="root/<class>/<image>")
    class_names: str | None = Field(None, description="JSON {folder: name} / list, or a text file of names")
    templates: str | list[str] = Field("openai80", description="openai80, simple7, photo, or a list of '{}' prompts")
    ks: list[int] = [1, 5]
    limit: int | None = Field(None, ge=1, description="keep only the first N images of each class")

    def load(self) -> ClassificationSet:
        from recaption.eval.datasets import load_image_folder

        data = load_image_folder(self.path, self.class_names, self.name or "")
        if self.limit:
            taken: Counter[int] = Counter()
            keep = []
            for i, label in enumerate(data.labels):
                if taken[label] < self.limit:
                    taken[label] += 1
                    keep.append(i)
            data.images, data.labels = [data.images[i] for i in keep], [data.labels[i] for i in keep]
        return data


SetSection = Annotated[
    ShareGPT4VSet | DCISet | IIWSet | Urban1kSet | KarpathySet | SyntheticSet | ImageFolderSet,
    Field(discriminator="format"),
]


class EvalConfig(Strict):
    """An eval YAML, e.g.

    model: {path: /ckpt/clip-vit-b16}
    sets:
      - {format: karpathy, path: /data/coco/dataset_coco.json, images: /data/coco, name: coco-5k}
      - {format: sharegpt4v, path: /data/share4v_sam_10k.json, images: /data/sa1b, limit: 1000}
      - {format: image-folder, path: /data/imagenet/val, class_names: /data/imagenet/names.json}
    batch_size: 64
    output: eval-out/clip.json
    """

    model: ModelSection | None = Field(
        None, description="required by `recaption eval`; the trainer's hook brings its own"
    )
    sets: list[SetSection] = Field(min_length=1)
    batch_size: int = Field(64, ge=1)
    ks: list[int] = Field([1, 5, 10], min_length=1, description="k of the retrieval Recall@k")
    score_device: str | None = Field(None, description="where retrieval scores are computed; default model.device")
    output: str | None = Field(None, description="JSON file for the results (the hook appends JSON lines)")


def load_eval_config(
    path: str | Path | None, overrides: list[str] = (), data: dict[str, Any] | None = None
) -> EvalConfig:
    """Read an eval YAML (or a dict), apply `--set` overrides, validate. Errors name the offending key."""
    return load_model(EvalConfig, path, overrides, data)


def _resolve(config: EvalConfig | str | Path | dict[str, Any], overrides: list[str] = ()) -> EvalConfig:
    if isinstance(config, EvalConfig):
        return config if not overrides else load_eval_config(None, overrides, config.model_dump())
    if isinstance(config, dict):
        return load_eval_config(None, overrides, config)
    return load_eval_config(config, overrides)


def load_sets(cfg: EvalConfig) -> list[tuple[SetSection, EvalSet | ClassificationSet]]:
    """Every set of the config, loaded (files listed and checked, no image decoded yet); names must differ."""
    loaded = []
    for i, section in enumerate(cfg.sets):
        where = f"sets[{i}] ({section.format}{', ' + str(getattr(section, 'path', '')) if hasattr(section, 'path') else ''})"
        try:
            data = section.load()
        except RecaptionError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # a malformed file, not a bug here
            detail = f"{type(e).__name__}: {e}" if not isinstance(e, UnicodeDecodeError) else "not UTF-8 text"
            raise InputError(f"{where}: the file does not have the format's layout ({detail})") from None
        if section.limit and hasattr(data, "head"):
            data = data.head(section.limit)
        if not data.images or (hasattr(data, "texts") and not data.texts):
            raise InputError(f"{where}: the set is empty (no images or no texts)")
        if isinstance(section, ImageFolderSet):
            from recaption.eval.zeroshot import resolve_templates

            try:
                bad = [t for t in resolve_templates(section.templates) if t.count("{}") != 1]
            except ValueError as e:
                raise ConfigError(f"{where} templates: {e}") from None
            if bad:
                raise ConfigError(f"{where} templates: each needs exactly one {{}} for the class name: {bad[:3]}")
        loaded.append((section, data))
    names = [d.name for _, d in loaded]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sets: several sets are named {dupes}; give each a distinct `name`")
    return loaded


def evaluate_sets(encoder: Encoder, loaded: list[tuple[Any, Any]], cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """{set name: metrics + counts}: Recall@k for retrieval sets, top-k for image folders."""
    from recaption.eval.retrieval import evaluate_retrieval
    from recaption.eval.zeroshot import evaluate_zeroshot, resolve_templates

    results: dict[str, dict[str, Any]] = {}
    for section, data in loaded:
        start = time.perf_counter()
        if isinstance(section, ImageFolderSet):
            templates = resolve_templates(section.templates)
            metrics = evaluate_zeroshot(encoder, data, templates, cfg.batch_size, section.ks)
            counts = {"n_images": len(data.images), "n_classes": len(data.class_names)}
        else:
            device = cfg.score_device or (cfg.model.device if cfg.model else "cpu")
            metrics = evaluate_retrieval(encoder, data, cfg.batch_size, cfg.ks, device)
            counts = {"n_images": len(data.images), "n_texts": len(data.texts)}
        results[data.name] = {**metrics, **counts, "seconds": round(time.perf_counter() - start, 2)}
        log.info("eval %s: %s", data.name, results[data.name])
    return results


def run_eval(
    config: EvalConfig | str | Path | dict[str, Any], overrides: list[str] = (), encoder: Encoder | None = None
) -> dict[str, Any]:
    """Measure a model on every set of an eval config, print the table, write the JSON; returns what it wrote:
    {"model": ..., "config": ..., "results": {set: {metric: percent, n_images, ...}}}."""
    from recaption.eval.encoders import load_encoder
    from recaption.eval.retrieval import format_table, write_json

    cfg = _resolve(config, overrides)
    loaded = load_sets(cfg)  # before the model: a malformed set fails in a second, not after a model load
    if encoder is None:
        if cfg.model is None:
            raise ConfigError("model: required key is missing (e.g. model: {path: /ckpt/clip-vit-b16})")
        m = cfg.model
        options = {"device": m.device, "dtype": m.dtype, "max_length": m.max_length}
        try:
            encoder = load_encoder(
                m.kind, m.path, **options, **({"text_slot": m.text_slot} if m.kind == "recaption" else {})
            )
        except RecaptionError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a torn or mismatched checkpoint
            raise InputError(f"model.path {m.path}: cannot load the model ({type(e).__name__}: {e})") from None
    results = evaluate_sets(encoder, loaded, cfg)
    payload = {"model": cfg.model.model_dump() if cfg.model else None, "config": cfg.model_dump(), "results": results}
    print(format_table(results))
    if cfg.output:
        print(f"\nresults: {write_json(cfg.output, payload)}")
    return payload


def make_eval_hook(eval_cfg: EvalConfig | str | Path | dict[str, Any]) -> Callable[[Encoder, int], dict[str, float]]:
    """A function the trainer calls every N steps, on one process: hook(encoder, step) → {"<set>/<metric>": value}.

    Sets are listed and checked once, here, so a wrong path fails before training starts. An `nn.Module` encoder
    is put in eval mode for the call and restored after; other encoders handle their own mode. With `output`
    set, each call appends one JSON line {"step", "results"} to it.
    """
    cfg = _resolve(eval_cfg)
    loaded = load_sets(cfg)

    def hook(encoder: Encoder, step: int) -> dict[str, float]:
        import torch

        from recaption.eval.retrieval import metric_keys

        was_training = isinstance(encoder, torch.nn.Module) and encoder.training
        if was_training:
            encoder.eval()
        try:
            results = evaluate_sets(encoder, loaded, cfg)
        finally:
            if was_training:
                encoder.train()
        if cfg.output:
            out = Path(cfg.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps({"step": step, "results": results}) + "\n")
        return {f"{name}/{k}": v for name, r in results.items() for k, v in r.items() if k in metric_keys(r)}

    return hook


def trainer_hook(eval_config, model_cfg: ModelConfig, text_slot: TextSlot = "cls"):
    """The trainer's `eval_hook(model, tokenizer, step)` made from an eval config (`recaption.eval.run`): sets are
    loaded and checked now, and every call measures the live model through a `TrainerEncoder`."""
    hook = make_eval_hook(eval_config)

    def eval_hook(model: ContrastiveModel, tokenizer, step: int) -> dict[str, float]:
        return hook(TrainerEncoder(model, tokenizer, model_cfg, text_slot), step)

    return eval_hook

"""Pydantic models of a train YAML (`recaption train CONFIG`): data, sampling, towers, losses, schedule, workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from recaption.config import Strict, config_hash, load_model

Precision = Literal["auto", "bf16", "fp16", "fp32"]
TEXT_SOURCES = ("alt_text", "long", "prompt:<name>")


def check_text_source(source: str) -> str:
    """A text source is the row's alt_text, the sampled long caption, or a caption of a named prompt."""
    if source in ("alt_text", "long") or (source.startswith("prompt:") and len(source) > len("prompt:")):
        return source
    raise ValueError(f"unknown text source {source!r}: use one of {', '.join(TEXT_SOURCES)}")


class DataConfig(Strict):
    """The pipeline output to train on, and how it is streamed."""

    path: str = Field(description="A `recaption run` output directory (part-*.parquet); local path or URI")
    input_path: str | None = Field(
        None, description="Where the source shards are now; default: the input path stored in the run metadata"
    )
    shuffle_buffer: int = Field(512, ge=1, description="Examples held for shuffling (1: no shuffle within parts)")
    open_parts: int = Field(4, ge=1, description="Part files read at once and interleaved at random")
    decode_threads: int = Field(4, ge=1, description="Threads decoding and resizing the images of a batch")


class SamplingConfig(Strict):
    """Which texts each image gets at each step (DreamLIP sampling, LoTLIP short/long, Holistic perspectives)."""

    short: list[str] = Field(
        default_factory=lambda: ["alt_text", "prompt:short"],
        description="Sources of the short text, first usable wins: alt_text or prompt:<name>; else the first "
        "sub-caption of the long caption",
    )
    long_prompts: list[str] | None = Field(
        None, description="Prompts whose captions form the long-caption pool; default: all but prompt:* in `short`"
    )
    models: list[str] | None = Field(None, description="Captioning models in the pool (captions.model); default: all")
    num_sub_captions: int = Field(4, ge=1, description="K sub-captions sampled per image per step (DreamLIP)")
    merge: int = Field(1, ge=1, description="Consecutive sub-captions joined into one sampled unit")
    sub_caption_pool: Literal["chosen", "all"] = Field(
        "all",
        description="Where the K sub-captions come from: every usable long caption of the row, all models × long "
        "prompts (all: DreamLIP's training/data.py pools the sentences of all captions of an image), or the sampled "
        "long caption only (chosen)",
    )
    skip_flags: list[str] = Field(
        default_factory=lambda: ["error", "empty", "repetition", "dropped"],
        description="Captions carrying any of these flags are never sampled",
    )
    holistic: list[str] = Field(
        default_factory=list,
        description="One text source per image branch (Holistic CLIP): alt_text, long or prompt:<name>",
    )

    @field_validator("short", "holistic")
    @classmethod
    def _known_sources(cls, sources: list[str]) -> list[str]:
        return [check_text_source(s) for s in sources]


class ImageTowerConfig(Strict):
    """A CLIP vision transformer, built from these sizes or loaded from `pretrained`."""

    pretrained: str | None = Field(None, description="A local CLIPVisionModel or CLIPModel checkpoint directory")
    image_size: int = Field(224, gt=0)
    patch_size: int = Field(16, gt=0)
    hidden_size: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    num_class_tokens: int = Field(1, ge=1, description="M class tokens = M image branches (Holistic CLIP)")


class TextTowerConfig(Strict):
    """A BERT-style encoder with corner tokens, built from these sizes or loaded from `pretrained`."""

    pretrained: str | None = Field(None, description="A local BertModel checkpoint directory (with its tokenizer)")
    tokenizer: str | None = Field(
        None, description="A local tokenizer directory; default: the pretrained one, else one trained on the data"
    )
    vocab_size: int = Field(8000, gt=0, description="Size of a tokenizer trained on the data")
    context_length: int = Field(128, ge=8, le=512, description="Tokens of a long text incl. CLS, corners and SEP")
    short_context_length: int = Field(64, ge=4, le=512, description="Tokens of short texts and sub-captions")
    num_corners: int = Field(2, ge=0, description="K corner tokens after CLS (LoTLIP); 0: a plain tower")
    corners_see_each_other: bool = Field(False, description="Let CLS and corners attend one another (not LoTLIP)")
    hidden_size: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelConfig(Strict):
    """Both towers and the shared embedding space."""

    embed_dim: int = Field(512, gt=0)
    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    init_temperature: float = Field(0.07, gt=0.0)
    max_logit_scale: float = Field(100.0, gt=1.0, description="Logit scales are clamped to at most this")


class LossConfig(Strict):
    """Weights of the losses; 0 switches one off."""

    long: float = Field(1.0, ge=0.0, description="LoTLIP: symmetric InfoNCE per slot of the long caption")
    short: float = Field(1.0, ge=0.0, description="Symmetric InfoNCE of the short text's CLS slot")
    multi_positive: float = Field(
        1.0, ge=0.0, description="DreamLIP: each of K sub-captions its own InfoNCE against the images (released form)"
    )
    grouping: float = Field(0.0, ge=0.0, description="DreamLIP: sub-caption ↔ pooled patch tokens")
    holistic: float = Field(0.0, ge=0.0, description="Holistic CLIP: image branch i ↔ text i")
    long_slots: Literal["all", "cls"] = Field("all", description="Long texts use all K+1 slots (LoTLIP) or CLS only")
    grouping_threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="Min-max-normalised weights below it are 0 (DreamLIP's sgl_delta, 0.0)"
    )
    slot_weighting: Literal["per_slot", "per_loss"] = Field(
        "per_slot",
        description="per_slot: every text slot (short CLS, each long slot, each sub-caption) one InfoNCE weighted "
        "1/number of slots × its loss weight, as LoTLIP's and DreamLIP's released loss.py; per_loss: each loss's "
        "mean over its slots × its weight",
    )
    grouping_scope: Literal["batch", "image"] = Field(
        "batch", description="Negatives of the grouping loss: all B·K pairs of the global batch, or one image's K"
    )


class OptimConfig(Strict):
    """AdamW with a cosine schedule after a linear warmup."""

    lr: float = Field(5e-4, gt=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="The cosine ends at lr × this")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.2, ge=0.0, description="Not applied to biases, norms, scales and learned tokens")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global gradient norm; null: no clipping")


class RunConfig(Strict):
    """How long, how big, where the run writes, and how often it logs, evaluates and saves."""

    output: str = Field(description="Run directory: metrics.jsonl, checkpoints/, tokenizer/, final/")
    steps: int = Field(gt=0, description="Optimizer steps")
    batch_size: int = Field(gt=1, description="Images per worker per micro-step; the loss sees workers × this")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step")
    precision: Precision = Field("auto", description="auto: bf16 autocast on a GPU that has it, else fp32")
    device: str = Field("auto", description="auto, cpu or cuda")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="Steps between calls of the eval hook; 0: never")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(True, description="Continue from the latest checkpoint in `output` if there is one")
    mirror: str | None = Field(
        None,
        description="Set by recaption, not by hand: the object-storage run.output that this local staging "
        "directory (`output`) is copied to",
    )


class DistributedConfig(Strict):
    """Ray Train workers; 1 worker runs in this process without Ray."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Fractional on small machines")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with GPUs, else gloo")
    address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS, else a local Ray")


class EvalSection(Strict):
    """Periodic eval inside the trainer (rank 0): an eval YAML's sets measured every N steps, into metrics.jsonl."""

    config: str = Field(description="An eval YAML (`recaption eval`); its `model` section is ignored")
    every: int | None = Field(None, gt=0, description="Steps between evals; default: run.eval_every")
    text_slot: Literal["cls", "mean"] = Field(
        "cls", description="Text embedding: the CLS slot or the mean of all slots"
    )


class TrainConfig(Strict):
    """A whole training run."""

    data: DataConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.eval is not None and self.eval.every:
            self.run.eval_every = self.eval.every  # one place the loop reads
        if self.eval is not None and not self.run.eval_every:
            raise ValueError("eval needs eval.every (or run.eval_every): steps between evals")
        text, image = self.model.text, self.model.image
        for key in ("context_length", "short_context_length"):  # [CLS][corners] at least one token [SEP]
            if text.num_corners + 3 > getattr(text, key):
                raise ValueError(
                    f"model.text.{key} {getattr(text, key)} leaves no room for text after CLS, "
                    f"model.text.num_corners {text.num_corners} corner tokens and SEP: needs at least num_corners + 3"
                )
        if image.image_size % image.patch_size:
            raise ValueError("model.image.image_size must be a multiple of model.image.patch_size")
        if self.loss.holistic and len(self.sampling.holistic) != image.num_class_tokens:
            raise ValueError(
                f"loss.holistic needs one sampling.holistic source per image branch "
                f"({image.num_class_tokens} = model.image.num_class_tokens), got {len(self.sampling.holistic)}"
            )
        if not any((self.loss.long, self.loss.short, self.loss.multi_positive, self.loss.grouping, self.loss.holistic)):
            raise ValueError("every loss weight is 0: nothing to train")
        return self

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def model_hash(self) -> str:
        """Hash of what makes checkpoints compatible: the model and the losses' shapes."""
        return config_hash({"model": self.resolved()["model"]})


def load_train_config(
    path: str | Path | None, overrides: list[str] = (), data: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a train YAML (or a dict), apply `--set` overrides, validate. Errors name the offending key."""
    return load_model(TrainConfig, path, overrides, data)

"""Pydantic models of a pipeline YAML, `--set a.b=v` overrides, and the config hash."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recaption.errors import ConfigError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
InputFormat = Literal["auto", "webdataset", "img2dataset-parquet", "parquet", "hf", "folder"]
EngineName = Literal["hf", "vllm", "fake"]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(Strict):
    """Where the images come from and how to read them."""

    path: str = Field(
        description="Local path or URI (s3://, gs://) of a shard, a directory of shards or an image folder"
    )
    format: InputFormat = "auto"
    unit_size: int = Field(
        10_000,
        gt=0,
        description="Rows (samples) per work unit, for every format: a tar with more samples is cut into units "
        "<id>-s0000, <id>-s0001… read with ranged reads (a .tar.gz stays one unit)",
    )
    image_column: str | None = Field(
        None, description="Image column of parquet/HF inputs (bytes, {bytes,path} or path)"
    )
    key_column: str | None = Field(None, description="Column holding a stable id; default: `key`, else source/row")
    caption_column: str | None = Field(None, description="Column of the original alt-text; default: caption/text")
    url_column: str | None = Field(None, description="Column of the source URL; default: `url`")
    max_units: int | None = Field(None, gt=0, description="Process at most this many units (for trial runs)")
    keep_columns: Literal["auto"] | list[str] = Field(
        "auto",
        description="Source fields kept as output columns (a tar's `.json` keys, a table's columns), each `name` or "
        "`name:type` (string, int64, float64, bool, json); auto: img2dataset's fields (similarity, punsafe, LICENSE, "
        "original_width, exif …) for webdataset and img2dataset-parquet inputs; [] keeps none",
    )

    @field_validator("keep_columns")
    @classmethod
    def _known_types(cls, value: str | list[str]) -> str | list[str]:
        from recaption.fields import kept_fields

        kept_fields(value, "parquet", [])  # one line for a bad `name:type` before any work
        return value

    _absolute = field_validator("path")(classmethod(lambda cls, v: absolute_path(v)))


class ImageConfig(Strict):
    """Decode limits and the size images are sent to the models at."""

    max_pixels: int = Field(
        89_478_485, gt=0, description="Images claiming more pixels fail as decompression bombs (PIL's default)"
    )
    min_side: int = Field(
        8, gt=0, description="Images with a side below this many pixels fail (1×1 tracking pixels, icons)"
    )
    max_side: int = Field(1024, gt=0, description="Larger images are downscaled to this longest side before captioning")


class GenerationConfig(Strict):
    """Sampling settings shared by every engine."""

    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[str] = Field(default_factory=list, description="Generation ends at any of these strings")
    n: int = Field(1, gt=0, description="Captions per (image, prompt); more than 1 needs temperature > 0")
    seed: int = 0
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other sampling argument, passed to the engine as is: vLLM `SamplingParams` (top_k, min_p, "
        "stop_token_ids, structured_outputs: {json: SCHEMA} …) or transformers `generate` (top_k, "
        "no_repeat_ngram_size …); checked against the model's engine before any work",
    )

    @field_validator("extra")
    @classmethod
    def _not_a_named_setting(cls, extra: dict[str, Any]) -> dict[str, Any]:
        named = {
            "max_tokens": "max_new_tokens",
            "max_new_tokens": "max_new_tokens",
            "temperature": "temperature",
            "top_p": "top_p",
            "repetition_penalty": "repetition_penalty",
            "stop": "stop",
            "stop_strings": "stop",
            "n": "n",
            "num_return_sequences": "n",
            "seed": "seed",
        }
        for key in extra:
            if key in named:
                raise ValueError(f"extra.{key}: set generation.{named[key]} instead (it applies to every engine)")
        return extra

    @model_validator(mode="after")
    def _n_needs_sampling(self) -> GenerationConfig:
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 with temperature 0 would give n identical greedy captions; set temperature > 0")
        return self


class VLLMOptions(Strict):
    """`vllm.LLM` engine arguments of one model (engine: vllm)."""

    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine; each actor reserves this many")
    max_model_len: int | None = Field(None, gt=0, description="Context length; default: the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of each GPU vLLM may take")
    max_num_seqs: int | None = Field(None, gt=0, description="Sequences batched at once; default: vLLM's")
    enforce_eager: bool = Field(False, description="No CUDA graphs: faster start, slower decode")
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 1})
    seed: int | None = Field(None, description="Engine seed; default: generation.seed")
    quantization: str | None = Field(None, description="awq, gptq, fp8 … as vLLM names them")
    download_dir: str | None = Field(None, description="Where vLLM downloads weights (a shared model cache)")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other vllm.LLM argument, passed as is")


class FakeOptions(Strict):
    """The fake engine's knobs (engine: fake; data-plane tests and benchmarks only)."""

    delay_s: float = Field(0.0, ge=0.0, description="Seconds per image, to model an engine's cost")
    raise_on_width: int | None = Field(None, description="Raise when a batch holds an image this wide")
    crash_on_width: int | None = Field(None, description="Kill the actor's process on an image this wide")
    loop_on_width: int | None = Field(None, description="Write a repetition loop for an image this wide, unpenalised")


class ModelConfig(Strict):
    """One captioner: which model, which engine, which prompts, and how many actors run it."""

    name: str | None = Field(None, description="Id stored in captions.model; default: the registry name or path")
    path: str = Field(description="Registry name, Hugging Face repo id or local checkpoint directory")
    engine: EngineName = Field(
        None, validate_default=False, description="hf, vllm or fake; default: the registry entry's engine, else hf"
    )
    family: str = Field("auto", description="llava, instructblip, blip2 …; auto reads config.json `architectures`")
    prompts: list[str] = Field(default_factory=lambda: ["detailed"], min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto (cuda when the actor has a GPU, else cpu), cpu, cuda")
    batch_size: int = Field(8, gt=0, description="Images × prompts per generate call of the hf engine")
    trust_remote_code: bool = False
    revision: str | None = None
    generation: GenerationConfig | None = Field(None, description="Overrides the top-level `generation`")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    concurrency: int | Literal["auto"] | tuple[int, int] = Field(
        1,
        description="Actors in this model's pool: a number; [min, max] for a pool that grows and shrinks with the "
        "work and the cluster; auto: one per GPU (of accelerator_type), growing as GPU nodes join",
    )
    units_in_flight: int = Field(
        2, gt=0, description="Units one actor holds at once: the next unit's requests enter while one drains"
    )
    num_cpus: float = Field(0.5, ge=0.0, description="CPUs each actor reserves (fractional on small machines)")
    num_gpus: float | None = Field(
        None, ge=0.0, description="GPUs each actor reserves; default: vllm.tensor_parallel_size for vllm, else 0"
    )
    accelerator_type: str | None = Field(None, description="Only GPUs of this Ray accelerator type (A100, H100 …)")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of this model's actors")
    max_unit_attempts: int = Field(
        3, gt=0, description="Times a unit may crash this model's actor before its rows are committed as failed"
    )
    fake: FakeOptions = Field(default_factory=lambda: FakeOptions())

    @property
    def id(self) -> str:
        return self.name or self.path.rstrip("/").split("/")[-1]

    @property
    def gpus_per_actor(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return float(self.vllm.tensor_parallel_size) if self.engine == "vllm" else 0.0

    @field_validator("concurrency")
    @classmethod
    def _some_actors(cls, value: int | str | tuple[int, int]) -> int | str | tuple[int, int]:
        if isinstance(value, int) and value < 1:
            raise ValueError("a model needs at least 1 actor (or auto: one per GPU of the cluster)")
        if isinstance(value, tuple) and not 1 <= value[0] <= value[1]:
            raise ValueError(f"[min, max] needs 1 <= min <= max, got {list(value)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _registry_defaults(cls, data: Any) -> Any:
        """A registry name brings its default engine, revision, context length and, under the hf engine, its GPU
        and dtype (entry `hf`) unless the config sets them. The dtype only comes with a GPU: an actor the config
        puts on a CPU (`num_gpus: 0`) keeps `auto`, float32 there."""
        from recaption.catalog import REGISTRY

        if not isinstance(data, dict) or data.get("path") not in REGISTRY:
            return {"engine": "hf", **data} if isinstance(data, dict) and data.get("engine") is None else data
        entry = REGISTRY[data["path"]]
        data = {**data, "engine": data.get("engine") or entry["engine"]}
        if entry.get("revision") and not data.get("revision"):
            data["revision"] = entry["revision"]
        hf = entry.get("hf") or {}
        if data["engine"] == "hf" and hf:
            if data.get("num_gpus") is None and "num_gpus" in hf:
                data["num_gpus"] = hf["num_gpus"]
            if data.get("dtype") is None and "dtype" in hf and (data.get("num_gpus") or 0) > 0:
                data["dtype"] = hf["dtype"]
        vllm = dict(data.get("vllm") or {})
        if entry.get("max_model_len") and "max_model_len" not in vllm:
            data["vllm"] = {**vllm, "max_model_len": entry["max_model_len"]}
        return data

    @model_validator(mode="after")
    def _gpu_sharing_fits(self) -> ModelConfig:
        if self.engine != "vllm" or self.num_gpus is None:
            return self
        tp = self.vllm.tensor_parallel_size
        if tp > 1 and self.num_gpus != tp:
            raise ValueError(f"num_gpus must equal vllm.tensor_parallel_size ({tp}) when the engine spans GPUs")
        if 0 < self.num_gpus < 1 and self.vllm.gpu_memory_utilization > self.num_gpus:
            raise ValueError(
                f"actors sharing a GPU (num_gpus {self.num_gpus}) need vllm.gpu_memory_utilization <= {self.num_gpus}"
            )
        return self


class PostprocessConfig(Strict):
    """Cleaning of generated text and splitting into sub-captions."""

    min_sub_caption_chars: int = Field(3, ge=0, description="Shorter sentence fragments are merged or dropped")
    repetition_ngram: int = Field(4, gt=0, description="n-gram size used to flag repetition loops")
    repetition_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Flag `repetition` when repeated n-grams exceed this fraction"
    )
    degenerate: Literal["keep", "drop", "regenerate"] = Field(
        "keep",
        description="Captions with a degenerate flag: keep them flagged, drop their text (flag `dropped`), or "
        "generate them once more with a repetition penalty (flag `regenerated`)",
    )
    degenerate_flags: list[Literal["repetition", "empty", "truncated"]] = Field(
        default_factory=lambda: ["repetition", "empty"], description="Flags that make a caption degenerate"
    )
    regenerate_repetition_penalty: float = Field(1.3, gt=1.0, description="Penalty of the second generation")


class OutputConfig(Strict):
    """Where the Parquet goes."""

    path: str = Field(description="Output directory (local path or URI): new, empty, or a recaption output")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    lease_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="A run holds the output with a lease it renews; a killed run's lease is taken over this many "
        "seconds after its last renewal (at once on the same host once its process is gone)",
    )

    _absolute = field_validator("path")(classmethod(lambda cls, v: absolute_path(v)))


class RayConfig(Strict):
    """How the job uses Ray. Leave `address` unset for a local Ray; RAY_ADDRESS also selects a cluster."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0, description="CPUs of an auto-started local Ray (default: all)")
    read_num_cpus: float = Field(0.25, gt=0.0, description="CPUs each read task reserves (caption actors decode)")
    write_num_cpus: float = Field(0.25, gt=0.0, description="CPUs each clean+commit task reserves")
    autoscaling: bool = Field(
        False,
        description="The cluster adds nodes on demand: a fixed-size GPU pool waits for GPU nodes to join instead of "
        "failing at plan time when none is up yet",
    )


class PromptSpec(Strict):
    """A prompt with a fallback: `text` may name row fields (`{alt_text}`); a row lacking one gets `fallback`."""

    text: str
    fallback: str | None = Field(None, description="Name of the prompt used for a row that lacks a field `text` names")


class PipelineConfig(Strict):
    """A whole re-captioning job."""

    input: InputConfig
    output: OutputConfig
    models: list[ModelConfig] = Field(min_length=1)
    prompts: dict[str, str | PromptSpec] = Field(
        default_factory=dict,
        description="Extra or overriding prompts by name: a text (which may name row fields: `{alt_text}`, `{url}`, "
        "kept source fields) or {text, fallback}",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("models")
    @classmethod
    def _unique_model_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"model ids must be unique, repeated: {dupes}; set `name` to tell them apart")
        return models

    @model_validator(mode="after")
    def _fill_generation(self) -> PipelineConfig:
        for m in self.models:
            if m.generation is None:
                m.generation = self.generation.model_copy()
        return self

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Hash of what decides the output's content (see `content_view`)."""
        return config_hash(content_view(self.resolved()))


def content_view(resolved: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved pipeline config that decides the output's content: where and how fast it runs (pools,
    Ray, trial limits, compression, the output's place) is left out, so resizing a cluster mid-job does not refuse
    the resume, and the input path is compared as a place (`dir/` = `dir`; a URI without credentials or options)."""
    data = copy.deepcopy(resolved)
    data.pop("ray", None)
    data.pop("output", None)
    data["input"].pop("max_units", None)
    data["input"]["path"] = _place(data["input"]["path"])
    for model in data["models"]:
        for key in RUNTIME_MODEL_KEYS:
            model.pop(key, None)
        for key in RUNTIME_VLLM_KEYS:
            model["vllm"].pop(key, None)
    return data


def _place(path: str) -> str:
    if not _URI.match(path):
        return path.rstrip("/") or "/"
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(path)
    return urlunsplit((p.scheme, p.netloc.rsplit("@", 1)[-1], p.path.rstrip("/"), "", ""))


def absolute_path(value: str) -> str:
    """A local path made absolute (so a resume from another directory means the same place); URIs as they are."""
    if not value.strip() or _URI.match(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


# Model settings that change where or how fast captions are made, not what they say.
RUNTIME_MODEL_KEYS = (
    "concurrency",
    "num_cpus",
    "num_gpus",
    "accelerator_type",
    "env",
    "batch_size",
    "device",
    "max_unit_attempts",
    "units_in_flight",
)
RUNTIME_VLLM_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "download_dir")


def config_hash(data: dict[str, Any]) -> str:
    """A short stable hash of a resolved config (key order does not matter)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=v` → (["a", "b"], v) with v parsed as YAML (so numbers, bools and lists work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set input.path=/data/shards")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a nested key; list items are addressed by index (`models.0.path=...`)."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, parts[: i + 1], create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {'.'.join(parts)}: {'.'.join(parts[:-1])} is not a mapping")


def _child(node: Any, part: str, path: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is not a mapping")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the YAML as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (input, output, models, …)")
    return data


def load_config(
    path: str | Path | None, overrides: list[str] = (), data: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read a pipeline YAML (or a dict), apply `--set` overrides, validate. Errors name the offending key."""
    return load_model(PipelineConfig, path, overrides, data)


def load_model(
    model: type[BaseModel], path: str | Path | None, overrides: list[str] = (), data: dict[str, Any] | None = None
) -> Any:
    """Any config model (pipeline, train, eval) from a YAML file or a dict, with `--set` overrides applied."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    for item in overrides:
        apply_override(raw, *parse_override(item))
    return validate(model, raw, str(path) if path else "config")


def validate(model: type[BaseModel], raw: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_validation_error(e)}") from None


def describe_validation_error(e: ValidationError) -> str:
    """One line per problem, naming the dotted key, e.g. `input.pathh: unknown key`."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)

"""Rewrites ShareGPT4V's released checkpoint (model type `share4v`) into transformers' LLaVA format (llava-hf)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recaption.captioners.tiny import LLAVA_CHAT_TEMPLATE, llava_hub_key
from recaption.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SOURCE_ARCHITECTURES = ("Share4VLlamaForCausalLM", "LlavaLlamaForCausalLM")  # the latter: LLaVA-1.5's own repo
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
PAD_MULTIPLE = 64  # llava-hf pads the vocabulary to a multiple of 64 for matmul speed
# Small shards bound the writer's memory (one output shard plus its serialised copy) at no cost to loaders.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Original LLaVA name → llava-hf hub name, first match wins.
_LM_PREFIXES = [
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
]
_EMBEDDINGS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")  # a CLIPVisionModel saved by v5
# Llama settings of the source config that carry over to `text_config`.
_TEXT_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "initializer_range",
    "pretraining_tp",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
]


def convert_sharegpt4v(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes `src` (ShareGPT4V's checkpoint) plus its CLIP tower to `dst` as a llava-hf checkpoint; returns `dst`.

    The tower comes from `vision_tower` or the source config's `mm_vision_tower`: a local directory, or a Hub repo id
    found in the Hugging Face cache (`hf download` it first; nothing is downloaded here).
    Tensors stream one source shard at a time; `dst` appears only once it is complete."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    source = _read_source_config(src)
    tower = _find_vision_tower(src, source, vision_tower)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"destination {dst} already exists and is not an empty directory; choose a new one")
    tokenizer = _tokenizer(src)
    config = _llava_config(source, tower, tokenizer)
    processor = _processor(tower, tokenizer, config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting.", dir=dst.parent))
    try:
        dtype = _write_weights(src, tower, config, _ShardWriter(tmp, max_shard_bytes))
        config.dtype = dtype
        config.architectures = ["LlavaForConditionalGeneration"]
        config.save_pretrained(tmp)
        _generation_config(config).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _read_source_config(src: Path) -> dict[str, Any]:
    file = src / "config.json"
    if not file.is_file():
        raise ConfigError(f"source {src} has no config.json; give ShareGPT4V's checkpoint directory")
    config = json.loads(file.read_text())
    architectures = config.get("architectures") or []
    if "mm_vision_tower" not in config or not set(architectures) & set(SOURCE_ARCHITECTURES):
        raise ConfigError(
            f"{file}: model_type {config.get('model_type')!r}, architectures {architectures} is not an original "
            f"ShareGPT4V/LLaVA-1.5 checkpoint ({' or '.join(SOURCE_ARCHITECTURES)} with `mm_vision_tower`); "
            "a LlavaForConditionalGeneration checkpoint needs no conversion"
        )
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConfigError(
            f"{file}: mm_projector_type {config.get('mm_projector_type')!r}; llava-hf has mlp2x_gelu only"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConfigError(f"{file}: mm_use_im_start_end / mm_use_im_patch_token are set; llava-hf has neither token")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise ConfigError(f"{file}: mm_vision_select_feature {config['mm_vision_select_feature']!r} is unknown")
    return config


def _find_vision_tower(src: Path, source: dict[str, Any], given: str | os.PathLike | None) -> Path:
    if given is not None:
        tower = Path(given).expanduser()
        if not (tower / "config.json").is_file():
            raise ConfigError(f"vision tower {tower}: not a CLIP checkpoint directory (no config.json)")
        return tower
    named = str(source["mm_vision_tower"])
    for tower in (Path(named).expanduser(), src / named):  # the original code accepts any existing path
        if (tower / "config.json").is_file():
            return tower
    cached = _cached_snapshot(named)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    raise ConfigError(
        f"{src}/config.json names the vision tower {named!r}, which is neither a local directory nor in the Hugging "
        f"Face cache; ShareGPT4V released its fine-tuned CLIP tower separately: download it (`hf download {named}`) "
        "and run again, or pass --vision-tower DIR"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The HF-cache snapshot of a Hub repo id (its `main`), never downloading; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):  # not cached, or not a repo id at all
        return None


def _tokenizer(src: Path) -> Any:
    """The source tokenizer with `<image>` and `<pad>` added after its vocabulary, as llava-hf's has them."""
    from transformers import AddedToken, AutoTokenizer, LlamaConfig

    try:  # a Llama config stands in for the source's, whose model type transformers does not know
        # left padding: generation continues right after every prompt (an init argument, so it is saved)
        tokenizer = AutoTokenizer.from_pretrained(src, config=LlamaConfig(), padding_side="left")
    except Exception as e:  # missing sentencepiece, unreadable files: one line that says what to do
        raise ConfigError(
            f"cannot read the tokenizer of {src}: {type(e).__name__}: {e}; ShareGPT4V ships only tokenizer.model, "
            "which transformers reads with `pip install sentencepiece`"
        ) from None
    for leaked in ("is_local", "local_files_only"):  # loading options, not tokenizer settings: keep them out of dst
        tokenizer.init_kwargs.pop(leaked, None)
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})  # the original pads with <unk>; llava-hf has its own
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def _llava_config(source: dict[str, Any], tower: Path, tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    try:
        vision = CLIPVisionConfig.from_pretrained(tower)
    except Exception as e:
        raise ConfigError(f"vision tower {tower}: not a CLIP vision config: {type(e).__name__}: {e}") from None
    if source.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConfigError(
            f"vision tower {tower} is {vision.hidden_size} wide but the projector expects mm_hidden_size "
            f"{source['mm_hidden_size']}; pass the tower this checkpoint was trained with"
        )
    text = {k: source[k] for k in _TEXT_KEYS if source.get(k) is not None}
    vocab_size = max(source.get("vocab_size", 0), len(tokenizer))
    text["vocab_size"] = -(-vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
    text["pad_token_id"] = tokenizer.pad_token_id
    text["tie_word_embeddings"] = False
    full = source.get("mm_vision_select_feature", "patch") == "cls_patch"
    return LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + int(full),
        projector_hidden_act="gelu",
        vision_feature_layer=source.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if full else "default",
        tie_word_embeddings=False,
    )


def _processor(tower: Path, tokenizer: Any, config: Any) -> Any:
    """LlavaProcessor with the tower's CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    file = tower / "preprocessor_config.json"
    settings = json.loads(file.read_text()) if file.is_file() else {}
    side = config.vision_config.image_size
    kept = {k: settings[k] for k in ("image_mean", "image_std", "resample", "do_normalize") if k in settings}
    # The PIL backend needs no torchvision and saves as "CLIPImageProcessor", which every loader reads.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **kept
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _generation_config(config: Any) -> Any:
    from transformers import GenerationConfig

    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )


def _write_weights(src: Path, tower: Path, config: Any, writer: _ShardWriter) -> str:
    """Streams renamed LM, projector and tower weights into `writer`, checking every name and shape against the
    llava-hf model `config` describes; returns the language model's dtype name."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # names and shapes only, no memory
        expected = {
            llava_hub_key(k): tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()
        }
    rows = config.text_config.vocab_size
    dtype = None
    sources = [(f, _lm_key) for f in _weight_files(src)] + [(f, _vision_key) for f in _weight_files(tower)]
    embedded_tower = 0
    for file, rename in sources:
        log.info("converting %s", file)
        for key, tensor in _read_shard(file):
            name = rename(key)
            if name is None:
                embedded_tower += key.startswith("model.vision_tower.")
                continue
            if name in _EMBEDDINGS:
                tensor = _grow_rows(tensor, rows, f"{file.name}: {key}")
                dtype = str(tensor.dtype).removeprefix("torch.")
            if expected.get(name) != tuple(tensor.shape):
                what = "is not part of a llava model" if name not in expected else f"has shape {tuple(tensor.shape)}"
                raise ConfigError(f"{file}: weight {key} (→ {name}) {what}; expected {expected.get(name)}")
            writer.add(name, tensor)
    if embedded_tower:
        log.warning(
            "skipped %d model.vision_tower.* weights of %s: the original code loads %s instead",
            embedded_tower,
            src,
            tower,
        )
    missing = sorted(set(expected) - writer.seen)
    if missing:
        raise ConfigError(f"{src} and {tower} lack {len(missing)} weights of the llava model, e.g. {missing[:3]}")
    writer.finish()
    return dtype or "float32"


def _lm_key(key: str) -> str | None:
    # inv_freq: a buffer older transformers saved. The tower the original code loads is `mm_vision_tower`, never
    # weights embedded under model.vision_tower (it is built with delay_load), so those are skipped too.
    if key.endswith(".inv_freq") or key.startswith("model.vision_tower."):
        return None
    for old, new in _LM_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # unknown: the shape check names it


def _vision_key(key: str) -> str | None:
    """A CLIP vision weight → its llava-hf name; None for a full CLIP model's text side and for buffers."""
    rest = key.removeprefix("vision_model.") if key.startswith("vision_model.") else None
    if rest is None and key.startswith(_VISION_ROOTS):
        rest = key
    if rest is None or rest.endswith("position_ids"):
        return None
    return "vision_tower.vision_model." + rest


def _grow_rows(weight: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """Appends rows equal to the mean of the existing ones: new tokens start as an average token (the official
    llava conversion samples them around that mean with a 1e-5-scaled covariance)."""
    import torch

    if weight.shape[0] > rows:
        raise ConfigError(f"{what} has {weight.shape[0]} rows, more than the {rows} of the converted vocabulary")
    if weight.shape[0] == rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors first (no pickle, memory-mapped)."""
    for index, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin"),
    ):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
        if (directory / single).is_file():
            return [directory / single]
        shards = sorted(directory.glob(pattern))
        if shards:
            return shards
    raise ConfigError(f"{directory}: no weights (model*.safetensors or pytorch_model*.bin)")


def _read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file; safetensors read tensor by tensor, .bin memory-mapped where possible."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                yield key, f.get_tensor(key)
        return
    import torch

    try:  # weights_only: a checkpoint must not run code; mmap keeps a 10 GB shard out of RAM until read
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a pre-zipfile (legacy) checkpoint cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{file}: holds more than tensors, refusing to unpickle it: {e}") from None
    for key in list(state):  # popped, so a tensor is freed once written rather than when the shard is done
        yield key, state.pop(key)


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes`, named and indexed like `save_pretrained`."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.names: dict[str, str] = {}  # tensor name → part file, once flushed
        self.seen: set[str] = set()
        self.parts: list[str] = []
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ConfigError(f"weight {name} appears twice in the sources")
        self.seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self._flush()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view of a larger storage: safetensors wants its own
            tensor = tensor.clone()
        self.buffer[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f"part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(self.out / part), metadata={"format": "pt"})
        self.names.update(dict.fromkeys(self.buffer, part))
        self.parts.append(part)
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        if self.buffer:
            self._flush()
        n = len(self.parts)
        final = {p: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, p in enumerate(self.parts)}
        if n == 1:
            final = {self.parts[0]: "model.safetensors"}
        for part, name in final.items():
            os.rename(self.out / part, self.out / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": {k: final[p] for k, p in self.names.items()}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

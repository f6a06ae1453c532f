"""The transformers `generate` engine: CPU runs, tests, and models vLLM does not support."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recaption.captioners.engines.base import Generation, engine_dead
from recaption.captioners.models import resolve_model
from recaption.captioners.prompts import format_prompt
from recaption.config import GenerationConfig
from recaption.errors import ConfigError, EngineDeadError, EngineError
from recaption.faults import fault_raise

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from recaption.config import ModelConfig

# Family → transformers class that loads it (an attribute of the `transformers` module).
MODEL_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "sharegpt4v": "LlavaForConditionalGeneration",  # once converted to the llava-hf layout
    "llava_next": "LlavaNextForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
    "blip2": "Blip2ForConditionalGeneration",
    "chat": "AutoModelForImageTextToText",
}
_MAX_ERROR_CHARS = 500


@dataclass
class Prepared:
    """A batch ready for `generate_prepared`: its requests and their tensors on the device."""

    images: list[Image.Image]
    prompts: list[str]
    gen: GenerationConfig
    inputs: dict[str, Any]


class HFCaptioner:
    """Captions with `model.generate` in batches of `batch_size`; a failing batch fails only its own items."""

    def __init__(self, model: ModelConfig) -> None:
        import torch
        import transformers

        self.model_id = model.id
        transformers.utils.logging.disable_progress_bar()  # one bar per actor per load is noise in a pipeline log
        self.gen = model.generation or GenerationConfig()
        self.batch_size = model.batch_size
        self.info = resolve_model(model.path, model.family, model.revision)
        if model.num_cpus >= 1:
            torch.set_num_threads(int(model.num_cpus))
        device = model.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _pick_dtype(model.dtype, self.device)
        class_name = MODEL_CLASSES.get(self.info.family, MODEL_CLASSES["chat"])
        options = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(self.info.path, **options)
            self.model = getattr(transformers, class_name).from_pretrained(self.info.path, dtype=self.dtype, **options)
        except Exception as e:
            raise EngineError(
                f"cannot load {self.info.path} (family {self.info.family}) with transformers.{class_name}: "
                f"{type(e).__name__}: {e}"
            ) from e
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.encoder_decoder = bool(self.model.config.get_text_config().is_encoder_decoder)
        if not self.encoder_decoder:
            self.tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._formatted: dict[str, str] = {}

    def caption(
        self, images: list[Image.Image], prompts: list[str], generation: GenerationConfig | None = None
    ) -> list[Generation]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they pair up by index")
        gen = generation or self.gen
        out: list[Generation] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            out.extend(self._caption_batch(images[start:stop], prompts[start:stop], gen.seed + start, gen))
        return out

    def prepare(
        self, images: list[Image.Image], prompts: list[str], generation: GenerationConfig | None = None
    ) -> Prepared:
        """One batch's tensors, on the device: the CPU half of `caption`, run while the previous batch generates."""
        gen = generation or self.gen
        return Prepared(images, prompts, gen, self._encode(images, prompts))

    def generate_prepared(self, prepared: Prepared) -> list[Generation]:
        """The GPU half: `gen.n` Generations per request of a prepared batch. Raises what generate raises (the
        runner then falls back to `caption`, which halves on OOM and isolates bad requests)."""
        fault_raise("engine:cuda-error", lambda: RuntimeError("CUDA error: an illegal memory access was encountered"))
        try:
            return self._run(prepared.inputs, prepared.gen.seed, prepared.gen)
        except Exception as e:
            if engine_dead(e):
                raise EngineDeadError(f"the {self.device} device failed: {type(e).__name__}: {e}") from e
            raise

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {
            "engine": "hf",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model_path": self.info.path,
            "model_family": self.info.family,
            "model_revision": self.info.revision or "",
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    def _caption_batch(
        self, images: list[Image.Image], prompts: list[str], seed: int, gen: GenerationConfig
    ) -> list[Generation]:
        import torch

        try:
            return self._generate(images, prompts, seed, gen)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:  # n generations per request, like any other result, so captions stay aligned
                return [_error("CUDA out of memory on a single image even at batch size 1")] * gen.n
            torch.cuda.empty_cache()
            half = len(images) // 2  # a smaller batch may fit; the halves keep their order
            return self._caption_batch(images[:half], prompts[:half], seed, gen) + self._caption_batch(
                images[half:], prompts[half:], seed + half, gen
            )
        except EngineDeadError:
            raise
        except Exception as e:  # one bad request must not fail the others: retry alone, fail only what still fails
            if engine_dead(e):  # a faulted CUDA context fails every later call too: the actor must be replaced
                raise EngineDeadError(f"the {self.device} device failed: {type(e).__name__}: {e}") from e
            if len(images) == 1:
                return [_error(f"{type(e).__name__}: {e}")] * gen.n
            return [
                g
                for i in range(len(images))
                for g in self._caption_batch(images[i : i + 1], prompts[i : i + 1], seed + i, gen)
            ]

    def _generate(
        self, images: list[Image.Image], prompts: list[str], seed: int, gen: GenerationConfig
    ) -> list[Generation]:
        fault_raise("engine:cuda-error", lambda: RuntimeError("CUDA error: an illegal memory access was encountered"))
        return self._run(self._encode(images, prompts), seed, gen)

    def _encode(self, images: list[Image.Image], prompts: list[str]) -> dict[str, Any]:
        texts = [self._format(p) for p in prompts]
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        encoding = self.processor(images=rgb, text=texts, return_tensors="pt", padding=True)
        return {k: _to(v, self.device, self.dtype) for k, v in encoding.items()}

    def _run(self, inputs: dict[str, Any], seed: int, gen: GenerationConfig) -> list[Generation]:
        import torch

        # Seeded per batch (by its first item's index), so one failed or retried batch leaves the others' draws alone.
        torch.manual_seed(seed)
        stop = {"tokenizer": self.tokenizer} if gen.stop else {}
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=self._generation_config(gen), **stop)
        input_ids = inputs.get("input_ids")
        if input_ids is not None and gen.n > 1:
            input_ids = input_ids.repeat_interleave(gen.n, dim=0)  # num_return_sequences rows per input
        results = []
        for row in self._new_tokens(output, input_ids).tolist():
            n, reason = count_tokens(row, self.eos_ids, self.pad_id)
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            text, stopped = cut_at_stop(text, gen.stop)
            results.append(Generation(text=text, n_tokens=n, finish_reason="stop" if stopped else reason))
        return results

    def _format(self, prompt: str) -> str:
        if prompt not in self._formatted:
            self._formatted[prompt] = format_prompt(self.info.family, prompt, self.processor)
        return self._formatted[prompt]

    def _generation_config(self, gen: GenerationConfig | None = None) -> Any:
        gen = gen or self.gen
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = gen.max_new_tokens
        config.repetition_penalty = gen.repetition_penalty
        config.pad_token_id = self.pad_id
        config.num_beams = 1
        config.num_return_sequences = gen.n
        config.stop_strings = gen.stop or None
        if gen.temperature > 0:
            # Plain nucleus sampling like vLLM's; transformers would add top_k=50 otherwise.
            config.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=0)
        else:
            config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        config.update(**gen.extra)  # generation.extra last: any other `generate` setting (checked at plan time)
        return config

    def _new_tokens(self, output: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """Generated ids only: decoder-only models (LLaVA, and InstructBLIP/BLIP-2 with a Llama/OPT LM in
        transformers 5) return the prompt too; encoder-decoder ones start with the decoder start token."""
        if self.encoder_decoder:
            return output[:, 1:]
        if input_ids is not None and output.shape[1] >= input_ids.shape[1]:
            n = input_ids.shape[1]
            if bool((output[:, :n] == input_ids.to(output.device)).all()):
                return output[:, n:]
        return output


def count_tokens(row: list[int], eos_ids: set[int], pad_id: int | None = None) -> tuple[int, str]:
    """(generated tokens up to and including the first EOS, finish reason). A row without EOS either ran until
    max_new_tokens (`length`) or was ended by a stop string and padded after it (`stop`, padding not counted)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return i + 1, "stop"
    n = len(row)
    while pad_id is not None and n and row[n - 1] == pad_id:
        n -= 1
    return n, "length" if n == len(row) else "stop"


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded, as vLLM returns it), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)].rstrip(), True) if cuts else (text, False)


def _eos_ids(*values: int | list[int] | None) -> set[int]:
    ids: set[int] = set()
    for v in values:
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(v)
    return ids


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Moves tensors to the device; only floating ones (pixel values) take the model dtype."""
    if not hasattr(value, "to"):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _error(message: str) -> Generation:
    return Generation(text="", n_tokens=0, finish_reason="error", error=message[:_MAX_ERROR_CHARS])


def check_generate_extra(model_id: str, extra: dict[str, Any]) -> None:
    """Before any work: every key of `generation.extra` is a transformers GenerationConfig setting and the set is
    one transformers accepts (a ConfigError in one line otherwise)."""
    if not extra:
        return
    import transformers

    from recaption.captioners.engines.base import check_extra_keys

    check_extra_keys(model_id, "transformers generate", extra, set(vars(transformers.GenerationConfig())))
    try:
        transformers.GenerationConfig(do_sample=True, **extra).validate(strict=True)
    except Exception as e:
        raise ConfigError(
            f"model {model_id}: generation.extra is refused by transformers: {' '.join(str(e).split())}"
        ) from None

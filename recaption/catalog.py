"""The named models a config may use as `path` (data only): repo, revision, engine and hf defaults."""

from __future__ import annotations

from typing import Any

# Named models a config may use as `path`. `repo` is a Hugging Face repo id, `revision` the one loaded (a commit hash
# pins it; `main` follows the repo), `engine` the default engine, `chat_format` the PROMPT_FORMATS entry that wraps
# prompts (recaption/captioners/prompts), and `hf` the ModelConfig defaults under the hf engine: a 7B/13B model needs a GPU and
# runs in bf16 there. Config values always win; `--set models.N.num_gpus=0` runs one on a CPU (in float32).
_HF_ON_GPU = {"num_gpus": 1, "dtype": "bfloat16"}


REGISTRY: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {
        "repo": "llava-hf/llava-1.5-7b-hf",
        "revision": "main",
        "family": "llava",
        "chat_format": "llava",
        "engine": "vllm",
        "max_model_len": 4096,
        "hf": _HF_ON_GPU,
    },
    "llava-1.5-13b": {
        "repo": "llava-hf/llava-1.5-13b-hf",
        "revision": "main",
        "family": "llava",
        "chat_format": "llava",
        "engine": "vllm",
        "max_model_len": 4096,
        "hf": _HF_ON_GPU,
    },
    # vLLM has no InstructBLIP: it runs on the hf engine (batched, on one GPU in bf16).
    "instructblip-vicuna-7b": {
        "repo": "Salesforce/instructblip-vicuna-7b",
        "revision": "main",
        "family": "instructblip",
        "chat_format": "instructblip",
        "engine": "hf",
        "hf": _HF_ON_GPU,
    },
    "blip2-opt-2.7b": {
        "repo": "Salesforce/blip2-opt-2.7b",
        "revision": "main",
        "family": "blip2",
        "chat_format": "blip2",
        "engine": "vllm",
        "max_model_len": 2048,
        "hf": _HF_ON_GPU,
    },
    # Released in the original LLaVA repo format, which no engine loads: `convert` names what to run instead.
    "sharegpt4v-7b": {
        "repo": "Lin-Chen/ShareGPT4V-7B",
        "revision": "main",
        "family": "sharegpt4v",
        "chat_format": "sharegpt4v",
        "engine": "vllm",
        "max_model_len": 4096,
        "hf": _HF_ON_GPU,
        "convert": "sharegpt4v",
    },
    # Tiny random-weight models built locally on first use (recaption/captioners/tiny.py): the demo and tests.
    "tiny-llava": {"tiny": "llava", "family": "llava", "chat_format": "llava", "engine": "hf"},
    # The same at LLaVA-1.5's geometry (336 px, 576 image tokens): the vLLM bench on a CPU.
    "tiny-llava-336": {"tiny": "llava-336", "family": "llava", "chat_format": "llava", "engine": "hf"},
    "tiny-instructblip": {
        "tiny": "instructblip",
        "family": "instructblip",
        "chat_format": "instructblip",
        "engine": "hf",
    },
    "tiny-blip2": {"tiny": "blip2", "family": "blip2", "chat_format": "blip2", "engine": "hf"},
    # A tiny LLaVA trained to describe the generated scenes of recaption.eval.synthetic (recaption/demo/scene_captioner.py),
    # shipped in the package: captions that can be scored against the scenes' truth, on a CPU, offline.
    "scene-llava": {"asset": "scene-llava", "family": "llava", "chat_format": "llava", "engine": "hf"},
}

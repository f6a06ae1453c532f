"""Model registry and family detection: a name, repo id or directory → where the checkpoint is and its family."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recaption.catalog import REGISTRY
from recaption.errors import ConfigError

# config.json `architectures` entry → family. Families decide the prompt format (prompts/) and the transformers
# class (engines/hf.py); anything not listed is a generic chat VLM driven by its processor's chat template.
ARCHITECTURE_FAMILIES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "InstructBlipForConditionalGeneration": "instructblip",
    "Blip2ForConditionalGeneration": "blip2",
    "LlavaNextForConditionalGeneration": "llava_next",
    # ShareGPT4V's own checkpoint is in the original LLaVA repo format; convert it to llava-hf's to run it.
    "Share4VLlamaForCausalLM": "sharegpt4v",
}
GENERIC_FAMILY = "chat"
# Released formats that must be converted (recaption convert) before an engine can load them.
NEEDS_CONVERSION = {"Share4VLlamaForCausalLM"}
FAMILIES = frozenset(ARCHITECTURE_FAMILIES.values()) | {GENERIC_FAMILY}

# The packaged scene captioner (scene-llava) lives with the demo that trains and scores it.
ASSETS = Path(__file__).resolve().parents[1] / "demo" / "assets"

# owner/name with Hugging Face's allowed characters; anything else is treated as a filesystem path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model: `path` is what `from_pretrained`/vLLM take (a local directory or a repo id)."""

    path: str
    family: str
    architectures: list[str] = field(default_factory=list)
    revision: str | None = None
    registry_name: str | None = None


def family_of(architectures: list[str]) -> str:
    """The family of the first known architecture, else the generic chat family."""
    for arch in architectures:
        if arch in ARCHITECTURE_FAMILIES:
            return ARCHITECTURE_FAMILIES[arch]
    return GENERIC_FAMILY


def resolve_model(path_or_name: str, family: str = "auto", revision: str | None = None) -> ModelInfo:
    """Resolves a registry name, local checkpoint directory or HF repo id, and detects its family."""
    if family != "auto" and family not in FAMILIES:
        raise ConfigError(f"model family {family!r} is unknown; use auto or one of {', '.join(sorted(FAMILIES))}")
    entry = REGISTRY.get(path_or_name)
    if entry and entry.get("convert"):
        raise ConfigError(conversion_message(path_or_name, entry))
    target = _registry_target(entry) if entry else path_or_name
    local = Path(target).expanduser()
    if local.is_dir():
        config = _read_local_config(local)
        target = str(local.resolve())
    elif _REPO_ID.match(target) and not local.exists():
        config = _read_hub_config(target, revision)
    elif local.exists():
        raise ConfigError(f"model path {path_or_name} is a file; give the checkpoint directory that holds config.json")
    else:
        raise ConfigError(
            f"model path not found: {path_or_name}; give a local checkpoint directory (with config.json), "
            f"a Hugging Face repo id (owner/name) or a registry name ({', '.join(sorted(REGISTRY))})"
        )
    architectures = list(config.get("architectures") or [])
    if NEEDS_CONVERSION & set(architectures):
        raise ConfigError(
            f"model {path_or_name} is in ShareGPT4V's original format, which neither engine loads: run "
            "`recaption convert sharegpt4v SRC DST --vision-tower TOWER` and give DST as the model path"
        )
    if family == "auto":
        family = entry["family"] if entry else family_of(architectures)
    return ModelInfo(target, family, architectures, revision, path_or_name if entry else None)


def conversion_message(name: str, entry: dict[str, Any]) -> str:
    """What to run before a registry entry released in a format no engine loads can be used (one line)."""
    repo = entry["repo"]
    return (
        f"model {name} ({repo}) is released in ShareGPT4V's original format, which neither engine loads: download "
        f"it (`hf download {repo} --local-dir SRC`), convert it (`recaption convert {entry['convert']} SRC DST`; the "
        "CLIP tower its config names is read from the HF cache, or pass --vision-tower DIR) and set the model's path "
        "to DST (`path: DST` in the YAML or `--set models.N.path=DST`)"
    )


def _registry_target(entry: dict[str, str]) -> str:
    if "tiny" in entry:
        from recaption.captioners.tiny import ensure_tiny

        return str(ensure_tiny(entry["tiny"]))
    if "asset" in entry:
        return str(ASSETS / entry["asset"])
    return entry["repo"]


def _read_local_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise ConfigError(f"model directory {directory} has no config.json; is it a transformers checkpoint?")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{file}: not valid JSON: {e}") from None


def _read_hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    """config.json from the HF cache, downloading it when online; the weights are left to the engine."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        file = hf_hub_download(repo_id, "config.json", revision=revision)
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"model {repo_id}: not in the Hugging Face cache and the Hub is unreachable (or HF_HUB_OFFLINE=1); "
            f"download it first (`hf download {repo_id}`) or give a local checkpoint directory"
        ) from None
    except GatedRepoError:
        raise ConfigError(
            f"model {repo_id}: the repo is gated; accept its licence and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"model {repo_id}: no such Hugging Face repo (or it is private); check the name") from None
    except Exception as e:  # revision not found, HTTP errors …: one readable line is what the user needs
        raise ConfigError(f"model {repo_id}: cannot read config.json from the Hub: {type(e).__name__}: {e}") from None
    return json.loads(Path(file).read_text())

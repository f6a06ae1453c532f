"""Test session setup: offline Hugging Face, a private cache for tiny models, and one local Ray (2 CPUs)."""

import os

import pytest

# Set before anything imports huggingface_hub or starts Ray: Ray workers inherit this environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Tiny models built by the code under test go to a per-session cache, never the user's."""
    if "RECAPTION_CACHE" not in os.environ:
        os.environ["RECAPTION_CACHE"] = str(tmp_path_factory.mktemp("recaption-cache"))
    yield


@pytest.fixture(scope="session")
def ray_session(_tiny_cache):
    """One local Ray for the whole test session, with 2 CPUs as on the CI machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()

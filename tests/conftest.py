"""Test session setup: offline Hugging Face, a private cache for tiny models, and one local Ray (2 CPUs)."""

import os
import socket

import pytest

# Set before anything imports huggingface_hub or starts Ray: Ray workers inherit this environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Credentials for the local S3 server of the object-storage tests; Ray workers need them too.
for _name, _value in [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
]:
    os.environ.setdefault(_name, _value)


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 (moto's server on 127.0.0.1) with a bucket `bucket`; yields the URI query that reaches it."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # moto[server] is a dev extra
        pytest.skip("moto[server] is not installed: pip install 'moto[server]' to run the S3 tests")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("bucket")
        yield f"endpoint_override={endpoint}&scheme=http"
    finally:
        server.stop()

"""The files in docker/ agree with the project: a pinned vLLM base image that installs `recaption[vllm]` and the Ray
the project needs, and a KubeRay RayJob and a compose file whose commands run a pipeline of this repository that
loads. Reads the files only: no Docker, no Kubernetes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement

from recaption.cli import build_parser
from recaption.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


# --- the Dockerfile ------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, `\\` continuations joined, heredoc bodies appended."""
    instructions: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        keyword, _, args = line.strip().partition(" ")
        for marker in re.findall(r"<<-?['\"]?(\w+)['\"]?", args):
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            args += "\n" + "\n".join(body)
        instructions.append((keyword.upper(), args.strip()))
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DOCKER / "Dockerfile").read_text())


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def env_values(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def base_image(instructions: list[tuple[str, str]]) -> str:
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) == 1, f"expected one stage, got FROM {froms}"
    defaults = arg_defaults(instructions)
    image = froms[0].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], image)


def runs(instructions: list[tuple[str, str]]) -> str:
    return "\n".join(args for keyword, args in instructions if keyword == "RUN")


def pyproject_requirements() -> dict[str, Requirement]:
    """The project's requirements by name, the vllm extra included, read from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["vllm"]]
    return {r.name: r for r in reqs}


def test_base_image_is_a_pinned_vllm_release(dockerfile):
    image = base_image(dockerfile)
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai", image
    assert re.fullmatch(r"v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", tag), f"{image}: pin a release tag, not {tag!r}"
    vllm_version = tag[1:].split("@")[0]
    assert pyproject_requirements()["vllm"].specifier.contains(vllm_version), "the vllm extra must accept the base"
    # The build checks that the base image holds the vLLM it names.
    assert "vllm.__version__ == '${VLLM_VERSION}'" in runs(dockerfile)


def test_installs_the_project_with_the_vllm_extra_and_keeps_the_base_torch(dockerfile):
    copied = " ".join(args for keyword, args in dockerfile if keyword == "COPY")
    for path in ("pyproject.toml", "README.md", "recaption", "pipelines"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied), f"the image does not COPY {path}"
        # Dockerfile.dockerignore lets only what the image copies into the build context.
        assert f"!{path}" in (DOCKER / "Dockerfile.dockerignore").read_text().split()
    script = runs(dockerfile)
    assert re.search(r"install .*recaption\[vllm\]", script), "the project must be installed with the vllm extra"
    for line in script.splitlines():
        if re.search(r"pip install", line):
            assert not re.search(r"[\s\"'](torch|torchvision|vllm)([=<>~\[\"'\s]|$)", line), f"reinstalls: {line}"
            assert "-c /etc/recaption-base-constraints.txt" in line, f"install without the base constraints: {line}"
    assert "torch.__version__" in script and "recaption-base-torch.txt" in script  # torch checked unchanged


def test_ray_in_the_image_fits_the_project_and_matches_the_rayjob(dockerfile):
    ray_version = arg_defaults(dockerfile)["RAY_VERSION"]
    ray_req = pyproject_requirements()["ray"]
    assert ray_req.specifier.contains(ray_version), f"ray {ray_version} is outside the project's {ray_req}"
    assert re.search(r"ray\[[^\]]*default[^\]]*\]==\$\{RAY_VERSION\}", runs(dockerfile)), "KubeRay needs ray[default]"
    assert re.search(r"ray\[[^\]]*data[^\]]*\]==\$\{RAY_VERSION\}", runs(dockerfile))
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_entrypoint_is_reset_and_the_cache_is_a_volume(dockerfile):
    entrypoints = [args for keyword, args in dockerfile if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].replace(" ", "") == "[]", "the base image's `vllm serve` must not run"
    hf_home = env_values(dockerfile)["HF_HOME"]
    assert hf_home.startswith("/")
    volumes = [v for keyword, args in dockerfile if keyword == "VOLUME" for v in yaml.safe_load(args)]
    assert hf_home in volumes
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the image runs as a non-root user"


def test_the_images_ray_keeps_idle_workers_as_a_local_ray_does(dockerfile):
    from recaption.job.pipeline import KEEP_IDLE_WORKERS

    env = env_values(dockerfile)
    assert {name: env.get(name) for name in KEEP_IDLE_WORKERS} == KEEP_IDLE_WORKERS


# --- the RayJob and the compose file -------------------------------------------------------------------------------


def image_pipelines_dir(dockerfile: list[tuple[str, str]]) -> PurePosixPath:
    """Where the image holds the repository's pipelines/ (the destination of `COPY pipelines DEST`)."""
    workdir = PurePosixPath("/")
    for keyword, args in dockerfile:
        if keyword == "WORKDIR":
            workdir = workdir / args
        if keyword == "COPY" and args.split()[0] == "pipelines":
            return workdir / args.split()[-1]
    raise AssertionError("the Dockerfile does not COPY pipelines")


def check_run_command(argv: list[str], dockerfile: list[tuple[str, str]]) -> None:
    """`argv` is a `recaption run PIPELINE [--set k=v ...]` the CLI accepts, naming a pipeline of this repository
    (by its path inside the image) that loads with those overrides."""
    assert argv[0] == "recaption", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run", argv
    in_image = PurePosixPath(args.config)
    pipelines = image_pipelines_dir(dockerfile)
    assert in_image.is_absolute() and in_image.is_relative_to(pipelines), (
        f"{in_image}: name the pipeline by its absolute path in the image ({pipelines}/...): the job's working "
        f"directory need not be the image's WORKDIR"
    )
    local = ROOT / "pipelines" / in_image.relative_to(pipelines)
    assert local.is_file(), f"{in_image} is not a file of pipelines/"
    cfg = load_config(local, args.overrides)
    overrides = dict(item.split("=", 1) for item in args.overrides)
    assert cfg.input.path == overrides["input.path"] and cfg.output.path == overrides["output.path"]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def pod_specs(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_rayjob_is_a_head_and_a_gpu_worker_group_that_shut_down(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert sum(gpus(c) for c in head) == 0, "the head runs no model"
    workers = cluster["workerGroupSpecs"]
    assert workers and all(group["replicas"] >= 1 for group in workers)
    for group in workers:
        containers = group["template"]["spec"]["containers"]
        assert sum(gpus(c) for c in containers) >= 1, f"{group['groupName']} requests no nvidia.com/gpu"
        for c in containers:
            requests = c["resources"].get("requests", {}).get("nvidia.com/gpu")
            assert requests in (None, c["resources"]["limits"]["nvidia.com/gpu"]), "GPU requests must equal limits"


def test_rayjob_entrypoint_runs_a_pipeline_of_this_repo(rayjob, dockerfile):
    check_run_command(shlex.split(rayjob["spec"]["entrypoint"]), dockerfile)


def test_rayjob_pods_mount_the_model_cache_at_hf_home_and_get_credentials_from_a_secret(rayjob, dockerfile):
    image_hf_home = env_values(dockerfile)["HF_HOME"]
    for group, spec in pod_specs(rayjob).items():
        pvcs = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        for c in spec["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            hf_home = env["HF_HOME"]["value"] if "HF_HOME" in env else image_hf_home
            assert hf_home == image_hf_home
            cache = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in pvcs]
            assert cache == [hf_home], f"{group}: the model-cache PVC must be mounted at HF_HOME ({hf_home})"
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{group}: {name} must come from a Secret"


def test_rayjob_gpu_workers_have_a_shared_memory_volume(rayjob):
    for group, spec in pod_specs(rayjob).items():
        if not any(gpus(c) for c in spec["containers"]):
            continue
        memory_volumes = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for c in spec["containers"]:
            assert any(
                m["mountPath"] == "/dev/shm" and m["name"] in memory_volumes for m in c.get("volumeMounts", [])
            ), f"{group}: mount an emptyDir (medium: Memory) at /dev/shm"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_is_one_service_on_all_gpus_that_runs_a_pipeline(compose, dockerfile):
    (service,) = compose["services"].values()
    build = service["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert any(d.get("count") == "all" for d in devices), "a single node uses all its GPUs"
    check_run_command(list(service["command"]), dockerfile)
    assert service.get("shm_size") or service.get("ipc") == "host", "Ray and PyTorch need a large /dev/shm"


def test_compose_keeps_the_hf_cache_and_the_data_on_volumes(compose, dockerfile):
    (service,) = compose["services"].values()
    hf_home = env_values(dockerfile)["HF_HOME"]
    assert service.get("environment", {}).get("HF_HOME", hf_home) == hf_home
    targets = {}
    for volume in service["volumes"]:
        source, target = re.sub(r"\$\{[^}]*\}", "VAR", volume).split(":")[:2]  # `${X:-dir}` holds a colon
        targets[target] = source
    assert targets.get(hf_home) in compose.get("volumes", {}), "HF_HOME must be a named volume"
    data_dirs = [t for t in targets if t != hf_home]
    assert data_dirs, "mount a data directory"
    args = build_parser().parse_args(list(service["command"])[1:])
    for item in args.overrides:
        key, value = item.split("=", 1)
        if key in ("input.path", "output.path"):
            assert any(PurePosixPath(value).is_relative_to(d) for d in data_dirs), f"{key}={value} is not on a volume"

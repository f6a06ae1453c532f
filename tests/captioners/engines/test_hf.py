"""The transformers engine on tiny random-weight checkpoints of every family."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from recaption.captioners.engines.hf import HFCaptioner, count_tokens  # noqa: E402
from recaption.captioners.engines.registry import build_captioner
from recaption.captioners.tiny import FAMILIES, build_tiny  # noqa: E402
from recaption.config import GenerationConfig, ModelConfig  # noqa: E402
from recaption.errors import ConfigError, EngineError  # noqa: E402

MAX_NEW = 12
PROMPTS = ["Describe the image in detail.", "What colour is the largest shape?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


def images(n: int = 8) -> list[Image.Image]:
    # Different sizes and colours; one greyscale, which the engine must convert.
    out = [Image.new("RGB", (40 + 8 * i, 30 + 4 * i), (30 * i, 255 - 30 * i, 90)) for i in range(n - 1)]
    return [*out, Image.new("L", (50, 50), 128)]


def captioner(path, batch_size: int = 4, **generation) -> HFCaptioner:
    gen = GenerationConfig(max_new_tokens=MAX_NEW, **generation)
    return HFCaptioner(ModelConfig(path=str(path), batch_size=batch_size, generation=gen))


def requests() -> tuple[list[Image.Image], list[str]]:
    imgs = images()
    return [im for im in imgs for _ in PROMPTS], [p for _ in imgs for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_and_greedy_is_deterministic(tiny, family):
    engine = captioner(tiny[family])
    assert engine.info.family == family
    imgs, prompts = requests()
    first = engine.caption(imgs, prompts)
    assert len(first) == 16
    for g in first:
        assert g.error is None and g.finish_reason in {"stop", "length"}, g
        assert 0 < g.n_tokens <= MAX_NEW
        # An untrained model may emit EOS at once; otherwise its tokens decode to some text.
        assert g.text or g.finish_reason == "stop", g
        assert g.finish_reason == "stop" or g.n_tokens == MAX_NEW
    assert [g.text for g in engine.caption(imgs, prompts)] == [g.text for g in first]


def test_llava_batch_size_does_not_change_greedy_text(tiny):
    imgs, prompts = requests()
    one = captioner(tiny["llava"], batch_size=1).caption(imgs, prompts)
    four = captioner(tiny["llava"], batch_size=4).caption(imgs, prompts)
    assert [(g.text, g.n_tokens) for g in one] == [(g.text, g.n_tokens) for g in four]


def test_sampling_is_seeded(tiny):
    imgs, prompts = requests()
    a = captioner(tiny["blip2"], temperature=1.0, top_p=0.9, seed=7).caption(imgs, prompts)
    b = captioner(tiny["blip2"], temperature=1.0, top_p=0.9, seed=7).caption(imgs, prompts)
    greedy = captioner(tiny["blip2"]).caption(imgs, prompts)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in greedy]


def test_a_failing_request_only_fails_itself(tiny, monkeypatch):
    engine = captioner(tiny["llava"], batch_size=2)
    real = engine._generate

    def flaky(imgs, prompts, seed, gen):
        if "boom" in prompts:
            raise RuntimeError("simulated engine failure")
        return real(imgs, prompts, seed, gen)

    monkeypatch.setattr(engine, "_generate", flaky)
    out = engine.caption(images(6), ["a", "b", "boom", "c", "d", "e"])
    # The batch holding "boom" is retried request by request: only "boom" fails, "c" beside it is captioned.
    assert out[2].finish_reason == "error" and out[2].error == "RuntimeError: simulated engine failure"
    assert out[2].text == ""
    assert all(g.finish_reason in {"stop", "length"} and g.error is None for g in out[:2] + out[3:])


def test_token_accounting():
    eos = {2}
    assert count_tokens([5, 6, 2, 3, 3], eos) == (3, "stop")  # EOS counted, padding after it not
    assert count_tokens([2, 3, 3], eos) == (1, "stop")
    assert count_tokens([5, 6, 7], eos) == (3, "length")
    assert count_tokens([5, 9, 6], {2, 9}) == (2, "stop")


def test_factory_versions_and_empty_input(tiny):
    engine = build_captioner(ModelConfig(path=str(tiny["instructblip"]), engine="hf", name="ib"))
    assert isinstance(engine, HFCaptioner) and engine.model_id == "ib"
    versions = engine.versions()
    assert versions["model_path"] == str(tiny["instructblip"].resolve())
    assert {"transformers", "torch", "model_family"} <= set(versions) and versions["device"] == "cpu"
    assert versions["dtype"] == "float32"
    assert engine.caption([], []) == []
    with pytest.raises(ValueError, match="pair up"):
        engine.caption(images(2), ["one"])


def test_whole_cpus_set_torch_threads(tiny, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    HFCaptioner(ModelConfig(path=str(tiny["blip2"]), num_cpus=0.5))
    HFCaptioner(ModelConfig(path=str(tiny["blip2"]), num_cpus=2.0))
    assert calls == [2]  # a fractional reservation leaves torch's default alone


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model path not found"):
        HFCaptioner(ModelConfig(path=str(tmp_path / "nope")))


def test_unloadable_checkpoint_is_an_engine_error(tiny, tmp_path):
    (tmp_path / "config.json").write_text((tiny["blip2"] / "config.json").read_text())  # config, no weights
    with pytest.raises(EngineError, match="cannot load"):
        HFCaptioner(ModelConfig(path=str(tmp_path)))


def test_count_tokens_after_a_stop_string_excludes_padding():
    assert count_tokens([5, 6, 3, 3], {2}, pad_id=3) == (2, "stop")
    assert count_tokens([5, 6, 7], {2}, pad_id=3) == (3, "length")


def test_cut_at_stop():
    from recaption.captioners.engines.hf import cut_at_stop

    assert cut_at_stop("a red cube. ### more", ["###", "more"]) == ("a red cube.", True)
    assert cut_at_stop("a red cube.", ["###"]) == ("a red cube.", False)


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_n_samples_per_request_come_grouped(tiny, family):
    imgs, prompts = requests()
    gens = captioner(tiny[family], temperature=1.0, n=3, seed=1).caption(imgs[:4], prompts[:4])
    assert len(gens) == 12 and all(g.error is None for g in gens)
    # The 3 samples of a request differ from each other (sampling), and every group has its own.
    groups = [[g.text for g in gens[i : i + 3]] for i in range(0, 12, 3)]
    assert all(len(set(group)) > 1 for group in groups)


def test_stop_strings_end_generation(tiny):
    imgs, prompts = requests()
    free = captioner(tiny["llava"]).caption(imgs[:4], prompts[:4])
    # A stop string taken from the middle of a free generation must cut it there.
    word = next(g.text.split()[1] for g in free if len(g.text.split()) > 2)
    stopped = captioner(tiny["llava"], stop=[word]).caption(imgs[:4], prompts[:4])
    for f, s in zip(free, stopped, strict=True):
        if word in f.text:
            assert s.finish_reason == "stop" and word not in s.text and f.text.startswith(s.text)
            assert s.n_tokens <= f.n_tokens


def test_out_of_memory_halves_the_batch_keeps_order_and_n_per_request(tiny, monkeypatch):
    import torch

    engine = captioner(tiny["llava"], batch_size=4, temperature=1.0, n=3, seed=3)
    real, sizes = engine._generate, []

    def tight_memory(imgs, prompts, seed, gen):
        sizes.append(len(imgs))
        if len(imgs) > 1 or "huge" in prompts:  # only single requests fit; "huge" fits nowhere
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(imgs, prompts, seed, gen)

    monkeypatch.setattr(engine, "_generate", tight_memory)
    imgs, prompts = images(4), ["a", "b", "huge", "c"]
    out = engine.caption(imgs, prompts)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]  # 4 → 2 → 1, first half before the second
    assert len(out) == 4 * 3  # n generations per request, also for the one that failed
    failed = out[6:9]
    assert all(g.finish_reason == "error" and "out of memory on a single image" in g.error for g in failed)
    assert all(g.error is None for g in out[:6] + out[9:])
    # Each request got the draws it gets alone at batch size 1: the halves kept their order and seeds.
    alone = captioner(tiny["llava"], batch_size=1, temperature=1.0, n=3, seed=3).caption(imgs, ["a", "b", "x", "c"])
    assert [g.text for g in out[:6] + out[9:]] == [g.text for g in alone[:6] + alone[9:]]


@pytest.mark.parametrize(("threads", "beside"), [(4, False), (3, True)])
def test_the_next_batch_is_prepared_beside_generate_only_where_torch_leaves_a_core(tiny, monkeypatch, threads, beside):
    """On 4 CPUs with torch's team on all 4, the engine thread prepares each batch itself (a processor thread beside
    generate would take a core from the team); with a core to spare, the prepare thread does it while one generates.
    The captions are the same either way."""
    import threading

    import torch

    from recaption.captioners import Request, make_runner

    engine = captioner(tiny["llava"], batch_size=2)
    model = ModelConfig(path=str(tiny["llava"]), batch_size=2, generation=engine.gen)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    prepared_on, real_prepare = [], engine.prepare

    def prepare(*args):
        prepared_on.append(threading.current_thread().name)
        return real_prepare(*args)

    monkeypatch.setattr(engine, "prepare", prepare)
    imgs, prompts = requests()
    runner = make_runner(engine, model)
    try:
        futures = [
            runner.submit(Request(im, p, engine.gen, i, "u"))
            for i, (im, p) in enumerate(zip(imgs, prompts, strict=True))
        ]
        texts = [g.text for f in futures for g in f.result(timeout=120)]
    finally:
        runner.close()
    assert texts == [g.text for g in engine.caption(imgs, prompts)]
    assert bool(prepared_on) is beside
    assert set(prepared_on) <= {"recaption-prepare"}


def test_without_cpu_affinity_the_cpu_count_says_whether_a_core_is_free(monkeypatch):
    """macOS has no os.sched_getaffinity: the runner reads os.cpu_count instead of failing to start."""
    import types

    import torch

    from recaption.captioners.engines.runner import _core_to_spare

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert _core_to_spare(cpu) is False
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert _core_to_spare(cpu) is True

"""`recaption bench --quick` runs every section end to end and writes its table and JSON (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recaption.bench import BenchResult, Measurement, compared, default_workdir, format_table, interleaved, run_bench
from recaption.bench import run as bench_run
from recaption.cli import build_parser

SECTIONS_NAMES = {
    "data plane (fake engine)",
    "data plane incl. start-up",
    "hf engine (tiny-llava)",
    "hf engine vs processor + generate in turn (tiny-llava)",
    "trainer step",
    "corner tokens K=2 vs K=0",
    "scaling: 1 worker(s), 4 units",
    "scaling: 2 worker(s), 8 units",
    "caption actor memory, 16- vs 8-image units",
    "caption actor RSS, 16- vs 8-image units",
}


def test_quick_bench_measures_every_section(tmp_path):
    exe = Path(sys.executable).with_name("recaption")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [str(exe), "bench", "--quick", "--cpus", "2", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,  # minutes on an idle machine; a shared one under load takes several times as long
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {m["name"] for m in report["measurements"]}
    assert names >= SECTIONS_NAMES, names
    assert any(n.startswith("worker RSS over") for n in names)
    for m in report["measurements"]:
        assert set(m) >= {"name", "value", "unit", "baseline", "ratio", "target", "met", "verdict", "spread", "repeats"}
        assert m["value"] > 0 and m["baseline"] > 0, m
        if m["spread"]:  # interleaved repeats: the median ratio lies within the repeats' range
            low, high = m["spread"]
            assert low <= m["ratio"] <= high and m["repeats"] >= 2, m
        else:
            assert abs(m["ratio"] - m["value"] / m["baseline"]) < 1e-9 * m["ratio"], m
    by_name = {m["name"]: m for m in report["measurements"]}
    for name in ("data plane (fake engine)", "hf engine (tiny-llava)", "caption actor memory, 16- vs 8-image units"):
        assert by_name[name]["repeats"] >= 2 and by_name[name]["verdict"] in ("met", "MISSED", "crosses"), name
    machine = report["machine"]
    assert machine["bench_cpus"] == 2 and machine["versions"]["torch"] and machine["cpu"]
    assert len(machine["load"]) == 3 and len(machine["load_end"]) == 3
    # The table on stdout names every measurement and says whether its target was met.
    table = proc.stdout[proc.stdout.rindex("measurement") :]
    assert all(name in table for name in names)
    assert "target" in table and ("met" in table or "MISSED" in table)


def test_table_and_targets():
    result = BenchResult(machine={})
    result.measurements = [
        Measurement("a", 80.0, "images/s", 100.0, 0.8, ">= 0.8"),
        Measurement("b", 1.07, "x", 1.0, 1.07, "<= 1.05"),
        Measurement("c", 3.0, "MiB"),
        compared("d", "images/s", [90.0, 99.0, 80.0], [100.0, 100.0, 100.0], ">= 0.85"),  # spread 0.80-0.99
        compared("e", "images/s", [95.0, 99.0, 97.0], [100.0, 100.0, 100.0], ">= 0.9"),
        compared("f", "MiB", [130.0, 120.0], [100.0, 100.0], "<= 1.1"),
    ]
    assert [m.met for m in result.measurements] == [True, False, None, False, True, False]
    assert [m.verdict for m in result.measurements] == ["met", "MISSED", None, "crosses", "met", "MISSED"]
    d = result.measurements[3]
    assert (d.value, d.baseline, d.ratio, d.spread, d.repeats) == (90.0, 100.0, 0.9, [0.8, 0.99], 3)
    lines = format_table(result).splitlines()
    assert lines[0].split()[:2] == ["measurement", "value"]
    assert lines[2].split() == ["a", "80", "images/s", "100", "0.800", "1", ">=", "0.8", "met"]
    assert lines[3].split()[-1] == "MISSED" and lines[4].split() == ["c", "3", "MiB", "1"]
    assert lines[5].split() == ["d", "90", "images/s", "100", "0.900", "0.800-0.990", "3", ">=", "0.85", "crosses"]


def test_interleaved_runs_alternate():
    calls = []
    values = interleaved({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b"] * 3 and values == {"a": [1.0] * 3, "b": [2.0] * 3}


def test_scratch_data_goes_to_the_cache_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECAPTION_CACHE", str(tmp_path / "cache"))
    assert default_workdir() == tmp_path / "cache" / "bench"
    seen = []  # the section's own work is not the point here: where it is asked to put its files is
    monkeypatch.setattr(bench_run, "bench_trainer", lambda result, work, sizes, cpus: seen.append(work))
    run_bench(sections=["trainer"], quick=True)
    assert seen == [tmp_path / "cache" / "bench"] and seen[0].is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert build_parser().parse_args(["bench"]).workdir is None  # the CLI's default is the cache too


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed: scripts/test-vllm.sh")
def test_vllm_engine_section_against_one_bare_generate_ray_data_llm_and_k_prompts(tmp_path):
    """`recaption bench engine --engine vllm` on the CPU build, with demo-vllm.yaml's engine options: the pipeline
    against one bare LLM.generate and against ray.data.llm, interleaved; k prompts per image against one."""
    demo_vllm = Path(__file__).resolve().parents[2] / "pipelines" / "demo-vllm.yaml"
    result = run_bench(tmp_path, ["engine"], quick=True, engine="vllm", num_cpus=2, pipeline=str(demo_vllm))
    by_name = {m.name: m for m in result.measurements}
    assert list(by_name) == [
        "vllm pipeline (tiny-llava)",
        "vllm pipeline vs the bare call's whole rate (tiny-llava)",
        "vllm pipeline vs ray.data.llm (tiny-llava)",
        "vllm: each of 1 extra prompts vs the first (tiny-llava)",  # demo-vllm.yaml's two prompts
        "vllm: prefix-cache hit rate, 2 prompts per image (tiny-llava)",
    ]
    for name in list(by_name)[:3]:
        m = by_name[name]
        assert m.unit == "images/s/engine" and m.value > 0 and m.baseline > 0 and m.repeats == 2, m
        assert m.spread[0] <= m.ratio <= m.spread[1]
        assert m.verdict in (("met", "MISSED", "crosses") if m.target else (None,)), m
    assert "ONE vllm.LLM.generate over all 32 images" in by_name["vllm pipeline (tiny-llava)"].note
    extra = by_name["vllm: each of 1 extra prompts vs the first (tiny-llava)"]
    assert extra.repeats == 2 and extra.target == "<= 0.4" and "generated tokens per request" in extra.note
    hits = by_name["vllm: prefix-cache hit rate, 2 prompts per image (tiny-llava)"]
    assert 0.0 <= hits.value <= 1.0 and hits.repeats == 2

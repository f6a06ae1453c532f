"""`recaption bench --quick` runs every section end to end and writes its table and JSON (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recaption.bench import BenchResult, Measurement, format_table, run_bench

SECTIONS_NAMES = {
    "data plane (fake engine)",
    "data plane incl. start-up",
    "hf engine (tiny-llava)",
    "trainer step",
    "corner tokens K=2 vs K=0",
    "scaling: 1 worker(s), 4 units",
    "scaling: 2 worker(s), 8 units",
}


def test_quick_bench_measures_every_section(tmp_path):
    exe = Path(sys.executable).with_name("recaption")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [str(exe), "bench", "--quick", "--cpus", "2", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {m["name"] for m in report["measurements"]}
    assert names >= SECTIONS_NAMES, names
    assert any(n.startswith("worker RSS over") for n in names)
    for m in report["measurements"]:
        assert set(m) >= {"name", "value", "unit", "baseline", "ratio", "target", "met"}
        assert m["value"] > 0 and m["baseline"] > 0, m
        assert abs(m["ratio"] - m["value"] / m["baseline"]) < 1e-9 * m["ratio"], m
    machine = report["machine"]
    assert machine["bench_cpus"] == 2 and machine["versions"]["torch"] and machine["cpu"]
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
    ]
    assert [m.met for m in result.measurements] == [True, False, None]
    lines = format_table(result).splitlines()
    assert lines[0].split()[:2] == ["measurement", "value"]
    assert lines[2].split() == ["a", "80", "images/s", "100", "0.800", ">=", "0.8", "met"]
    assert lines[3].split()[-1] == "MISSED" and lines[4].split() == ["c", "3", "MiB"]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed: scripts/test-vllm.sh")
def test_vllm_engine_section_runs_the_pipeline_and_a_bare_llm(tmp_path):
    """`recaption bench engine --engine vllm` on the CPU build, with demo-vllm.yaml's engine options."""
    demo_vllm = Path(__file__).resolve().parents[1] / "pipelines" / "demo-vllm.yaml"
    result = run_bench(tmp_path, ["engine"], quick=True, engine="vllm", num_cpus=2, pipeline=str(demo_vllm))
    (m,) = result.measurements
    assert m.name == "vllm pipeline (tiny-llava)" and m.unit == "images/s/engine"
    assert m.value > 0 and m.baseline > 0 and m.ratio == pytest.approx(m.value / m.baseline)
    assert "generated tokens/s" in m.note

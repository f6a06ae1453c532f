"""`recaption bench plan --quick`: every row of the plan section is measured (no timing is asserted)."""

from __future__ import annotations

from recaption.bench import BenchResult
from recaption.bench.plan import bench_plan


def test_quick_plan_bench_measures_cold_and_resumed_starts(tmp_path):
    result = BenchResult(machine={})
    bench_plan(result, tmp_path, quick=True)
    names = [m.name for m in result.measurements]
    assert names == [
        "plan: 300 units, cold, nothing done",
        "plan: 300 units, resume, 50% done",
        "plan: 300 units, resume, 100% done",
        "plan: 1500 units, cold, nothing done",
        "plan: 1500 units, resume, 50% done",
        "plan: 1500 units, resume, 100% done",
        "plan: 300 units, resume, 50% done, no manifest",
        "plan: 300 units, resume, 100% done, stock moto listing",
    ]
    for m in result.measurements:
        assert m.value > 0 and m.baseline > 0 and m.unit == "s", m
    by_name = {m.name: m for m in result.measurements}
    # What each start read: the manifest spares every marker but the last 1 % a killed run's keeper had not folded in.
    assert "750 to do" in by_name["plan: 1500 units, resume, 50% done"].note
    assert " 7 markers read" in by_name["plan: 1500 units, resume, 50% done"].note
    assert " 150 markers read" in by_name["plan: 300 units, resume, 50% done, no manifest"].note
    assert "us/unit" in by_name["plan: 1500 units, resume, 100% done"].note

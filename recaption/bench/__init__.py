"""`recaption bench`: one module per section, each measured against its bare baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.bench.result import BenchResult, Measurement, compared, default_workdir, format_table, interleaved
    from recaption.bench.run import run_bench

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "BenchResult": "recaption.bench.result",
    "Measurement": "recaption.bench.result",
    "compared": "recaption.bench.result",
    "default_workdir": "recaption.bench.result",
    "format_table": "recaption.bench.result",
    "interleaved": "recaption.bench.result",
    "run_bench": "recaption.bench.run",
}
__all__ = [
    "BenchResult",
    "Measurement",
    "compared",
    "default_workdir",
    "format_table",
    "interleaved",
    "run_bench",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

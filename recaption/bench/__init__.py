"""`recaption bench`: one module per section, each measured against its bare baseline."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recaption.bench.result import BenchResult, Measurement, compared, default_workdir, format_table, interleaved
    from recaption.bench.run import run_bench

# The names other rooms use, each loaded from its module on first use: importing the room stays light, and a
# module that moves inside the room changes this table, not its importers.
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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

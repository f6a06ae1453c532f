"""Tools that read a finished output: report (and its HTML page), export, inspect."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.outputs.export import export_output
    from recaption.outputs.inspect import inspect_output
    from recaption.outputs.reading import part_paths
    from recaption.outputs.report import build_report

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "build_report": "recaption.outputs.report",
    "export_output": "recaption.outputs.export",
    "inspect_output": "recaption.outputs.inspect",
    "part_paths": "recaption.outputs.reading",
}
__all__ = [
    "build_report",
    "export_output",
    "inspect_output",
    "part_paths",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

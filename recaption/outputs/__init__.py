"""Tools that read a finished output: report (and its HTML page), export, inspect."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recaption.outputs.export import export_output
    from recaption.outputs.inspect import inspect_output
    from recaption.outputs.reading import part_paths
    from recaption.outputs.report import build_report

# The names other rooms use, each loaded from its module on first use: importing the room stays light, and a
# module that moves inside the room changes this table, not its importers.
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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""A room's public names, each loaded from its module on first use.

Every room's `__init__` keeps a table `{name: module}` of the names other rooms use and sets
`__getattr__ = lazy_exports(__name__, _EXPORTS)`: importing a room stays light (no torch, Ray or vLLM until a name
that needs them is used), and a module that moves inside the room changes the table, not its importers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(room: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `room`: a name in `exports` is imported from its module when asked for. It is
    looked up there every time, never kept in the room, so patching the module (tests do) reaches every importer; a
    hot loop takes the name once, outside the loop."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {room!r} has no attribute {name!r}")

    return __getattr__

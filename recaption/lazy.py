"""A room's public names, each loaded from its module on first use.

Every room's `__init__` keeps a table `{name: module}` of the names other rooms use and sets
`__getattr__ = lazy_exports(__name__, _EXPORTS)`: importing a room stays light (no torch, Ray or vLLM until a name
that needs them is used), and a module that moves inside the room changes the table, not its importers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(room: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `room`: a name in `exports` is imported from its module when first asked for, and
    kept in the room (a name asked for in a hot loop, such as `decode_image` per image, is imported once)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[room], name, value)
            return value
        raise AttributeError(f"module {room!r} has no attribute {name!r}")

    return __getattr__

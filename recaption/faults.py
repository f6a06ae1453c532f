"""Fault injection for the kill-and-resume and engine-fault tests. Test-only; inert unless `RECAPTION_FAULT` is set.

`RECAPTION_FAULT=<point>` acts at that point: `fault_point` SIGKILLs the whole run (the run must be started as its
own session, `setsid` or `start_new_session=True`: the session leader's whole process group, driver, GCS and raylet,
is killed, as a machine losing power would be); `fault_raise` raises an exception there instead (a CUDA fault, a
dead engine). `RECAPTION_FAULT_UNIT=<unit>` arms it for that unit only (where the point knows its unit).
`RECAPTION_FAULT_SKIP=k` lets the first k visits of the point pass in each process, and
`RECAPTION_FAULT_ONCE=<path>` confines the fault to one process, the first to create that file: there it fires at
every visit from then on (a faulted CUDA context stays faulted), elsewhere never. With both: "from its second batch on,
the first actor's engine fails; the actor Ray starts instead is healthy".
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

POINTS = (
    "commit:before-rename",
    "commit:after-data",
    "caption:start",
    "overwrite:after-markers",
    "retry:before-replace",
    "engine:cuda-error",
    "engine:kill-core",
    "engine:request-error",
    "commit:enospc",
)
_visits: dict[str, int] = {}
_owner: set[str] = set()  # the ONCE files this process created


def _fires(name: str, unit: str | None = None) -> bool:
    if os.environ.get("RECAPTION_FAULT") != name:
        return False
    only = os.environ.get("RECAPTION_FAULT_UNIT")
    if only and unit != only:
        return False
    _visits[name] = _visits.get(name, 0) + 1
    if _visits[name] <= int(os.environ.get("RECAPTION_FAULT_SKIP", "0")):
        return False
    once = os.environ.get("RECAPTION_FAULT_ONCE")
    if once and once not in _owner:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        _owner.add(once)
    return True


def fault_point(name: str) -> None:
    """Kills the whole run (its process session) here when the fault is armed."""
    if not _fires(name):
        return
    try:
        os.killpg(os.getsid(0), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_raise(name: str, error: Callable[[], BaseException], unit: str | None = None) -> None:
    """Raises `error()` here when the fault is armed (for `unit` only, where RECAPTION_FAULT_UNIT names one)."""
    if _fires(name, unit):
        raise error()


def fault_call(name: str, action: Callable[[], None]) -> None:
    """Runs `action()` here when the fault is armed (e.g. kills the engine's own process)."""
    if _fires(name):
        action()

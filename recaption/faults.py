"""Crash injection for the kill-and-resume tests: `RECAPTION_FAULT=<point>` SIGKILLs the whole run at that point.

Test-only. The run must be started as its own session (`setsid`, or `start_new_session=True`), since the whole
process group of the session leader (driver, GCS, raylet) is killed, as a machine losing power would be.
"""

from __future__ import annotations

import os
import signal

POINTS = ("commit:before-rename", "commit:after-data", "caption:start")


def fault_point(name: str) -> None:
    if os.environ.get("RECAPTION_FAULT") != name:
        return
    try:
        os.killpg(os.getsid(0), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)

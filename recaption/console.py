"""A quiet console: a normal run prints recaption's own lines, not the library chatter a user can do nothing about.

Hidden unless `--verbose`: Ray's "Token authentication is enabled" warning (a local Ray started for the run), Ray
Train's per-worker "Reporting training result" and "Failed to query Ray Train Controller" lines, and its
core worker's "E" line saying an actor has "constructor arguments in the object store and max_restarts > 0" (Ray Data's
actor pools always do; the line is written by Ray's C++ core straight to file descriptor 2, so it is filtered there,
in the driver process, line by line; everything else passes through untouched and at once). vLLM's INFO lines in the
caption actors of a local Ray are left out at their source (`VLLM_LOGGING_LEVEL=WARNING`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading

# Whether stderr was a terminal before any filter replaced file descriptor 2 with a pipe (the progress bar asks).
stderr_is_tty = sys.stderr.isatty() if sys.stderr is not None else False

NOISE = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    re.compile(r"Token authentication is enabled for this Ray cluster"),
    # Ray Train's own chatter in `recaption train` with several workers: each worker's report of its final metrics,
    # and its placement-group cleaner's retries of a state query.
    re.compile(r"Reporting training result \d+: TrainingReport\("),
    re.compile(r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"),
)
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
# For the processes a local Ray starts from this one (they inherit its environment): vLLM's INFO lines, dozens per
# engine start from every caption actor (engine arguments, weights loaded, KV cache size …); its warnings still show.
# A value the user set stays, and so does a model's own `env`.
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}

_filter: _Fd2Filter | None = None


def quiet(verbose: bool) -> None:
    """Hides the noise for the rest of the process (nothing with `verbose`)."""
    global _filter
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if _filter is None:
        try:
            _filter = _Fd2Filter()
        except OSError:  # no fd 2 to filter (a daemon, a closed stderr): nothing to hide
            _filter = None


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


class _Fd2Filter:
    """File descriptor 2 becomes a pipe read by a thread that copies every line to the real stderr except noise. A
    partial line that cannot be the start of a Ray log line (a progress bar's `\\r…`) is passed on at once."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not is_noise(line.decode("utf-8", "replace")))
            if pending and not pending.lstrip(b"\r").startswith(b"["):  # not a Ray log line: no need to hold it
                out, pending = out + pending, b""
            if out:
                self._write(out)
        if pending and not is_noise(pending.decode("utf-8", "replace")):
            self._write(pending)

    def _write(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.real, data) :]
            except OSError:
                return

    def close(self) -> None:
        """Puts the real stderr back and lets the thread pass on what is left."""
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self.real, 2)  # our write end closes: the thread reads what is left (the pipe stays open for any
        self.thread.join(timeout=1)  # process that inherited it, so a late write never meets a closed pipe)

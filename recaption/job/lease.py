"""One writer per output: a lease file that the running driver renews and a successor takes over once it goes stale.

`_lease.json` names the run that holds the output (run id, host, pid, since, last heartbeat, timeout). A second run
refuses in one line naming the holder; a holder that stopped renewing (killed, its machine lost) is taken over after
its timeout, or at once when it ran on this host and its process is gone. Object stores have no exclusive create, so
a new holder writes its record, waits, and reads it back; it keeps checking at every renewal, and every commit checks
the record first (`check_holder`), so two runs never both commit into one output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from recaption.errors import RecaptionError
from recaption.job.writer import OutputDir

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class OutputBusyError(RecaptionError):
    """Another live run holds the output directory."""


class LeaseLostError(RecaptionError):
    """This run's lease was taken over (it stopped renewing for longer than its timeout)."""


@dataclass
class Holder:
    """What the lease file records about the run holding the output."""

    run_id: str
    host: str
    pid: int
    pid_started: float | None
    since: float
    heartbeat_at: float
    timeout_s: float

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}) since {_when(self.since)}"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class Lease:
    """The lease of one run on one output directory; `with Lease(out, 60).acquire():` holds it and renews it."""

    def __init__(self, out: OutputDir, timeout_s: float, run_id: str | None = None, settle_s: float | None = None):
        self.out = out
        self.path = out.path(LEASE_FILE)
        self.timeout_s = timeout_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # Object stores: how long a writer waits before reading its record back (another writer's PUT lands first).
        self.settle_s = settle_s if settle_s is not None else (0.05 if out.atomic_rename else 1.0)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = Holder(
            self.run_id, socket.gethostname(), os.getpid(), _process_started(os.getpid()), 0.0, 0.0, timeout_s
        )

    def read(self) -> Holder | None:
        """The holder the lease file names; None when there is no file (or only a torn one, which no run wrote)."""
        try:
            data = json.loads(self.out.read_bytes(self.path))
            return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            if not self.out.fs.get_file_info(self.path).is_file:
                return None
            log.warning("output lease %s is unreadable (%s): treated as free", self.path, e)
            return None

    def stale_reason(self, holder: Holder, now: float | None = None) -> str | None:
        """Why `holder` no longer holds the lease, or None while it does."""
        now = time.time() if now is None else now
        if holder.host == socket.gethostname():
            started = _process_started(holder.pid)
            if started is None or (holder.pid_started is not None and abs(started - holder.pid_started) > 1.0):
                return f"its process {holder.pid} on this host is gone"
        silent = now - holder.heartbeat_at
        if silent > holder.timeout_s:
            return f"no heartbeat for {silent:.0f} s (its timeout is {holder.timeout_s:g} s)"
        return None

    def acquire(self) -> Lease:
        """Takes the lease or raises OutputBusyError naming the live holder; starts renewing it."""
        for _ in range(3):
            current = self.read()
            if current is not None and current.run_id != self.run_id:
                reason = self.stale_reason(current)
                if reason is None:
                    raise self.busy_error(current)
                log.warning("taking over the output lease of %s: %s", current.describe(), reason)
            now = time.time()
            self.holder.since = self.holder.since or now
            self.holder.heartbeat_at = now
            if current is None and self.out.atomic_rename:
                if not self._create_exclusive():
                    continue  # another run created it just now: look at it again
            else:
                self._write()
            time.sleep(self.settle_s)
            winner = self.read()
            if winner is not None and winner.run_id == self.run_id:
                self._start_heartbeat()
                return self
            if winner is not None:
                raise self.busy_error(winner)
        raise OutputBusyError(f"output.path {self.out.uri}: could not take its lease ({LEASE_FILE}); retry")

    def busy_error(self, holder: Holder) -> OutputBusyError:
        """What a run says when `holder` holds the lease (`recaption plan` says it too)."""
        ago = max(time.time() - holder.heartbeat_at, 0.0)
        return OutputBusyError(
            f"output.path {self.out.uri} is in use by {holder.describe()}, last heartbeat {ago:.0f} s ago; "
            f"wait for it to finish (a killed run's lease is taken over {holder.timeout_s:g} s after its last "
            "heartbeat), or choose another output.path"
        )

    def _record(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=2, sort_keys=True).encode()

    def _write(self) -> None:
        self.out.write_atomic(self.path, self._record())

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def renew(self) -> None:
        """Writes a new heartbeat if the file still names this run; otherwise marks the lease lost."""
        current = self.read()
        if current is None or current.run_id != self.run_id:
            who = current.describe() if current else "nobody (the lease file is gone)"
            self.lost = f"the output lease of {self.out.uri} now names {who}"
            return
        self.holder.heartbeat_at = time.time()
        self._write()

    def check(self) -> None:
        """Raises LeaseLostError once the lease is lost; called by the driver between units."""
        if self.lost:
            raise LeaseLostError(f"{self.lost}: this run stopped; rerun to resume when the output is free")

    def _start_heartbeat(self) -> None:
        interval = max(self.timeout_s / 4, 0.05)

        def beat() -> None:
            last_ok = time.time()
            while not self._stop.wait(interval) and not self.lost:
                try:
                    self.renew()
                    last_ok = time.time()
                except Exception as e:  # a storage hiccup: keep trying until the timeout would pass
                    log.warning("cannot renew the output lease: %s", e)
                    if time.time() - last_ok > self.timeout_s:
                        self.lost = f"could not renew the output lease of {self.out.uri} for {self.timeout_s:g} s"

        self._thread = threading.Thread(target=beat, name="recaption-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops renewing and removes the lease file if it still names this run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.read()
        if current is not None and current.run_id == self.run_id:
            self.out.delete_if_exists(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_holder(out: OutputDir, run_id: str) -> str | None:
    """None when the lease file names `run_id`; else why this run may not commit (used before every commit)."""
    try:
        data = json.loads(out.read_bytes(out.path(LEASE_FILE)))
    except FileNotFoundError:
        return f"the output lease ({LEASE_FILE}) is gone"
    except (OSError, ValueError) as e:
        if not out.fs.get_file_info(out.path(LEASE_FILE)).is_file:
            return f"the output lease ({LEASE_FILE}) is gone"
        return f"the output lease is unreadable: {e}"
    if data.get("run_id") != run_id:
        return f"the output is now held by run {data.get('run_id')} (host {data.get('host')}, pid {data.get('pid')})"
    return None

"""The done units of an output at scale: one listing of `_done/` (the truth), and what the markers say kept in a
compacted manifest, so that a marker is read once in the output's life, not once per start.

The manifest (`_manifest/done.recaption.json.gz`) holds, per unit, its marker's size and modification time as listed
and the marker's content. It is only a cache of the markers: an entry counts only when the listing shows its marker
with the same size and time; a marker the manifest lacks (or that changed since: `--retry-failed` rewrites it) is
read, in parallel with the others; an entry whose marker is gone is dropped. The run that holds the output keeps it
current (`kept_current`: every few minutes and at the end), so a resume after a kill reads only the markers of the
last minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from recaption.errors import OutputWriteError
from recaption.job.writer import DONE_DIR, DONE_MANIFEST, OutputDir, unit_of_marker
from recaption.redact import redact_text
from recaption.sources import retrying

log = logging.getLogger(__name__)

FORMAT = 1
READERS = 32  # markers read at once: each is one small GET, so latency, not bandwidth, is what they cost
KEEP_EVERY_S = 120.0  # the keeper folds new markers in this often, or less often when a refresh is slow


class DoneManifest:
    """The done units of one output, as of the last `refresh`."""

    def __init__(self, out: OutputDir, read_only: bool = False):
        self.out = out
        self.read_only = read_only  # a reader that does not hold the output (report, plan): never writes the manifest
        self.entries: dict[str, tuple[int | None, int | None, dict]] | None = None  # unit → (size, mtime_ns, marker)
        self.markers_read = 0  # by this object: what a refresh cost beyond its listing
        self.last_refresh_s = 0.0
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.out.path(DONE_MANIFEST)

    def refresh(self) -> dict[str, dict]:
        """The units whose marker exists now, with what each marker says. Lists `_done/` once, reads only the markers
        the manifest lacks or holds an older version of, and rewrites the manifest when anything changed."""
        with self._lock:
            t0 = time.monotonic()
            known = self.entries if self.entries is not None else self._load()
            listed = self._list()
            current = {
                unit: known[unit]
                for unit, info in listed.items()
                if unit in known and known[unit][:2] == (info.size, info.mtime_ns)
            }
            stale = [info for unit, info in listed.items() if unit not in current]
            for unit, marker in self._read(stale).items():
                current[unit] = (listed[unit].size, listed[unit].mtime_ns, marker)
            if not self.read_only and (self.entries is None or current.keys() != known.keys() or stale):
                self._save(current)
            self.entries = current
            self.last_refresh_s = time.monotonic() - t0
            return {unit: entry[2] for unit, entry in sorted(current.items())}

    @contextlib.contextmanager
    def kept_current(self, every_s: float = KEEP_EVERY_S) -> Iterator[DoneManifest]:
        """Refreshes the manifest in the background while the block runs (at most every `every_s`, and never more
        than a twentieth of the time), and once more at its end: a run killed in between leaves a manifest that
        lacks only the markers of its last minutes. A failed refresh costs the next start some reads, nothing more."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(max(every_s, 20 * self.last_refresh_s)):
                self._refresh_quietly()

        thread = threading.Thread(target=keep, name="done-manifest", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            if self.entries is not None:  # refreshed at least once: the run got as far as planning
                self._refresh_quietly()

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - a cache; the markers stay the truth
            log.warning("cannot refresh the done manifest of %s: %s", self.out.uri, redact_text(str(e)))

    def _list(self) -> dict[str, pafs.FileInfo]:
        return retrying(self.out.marker_infos, f"{self.out.uri}/{DONE_DIR}/", "list")

    def _read(self, infos: list[pafs.FileInfo]) -> dict[str, dict]:
        def read(info: pafs.FileInfo) -> tuple[str, dict | None]:
            unit = unit_of_marker(info.base_name)
            try:
                data = retrying(lambda: self.out.read_bytes(info.path), f"{self.out.uri}/{DONE_DIR}/", "read")
            except FileNotFoundError:
                return unit, None  # deleted since the listing: not done
            try:
                marker = json.loads(data)
            except ValueError:
                raise OutputWriteError(
                    f"done marker {self.out.uri}/{DONE_DIR}/{info.base_name} is not JSON; delete it to redo the unit"
                ) from None
            return unit, marker if isinstance(marker, dict) else {}

        if not infos:
            return {}
        with ThreadPoolExecutor(max_workers=min(READERS, len(infos))) as pool:
            found = dict(pool.map(read, infos))
        self.markers_read += len(infos)
        return {unit: marker for unit, marker in found.items() if marker is not None}

    def _load(self) -> dict[str, tuple[int | None, int | None, dict]]:
        try:  # `.gz`: pyarrow compresses and decompresses by the extension
            data = retrying(lambda: self.out.read_bytes(self.path), f"{self.out.uri}/{DONE_MANIFEST}", "read")
        except FileNotFoundError:
            return {}
        except (OSError, pa.ArrowException):  # not gzip: read as damaged, below
            data = b""
        try:
            record = json.loads(data)
            if record.get("format") == FORMAT:
                return {unit: (size, mtime, marker) for unit, (size, mtime, marker) in record["units"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        log.warning(
            "%s/%s is not a manifest this version reads: every marker is read again", self.out.uri, DONE_MANIFEST
        )
        return {}

    def _save(self, entries: dict[str, tuple[int | None, int | None, dict]]) -> None:
        record = {"format": FORMAT, "written_at": time.time(), "units": {u: list(e) for u, e in entries.items()}}
        data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            self.out.write_atomic(self.path, data)
        except (OSError, pa.ArrowException) as e:  # the markers stay the truth: the next start reads them
            log.warning("cannot write the done manifest of %s: %s", self.out.uri, redact_text(str(e)))

"""Live progress of a run: a tqdm bar on a terminal, parseable log lines otherwise, and `_progress.json` to follow."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

log = logging.getLogger(__name__)
PROGRESS_FILE = "_progress.json"
UNIT_COUNTS = ("rows", "ok", "failed", "skipped", "tokens")
UNIT_RATES = {"images_per_s": "rows", "tokens_per_s": "tokens"}
MAX_ERRORS_KEPT = 100  # `_progress.json` stays small on a run where every unit fails
_FIELD = re.compile(r"(\w+)=(\S+)")


class Progress:
    """Counts work done as it commits and shows it; `unit_done` per committed pipeline unit, `advance` per step.

    On a TTY a tqdm bar (with ETA) is drawn; elsewhere a `recaption progress: units=3/10 rows=… eta_s=…` line is
    printed every `interval_s` seconds and a `… done:` line with the final counts at `close`. With an `output`
    (a `recaption.writer.OutputDir`), `_progress.json` is rewritten atomically after every update.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "recaption",
        unit: str = "unit",
        initial: int = 0,
        counts: tuple[str, ...] = (),
        rates: Mapping[str, str] | None = None,
        enabled: bool = True,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        interval_s: float = 30.0,
        output: Any = None,
        clock=time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.done = initial
        self.counts: dict[str, float] = dict.fromkeys(counts, 0)
        self.values: dict[str, Any] = {}
        self.rates = dict(rates or {})
        self.errors: dict[str, str] = {}
        self.n_errors = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.enabled, self.interval_s, self.output, self.clock = enabled, interval_s, output, clock
        self.start, self.started_at = clock(), time.time()
        self.last_line: float | None = None
        self.closed = False
        self.write_failed = False
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, mininterval=1.0)
        self._write_state(finished=False)

    @classmethod
    def for_units(cls, total: int, initial: int = 0, output: Any = None, **kwargs: Any) -> Progress:
        """The pipeline's view: units done / total, rows, ok, failed, skipped, tokens, images/s, tokens/s."""
        return cls(total, initial=initial, counts=UNIT_COUNTS, rates=UNIT_RATES, output=output, **kwargs)

    @classmethod
    def for_steps(cls, total: int, initial: int = 0, desc: str = "train", **kwargs: Any) -> Progress:
        """A trainer's view: steps done / total and whatever counts (`samples`) and values (`loss`) it passes."""
        kwargs.setdefault("rates", {"samples_per_s": "samples"})
        return cls(total, initial=initial, desc=desc, unit="step", counts=("samples",), **kwargs)

    def unit_done(self, summary: Mapping[str, Any]) -> None:
        """One unit's commit summary (unit, rows, ok, failed, skipped, tokens, seconds, error) from the driver."""
        if summary.get("error"):
            self.n_errors += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors[str(summary.get("unit"))] = str(summary["error"])
        self.advance(1, {k: int(summary.get(k) or 0) for k in UNIT_COUNTS})

    def advance(self, n: int = 1, counts: Mapping[str, float] | None = None, **values: Any) -> None:
        """`n` more units or steps done; `counts` add up over the run, `values` (e.g. loss) show their latest."""
        self.done += n
        for k, v in (counts or {}).items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(self._postfix(), refresh=False)
        elif self.enabled:
            now = self.clock()
            if self.last_line is None or now - self.last_line >= self.interval_s:
                self.last_line = now
                self._print("progress")
        self._write_state(finished=False)

    def snapshot(self) -> dict[str, Any]:
        """Everything known now, as `_progress.json` holds it."""
        elapsed = max(self.clock() - self.start, 1e-9)
        new = self.done - self.initial
        eta = (self.total - self.done) * elapsed / new if new > 0 else None
        state: dict[str, Any] = {
            "desc": self.desc,
            "unit": self.unit,
            "done": self.done,
            "total": self.total,
            "initial": self.initial,
            **{k: _number(v) for k, v in self.counts.items()},
            **self.values,
            "elapsed_s": round(elapsed, 3),
            f"{self.unit}s_per_s": round(new / elapsed, 4),
            **{name: round(self.counts.get(src, 0) / elapsed, 3) for name, src in self.rates.items()},
            "eta_s": None if eta is None else round(max(eta, 0.0), 1),
            "started_at": self.started_at,
            "updated_at": time.time(),
        }
        if self.unit == "unit":
            state.update(unit_errors=self.n_errors, errors=dict(self.errors))
        return state

    def write(self, text: str) -> None:
        """A message line that does not break the bar (a trainer's metrics, a warning)."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, finished: bool = True) -> dict[str, Any]:
        """Ends the view with the final counts; `finished=False` when the run stopped early. Idempotent."""
        if self.closed:
            return self.snapshot()
        self.closed = True
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(), refresh=True)
            self.bar.close()
        elif self.enabled:
            self._print("done" if finished else "stopped")
        return self._write_state(finished=finished, stopped=not finished)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    def _postfix(self) -> dict[str, str]:
        state = self.snapshot()
        shown = {k: _format(state[k]) for k in ("ok", "failed", "unit_errors") if state.get(k)}
        shown.update({k.removesuffix("_per_s") + "/s": f"{state[k]:.1f}" for k in self.rates})
        shown.update({k: _format(v) for k, v in self.values.items()})
        return shown

    def _print(self, event: str) -> None:
        state = self.snapshot()
        fields = [f"{self.unit}s={self.done}/{self.total}"]
        fields += [f"{k}={_format(state[k])}" for k in (*self.counts, "unit_errors") if k in state]
        fields += [f"{k}={_format(v)}" for k, v in self.values.items()]
        fields += [f"{k}={state[k]}" for k in (*self.rates, "elapsed_s")]
        fields.append(f"eta_s={'-' if state['eta_s'] is None else state['eta_s']}")
        print(f"{self.desc} {event}: {' '.join(fields)}", file=self.stream, flush=True)

    def _write_state(self, finished: bool, stopped: bool = False) -> dict[str, Any]:
        state = self.snapshot() | {"finished": finished, "stopped": stopped}
        if self.output is not None:
            try:
                self.output.write_json(self.output.path(PROGRESS_FILE), state)
            except OSError as e:  # the view is not worth a run: say it once, the run ends on its own errors
                if not self.write_failed:
                    log.warning("cannot update %s: %s", PROGRESS_FILE, e)
                self.write_failed = True
        return state


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """A non-TTY progress line back as a dict (`event`, `desc`, `done`, `total`, counts, rates); None otherwise."""
    head, sep, rest = line.strip().partition(": ")
    parts = head.rsplit(" ", 1)
    if not sep or len(parts) != 2 or parts[1] not in ("progress", "done", "stopped"):
        return None
    parsed: dict[str, Any] = {"desc": parts[0], "event": parts[1]}
    for key, value in _FIELD.findall(rest):
        if "/" in value:
            done, total = value.split("/", 1)
            parsed.update(done=int(done), total=int(total))
        else:
            parsed[key] = _parse_value(value)
    return parsed


def _parse_value(value: str) -> Any:
    if value == "-":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _number(v: float) -> float:
    return int(v) if float(v).is_integer() else v


def _format(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)

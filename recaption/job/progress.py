"""Live progress of a run: a tqdm bar on a terminal, parseable log lines otherwise, and `_progress.json` to follow."""

from __future__ import annotations

import json
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
ERROR_KINDS_SHOWN = 3  # error kinds on a progress line
MAX_ERRORS_KEPT = 100  # `_progress.json` stays small on a run where every unit fails
_FIELD = re.compile(r"(\w+)=(\S+)")
_ONE_FIELD = re.compile(r"[\s,:=]+")


class Progress:
    """Counts work done as it commits and shows it; `unit_done` per committed pipeline unit, `advance` per step.

    On a TTY a tqdm bar (with ETA) is drawn; elsewhere a `recaption progress: units=3/10 rows=… eta_s=…` line is
    printed every `interval_s` seconds and a `… done:` line with the final counts at `close`. With an `output`
    (a `recaption.job.writer.OutputDir`), `_progress.json` is rewritten atomically after every update.
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
        trackers: list | None = None,
        track_updates: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.done = initial
        self.counts: dict[str, float] = dict.fromkeys(counts, 0)
        self.values: dict[str, Any] = {}
        self.rates = dict(rates or {})
        self.errors: dict[str, str] = {}
        self.n_errors = 0
        self.error_kinds: dict[str, int] = {}  # failed rows by error kind, over the units this run committed
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.enabled, self.interval_s, self.output, self.clock = enabled, interval_s, output, clock
        self.start, self.started_at = clock(), time.time()
        self.last_line: float | None = None
        self.closed = False
        self.write_failed = False
        self.engines = EngineView()
        self.trackers = list(trackers or [])  # recaption.job.tracking: TensorBoard, W&B
        self.track_updates = track_updates  # False: only `log_scalars` reaches them (a trainer logs its records)
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
        """One unit's commit summary (unit, rows, ok, failed, skipped, tokens, seconds, error, metrics) from the
        driver; its engine metrics update the per-model view (busy, in flight, waiting, tokens/s, cache hits)."""
        if summary.get("error"):
            self.n_errors += 1
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors[str(summary.get("unit"))] = str(summary["error"])
        if summary.get("error_kinds"):
            from recaption.errors import merge_error_counts

            self.error_kinds = merge_error_counts([self.error_kinds, json.loads(summary["error_kinds"])])
        self.engines.update(summary.get("metrics"), self.clock() - self.start)
        self.advance(1, {k: int(summary.get(k) or 0) for k in UNIT_COUNTS}, **self.engines.line_values())

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
        self._track()

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Numbers that are not part of the view (a trainer's eval metrics, its grad norm) to every tracker."""
        if not self.trackers:
            return
        from recaption.job.tracking import scalars

        figures = scalars(values, self.desc)
        for tracker in list(self.trackers):
            try:
                tracker.log(step, figures)
            except Exception as e:
                log.warning("%s: stopped reporting to it: %s", type(tracker).__name__, e)
                self.trackers.remove(tracker)

    def _track(self) -> None:
        """The numbers of this update to every tracker, at step `done` (a tracker that fails is dropped, once)."""
        if not self.trackers or not self.track_updates:
            return
        from recaption.job.tracking import scalars

        state = self.snapshot()
        figures = scalars(state, self.desc) | {f"{self.desc}/{self.unit}s_done": float(self.done)}
        for tracker in list(self.trackers):
            try:
                tracker.log(self.done, figures)
            except Exception as e:  # a tracker is a view: it never ends a run
                log.warning("%s: stopped reporting to it: %s", type(tracker).__name__, e)
                self.trackers.remove(tracker)

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
            state.update(unit_errors=self.n_errors, errors=dict(self.errors), error_kinds=dict(self.error_kinds))
            if self.engines.latest:
                state.update(engines=self.engines.summary(), engine_history=list(self.engines.history))
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
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                log.warning("%s: could not close: %s", type(tracker).__name__, e)
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
        if self.error_kinds:
            kind, n = next(iter(self.error_kinds.items()))
            shown["top_error"] = f"{kind} ({n})"
        return shown

    def _print(self, event: str) -> None:
        state = self.snapshot()
        fields = [f"{self.unit}s={self.done}/{self.total}"]
        fields += [f"{k}={_format(state[k])}" for k in (*self.counts, "unit_errors") if k in state]
        if self.error_kinds:  # the most frequent kinds of failed rows, `kind:rows` (spaces as `_`: one field)
            top = list(self.error_kinds.items())[:ERROR_KINDS_SHOWN]
            fields.append("error_kinds=" + ",".join(f"{_ONE_FIELD.sub('_', k)}:{n}" for k, n in top))
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


class EngineView:
    """Each model's engine as its caption actors last reported it (with every unit they pass on): busy fraction
    (engine time weighted by how full its batch was, over wall time, averaged over actors), requests in flight,
    requests waiting with their images decoded, output tokens/s (summed over actors), prefix-cache hit rate; and a
    history of those, one point per unit, thinned to at most `HISTORY` points."""

    HISTORY = 600

    def __init__(self) -> None:
        self.latest: dict[str, dict[int, dict[str, Any]]] = {}
        self.history: list[dict[str, Any]] = []
        self._every = 1
        self._seen = 0

    def update(self, metrics: str | None, elapsed_s: float) -> None:
        if not metrics:
            return
        for model, snap in json.loads(metrics).items():
            self.latest.setdefault(model, {})[int(snap.get("actor", 0))] = snap
        self._seen += 1
        if self._seen % self._every:
            return
        self.history.append({"t": round(elapsed_s, 2), **{m: s for m, s in self.summary().items()}})
        if len(self.history) > self.HISTORY:  # keep every other point, and from now on every other unit
            self.history = self.history[::2]
            self._every *= 2

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for model, actors in self.latest.items():
            snaps = list(actors.values())
            queries = sum(s.get("cache_queries", 0) for s in snaps)
            out[model] = {
                "actors": len(snaps),
                "busy": round(sum(s["busy"] for s in snaps) / len(snaps), 3),
                "in_flight": sum(s["in_flight"] for s in snaps),
                "waiting": sum(s["waiting"] for s in snaps),
                "out_tokens_per_s": round(sum(s["output_tokens"] / max(s["wall_s"], 1e-9) for s in snaps), 1),
                "cache_hit": round(sum(s.get("cache_hits", 0) for s in snaps) / queries, 3) if queries else None,
            }
        return out

    def line_values(self) -> dict[str, Any]:
        """The progress line's fields: `busy=0.93 inflight=64 waiting=12 out_tok_s=850 cache=0.71`, each suffixed
        with the model's id where there are several models."""
        values: dict[str, Any] = {}
        summary = self.summary()
        for model, s in summary.items():
            suffix = "" if len(summary) == 1 else "_" + re.sub(r"\W", "_", model)
            values[f"busy{suffix}"] = s["busy"]
            values[f"inflight{suffix}"] = s["in_flight"]
            values[f"waiting{suffix}"] = s["waiting"]
            values[f"out_tok_s{suffix}"] = s["out_tokens_per_s"]
            if s["cache_hit"] is not None:
                values[f"cache{suffix}"] = s["cache_hit"]
        return values


def _is_tty(stream: IO[str]) -> bool:
    """Whether `stream` is a terminal; stderr is asked as it was before `recaption.console` filtered it."""
    if stream is sys.stderr:
        from recaption import console

        return console.stderr_is_tty
    return stream.isatty()


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

"""Progress: parseable lines off a TTY ending with the final counts, a bar on a TTY, `_progress.json` as units commit."""

from __future__ import annotations

import io
import json

from recaption.job.progress import PROGRESS_FILE, Progress, parse_progress_line
from recaption.job.writer import open_output
from tests.data import write_webdataset_dir
from tests.job.test_pipeline import make_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unit_summary(unit: str, rows: int, failed: int = 0, tokens: int = 0, error: str | None = None) -> dict:
    return {"unit": unit, "rows": rows, "ok": rows - failed, "failed": failed, "skipped": 0, "tokens": tokens,
            "seconds": 1.0, "error": error}  # fmt: skip


def test_log_lines_off_a_tty_parse_and_end_with_the_final_counts(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    out = open_output(str(tmp_path))
    live = Progress.for_units(5, initial=1, output=out, stream=stream, tty=False, interval_s=10, clock=clock)
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["done"] == 1
    clock.now += 2
    live.unit_done(unit_summary("a", 10, failed=1, tokens=100))  # first line at once
    clock.now += 2
    live.unit_done(unit_summary("b", 10, tokens=100))  # within interval_s: no line
    clock.now += 16
    live.unit_done(unit_summary("c", 0, error="cannot read c.tar: OSError"))
    state = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert state["done"] == 4 and state["finished"] is False and state["errors"] == {"c": "cannot read c.tar: OSError"}
    clock.now += 5
    live.unit_done(unit_summary("d", 20, failed=2, tokens=300))
    final = live.close()

    lines = [parse_progress_line(line) for line in stream.getvalue().splitlines()]
    assert [p["event"] for p in lines] == ["progress", "progress", "done"]
    first, last = lines[0], lines[-1]
    assert (first["done"], first["total"], first["rows"], first["failed"]) == (2, 5, 10, 1)
    assert first["images_per_s"] == 5.0 and first["tokens_per_s"] == 50.0
    assert first["eta_s"] == 6.0  # 3 units left at 1 unit per 2 s
    assert last == {
        "desc": "recaption", "event": "done", "done": 5, "total": 5, "rows": 40, "ok": 37, "failed": 3,
        "skipped": 0, "tokens": 500, "unit_errors": 1, "images_per_s": 1.6, "tokens_per_s": 20.0,
        "elapsed_s": 25.0, "eta_s": 0.0,
    }  # fmt: skip
    state = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert state["finished"] is True and state["done"] == 5 and state["rows"] == 40 and state["tokens"] == 500
    assert final["finished"] is True and final["eta_s"] == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_run_that_stops_says_so_and_disabled_prints_nothing(tmp_path):
    stream = io.StringIO()
    try:
        with Progress.for_units(3, output=open_output(str(tmp_path)), stream=stream, tty=False) as live:
            live.unit_done(unit_summary("a", 4))
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert parse_progress_line(stream.getvalue().splitlines()[-1])["event"] == "stopped"
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["stopped"] is True
    quiet = io.StringIO()
    with Progress.for_units(2, stream=quiet, tty=False, enabled=False) as live:
        live.unit_done(unit_summary("a", 4))
    assert quiet.getvalue() == ""


def test_steps_mode_on_a_tty_draws_a_bar():
    stream, clock = io.StringIO(), FakeClock()
    live = Progress.for_steps(10, initial=2, stream=stream, tty=True, clock=clock)
    for _ in range(3):
        clock.now += 0.5
        live.advance(1, {"samples": 32}, loss=1.25)
    state = live.close()
    assert state["done"] == 5 and state["samples"] == 96 and state["loss"] == 1.25
    assert state["samples_per_s"] == 64.0 and state["steps_per_s"] == 2.0 and state["eta_s"] == 2.5
    text = stream.getvalue()
    assert "train" in text and "5/10" in text and "loss=1.25" in text
    assert parse_progress_line(text.splitlines()[-1]) is None  # a bar, not log lines


def test_pipeline_writes_progress_json_and_log_lines(tmp_path, ray_session, capsys):
    from recaption.job.pipeline import run_pipeline

    write_webdataset_dir(tmp_path / "in", 6, shard_size=2)
    summary = run_pipeline(make_config(tmp_path / "in", tmp_path / "out"), progress=True)
    state = json.loads((tmp_path / "out" / PROGRESS_FILE).read_text())
    assert state["finished"] and (state["done"], state["total"]) == (3, 3)
    assert (state["rows"], state["ok"], state["tokens"]) == (6, 6, summary.tokens)
    lines = [parse_progress_line(line) for line in capsys.readouterr().err.splitlines()]
    final = [p for p in lines if p and p["event"] == "done"]
    assert len(final) == 1 and final[0]["rows"] == 6 and final[0]["done"] == 3
    # A run killed after its last commit left `finished: false`; the rerun finds nothing to do and says it is done.
    (tmp_path / "out" / PROGRESS_FILE).write_text(json.dumps(state | {"finished": False}))
    rerun = run_pipeline(make_config(tmp_path / "in", tmp_path / "out"), progress=True)
    assert (rerun.units_skipped, rerun.units_done) == (3, 0)
    state = json.loads((tmp_path / "out" / PROGRESS_FILE).read_text())
    assert state["finished"] and (state["done"], state["total"], state["rows"]) == (3, 3, 0)
    lines = [parse_progress_line(line) for line in capsys.readouterr().err.splitlines()]
    final = [p for p in lines if p and p["event"] == "done"]
    assert len(final) == 1 and (final[0]["done"], final[0]["total"], final[0]["rows"]) == (3, 3, 0)


def test_a_trainer_view_counts_samples_and_writes_lines_between_updates():
    import io

    from recaption.job.progress import Progress

    stream = io.StringIO()
    view = Progress.for_steps(4, stream=stream, tty=False, interval_s=0.0)
    for _ in range(4):
        view.advance(1, {"samples": 8}, loss=1.5)
    view.write("step 4  loss 1.5")
    view.close()
    assert view.snapshot()["samples"] == 32 and view.snapshot()["loss"] == 1.5
    assert "train" in stream.getvalue() and "done" in stream.getvalue()

"""Per-unit statistics (img2dataset's `status_dict` habit): each done marker counts rows by status and failed rows by
error kind; `_stats.json` holds the output's total; the run's summary, progress line and report use them."""

from __future__ import annotations

import io
import json

import pyarrow as pa

from recaption.cli import main
from recaption.errors import OTHER_KINDS, error_counts, merge_error_counts
from recaption.job.pipeline import run_pipeline
from recaption.job.progress import PROGRESS_FILE, Progress, parse_progress_line
from recaption.job.writer import OUTPUT_SCHEMA, STATS_FILE, open_output, output_totals, unit_stats
from recaption.outputs.report import build_report
from recaption.sources.tar import write_webdataset
from tests.data import image_corpus, make_image
from tests.job.test_pipeline import make_config


def test_error_counts_group_by_kind_and_keep_the_most_frequent():
    errors = ["truncated image: 3 bytes not processed", "truncated image: broken data stream", None,
              "model llava prompt short: RuntimeError: CUDA out of memory"]  # fmt: skip
    assert error_counts(errors) == {"truncated image": 2, "model llava: RuntimeError": 1, "unknown": 1}
    many = [f"kind{chr(97 + i)} broke" for i in range(6)] + ["kinda broke"] * 3
    kept = error_counts(many, most=2)
    assert kept == {"kinda broke": 4, "kindb broke": 1, OTHER_KINDS: 4} and sum(kept.values()) == len(many)
    assert merge_error_counts([kept, {OTHER_KINDS: 1, "kinda broke": 1}], most=2) == {
        "kinda broke": 5, "kindb broke": 1, OTHER_KINDS: 5,
    }  # fmt: skip


def test_a_marker_counts_failed_rows_by_kind_and_totals_add_markers_up():
    rows = [
        {"key": "a", "status": "ok", "error": None, "captions": [{"n_tokens": 7}]},
        {"key": "b", "status": "failed", "error": "decompression bomb: 10000x10000 = 1e+08 pixels", "captions": []},
        {"key": "c", "status": "failed", "error": "decompression bomb: 20000x9000 = 1.8e+08 pixels", "captions": []},
        {"key": "d", "status": "skipped", "error": "filtered: too small", "captions": []},
    ]
    table = pa.Table.from_pylist([{n: r.get(n) for n in OUTPUT_SCHEMA.names} | r for r in rows], schema=OUTPUT_SCHEMA)
    stats = unit_stats(table, 1.5, "h")
    assert (stats["rows"], stats["ok"], stats["failed"], stats["skipped"]) == (4, 1, 2, 1)
    assert stats["errors"] == {"decompression bomb": 2} and stats["tokens"] == 7  # skipped rows are not failures
    legacy = {"rows": 3, "ok": 2, "failed": 1, "skipped": 0, "tokens": 5, "seconds": 2.0}  # before error kinds
    totals = output_totals({"u1": stats, "u0": legacy})
    assert totals == {"units": 2, "rows": 7, "ok": 3, "failed": 3, "skipped": 1, "tokens": 12, "seconds": 3.5,
                      "errors": {"decompression bomb": 2, "(not counted)": 1}}  # fmt: skip


def test_the_progress_line_and_progress_json_show_error_kinds(tmp_path):
    stream = io.StringIO()
    live = Progress.for_units(2, output=open_output(str(tmp_path)), stream=stream, tty=False, interval_s=0)
    summary = {"unit": "a", "rows": 5, "ok": 2, "failed": 3, "skipped": 0, "tokens": 9, "error": None}
    live.unit_done(summary | {"error_kinds": json.dumps({"truncated image": 2, "model m: RuntimeError": 1})})
    live.unit_done(summary | {"unit": "b", "error_kinds": json.dumps({"model m: RuntimeError": 3})})
    live.close()
    lines = [parse_progress_line(line) for line in stream.getvalue().splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["failed"] == 6
    assert lines[-1]["error_kinds"] == "model_m_RuntimeError:4,truncated_image:2"
    assert lines[0]["error_kinds"] == "truncated_image:2,model_m_RuntimeError:1"
    state = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert state["error_kinds"] == {"model m: RuntimeError": 4, "truncated image": 2}
    bar = io.StringIO()
    with Progress.for_units(1, stream=bar, tty=True) as live:
        live.unit_done(summary | {"error_kinds": json.dumps({"truncated image": 3})})
    assert "top_error=truncated image (3)" in bar.getvalue()


def test_a_run_writes_error_kinds_in_markers_stats_json_summary_and_report(tmp_path, ray_session, capsys):
    bad = {key: (ext, data) for key, ext, data, err in image_corpus() if err}
    samples = [{"key": f"good{i}", "jpg": make_image(i)} for i in range(3)]
    samples += [{"key": key, ext: data} for key, (ext, data) in bad.items()]
    write_webdataset(str(tmp_path / "in"), samples, shard_size=5)
    cfg = make_config(tmp_path / "in", tmp_path / "out")
    summary = run_pipeline(cfg, progress=False)
    assert summary.failed == len(bad) and sum(summary.errors.values()) == len(bad)
    assert summary.errors["truncated image"] == 2 and summary.errors["decompression bomb"] == 1

    out = tmp_path / "out"
    markers = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    assert len(markers) == 2
    for marker in markers:
        assert sum(marker["errors"].values()) == marker["failed"] and marker["ok"] + marker["failed"] == marker["rows"]
    totals = json.loads((out / STATS_FILE).read_text())
    assert totals["units"] == 2 and totals["rows"] == len(samples) and totals["errors"] == summary.errors
    assert summary.totals == {k: v for k, v in totals.items() if k != "updated_at"}

    report = build_report(str(out))
    assert report["units"]["errors"] == summary.errors and report["units"]["rows"] == len(samples)
    worst = report["units"]["most_failed"]
    assert [u["failed"] for u in worst] == sorted((m["failed"] for m in markers), reverse=True)
    assert worst[0]["errors"] == max(markers, key=lambda m: m["failed"])["errors"]
    page = (out / "_report" / "index.html").read_text()
    assert "<h2>Units</h2>" in page and "unit with most failed rows" in page
    # The report reads the markers without writing the done manifest (a reader does not hold the output).
    manifest = out / "_manifest" / "done.recaption.json.gz"
    before = manifest.stat().st_mtime_ns
    (out / "_done" / f"{markers[0]['unit']}.recaption.json").touch()
    build_report(str(out))
    assert manifest.stat().st_mtime_ns == before

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(samples)} rows (3 ok, {len(bad)} failed, 0 skipped) in 2 done units" in printed
    assert "failed rows by error kind: truncated image 2," in printed

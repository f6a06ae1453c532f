"""What a finished run prints: output, units, rows, speed and the units that did not commit."""

from __future__ import annotations


def print_summary(s) -> None:
    print(f"output:   {s.output}")
    retried = f" ({s.units_retried} to retry failed rows)" if s.units_retried else ""
    print(f"units:    {s.units_done} run{retried}, {s.units_skipped} already done, {s.units_total} in total")
    print(f"rows:     {s.rows} ({s.ok} ok, {s.failed} failed, {s.skipped} skipped)")
    if s.errors:
        print(f"failed:   {format_kinds(s.errors)}")
    print(f"speed:    {s.images_per_s:.1f} images/s, {s.tokens} tokens in {s.seconds:.1f} s")
    t = s.totals
    if t and (s.units_skipped or s.units_retried):  # earlier runs wrote some units: the output's own totals
        print(f"total:    {t['units']} units, {t['rows']} rows ({t['ok']} ok, {t['failed']} failed, "
              f"{t['skipped']} skipped){'; failed: ' + format_kinds(t['errors']) if t['errors'] else ''}")  # fmt: skip
    for unit, error in s.unit_errors.items():
        print(f"unit {unit} not committed: {error} (rerun the same command to retry it)")


def format_kinds(kinds: dict[str, int], most: int = 5) -> str:
    """`truncated image 8, decompression bomb 4, … (3 more kinds)`: failed rows by error kind, most first."""
    items = list(kinds.items())
    text = ", ".join(f"{k} {n}" for k, n in items[:most])
    return text + (f", … ({len(items) - most} more kinds)" if len(items) > most else "")

"""`recaption report`: statistics of an output, streamed over its Parquet, as report.json, PNG plots and a page."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import re
import time
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recaption.errors import error_kind
from recaption.job import OutputDir, open_output
from recaption.outputs.reading import iter_batches, part_paths, run_metadata

REPORT_DIR = "_report"
NGRAMS = (1, 2, 3)
OPENING_WORDS = 3
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits, as WORD_RE2 (Arrow's regex engine) counts them
WORD_RE2 = r"[\pL\pN]+(?:'[\pL\pN]+)*"
_STOPWORDS = """a an the and or but of in on at to for from by with without into onto over under above below near behind
beside between is are was were be been being has have had do does did this that these those it its it's there here
their they them he she his her we you i as than then so such very also which who whom whose what where when while
can could may might will would should shows show showing image picture photo photograph depicts"""
STOPWORDS = frozenset(_STOPWORDS.split())


def words(text: str) -> list[str]:
    """Lower-cased words of a caption (letters and digits; inner apostrophes kept)."""
    return _WORD.findall(text.lower())


class DistinctCounter:
    """Distinct strings: exact up to `k` of them, then estimated from the k smallest hashes (KMV, error ~1/√k)."""

    def __init__(self, k: int = 16384) -> None:
        self.k, self.heap, self.members = k, [], set()

    def add(self, item: str) -> None:
        h = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")
        if h in self.members:
            return
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, -h)
            self.members.add(h)
        elif h < -self.heap[0]:
            self.members.discard(-heapq.heapreplace(self.heap, -h))
            self.members.add(h)

    @property
    def exact(self) -> bool:
        return len(self.heap) < self.k

    def count(self) -> int:
        return len(self.heap) if self.exact else round((self.k - 1) * 2**64 / -self.heap[0])


class TopCounter(Counter):
    """A Counter that keeps its memory bounded: past 2×`keep` keys it drops all but the `keep` most common."""

    def __init__(self, keep: int = 10000) -> None:
        super().__init__()
        self.keep = keep

    def add(self, item: str) -> None:
        self[item] += 1
        if len(self) > 2 * self.keep:
            kept = self.most_common(self.keep)
            self.clear()
            self.update(dict(kept))


def distribution(counts: Counter) -> dict[str, Any]:
    """Mean, quantiles and the histogram ([[value, count], …]) of integer values given as running counts."""
    n = sum(counts.values())
    if not n:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None, "hist": []}
    values = sorted(counts)
    cumulative = list(itertools.accumulate(counts[v] for v in values))

    def quantile(q: float) -> int:
        return values[next(i for i, c in enumerate(cumulative) if c >= q * n)]

    mean = sum(v * c for v, c in counts.items()) / n
    hist = [[v, counts[v]] for v in values]
    return {"n": n, "mean": round(mean, 4), "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99),
            "max": values[-1], "hist": hist}  # fmt: skip


class CaptionStats:
    """Running statistics of the captions of one (model, prompt)."""

    def __init__(self, model: str, prompt: str) -> None:
        self.model, self.prompt = model, prompt
        self.captions = self.errors = self.sampled = 0
        self.tokens, self.words, self.sub_captions = Counter(), Counter(), Counter()
        self.flags, self.finish = Counter(), Counter()
        self.ngrams = {n: DistinctCounter() for n in NGRAMS}
        self.ngram_totals = dict.fromkeys(NGRAMS, 0)
        self.openings = TopCounter()

    def add_text(self, ws: list[str]) -> None:
        """The words of one sampled caption: vocabulary, distinct n-grams, opening phrase."""
        self.sampled += 1
        for n in NGRAMS:
            grams = [" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)]
            for gram in set(grams):
                self.ngrams[n].add(gram)
            self.ngram_totals[n] += len(grams)
        if ws:
            self.openings.add(" ".join(ws[:OPENING_WORDS]))

    def summary(self) -> dict[str, Any]:
        openings = [
            {"phrase": p, "count": c, "share": round(c / self.sampled, 4)} for p, c in self.openings.most_common(10)
        ]
        return {
            "model": self.model,
            "prompt": self.prompt,
            "captions": self.captions,
            "error_captions": self.errors,
            "tokens": distribution(self.tokens),
            "words": distribution(self.words),
            "sub_captions": distribution(self.sub_captions),
            "flags": dict(self.flags.most_common()),
            "flag_share": {f: round(c / self.captions, 4) for f, c in self.flags.most_common()},
            "finish_reason": dict(self.finish.most_common()),
            "text_sampled": self.sampled,
            "vocab_size": self.ngrams[1].count(),
            "vocab_exact": self.ngrams[1].exact,
            **{
                f"distinct_{n}": round(self.ngrams[n].count() / t, 4) if t else None
                for n, t in self.ngram_totals.items()
            },
            "openings": openings,
            "top_opening_share": openings[0]["share"] if openings else 0.0,
        }


class OutputStats:
    """Running statistics of a whole output: statuses, error kinds, captions per (model, prompt), agreement.

    Counts and length histograms are computed per record batch with Arrow kernels; word-level statistics loop in
    Python over the rows whose key hashes below `text_rate` only."""

    def __init__(self, text_rate: float = 1.0) -> None:
        self.text_rate = text_rate
        self.rows, self.status = 0, Counter()
        self.error_kinds, self.error_examples = TopCounter(1000), {}
        self.captions: dict[tuple[str, str], CaptionStats] = {}
        self.agreement: dict[tuple[str, str, str], list[float]] = {}

    def stats(self, model: str, prompt: str) -> CaptionStats:
        return self.captions.setdefault((model, prompt), CaptionStats(model, prompt))

    def add_batch(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for item in pc.value_counts(batch.column("status")).to_pylist():
            self.status[item["values"]] += item["counts"]
        for error in batch.column("error").drop_null().to_pylist():
            kind = error_kind(error)
            self.error_kinds.add(kind)
            if len(self.error_examples) < 1000:
                self.error_examples.setdefault(kind, error)
        self._count_captions(pc.list_flatten(batch.column("captions")))
        sampled = [zlib.crc32(k.encode()) < self.text_rate * 2**32 for k in batch.column("key").to_pylist()]
        if any(sampled):
            for caps in batch.column("captions").filter(pa.array(sampled)).to_pylist():
                self._add_text(caps or [])

    def _count_captions(self, caps: pa.StructArray) -> None:
        flags = caps.field("flags")
        flag, parent = pc.list_flatten(flags), pc.list_parent_indices(flags)
        error = np.zeros(len(caps), dtype=bool)
        error[parent.filter(pc.equal(flag, "error")).to_numpy()] = True
        cols = {"model": caps.field("model"), "prompt": caps.field("prompt")}
        by_flag = pa.table({**{k: v.take(parent) for k, v in cols.items()}, "flag": flag})
        for r in _group_counts(by_flag, "flag"):
            self.stats(r["model"], r["prompt"]).flags[r["flag"]] += r["n"]
        finish = pc.fill_null(caps.field("finish_reason"), "none")
        for r in _group_counts(pa.table({**cols, "finish": finish, "error": error}), "finish", "error"):
            s = self.stats(r["model"], r["prompt"])
            s.captions += r["n"]
            s.errors += r["n"] if r["error"] else 0
            s.finish[r["finish"]] += r["n"]
        lengths = {
            "tokens": pc.fill_null(caps.field("n_tokens"), 0),
            "words": pc.count_substring_regex(pc.fill_null(caps.field("text"), ""), WORD_RE2),
            "sub_captions": pc.fill_null(pc.list_value_length(caps.field("sub_captions")), 0),
        }
        good = pa.table({**cols, **lengths}).filter(pa.array(~error))
        for name in lengths:
            for r in _group_counts(good, name):
                getattr(self.stats(r["model"], r["prompt"]), name)[r[name]] += r["n"]

    def _add_text(self, caps: list[dict]) -> None:
        by_prompt: dict[str, dict[str, set[str]]] = {}
        for cap in caps:
            if "error" in (cap["flags"] or []):
                continue
            ws = words(cap["text"] or "")
            self.stats(cap["model"], cap["prompt"]).add_text(ws)
            content = {w for w in ws if w not in STOPWORDS and not w.isdigit()}
            by_prompt.setdefault(cap["prompt"], {})[cap["model"]] = content
        for prompt, models in by_prompt.items():
            for a, b in itertools.combinations(sorted(models), 2):
                union = models[a] | models[b]
                if union:
                    acc = self.agreement.setdefault((a, b, prompt), [0.0, 0])
                    acc[0] += len(models[a] & models[b]) / len(union)
                    acc[1] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "status": {s: self.status.get(s, 0) for s in ("ok", "failed", "skipped")},
            "errors": [
                {"kind": k, "count": c, "example": self.error_examples.get(k)}
                for k, c in self.error_kinds.most_common()
            ],
            "captions": [self.captions[k].summary() for k in sorted(self.captions)],
            "agreement": [
                {"models": [a, b], "prompt": p, "mean_jaccard": round(s / n, 4), "images": n}
                for (a, b, p), (s, n) in sorted(self.agreement.items())
            ],
            "text_sample_rate": round(self.text_rate, 6),
        }


def _group_counts(table: pa.Table, *keys: str) -> list[dict]:
    """Rows of (model, prompt, *keys, n): how many rows of `table` have each combination."""
    counted = table.group_by(["model", "prompt", *keys]).aggregate([([], "count_all")])
    return counted.rename_columns([*(c if c != "count_all" else "n" for c in counted.column_names)]).to_pylist()


def collect(out: OutputDir, text_sample: int | None = 10_000) -> OutputStats:
    """Streams every row once; word-level statistics (vocabulary, n-grams, openings, agreement) use a sample of
    about `text_sample` rows chosen by a hash of the key (all rows when None or the output is smaller)."""
    total = 0
    for path in part_paths(out):
        with out.fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    stats = OutputStats(1.0 if not text_sample or total <= text_sample else text_sample / total)
    for batch in iter_batches(out, columns=["key", "status", "error", "captions"], batch_size=4096):
        stats.add_batch(batch)
    return stats


def engine_history(out: OutputDir) -> dict[str, Any]:
    """The last run's engine figures per model and their history, from `_progress.json` (none before a run)."""
    from recaption.job import PROGRESS_FILE

    try:
        progress = json.loads(out.read_bytes(out.path(PROGRESS_FILE)))
    except (OSError, ValueError):
        return {"engines": {}, "engine_history": []}
    return {"engines": progress.get("engines") or {}, "engine_history": progress.get("engine_history") or []}


def unit_statistics(out: OutputDir, most: int = 10) -> dict[str, Any]:
    """What the done markers say (read only: the output's manifest is read, never written): the output's totals
    (units, rows by status, failed rows by error kind), rows per unit, and the units with the most failed rows."""
    from recaption.job import DoneManifest, output_totals

    done = DoneManifest(out, read_only=True).refresh()
    worst = sorted((m for m in done.values() if m.get("failed")), key=lambda m: (-int(m["failed"]), str(m.get("unit"))))
    return {
        **output_totals(done),
        "rows_per_unit": distribution(Counter(int(m.get("rows") or 0) for m in done.values())),
        "most_failed": [
            {"unit": m.get("unit"), "rows": m.get("rows"), "failed": m["failed"], "errors": m.get("errors") or {}}
            for m in worst[:most]
        ],
    }


GALLERY = 24


def build_report(
    output: str,
    text_sample: int | None = 10_000,
    gallery: int = GALLERY,
    seed: int = 0,
    input_path: str | None = None,
) -> dict[str, Any]:
    """Writes `OUTPUT/_report/report.json`, its PNG plots and a self-contained `index.html`; returns the JSON. The
    page opens with a gallery of `gallery` rows sampled with `seed` (failed ones included), thumbnails made from the
    source (`input_path`: where its shards are now, if they moved since the run)."""
    from recaption.config import ImageConfig
    from recaption.outputs.gallery import card_json, gallery_cards, rows_of, sample_idents
    from recaption.outputs.report_page import render_page, render_plots

    out = open_output(output)
    meta = run_metadata(out)
    started = time.time()
    image_cfg = ImageConfig.model_validate((meta.get("config") or {}).get("images") or {})
    rows = rows_of(out, sample_idents(out, gallery, seed))
    cards, gallery_note = gallery_cards(out, rows, image_cfg, input_path, output)
    report = collect(out, text_sample).to_json()
    config = meta.get("config", {})
    report = {
        "output": output,
        "input": (config.get("input") or {}).get("path"),
        "config_hash": meta.get("config_hash"),
        "models": [m.get("name") or m.get("path") for m in config.get("models") or []],
        "prompts": meta.get("prompts", {}),
        "versions": meta.get("versions", {}),
        **report,
        "units": unit_statistics(out),
        **engine_history(out),
        "gallery": {"seed": seed, "note": gallery_note, "rows": [card_json(c) for c in cards]},
        "seconds": round(time.time() - started, 3),
    }
    dest = OutputDir(out.fs, out.path(REPORT_DIR))
    plots = render_plots(report)
    for name, png in plots.items():
        dest.write_atomic(dest.path(name), png)
    report["plots"] = sorted(plots)
    dest.write_json(dest.path("report.json"), report)
    dest.write_atomic(dest.path("index.html"), render_page(report, plots, cards).encode())
    return {**report, "page": dest.path("index.html")}

"""The report's page: PNG plots (matplotlib, no pyplot) and a self-contained HTML page of report.json."""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

HISTOGRAMS = {
    "tokens": "generated tokens per caption",
    "words": "words per caption",
    "sub_captions": "sub-captions per caption",
}


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNGs by file name (matplotlib, no pyplot: no global state, no display needed)."""
    series = [(f"{c['model']} / {c['prompt']}", c) for c in report["captions"]]
    kinds = {e["kind"]: e["count"] for e in report["errors"][:10]}
    panels = [("rows by status", report["status"])] + ([("failed rows by error kind", kinds)] if kinds else [])
    plots = {"status.png": _bars(panels)}
    for field, label in HISTOGRAMS.items():
        plots[f"{field}.png"] = _histograms([(n, c[field]["hist"]) for n, c in series], label)
    plots["flags.png"] = _grouped("share of captions with each flag", [(n, c["flag_share"]) for n, c in series])
    if report["agreement"]:
        plots["agreement.png"] = _agreement(report["agreement"])
    if report.get("engine_history"):
        plots["engines.png"] = _engines(report["engine_history"])
    return plots


ENGINE_PANELS = {
    "busy": "engine busy (batch-weighted time / wall time)",
    "out_tokens_per_s": "generated tokens/s",
    "in_flight": "requests in the engine",
    "waiting": "requests waiting, images decoded",
}


def _engines(history: list[dict[str, Any]]) -> bytes:
    """Each model's engine over the run (one point per committed unit): busy, tokens/s, in flight, waiting."""
    models = sorted({m for point in history for m in point if m != "t"})
    fig, axes = _figure(len(ENGINE_PANELS), 1.9)
    for ax, (field, title) in zip(axes, ENGINE_PANELS.items(), strict=True):
        ax.set_title(title, fontsize=10, loc="left")
        for model in models:
            points = [(p["t"], p[model][field]) for p in history if model in p and p[model].get(field) is not None]
            ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=model)
        if field == "busy":
            ax.set_ylim(0, 1.05)
    axes[-1].set_xlabel("seconds since the run started")
    axes[0].legend(fontsize=8)
    return _png(fig)


def _figure(rows: int, height: float = 2.6, width: float = 8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _bars(panels: list[tuple[str, dict[str, float]]]) -> bytes:
    fig, axes = _figure(len(panels), 2.2)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10, loc="left")
        if not any(values.values()):
            _nothing(ax, "none")
            continue
        ax.barh([_short(k) for k in values][::-1], list(values.values())[::-1], color="#4c72b0")
    return _png(fig)


def _grouped(title: str, series: list[tuple[str, dict[str, float]]]) -> bytes:
    import numpy as np

    keys = sorted({k for _, values in series for k in values})
    fig, (ax,) = _figure(1, max(2.2, 0.5 + 0.35 * len(keys) * max(1, len(series)) ** 0.5))
    ax.set_title(title, fontsize=10, loc="left")
    if not keys:
        _nothing(ax, "no caption was flagged")
        return _png(fig)
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.barh(np.arange(len(keys)) + i * height, [values.get(k, 0) for k in keys], height, label=name)
    ax.set_yticks(np.arange(len(keys)) + 0.4 - height / 2, keys)
    ax.xaxis.set_major_formatter("{x:.0%}")
    ax.legend(fontsize=8)
    return _png(fig)


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_axis_off()


def _histograms(series: list[tuple[str, list[list[int]]]], xlabel: str) -> bytes:
    import numpy as np

    fig, (ax,) = _figure(1, 3.2)
    top = max((h[-1][0] for _, h in series if h), default=0)
    low = max(0, min(min((h[0][0] for _, h in series if h), default=0), top - 4))  # ≥ 5 bins: integer ticks
    bins = np.arange(low - 0.5, top + 1.5) if top - low < 40 else np.linspace(low, top + 1, 41)
    for name, hist in series:
        if hist:
            counts, _ = np.histogram([v for v, _ in hist], bins=bins, weights=[c for _, c in hist])
            ax.stairs(counts, bins, label=name, linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("captions")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if series:
        ax.legend(fontsize=8)
    return _png(fig)


def _agreement(pairs: list[dict]) -> bytes:
    import numpy as np

    models = sorted({m for p in pairs for m in p["models"]})
    by_pair: dict[tuple[str, str], list[float]] = {}
    for p in pairs:  # one cell per pair of models: the mean over the prompts they share
        by_pair.setdefault(tuple(p["models"]), []).append(p["mean_jaccard"])
    matrix = np.eye(len(models))
    for (a, b), values in by_pair.items():
        i, j = models.index(a), models.index(b)
        matrix[i, j] = matrix[j, i] = sum(values) / len(values)
    fig, (ax,) = _figure(1, 1.5 + 0.6 * len(models), width=2.5 + 0.8 * len(models))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title("agreement: mean Jaccard of content words", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _png(fig)


CAPTION_COLUMNS = {
    "model": "model",
    "prompt": "prompt",
    "captions": "captions",
    "errors": "error_captions",
    "tokens mean": "tokens.mean",
    "p50": "tokens.p50",
    "p90": "tokens.p90",
    "max": "tokens.max",
    "words mean": "words.mean",
    "sub-captions mean": "sub_captions.mean",
    "vocabulary": "vocab_size",
    "distinct-2": "distinct_2",
    "distinct-3": "distinct_3",
    "top opening share": "top_opening_share",
}
STYLE = (
    "body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}div.t{overflow-x:auto}"
    "table{border-collapse:collapse;margin:1em 0;font-size:12px}td,th{border:1px solid #ccc;padding:3px 5px;"
    "text-align:left;vertical-align:top}th{background:#eef}"
    "img{max-width:100%;display:block;margin:1em 0}.big{font-size:18px}.small{color:#777}"
)


def render_page(report: dict[str, Any], plots: dict[str, bytes], cards: list[dict] | None = None) -> str:
    """A self-contained HTML page: the gallery (`cards`, thumbnails inlined), the tables of report.json and the plots
    inlined as data URIs."""
    from recaption.outputs.gallery import STYLE as GALLERY_STYLE

    caps, status = report["captions"], report["status"]
    flags = [", ".join(f"{f} {v:.1%}" for f, v in c["flag_share"].items()) for c in caps]
    parts = [
        f"<h1>recaption report</h1><p>output <code>{escape(report['output'])}</code> · input "
        f"<code>{escape(str(report['input']))}</code> · config {escape(str(report['config_hash']))} · "
        f"models {escape(', '.join(report['models']))}</p>",
        *_gallery_section(report, cards or []),
        f"<h2>Rows</h2><p class=big>{report['rows']} rows: {status['ok']} ok, {status['failed']} failed, "
        f"{status['skipped']} skipped</p>",
        _table(["error kind", "rows", "example"], [[e["kind"], e["count"], e["example"]] for e in report["errors"]])
        if report["errors"]
        else "<p>No failed rows.</p>",
        _img(plots, "status.png"),
        *_unit_section(report),
        "<h2>Captions per model and prompt</h2>",
        _table(
            [*CAPTION_COLUMNS, "flags"],
            [[_get(c, path) for path in CAPTION_COLUMNS.values()] + [f] for c, f in zip(caps, flags, strict=True)],
        ),
        *(_img(plots, f"{name}.png") for name in ("tokens", "words", "sub_captions", "flags")),
        "<h2>Most frequent openings</h2><p>A few openings covering most captions are a sign of templated text.</p>",
        _table(
            ["model / prompt", "opening", "captions", "share"],
            [
                [f"{c['model']} / {c['prompt']}", o["phrase"], o["count"], f"{o['share']:.1%}"]
                for c in caps
                for o in c["openings"][:5]
            ],
        ),  # fmt: skip
        "<h2>Agreement between models</h2>",
        _table(
            ["models", "prompt", "mean Jaccard of content words", "images"],
            [[" vs ".join(a["models"]), a["prompt"], a["mean_jaccard"], a["images"]] for a in report["agreement"]],
        )
        if report["agreement"]
        else "<p>One model only: nothing to compare.</p>",
        _img(plots, "agreement.png"),
        *_engine_section(report, plots),
        "<h2>Prompts</h2>" + _table(["prompt", "text"], [[k, v] for k, v in report["prompts"].items()]),
        f"<p class=small>word statistics on {report['text_sample_rate']:.1%} of rows · versions "
        f"{escape(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}</p>",
    ]
    head = f"<meta charset=utf-8><title>recaption report</title><style>{STYLE}{GALLERY_STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{chr(10).join(parts)}</body></html>"


def _gallery_section(report: dict[str, Any], cards: list[dict]) -> list[str]:
    from recaption.outputs.gallery import render_gallery

    if not cards:
        return []
    info = report.get("gallery") or {}
    failed = sum(c["status"] == "failed" for c in cards)
    text = (f"{len(cards)} rows sampled (seed {info.get('seed', 0)}; {failed} failed), thumbnails made from the "
            "source; every model's caption side by side, one row per prompt.")  # fmt: skip
    note = f"<p class=small>{escape(info['note'])}</p>" if info.get("note") else ""
    return ["<h2>Gallery</h2>", note, render_gallery(cards, text)]


def _unit_section(report: dict[str, Any]) -> list[str]:
    """The done markers' view: units, rows per unit, failed rows by kind, the units with the most failed rows."""
    units = report.get("units")
    if not units or not units["units"]:
        return []
    per_unit = units["rows_per_unit"]
    kinds = "; ".join(f"{k} {n}" for k, n in units["errors"].items()) or "none"
    parts = [
        f"<h2>Units</h2><p>{units['units']} units done, {units['rows']} rows ({units['ok']} ok, {units['failed']} "
        f"failed, {units['skipped']} skipped) · rows per unit: median {per_unit['p50']}, max {per_unit['max']} · "
        f"failed rows by error kind: {escape(kinds)}</p>"
    ]
    if units["most_failed"]:
        rows = [
            [u["unit"], u["rows"], u["failed"], "; ".join(f"{k} {n}" for k, n in u["errors"].items())]
            for u in units["most_failed"]
        ]
        parts.append(_table(["unit with most failed rows", "rows", "failed", "error kinds"], rows))
    return parts


def _engine_section(report: dict[str, Any], plots: dict[str, bytes]) -> list[str]:
    engines = report.get("engines") or {}
    if not engines:
        return []
    rows = [
        [m, e["actors"], f"{e['busy']:.0%}", e["in_flight"], e["waiting"], e["out_tokens_per_s"],
         "-" if e.get("cache_hit") is None else f"{e['cache_hit']:.0%}"]
        for m, e in engines.items()
    ]  # fmt: skip
    head = ["model", "actors", "busy", "in flight", "waiting", "tokens/s", "prefix-cache hits"]
    return ["<h2>Engines (last run)</h2>", _table(head, rows), _img(plots, "engines.png")]


def _img(plots: dict[str, bytes], name: str) -> str:
    data = plots.get(name)
    return f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>" if data else ""


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class=t><table><tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr>{cells}</table></div>"


def _get(obj: dict, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part]
    return obj


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

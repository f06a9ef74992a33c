"""A static, self-contained HTML report of a universality run: the paired-feature browser.

``write_report(workdir)`` reads what the pipeline wrote (``results.json``, ``plots/*.png``,
``features/<comparison>.json`` and the per-feature export ``features/<comparison>/<side>/
batch-<k>.json``) and writes ``workdir/report/``:

* ``index.html``: one page, inline CSS and JS, no server, no network, no CDN; opens from disk
  (``file://``). Overview: per comparison and metric the score, null mean and spread, excess,
  p, z, n/d; floor -> cross -> ceiling; the filter funnel; the run's plots; layer-grid
  heatmaps with significant cells marked. Pairs: a sortable, searchable, paged table of the
  kept pairs (activation correlation, decoder cosine when both SAEs have one width, densities,
  importance when the feature tables carry an ``importance`` field, same-top-token flag);
  clicking a pair shows both features side by side (top-activating contexts with each token's
  activation and the top token outlined, activation histograms, top promoted / suppressed
  tokens when the run had an unembedding). Features: every feature of either side with its
  status and the reason it was dropped.
* ``data/comp-<i>.js``: the pair and feature tables of comparison ``i`` (loaded when that
  comparison is first shown); ``data/comp-<i>-<side>-<k>.js``: the per-feature pages of
  features ``[k * per_batch, (k + 1) * per_batch)`` (loaded when one of them is opened). Data
  files are JavaScript (``SAEU.put(key, {...})``; a page batch is the export's batch file
  wrapped as is) because browsers refuse to fetch JSON from
  ``file://``; lazy loading keeps a 32k-feature run's page fast to open.
* ``plots/``: copies of the run's PNGs (the report folder can be moved or zipped alone).

The per-feature export the pipeline writes (`experiments.pipeline.feature_pages`) follows the
layout of SAEDashboard's ``NeuronpediaRunner`` ``batch-<k>.json`` files, the files Neuronpedia
feature pages are imported from (keys ``feature_index``, ``activations[{tokens, values,
qualifying_token_index}]``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values``,
``freq_hist_data_bar_heights``/``freq_hist_data_bar_values``,
``logits_hist_data_bar_heights``/``logits_hist_data_bar_values``, ``frac_nonzero``,
``maxActApprox``; project fields under ``universality``).

Rebuild from an existing workdir::

    python -m experiments.report --workdir=runs/universality/toy
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

from engine import metrics_io
from experiments.pipeline.results import (
    HEAD_KEYS,
    KeptPairs,
    MetricResult,
    ResultsError,
    RunResults,
)

ALPHA = 0.01
HERE = os.path.dirname(os.path.abspath(__file__))


class ReportError(ValueError):
    """The workdir lacks what the report needs (one line)."""


def _js_value(obj) -> str:
    """JSON text usable as a JS literal inside ``<script>`` (NaN / Infinity allowed)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=True, ensure_ascii=False)
    # A "</script>" inside a string would end the inline script early.
    return text.replace("</", "<\\/")


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _metric_summary(metrics: Mapping[str, MetricResult] | None) -> dict:
    """What the page shows of each metric (no null values: the page stays small)."""
    out = {}
    for name, r in (metrics or {}).items():
        row = {
            "score": r.score,
            "null_mean": r.null_mean,
            "null_std": r.null_std,
            "excess": r.excess,
            "p": r.p,
            "z": r.z,
            "n_over_d": r.n_over_d,
            "components": None if r.components is None else list(r.components),
        }
        # Sizes come from the metric's own result (`engine.similarity.evaluate`).
        row.update({k: r.details[k] for k in ("n", "rows", "d") if k in r.details})
        out[name] = row
    return out


def _overview(results: RunResults, plots: list[str]) -> dict:
    comps = []
    for i, c in enumerate(results.comparisons):
        pairing = c.pairing.to_json()
        del pairing["best_corr_ab"]  # a per-feature list: the data files carry those
        comps.append(
            {
                "id": i,
                "name": c.name,
                "kind": c.kind,
                "label": c.label,
                "hookpoint_a": c.labels.hookpoint_a,
                "hookpoint_b": c.labels.hookpoint_b,
                "n_features": {"a": c.n_features[0], "b": c.n_features[1]},
                "tokens": c.tokens,
                "n_pairs": c.n_pairs,
                "filters": c.filters.to_json(),
                "pairing": pairing,
                "metrics": _metric_summary(c.metrics),
                "metrics_before_threshold": _metric_summary(c.metrics_before_threshold),
                "n_pairs_before_threshold": c.n_pairs_before_threshold,
                "metrics_skipped": dict(c.metrics_skipped),
                "note": c.note,
                "truth": None if c.truth is None else c.truth.to_json(),
                "fraction_same_top_token": c.fraction_same_top_token,
                "verdict": results.summary[i] if i < len(results.summary) else None,
            }
        )
    head = {**dict.fromkeys(HEAD_KEYS), **results.head()}
    return _clean(
        {
            "head": head,
            "comparisons": comps,
            "alpha": ALPHA,
            "reference_points": {m: e.to_json() for m, e in results.reference_points.items()},
            "grid": None if results.grid is None else results.grid.to_json(),
            "plots": plots,
        }
    )


def _columns(rows: list[dict], keys: dict) -> dict:
    return {out: [r.get(k) for r in rows] for out, k in keys.items()}


def _comparison_data(pairs: KeptPairs, table: dict | None) -> dict:
    """The pair and feature tables of one comparison (its kept pairs, its feature table)."""
    data = {
        "pairs": {
            "a": list(pairs.a),
            "b": list(pairs.b),
            "value": list(pairs.value),
            "dcos": None if pairs.decoder_cos is None else list(pairs.decoder_cos),
        },
        "features": {},
        "has_pages": {},
    }
    for side in "ab":
        rows = (table or {}).get(side) or []
        cols = _columns(
            rows,
            {
                "density": "density",
                "max": "max",
                "status": "status",
                "drop": "drop",
                "reason": "reason",
                "partner": "partner",
                "partner_value": "partner_value",
                "importance": "importance",
            },
        )
        cols["top"] = [r.get("top_tokens") or [] for r in rows]
        if not any(v is not None for v in cols["importance"]):
            cols["importance"] = None
        data["features"][side] = cols
    return _clean(data)


def _load(path: str):
    return metrics_io.read_json(path)


def _write_js(path: str, key: str, obj) -> None:
    metrics_io.write_text(path, f"SAEU.put({json.dumps(key)},{_js_value(obj)});\n")


def write_report(workdir: str, out_dir: str | None = None) -> str:
    """Writes ``out_dir`` (default ``workdir/report``) and returns the path of index.html."""
    results_path = os.path.join(workdir, "results.json")
    if not metrics_io.exists(results_path):
        raise ReportError(
            f"--workdir={workdir}: no results.json (run the universality pipeline there first)"
        )
    try:
        results = RunResults.load(results_path)
    except ResultsError as e:
        raise ReportError(str(e)) from None
    out_dir = out_dir or os.path.join(workdir, "report")
    data_dir = os.path.join(out_dir, "data")
    # Every file goes through the run-directory file API: a gs:// workdir is written in place.
    data = metrics_io.epath_of(data_dir)
    if data.is_dir():
        data.rmtree()
    metrics_io.makedirs(data_dir)
    plots = []
    src_plots = sorted(metrics_io.epath_of(workdir).glob("plots/*.png"), key=lambda p: p.name)
    for p in src_plots:
        metrics_io.write_bytes(os.path.join(out_dir, "plots", p.name), p.read_bytes())
        plots.append("plots/" + p.name)
    overview = _overview(results, plots)
    for i, comp in enumerate(results.comparisons):
        name = comp.name
        table_path = os.path.join(workdir, "features", f"{name}.json")
        table = _load(table_path) if metrics_io.exists(table_path) else None
        data = _comparison_data(comp.pairs, table)
        for side in "ab":
            index_path = os.path.join(workdir, "features", name, side, "index.json")
            if not metrics_io.exists(index_path):
                data["has_pages"][side] = None
                continue
            index = _load(index_path)
            data["has_pages"][side] = {
                "per_batch": index["per_batch"],
                "n_batches": len(index["batches"]),
            }
            for b in index["batches"]:
                # The export file is JSON, hence a JS literal: wrap its text unparsed (fast
                # for 32k-feature runs). Only "</" needs no escaping: this is no inline script.
                key = f"comp-{i}-{side}-{b['batch']}"
                text = metrics_io.read_text(os.path.join(os.path.dirname(index_path), b["file"]))
                metrics_io.write_text(
                    os.path.join(data_dir, f"{key}.js"), f"SAEU.put({json.dumps(key)},{text});\n"
                )
        _write_js(os.path.join(data_dir, f"comp-{i}.js"), f"comp-{i}", data)
        overview["comparisons"][i]["has_pages"] = data["has_pages"]
        overview["comparisons"][i]["has_table"] = table is not None
    with open(os.path.join(HERE, "html_report_assets", "report.js"), encoding="utf-8") as fh:
        script = fh.read()
    with open(os.path.join(HERE, "html_report_assets", "report.css"), encoding="utf-8") as fh:
        style = fh.read()
    title = "universality report: " + metrics_io.epath_of(workdir).name
    html = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_escape(title)}</title>\n<style>\n{style}\n</style></head>\n<body>\n"
        f"{_BODY.replace('@TITLE@', _escape(title))}\n"
        f"<script>\nvar SAEU_OVERVIEW = {_js_value(overview)};\n</script>\n"
        f"<script>\n{script}\n</script>\n</body></html>\n"
    )
    path = os.path.join(out_dir, "index.html")
    metrics_io.write_text(path, html)
    return path


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_BODY = """<header><h1>@TITLE@</h1><div id="run-head"></div>
<nav><button class="tab active" data-tab="overview" id="tab-overview">Overview</button>
<button class="tab" data-tab="pairs" id="tab-pairs">Pairs</button>
<button class="tab" data-tab="features" id="tab-features">Features</button></nav></header>
<main>
<section id="overview" class="panel active"></section>
<section id="pairs" class="panel">
 <div class="controls">comparison <select id="pairs-comp"></select>
  <input id="pairs-search" type="search" placeholder="search: feature id (A#3, B#7) or token">
  <span id="pairs-count"></span>
  <button id="pairs-prev">&larr;</button><span id="pairs-page"></span>
  <button id="pairs-next">&rarr;</button></div>
 <div class="note" id="pairs-note"></div>
 <table id="pairs-table" class="grid-table"><thead></thead><tbody></tbody></table>
 <div id="pair-detail" class="detail"></div>
</section>
<section id="features" class="panel">
 <div class="controls">comparison <select id="feat-comp"></select>
  side <select id="feat-side"><option value="a">A</option><option value="b">B</option></select>
  status <select id="feat-status"></select>
  <input id="feat-search" type="search" placeholder="search: feature id, token or reason">
  <span id="feat-count"></span>
  <button id="feat-prev">&larr;</button><span id="feat-page"></span>
  <button id="feat-next">&rarr;</button></div>
 <table id="feat-table" class="grid-table"><thead></thead><tbody></tbody></table>
 <div id="feat-detail" class="detail"></div>
</section>
</main>"""

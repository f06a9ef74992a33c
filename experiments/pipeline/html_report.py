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

import glob
import json
import math
import os
import shutil

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


def _metric_summary(metrics: dict) -> dict:
    keep = ("score", "null_mean", "null_std", "excess", "p", "z", "n_over_d", "components",
            "n", "rows", "d")
    return {m: {k: r.get(k) for k in keep if k in r} for m, r in (metrics or {}).items()}


def _overview(results: dict, plots: list[str]) -> dict:
    comps, summary = [], results.get("summary") or []
    for i, c in enumerate(results.get("comparisons", [])):
        comps.append({
            "id": i, "name": c.get("name"), "kind": c.get("kind"), "label": c.get("label"),
            "hookpoint_a": c.get("hookpoint_a"), "hookpoint_b": c.get("hookpoint_b"),
            "n_features": c.get("n_features"), "tokens": c.get("tokens"),
            "n_pairs": c.get("n_pairs"), "filters": c.get("filters", {}),
            "pairing": {k: v for k, v in c.get("pairing", {}).items()
                        if not isinstance(v, list)},
            "metrics": _metric_summary(c.get("metrics")),
            "metrics_before_threshold": _metric_summary(c.get("metrics_before_threshold")),
            "n_pairs_before_threshold": c.get("n_pairs_before_threshold"),
            "metrics_skipped": c.get("metrics_skipped", {}), "note": c.get("note"),
            "truth": c.get("truth"), "fraction_same_top_token": c.get("fraction_same_top_token"),
            "verdict": summary[i] if i < len(summary) else None})
    head = {k: results.get(k) for k in ("preset", "models", "hookpoints", "tokens", "contexts",
                                         "text", "data", "toy", "versions", "config")}
    return _clean({"head": head, "comparisons": comps, "alpha": ALPHA,
                   "reference_points": results.get("reference_points", {}),
                   "grid": results.get("grid"), "plots": plots})


def _columns(rows: list[dict], keys: dict) -> dict:
    return {out: [r.get(k) for r in rows] for out, k in keys.items()}


def _comparison_data(comp: dict, table: dict | None) -> dict:
    pairs = comp.get("pairs", {})
    data = {"pairs": {"a": pairs.get("a", []), "b": pairs.get("b", []),
                      "value": pairs.get("value", []),
                      "dcos": pairs.get("decoder_cos")},
            "features": {}, "has_pages": {}}
    for side in "ab":
        rows = (table or {}).get(side) or []
        cols = _columns(rows, {"density": "density", "max": "max", "status": "status",
                               "drop": "drop", "reason": "reason", "partner": "partner",
                               "partner_value": "partner_value", "importance": "importance"})
        cols["top"] = [r.get("top_tokens") or [] for r in rows]
        if not any(v is not None for v in cols["importance"]):
            cols["importance"] = None
        data["features"][side] = cols
    return _clean(data)


def _load(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_js(path: str, key: str, obj) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(f"SAEU.put({json.dumps(key)},{_js_value(obj)});\n")
    os.replace(path + ".tmp", path)


def write_report(workdir: str, out_dir: str | None = None) -> str:
    """Writes ``out_dir`` (default ``workdir/report``) and returns the path of index.html."""
    results_path = os.path.join(workdir, "results.json")
    if not os.path.exists(results_path):
        raise ReportError(f"--workdir={workdir}: no results.json (run the universality "
                          "pipeline there first)")
    results = _load(results_path)
    if not isinstance(results.get("comparisons"), list):
        raise ReportError(f"{results_path}: no 'comparisons' list; not a universality run")
    out_dir = out_dir or os.path.join(workdir, "report")
    data_dir = os.path.join(out_dir, "data")
    if os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
    os.makedirs(data_dir)
    plots = []
    src_plots = sorted(glob.glob(os.path.join(workdir, "plots", "*.png")))
    if src_plots:
        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for p in src_plots:
        shutil.copyfile(p, os.path.join(out_dir, "plots", os.path.basename(p)))
        plots.append("plots/" + os.path.basename(p))
    overview = _overview(results, plots)
    for i, comp in enumerate(results["comparisons"]):
        name = comp.get("name", str(i))
        table_path = os.path.join(workdir, "features", f"{name}.json")
        table = _load(table_path) if os.path.exists(table_path) else None
        data = _comparison_data(comp, table)
        for side in "ab":
            index_path = os.path.join(workdir, "features", name, side, "index.json")
            if not os.path.exists(index_path):
                data["has_pages"][side] = None
                continue
            index = _load(index_path)
            data["has_pages"][side] = {"per_batch": index["per_batch"],
                                       "n_batches": len(index["batches"])}
            for b in index["batches"]:
                # The export file is JSON, hence a JS literal: wrap its text unparsed (fast
                # for 32k-feature runs). Only "</" needs no escaping: this is no inline script.
                key = f"comp-{i}-{side}-{b['batch']}"
                with open(os.path.join(os.path.dirname(index_path), b["file"]),
                          encoding="utf-8") as fh:
                    text = fh.read()
                out = os.path.join(data_dir, f"{key}.js")
                with open(out + ".tmp", "w", encoding="utf-8") as fh:
                    fh.write(f"SAEU.put({json.dumps(key)},{text});\n")
                os.replace(out + ".tmp", out)
        _write_js(os.path.join(data_dir, f"comp-{i}.js"), f"comp-{i}", data)
        overview["comparisons"][i]["has_pages"] = data["has_pages"]
        overview["comparisons"][i]["has_table"] = table is not None
    with open(os.path.join(HERE, "html_report_assets", "report.js"), encoding="utf-8") as fh:
        script = fh.read()
    with open(os.path.join(HERE, "html_report_assets", "report.css"), encoding="utf-8") as fh:
        style = fh.read()
    title = "universality report: " + os.path.basename(os.path.abspath(workdir))
    html = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_escape(title)}</title>\n<style>\n{style}\n</style></head>\n<body>\n"
            f"{_BODY.replace('@TITLE@', _escape(title))}\n"
            f"<script>\nvar SAEU_OVERVIEW = {_js_value(overview)};\n</script>\n"
            f"<script>\n{script}\n</script>\n</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(html)
    os.replace(path + ".tmp", path)
    return path


def _escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


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

"""Summary table and plots of a universality run (pure formatting: no computation).

Inputs are the JSON-ready dicts the pipeline writes to ``results.json``:
a comparison is ``{"name", "n_pairs", "filters": {...}, "pairing": {...},
"metrics": {metric: {"score", "null_mean", "null_std", "p", "z", "excess", ...}}}``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

ALPHA = 0.01


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def verdict(comparison: dict, alpha: float = ALPHA) -> str:
    """One sentence saying whether the comparison shows shared structure."""
    name = comparison["name"]
    metrics = comparison.get("metrics", {})
    if not metrics:
        before = comparison.get("metrics_before_threshold", {})
        sig = [m for m, r in before.items() if r["p"] < alpha and r["excess"] > 0]
        what = (f"no pair passed the correlation threshold ({comparison.get('n_pairs', 0)} "
                f"pairs): no shared features")
        if before:
            what += (f"; before the threshold {len(sig)} of {len(before)} metrics are "
                     f"significant at p < {alpha}")
        return f"{name}: {what}."
    flagged = [m for m, r in metrics.items() if r.get("informative") is False]
    metrics = {m: r for m, r in metrics.items() if m not in flagged}
    tail = (f" ({', '.join(flagged)}: uninformative, too few pairs for the components kept)"
            if flagged else "")
    if not metrics:
        return f"{name}: every metric is uninformative{tail}."
    return _verdict_of(name, metrics, alpha)[:-1] + tail + "."


def _verdict_of(name: str, metrics: dict, alpha: float) -> str:
    sig = [m for m, r in metrics.items() if r["p"] < alpha and r["excess"] > 0]
    n = len(metrics)
    if len(sig) == n:
        return (f"{name}: every metric ({n}) is above its random-pairing null at p < {alpha}: "
                f"the paired features share geometry.")
    if not sig:
        return (f"{name}: no metric is significant at p < {alpha}: no evidence of shared "
                f"feature geometry beyond chance.")
    return (f"{name}: {len(sig)} of {n} metrics significant at p < {alpha} "
            f"({', '.join(sig)}); mixed evidence.")


def _metric_rows(metrics: dict) -> list[str]:
    lines = [f"   {'metric':<13}{'score':>8}{'null':>8}{'± std':>8}{'excess':>8}{'z':>7}"
             f"{'p':>8}  {'kept':<9}{'n/d':>5}"]
    for name, r in metrics.items():
        kept = r.get("components")
        kept = "" if kept is None else "/".join(str(k) for k in np.ravel(kept))
        nd = r.get("n_over_d")
        nd = f"{nd:.1f}" if isinstance(nd, (int, float)) else ""
        z = "-" if r.get("z") is None else f"{r['z']:.1f}"
        flag = "  UNINFORMATIVE (too few pairs)" if r.get("informative") is False else ""
        lines.append(f"   {name:<13}{r['score']:>8.3f}{r['null_mean']:>8.3f}"
                     f"{r['null_std']:>8.3f}{r['excess']:>8.3f}{z:>7}{r['p']:>8.4f}  "
                     f"{kept:<9}{nd:>5}{flag}")
    return lines


def summary_table(comparisons: Sequence[dict]) -> str:
    """A terminal table: one block per comparison, one row per metric."""
    lines = []
    for comp in comparisons:
        head = f"== {comp['name']}: {comp.get('label', '')}  ({comp.get('n_pairs', 0)} pairs"
        pairing = comp.get("pairing", {})
        if "mean_best_corr_ab" in pairing:
            head += f", mean best corr A->B {pairing['mean_best_corr_ab']:.3f}"
        truth = comp.get("truth")
        if truth and truth.get("n_true_pairs"):
            head += (f", true pairs recovered "
                     f"{truth['fraction_true_pairs_recovered']:.0%}")
        lines.append(head + ")")
        filters = comp.get("filters")
        if filters:
            lines.append("   filters: " + " -> ".join(f"{k} {v}" for k, v in filters.items()))
        same = comp.get("same_index")
        if same and same.get("above_chance"):
            lines.append(f"   WARNING: {same['fraction']:.0%} of the kept pairs have the same "
                         f"feature index on both sides (chance {same['chance_fraction']:.2%}, "
                         f"p={same['p_value']:.2g}): shared seed or data order?")
        if comp.get("metrics"):
            lines.extend(_metric_rows(comp["metrics"]))
        elif comp.get("metrics_before_threshold"):
            lines.append(f"   {comp.get('note', '')}; metrics on the "
                         f"{comp['n_pairs_before_threshold']} pairs before the threshold:")
            lines.extend(_metric_rows(comp["metrics_before_threshold"]))
        for metric, why in comp.get("metrics_skipped", {}).items():
            lines.append(f"   {metric}: skipped ({why})")
        lines.append("   " + verdict(comp))
    return "\n".join(lines)


def plot_nulls(comparison: dict, path: str) -> None:
    """Histogram of each metric's null distribution with the observed score."""
    metrics = {k: v for k, v in comparison.get("metrics", {}).items() if "null" in v}
    if not metrics:
        return
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, metrics.items()):
        ax.hist(r["null"], bins=40, color="0.7", label="shuffled pairs")
        ax.axvline(r["score"], color="C3", lw=2, label=f"paired {r['score']:.3f}")
        z = "-" if r.get("z") is None else f"{r['z']:.1f}"
        flag = " UNINFORMATIVE" if r.get("informative") is False else ""
        ax.set_title(f"{name}: p={r['p']:.3g}, z={z}{flag}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{comparison['name']}: score vs random-pairing null", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matched_correlations(comparisons: Sequence[dict], path: str) -> None:
    """Histogram of each feature's best activation correlation, per comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for comp in comparisons:
        vals = comp.get("pairing", {}).get("best_corr_ab")
        if vals:
            ax.hist(vals, bins=40, range=(-0.2, 1.0), histtype="step", lw=1.5,
                    label=comp["name"])
    ax.set_xlabel("best activation correlation (A feature -> any B feature)")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reference_bars(comparisons: Sequence[dict], path: str) -> None:
    """Excess over the null per metric for every comparison (floor / score / ceiling)."""
    names = [c["name"] for c in comparisons if c.get("metrics")]
    if not names:
        return
    metrics = sorted({m for c in comparisons for m in c.get("metrics", {})})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(metrics) * len(names) + 2), 3.6))
    width = 0.8 / len(names)
    for i, comp in enumerate(c for c in comparisons if c.get("metrics")):
        ys = [comp["metrics"].get(m, {}).get("excess", np.nan) for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, ys, width, label=comp["name"])
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels(metrics)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("score - null mean")
    ax.set_title("excess over the random-pairing null (floor, comparisons, ceiling)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_heatmaps(grid: dict, plots_dir: str) -> list[str]:
    """One annotated heatmap per metric: rows = layers of A, columns = layers of B.

    ``grid = {"layers_a": [...], "layers_b": [...], "cells": {metric: [[value]]}}`` where
    value is the excess over the null (NaN when the cell had too few pairs).
    """
    plt = _plt()
    paths = []
    for metric, values in grid["cells"].items():
        v = np.asarray(values, dtype=float)
        fig, ax = plt.subplots(figsize=(2.5 + 1.0 * v.shape[1], 2.0 + 0.8 * v.shape[0]))
        im = ax.imshow(v, cmap="viridis", aspect="auto")
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(j, i, "-" if np.isnan(v[i, j]) else f"{v[i, j]:.2f}", ha="center",
                        va="center", color="w", fontsize=8)
        ax.set_xticks(range(v.shape[1]))
        ax.set_xticklabels(grid["layers_b"], rotation=45, fontsize=8)
        ax.set_yticks(range(v.shape[0]))
        ax.set_yticklabels(grid["layers_a"], fontsize=8)
        ax.set_xlabel("model B hookpoint")
        ax.set_ylabel("model A hookpoint")
        ax.set_title(f"{metric}: excess over null", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"layers_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_replicates(cell: dict, path: str) -> bool:
    """Cross-model vs within-side (seed) distributions of one cell, one panel per metric.

    ``cell`` is one entry of ``results["cells"]`` (`experiments.pipeline.references`). Drawn
    only when the cross scores form a distribution (``--replicates`` >= 2).
    """
    metrics = {m: e for m, e in cell["metrics"].items()
               if e["cross_distribution"]["n"] >= 2}
    if not metrics:
        return False
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (name, e) in zip(axes.flat, metrics.items()):
        groups = [("cross", e["cross_distribution"]["values"], "C0"),
                  ("within", (e.get("within_distribution") or {}).get("values", []), "C2")]
        for x, (_label, vals, color) in enumerate(groups):
            if not vals:
                continue
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color=color,
                       alpha=0.8)
            ax.errorbar(x + 0.25, np.mean(vals), yerr=np.std(vals), fmt="o", color="k",
                        capsize=3)
        if e.get("floor_excess") is not None:
            ax.axhline(e["floor_excess"], color="C3", ls="--", lw=1, label="floor")
            ax.legend(fontsize=7)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["cross", "within (seed)"])
        p = (e.get("test_cross_below_within") or {}).get("mann_whitney_p")
        ax.set_title(f"{name}" + (f": p(cross<within)={p:.3g}" if p is not None else ""),
                     fontsize=9)
        ax.set_ylabel("excess over null", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{cell['cell']} {cell.get('condition', '')}: replicates", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(cells: Sequence[dict], path: str) -> bool:
    """Score vs sweep condition, one panel per metric: cross mean ± std with the condition's
    own ceiling and floor (excess over each comparison's own null)."""
    by_cell: dict = {}
    for g in cells:
        if g.get("condition"):
            by_cell.setdefault(g["cell"], []).append(g)
    if not by_cell:
        return False
    metrics = sorted({m for gs in by_cell.values() for g in gs for m in g["metrics"]})
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for c, (cell, gs) in enumerate(by_cell.items()):
            xs = [float(g["condition"].split("=", 1)[1]) for g in gs]
            es = [g["metrics"].get(metric, {}) for g in gs]
            get = lambda key: [np.nan if e.get(key) is None else e[key] for e in es]  # noqa
            std = [e["cross_distribution"]["std"] if e else np.nan for e in es]
            ax.errorbar(xs, get("cross_excess"), yerr=std, fmt="o-", color=f"C{c}",
                        capsize=3, label=f"cross {cell}" if len(by_cell) > 1 else "cross")
            ax.plot(xs, get("ceiling_excess"), "^--", color=f"C{c}", alpha=0.6,
                    label="ceiling (seed)")
            ax.plot(xs, get("floor_excess"), "v:", color=f"C{c}", alpha=0.6,
                    label="floor (random init)")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xlabel(cells[0]["condition"].split("=", 1)[0] if cells else "")
        ax.set_ylabel("excess over null", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

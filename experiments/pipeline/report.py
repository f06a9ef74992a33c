"""Summary table and plots of a universality run (pure formatting: no computation).

Inputs are the typed results (`experiments.pipeline.results`): `ComparisonResult` per
comparison, `CellResult` per cell, `LayerGrid`; a results.json written earlier is read back
with `results.RunResults.load` (a renamed key fails there, in one line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import common
from experiments.pipeline.results import CellResult, ComparisonResult, LayerGrid, MetricResult

ALPHA = 0.01


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verdict(comparison: ComparisonResult, alpha: float = ALPHA) -> str:
    """One sentence saying whether the comparison shows shared structure."""
    name = comparison.name
    metrics = dict(comparison.metrics)
    if not metrics:
        before = comparison.metrics_before_threshold or {}
        sig = [m for m, r in before.items() if r.p < alpha and r.excess > 0]
        what = (
            f"no pair passed the correlation threshold ({comparison.n_pairs} "
            f"pairs): no shared features"
        )
        if before:
            what += (
                f"; before the threshold {len(sig)} of {len(before)} metrics are "
                f"significant at p < {alpha}"
            )
        return f"{name}: {what}."
    flagged = [m for m, r in metrics.items() if not r.informative]
    metrics = {m: r for m, r in metrics.items() if m not in flagged}
    tail = (
        f" ({', '.join(flagged)}: uninformative, too few pairs for the components kept)"
        if flagged
        else ""
    )
    if not metrics:
        return f"{name}: every metric is uninformative{tail}."
    return _verdict_of(name, metrics, alpha)[:-1] + tail + "."


def _verdict_of(name: str, metrics: Mapping[str, MetricResult], alpha: float) -> str:
    sig = [m for m, r in metrics.items() if r.p < alpha and r.excess > 0]
    n = len(metrics)
    if len(sig) == n:
        return (
            f"{name}: every metric ({n}) is above its random-pairing null at p < {alpha}: "
            f"the paired features share geometry."
        )
    if not sig:
        return (
            f"{name}: no metric is significant at p < {alpha}: no evidence of shared "
            f"feature geometry beyond chance."
        )
    return (
        f"{name}: {len(sig)} of {n} metrics significant at p < {alpha} "
        f"({', '.join(sig)}); mixed evidence."
    )


def _metric_rows(metrics: Mapping[str, MetricResult]) -> list[str]:
    lines = [
        f"   {'metric':<13}{'score':>8}{'null':>8}{'± std':>8}{'excess':>8}{'z':>7}"
        f"{'p':>8}  {'kept':<9}{'n/d':>5}"
    ]
    for name, r in metrics.items():
        kept = "" if r.components is None else "/".join(str(k) for k in r.components)
        nd = "" if r.n_over_d is None else f"{r.n_over_d:.1f}"
        z = "-" if r.z is None else f"{r.z:.1f}"
        flag = "" if r.informative else "  UNINFORMATIVE (too few pairs)"
        lines.append(
            f"   {name:<13}{r.score:>8.3f}{r.null_mean:>8.3f}"
            f"{r.null_std:>8.3f}{r.excess:>8.3f}{z:>7}{r.p:>8.4f}  "
            f"{kept:<9}{nd:>5}{flag}"
        )
    return lines


def summary_table(comparisons: Sequence[ComparisonResult]) -> str:
    """A terminal table: one block per comparison, one row per metric."""
    lines = []
    for comp in comparisons:
        head = (
            f"== {comp.name}: {comp.label}  ({comp.n_pairs} pairs"
            f", mean best corr A->B {comp.pairing.mean_best_corr_ab:.3f}"
        )
        truth = comp.truth
        if truth is not None and truth.n_true_pairs:
            head += f", true pairs recovered {truth.fraction_true_pairs_recovered:.0%}"
        lines.append(head + ")")
        lines.append("   filters: " + " -> ".join(f"{k} {v}" for k, v in comp.filters.steps))
        same = comp.same_index
        if same.above_chance:
            lines.append(
                f"   WARNING: {same.fraction:.0%} of the kept pairs have the same "
                f"feature index on both sides (chance {same.chance_fraction:.2%}, "
                f"p={same.p_value:.2g}): shared seed or data order?"
            )
        if comp.metrics:
            lines.extend(_metric_rows(comp.metrics))
        elif comp.metrics_before_threshold:
            lines.append(
                f"   {comp.note or ''}; metrics on the "
                f"{comp.n_pairs_before_threshold} pairs before the threshold:"
            )
            lines.extend(_metric_rows(comp.metrics_before_threshold))
        for metric, why in comp.metrics_skipped.items():
            lines.append(f"   {metric}: skipped ({why})")
        lines.append("   " + verdict(comp))
    return "\n".join(lines)


def plot_nulls(name: str, metrics: Mapping[str, MetricResult], path: str) -> None:
    """Histogram of each metric's null distribution with the observed score."""
    metrics = {k: v for k, v in metrics.items() if v.null is not None}
    if not metrics:
        return
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (metric, r) in zip(axes.flat, metrics.items()):
        ax.hist(r.null, bins=40, color="0.7", label="shuffled pairs")
        ax.axvline(r.score, color="C3", lw=2, label=f"paired {r.score:.3f}")
        z = "-" if r.z is None else f"{r.z:.1f}"
        flag = "" if r.informative else " UNINFORMATIVE"
        ax.set_title(f"{metric}: p={r.p:.3g}, z={z}{flag}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: score vs random-pairing null", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_matched_correlations(comparisons: Sequence[dict], path: str) -> None:
    """Histogram of each feature's best activation correlation, per comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for comp in comparisons:
        if comp.pairing.best_corr_ab:
            ax.hist(
                comp.pairing.best_corr_ab,
                bins=40,
                range=(-0.2, 1.0),
                histtype="step",
                lw=1.5,
                label=comp.name,
            )
    ax.set_xlabel("best activation correlation (A feature -> any B feature)")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_reference_bars(comparisons: Sequence[dict], path: str) -> None:
    """Excess over the null per metric for every comparison (floor / score / ceiling)."""
    scored = [c for c in comparisons if c.metrics]
    if not scored:
        return
    names = [c.name for c in scored]
    metrics = sorted({m for c in scored for m in c.metrics})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(metrics) * len(names) + 2), 3.6))
    width = 0.8 / len(names)
    for i, comp in enumerate(scored):
        ys = [comp.metrics[m].excess if m in comp.metrics else np.nan for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, ys, width, label=comp.name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels(metrics)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("score - null mean")
    ax.set_title("excess over the random-pairing null (floor, comparisons, ceiling)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_layer_heatmaps(grid: LayerGrid, plots_dir: str) -> list[str]:
    """One annotated heatmap per metric: rows = layers of A, columns = layers of B, values the
    excess over the null (NaN when the cell had too few pairs)."""
    plt = _plt()
    paths = []
    for metric, values in grid.cells.items():
        v = np.asarray(values, dtype=float)
        fig, ax = plt.subplots(figsize=(2.5 + 1.0 * v.shape[1], 2.0 + 0.8 * v.shape[0]))
        im = ax.imshow(v, cmap="viridis", aspect="auto")
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(
                    j,
                    i,
                    "-" if np.isnan(v[i, j]) else f"{v[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="w",
                    fontsize=8,
                )
        ax.set_xticks(range(v.shape[1]))
        ax.set_xticklabels(grid.layers_b, rotation=45, fontsize=8)
        ax.set_yticks(range(v.shape[0]))
        ax.set_yticklabels(grid.layers_a, fontsize=8)
        ax.set_xlabel("model B hookpoint")
        ax.set_ylabel("model A hookpoint")
        ax.set_title(f"{metric}: excess over null", fontsize=10)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"layers_{metric}.png")
        common.save_figure(fig, path, dpi=110)
        paths.append(path)
    return paths


def plot_replicates(cell: CellResult, path: str) -> bool:
    """Cross-model vs within-side (seed) distributions of one cell, one panel per metric.

    Drawn only when the cross scores form a distribution (``--replicates`` >= 2).
    """
    metrics = {m: e for m, e in cell.metrics.items() if e.cross_distribution.n >= 2}
    if not metrics:
        return False
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (name, e) in zip(axes.flat, metrics.items()):
        within = () if e.within_distribution is None else e.within_distribution.values
        groups = [("cross", e.cross_distribution.values, "C0"), ("within", within, "C2")]
        for x, (_label, vals, color) in enumerate(groups):
            if not vals:
                continue
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color=color, alpha=0.8)
            ax.errorbar(x + 0.25, np.mean(vals), yerr=np.std(vals), fmt="o", color="k", capsize=3)
        if e.floor_excess is not None:
            ax.axhline(e.floor_excess, color="C3", ls="--", lw=1, label="floor")
            ax.legend(fontsize=7)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["cross", "within (seed)"])
        p = None if e.test is None else e.test.mann_whitney_p
        ax.set_title(
            f"{name}" + (f": p(cross<within)={p:.3g}" if p is not None else ""), fontsize=9
        )
        ax.set_ylabel("excess over null", fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"{cell.cell} {cell.condition}: replicates", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    return True


def plot_sweep(cells: Sequence[CellResult], path: str) -> bool:
    """Score vs sweep condition, one panel per metric: cross mean ± std with the condition's
    own ceiling and floor (excess over each comparison's own null)."""
    by_cell: dict[str, list[CellResult]] = {}
    for g in cells:
        if g.condition:
            by_cell.setdefault(g.cell, []).append(g)
    if not by_cell:
        return False
    metrics = sorted({m for gs in by_cell.values() for g in gs for m in g.metrics})
    plt = _plt()
    cols = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)

    def nan(v: float | None) -> float:
        return np.nan if v is None else v

    for ax, metric in zip(axes.flat, metrics):
        for c, (cell, gs) in enumerate(by_cell.items()):
            xs = [float(g.condition.split("=", 1)[1]) for g in gs]
            es = [g.metrics[metric] if metric in g.metrics else None for g in gs]  # skipped
            ax.errorbar(
                xs,
                [nan(e and e.cross_excess) for e in es],
                yerr=[nan(e and e.cross_distribution.std) for e in es],
                fmt="o-",
                color=f"C{c}",
                capsize=3,
                label=f"cross {cell}" if len(by_cell) > 1 else "cross",
            )
            ax.plot(
                xs,
                [nan(e and e.ceiling_excess) for e in es],
                "^--",
                color=f"C{c}",
                alpha=0.6,
                label="ceiling (seed)",
            )
            ax.plot(
                xs,
                [nan(e and e.floor_excess) for e in es],
                "v:",
                color=f"C{c}",
                alpha=0.6,
                label="floor (random init)",
            )
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xlabel(cells[0].condition.split("=", 1)[0] if cells else "")
        ax.set_ylabel("excess over null", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    return True

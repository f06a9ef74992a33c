"""Plots of the concept-geometry experiment (toy planted variants and language models)."""

from __future__ import annotations

import os

import numpy as np

from experiments import common


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_circles(run, variant: str, pair, details: dict, cfg: dict) -> None:
    """Items' decoder vectors and token reconstructions in the top-2 PCs (Engels-style)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    rng = np.random.default_rng(0)
    cmap = plt.get_cmap("hsv")
    m = pair.period
    for col, side in enumerate("ab"):
        d = details[side]
        ax = axes[0, col]
        circ = d.get("circ")
        if circ is not None:
            xy = circ.points
            colours = [cmap(o / m) for o in circ.items]
            ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=60, edgecolors="k", zorder=3)
            for (x, y), o in zip(xy, circ.items):
                ax.annotate(
                    pair.concept_items[o],
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
            ax.set_title(
                f"model {side.upper()}: item decoder vectors, top-2 PCs\n"
                f"circularity {circ.score:.3f} (p={circ.p:.2g}), "
                f"plane {circ.plane_fraction:.0%}",
                fontsize=9,
            )
        else:
            ax.set_title(f"model {side.upper()}: too few items", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax = axes[1, col]
        rc = d.get("rcirc")
        if rc is not None:
            n = rc.points.shape[0]
            take = rng.permutation(n)[: cfg["plot_tokens"]]
            ax.scatter(
                rc.points[take, 0],
                rc.points[take, 1],
                s=4,
                alpha=0.4,
                c=[cmap(o / m) for o in rc.point_order[take]],
            )
            for c, o in zip(rc.centroids, rc.items):
                ax.annotate(
                    pair.concept_items[o],
                    c,
                    fontsize=8,
                    weight="bold",
                    ha="center",
                    va="center",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7),
                )
            ax.set_title(
                f"model {side.upper()}: reconstructions of concept tokens "
                f"(cluster features only)\ncircularity {rc.score:.3f} "
                f"(p={rc.p:.2g}), plane {rc.plane_fraction:.0%}",
                fontsize=9,
            )
        else:
            ax.set_title(f"model {side.upper()}: no reconstructions", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    fig.suptitle(
        f"{variant}: {pair.concept} ({'planted circle' if pair.planted else 'no circle'}"
        f", {'shared' if pair.shared else 'independent'} geometry)"
    )
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, f"circle_{variant}.png"), dpi=90)


def plot_cluster_sizes(run, variant: str, details: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, method in zip(axes, ("graph", "spectral")):
        for side in "ab":
            sizes = details[side][method].component_sizes
            sizes = sizes[sizes > 0]
            bins = np.arange(1, max(2, sizes.max()) + 2) - 0.5
            ax.hist(sizes, bins=bins, alpha=0.5, label=f"model {side.upper()}")
        fam = [len(details[s]["family"]) for s in "ab"]
        if method == "graph" and max(fam) > 0:
            ax.axvline(max(fam), color="k", ls="--", lw=1, label="concept family")
        if method == "graph":
            ax.set_yscale("log")
        ax.set_xlabel("cluster size (features)")
        ax.set_ylabel("clusters")
        ax.set_title(
            "cosine graph (top-2, cos > 0.5)"
            if method == "graph"
            else "spectral (angular affinity)",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"{variant}: cluster sizes")
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, f"cluster_sizes_{variant}.png"), dpi=90)


def plot_scores(run, variant: str, res: dict) -> None:
    """Observed score vs its permutation null (mean, 5-95 % band, 99 % mark)."""
    plt = _plt()
    entries = []
    for side in "ab":
        for key, label in (
            ("circularity", "circularity"),
            ("reconstruction_circularity", "recon. circularity"),
        ):
            r = res[f"model_{side}"].get(key)
            if r:
                entries.append((f"{label} {side.upper()}", r["score"], r["null"]))
    if res.get("cross_model"):
        entries.append(
            ("RSA items", res["cross_model"]["rsa"]["observed"], res["cross_model"]["rsa"])
        )
        entries.append(
            (
                "ordering A~B",
                res["cross_model"]["ordering_agreement"]["observed"],
                res["cross_model"]["ordering_agreement"],
            )
        )
    if res.get("group_distances"):
        entries.append(
            ("RSA groups", res["group_distances"]["rsa"]["observed"], res["group_distances"]["rsa"])
        )
    if not entries:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(entries)), 3.8))
    x = np.arange(len(entries))
    ax.bar(x - 0.2, [e[1] for e in entries], 0.4, label="observed", color="tab:blue")
    nm = np.asarray([e[2]["null_mean"] for e in entries])
    lo = nm - np.asarray([e[2]["null_quantiles"]["0.05"] for e in entries])
    hi = np.asarray([e[2]["null_quantiles"]["0.95"] for e in entries]) - nm
    ax.bar(x + 0.2, nm, 0.4, yerr=[lo, hi], capsize=3, label="null mean (5-95 %)", color="tab:gray")
    ax.scatter(
        x + 0.2,
        [e[2]["null_quantiles"]["0.99"] for e in entries],
        marker="_",
        s=200,
        color="k",
        label="null 99 %",
        zorder=3,
    )
    for xi, e in zip(x, entries):
        ax.annotate(f"p={e[2]['p']:.2g}", (xi - 0.2, e[1]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([e[0] for e in entries], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"{variant}: scores vs permutation nulls", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, f"scores_vs_null_{variant}.png"), dpi=90)


# -- language-model path ---------------------------------------------------------------------


def _circle_panel(ax, res, labels, title: str, m: int, plt, max_points: int = 1500) -> None:
    """Points coloured by item with item labels at the centroids; title with score and p."""
    cmap = plt.get_cmap("hsv")
    if res is None:
        ax.set_title(f"{title}\n(too few items or features)", fontsize=8)
        return
    n = res.points.shape[0]
    take = np.random.default_rng(0).permutation(n)[:max_points]
    ax.scatter(
        res.points[take, 0],
        res.points[take, 1],
        s=12 if n < 100 else 4,
        alpha=0.8 if n < 100 else 0.4,
        c=[cmap(o / m) for o in res.point_order[take]],
    )
    for c, o in zip(res.centroids, res.items):
        ax.annotate(
            labels[o],
            c,
            fontsize=7,
            weight="bold",
            ha="center",
            va="center",
            bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7),
        )
    ax.set_title(
        f"{title}\ncircularity {res.score:.3f} (p={res.p:.2g}), plane {res.plane_fraction:.0%}",
        fontsize=8,
    )
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")


def plot_lm_circles(path: str, concept, details: list, entry: dict, names: list) -> None:
    """Circle plots of both models side by side: the family's decoder rows (top) and the
    reconstructions of the concept tokens' activations (bottom), score and p in the titles."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    labels = [w.capitalize() for w in concept.items]
    for col, (d, name) in enumerate(zip(details, names)):
        fam = entry[f"model_{'ab'[col]}"]["family"]
        _circle_panel(
            axes[0, col],
            d.get("circ"),
            labels,
            f"model {'AB'[col]} ({os.path.basename(str(name))}): family decoder rows "
            f"({fam['n']} features)",
            concept.period,
            plt,
        )
        _circle_panel(
            axes[1, col],
            d.get("rcirc"),
            labels,
            f"model {'AB'[col]}: reconstructions of {concept.name} tokens",
            concept.period,
            plt,
        )
    cm = entry.get("cross_model") or {}
    sup = f"{concept.name}"
    if "rsa" in cm:
        sup += (
            f"   A vs B: RSA {cm['rsa']['observed']:.3f} (p={cm['rsa']['p']:.2g}), "
            f"order agreement {cm['ordering_agreement']['observed']:.3f} "
            f"(p={cm['ordering_agreement']['p']:.2g}), {cm['items_in_both']} items"
        )
    fig.suptitle(sup, fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)


def plot_group_distances(path: str, gd, names: list) -> None:
    """Both models' group-distance matrices side by side, with their RSA and its null."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    vmax = max(float(gd.dist_a.max()), float(gd.dist_b.max()), 1e-9)
    for ax, D, label, name in zip(axes, (gd.dist_a, gd.dist_b), "AB", names):
        im = ax.imshow(D, vmin=0, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(gd.names)))
        ax.set_yticks(range(len(gd.names)))
        ax.set_xticklabels(gd.names, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(gd.names, fontsize=7)
        for i in range(D.shape[0]):
            for j in range(D.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{D[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if D[i, j] < 0.6 * vmax else "k",
                )
        ax.set_title(f"model {label} ({os.path.basename(str(name))}): 1 - mean cosine", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    r = gd.rsa
    fig.suptitle(
        f"group distances, RSA A vs B {r.observed:.3f} (p={r.p:.2g}; null mean "
        f"{r.null_mean:.3f}, 99 % {r.null_quantiles.get('0.99', float('nan')):.3f}), "
        f"{len(gd.names)} groups",
        fontsize=9,
    )
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)

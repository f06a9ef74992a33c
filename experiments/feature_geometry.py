"""Feature clusters and circular features across two models (issue 8, concept geometry).

On toy data with a planted circular feature family (models/planted.py: the days of the week on
a circle in a 2-D plane, in two "models" related by a random rotation), and on an unplanted
control (random concept directions, independent in the two models), this experiment:

1. gets each model's dictionary: the ground-truth atoms and codes (``--dictionary=truth``,
   the default, SAE-free and fast) or a TopK SAE trained on the model's activations
   (``--dictionary=sae``, models/sae_train.py);
2. names each live feature by its top activating token (highest mean activation per token;
   dead features are left out);
3. clusters the decoder rows (engine/clustering.py: the Engels et al. cosine graph, top-2
   neighbours with cosine > 0.5, and spectral clustering on the angular affinity) and finds
   the cluster that holds the concept items' features;
4. scores circularity (engine/circular.py, engine/pca.py) of the items' decoder vectors in the
top-2 PCs of
   the cluster and of the reconstructions (from the cluster's features only) of the tokens that
   activate it, with exact permutation nulls;
5. compares the two models: RSA of the items' within-set cosine matrices and the angle-ordering
   agreement, and RSA of the distances between named concept groups, with permutation nulls.

Run (defaults: both the planted data and the unplanted control, ground-truth dictionaries)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry

With SAEs (slower; rerunning the same command resumes their training; other settings in the
same workdir are refused, see `experiments/common.py`)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry_sae \\
        --dictionary=sae --sae_steps=3000

Outputs: ``config.json``, ``metrics.jsonl`` (one summary line per variant), ``results.json``
(per variant: clustering, family, circularity, cross-model comparison, group distances, and the
acceptance checks), ``plots/circle_<variant>.png`` (item vectors and token reconstructions in
the top-2 PCs with token labels), ``plots/cluster_sizes_<variant>.png`` and
``plots/scores_vs_null_<variant>.png``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from experiments import common
from experiments.configs import feature_geometry as CONFIG  # noqa: N812  (the config module)

VARIANTS = {"planted": dict(planted=True, shared=True),
            "unplanted": dict(planted=False, shared=False),
            "shared_random": dict(planted=False, shared=True)}


# --------------------------------------------------------------------------------------------
# Dictionaries and feature names.
# --------------------------------------------------------------------------------------------


def _train_sae_dictionaries(run, pair, variant: str, cfg: dict):
    """TopK SAEs on both models' activations: returns ``[(W_dec, codes), (W_dec, codes)]``."""
    import jax.numpy as jnp

    from models import sae_train
    width = cfg["sae_width"] or 2 * pair.n_features
    out = []
    for side, acts in (("a", pair.acts_a), ("b", pair.acts_b)):
        tc = sae_train.TrainConfig(d_sae=width, activation="topk", k=cfg["sae_k"],
                                   lr=cfg["sae_lr"], dead_tokens=cfg["sae_dead_tokens"],
                                   seed=cfg["seed"])
        (sae,) = sae_train.train_saes(
            acts, [tc], steps=cfg["sae_steps"], batch_size=cfg["sae_batch"], mesh=run.mesh,
            workdir=run.path("saes", variant, side), data_seed=cfg["seed"],
            progress=cfg["progress"], metadata={"source": f"planted {variant} model {side}"})
        codes = np.concatenate([np.asarray(sae.encode(jnp.asarray(acts[i:i + 4096])))
                                for i in range(0, acts.shape[0], 4096)])
        out.append((np.asarray(sae.W_dec, np.float64), codes.astype(np.float32)))
    return out


@dataclasses.dataclass
class FeatureSummary:
    """Per-feature facts used to name features: never fired (dead) and max activation."""

    dead: np.ndarray
    max: np.ndarray


def feature_names(codes: np.ndarray, token_ids: np.ndarray, vocab_size: int,
                  min_count: int, chunk_size: int):
    """Names each live feature by its top activating token, in one chunked pass.

    The top token of a feature is the token with the highest MEAN activation of the feature
    over the rows holding that token (tokens seen at least ``min_count`` times). Unlike "the
    token of the single highest-activation row" this is not fooled by rows that merely
    co-occur with a concept word. Dead features (never fire) get -1.

    Returns:
      ``(top_token [F], FeatureSummary)``.
    """
    import scipy.sparse

    n, F = codes.shape
    sums = np.zeros((vocab_size, F))
    fmax = np.zeros(F)
    fired = np.zeros(F, bool)
    for lo in range(0, n, chunk_size):
        tok = token_ids[lo:lo + chunk_size]
        block = np.asarray(codes[lo:lo + chunk_size], np.float64)
        onehot = scipy.sparse.csr_matrix((np.ones(tok.size), (np.arange(tok.size), tok)),
                                         shape=(tok.size, vocab_size))
        sums += onehot.T @ block
        fmax = np.maximum(fmax, block.max(axis=0))
        fired |= np.any(block > 0, axis=0)
    counts = np.bincount(token_ids, minlength=vocab_size)
    means = np.where(counts[:, None] >= min_count, sums / np.maximum(counts, 1)[:, None],
                     -np.inf)
    top = np.argmax(means, axis=0).astype(np.int64)
    top[~fired] = -1
    return top, FeatureSummary(dead=~fired, max=fmax)


def concept_features(top_token: np.ndarray, stats, item_tokens: np.ndarray) -> np.ndarray:
    """``[m]`` feature index per concept item (-1 when no feature is named by it).

    Among features named by the item's token, the one with the highest max activation.
    """
    out = np.full(len(item_tokens), -1, np.int64)
    for i, t in enumerate(item_tokens):
        cands = np.flatnonzero(top_token == t)
        if cands.size:
            out[i] = cands[np.argmax(stats.max[cands])]
    return out


# --------------------------------------------------------------------------------------------
# One model's geometry.
# --------------------------------------------------------------------------------------------


def analyse_model(run, W: np.ndarray, codes: np.ndarray, token_ids: np.ndarray,
                  item_tokens: np.ndarray, period: int, cfg: dict, name: str) -> dict:
    """Clusters one dictionary, finds the concept family and scores its circularity."""
    from engine import accumulators, circular, clustering, pca, streaming
    top_token, stats = feature_names(codes, token_ids, cfg["vocab_size"],
                                     cfg["min_token_count"], cfg["chunk_size"])
    live = np.flatnonzero(~stats.dead & (np.linalg.norm(W, axis=1) > 0))
    W_live = W[live]
    graph = clustering.cosine_graph_clusters(
        W_live, k=cfg["graph_k"], threshold=cfg["graph_threshold"], min_size=cfg["min_size"],
        max_size=cfg["max_size"] or None, mesh=run.mesh)
    n_spec = cfg["spectral_clusters"] or max(2, len(live) // 8)
    spectral = clustering.spectral_clusters(W_live, n_spec, seed=cfg["seed"], mesh=run.mesh)

    items = concept_features(top_token, stats, item_tokens)
    found_items = np.flatnonzero(items >= 0)
    out = {"n_features": int(W.shape[0]), "n_live": int(len(live)),
           "graph": graph.summary(), "spectral": spectral.summary(),
           "items_with_feature": int(found_items.size), "item_features": items.tolist()}
    local = {int(f): i for i, f in enumerate(live)}
    item_local = np.asarray([local[int(items[i])] for i in found_items], np.int64)
    fam = {"cluster": None, "members": np.zeros(0, np.int64), "hits": 0, "recall": 0.0,
           "precision": 0.0}
    if item_local.size:
        fam = clustering.best_cluster_for(graph, item_local)
        fam["recall"] = fam["hits"] / len(item_tokens)      # over ALL items, found or not
    fam_members = live[fam["members"]]
    spec_fam = (clustering.best_cluster_for(spectral, item_local) if item_local.size
                else {"recall": 0.0, "precision": 0.0})
    found = fam["recall"] >= cfg["family_recall"]
    out["family"] = {"found": bool(found), "cluster": fam["cluster"],
                     "size": int(fam_members.size), "hits": fam["hits"],
                     "recall": float(fam["recall"]), "precision": float(fam["precision"]),
                     "members": fam_members.tolist(),
                     "spectral_recall": float(spec_fam["hits"] / len(item_tokens)
                                              if item_local.size else 0.0),
                     "spectral_precision": float(spec_fam["precision"])}
    detail = {"graph": graph, "spectral": spectral, "items": items, "family": fam_members,
              "top_token": top_token}
    if found_items.size < 3:
        out["circularity"] = None
        out["note"] = f"{found_items.size} concept item(s) have a feature; need 3"
        return out, detail

    # Decoder vectors of the items in the top-2 PCs of the family cluster (or of the items
    # themselves when no cluster holds them).
    fit = W[fam_members] if found and fam_members.size >= 3 else None
    circ, pc = circular.decoder_circularity(W[items[found_items]], found_items, period,
                                            fit_rows=fit, num_permutations=cfg["n_null"],
                                            seed=cfg["seed"])
    out["circularity"] = circ.to_json()
    detail["circ"], detail["pca"] = circ, pc

    # Reconstructions (from the cluster's features only) of the tokens that activate it.
    feats = fam_members if found and fam_members.size >= 3 else items[found_items]
    sub = codes[:, feats]
    acc = pca.ActiveRowMoments(len(feats))
    moments = acc.finalize(accumulators.accumulate(
        acc, streaming.ChunkStream((sub,), cfg["chunk_size"], name=f"{name} cluster codes"),
        run.mesh))
    rpca = pca.reconstruction_pca(W[feats], moments=moments)
    order_of_token = {int(t): i for i, t in enumerate(item_tokens)}
    is_item = np.isin(token_ids, item_tokens) & np.any(sub > 0, axis=1)
    rows = np.flatnonzero(is_item)
    order = np.asarray([order_of_token[int(t)] for t in token_ids[rows]], np.int64)
    if np.unique(order).size >= 3:
        pts = rpca.project(sub[rows].astype(np.float64) @ W[feats])
        rcirc = circular.circularity(pts, order, period, num_permutations=cfg["n_null"],
                                     seed=cfg["seed"] + 7)
        rcirc.plane_fraction = float(rpca.explained_variance_ratio.sum())
        out["reconstruction_circularity"] = rcirc.to_json()
        detail["rcirc"] = rcirc
    else:
        out["reconstruction_circularity"] = None
    return out, detail


# --------------------------------------------------------------------------------------------
# A variant: both models, comparison, plots.
# --------------------------------------------------------------------------------------------


def run_variant(run, variant: str, cfg: dict) -> dict:
    """Runs the whole analysis on one data variant and writes its plots."""
    from engine import checks, circular, group_geometry
    from models import planted
    if variant not in VARIANTS:
        raise checks.InputError(f"variant: unknown {variant!r}; expected one of "
                                f"{sorted(VARIANTS)}")
    pair = planted.make_planted_pair(
        cfg["seed"], d=cfg["d"], concept=cfg["concept"], n_groups=cfg["n_groups"],
        group_size=cfg["group_size"], n_other=cfg["n_other"], n_tokens=cfg["n_tokens"],
        noise=cfg["noise"], circle_offset=cfg["circle_offset"], **VARIANTS[variant])
    item_tokens = pair.concept_token_ids()
    if cfg["dictionary"] == "truth":
        dicts = [(pair.atoms_a.astype(np.float64), pair.codes),
                 (pair.atoms_b.astype(np.float64), pair.codes)]
    else:
        dicts = _train_sae_dictionaries(run, pair, variant, cfg)
    res = {"description": pair.description, "dictionary": cfg["dictionary"]}
    details = {}
    for side, (W, codes) in zip("ab", dicts):
        truth = pair.atoms_a if side == "a" else pair.atoms_b
        # How well the dictionary holds each ground-truth concept direction (1.0 for truth).
        Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        tn = truth[pair.concept_features].astype(np.float64)
        res[f"item_recovery_{side}"] = np.max(
            tn / np.linalg.norm(tn, axis=1, keepdims=True) @ Wn.T, axis=1).tolist()
        logging.info("%s: model %s", variant, side)
        res[f"model_{side}"], details[side] = analyse_model(
            run, W, codes, pair.token_ids, item_tokens, pair.period,
            dict(cfg, vocab_size=len(pair.vocab)), f"{variant} model {side}")

    # Across models: items that have a feature in both.
    ia, ib = details["a"]["items"], details["b"]["items"]
    both = np.flatnonzero((ia >= 0) & (ib >= 0))
    res["items_in_both"] = int(both.size)
    if both.size >= 4:
        res["cross_model"] = circular.compare_geometry(
            dicts[0][0][ia[both]], dicts[1][0][ib[both]], num_permutations=cfg["n_null"],
            seed=cfg["seed"]).to_json()
    else:
        res["cross_model"] = None

    # Relative distances of concept groups (features named by a group's words).
    groups_a, groups_b, skipped = {}, {}, {}
    for gname, gfeats in pair.groups.items():
        words = pair.feature_tokens[gfeats]
        fa = np.flatnonzero(np.isin(details["a"]["top_token"], words))
        fb = np.flatnonzero(np.isin(details["b"]["top_token"], words))
        if fa.size == 0 or fb.size == 0:
            skipped[gname] = f"no features in model {'A' if fa.size == 0 else 'B'}"
            continue
        groups_a[gname], groups_b[gname] = dicts[0][0][fa], dicts[1][0][fb]
    res["group_distances"] = None
    gres = None
    if len(groups_a) >= 3:
        gres = group_geometry.group_distance_rsa(groups_a, groups_b, num_permutations=cfg["n_null"],
                                           seed=cfg["seed"])
        res["group_distances"] = gres.to_json()
    res["groups_skipped"] = skipped

    res["acceptance"] = acceptance(res, variant, cfg["alpha"])
    if cfg.get("plots", True):
        _plot_circles(run, variant, pair, details, cfg)
        _plot_cluster_sizes(run, variant, details)
        _plot_scores(run, variant, res)
    return res


def acceptance(res: dict, variant: str, alpha: float) -> dict:
    """The issue's acceptance checks for this variant (True = passed)."""
    def p(x, *keys):
        for k in keys:
            x = None if x is None else x.get(k)
        return 1.0 if x is None else float(x)

    found = [res[f"model_{s}"]["family"]["found"] for s in "ab"]
    circ_p = [p(res[f"model_{s}"], "circularity", "p") for s in "ab"]
    circ_s = [p(res[f"model_{s}"], "circularity", "score") for s in "ab"]
    ord_p = p(res, "cross_model", "ordering_agreement", "p")
    rsa_p = p(res, "cross_model", "rsa", "p")
    out = {"family_found": found, "circularity_p": circ_p, "circularity_score": circ_s,
           "ordering_p": ord_p, "rsa_p": rsa_p, "alpha": alpha}
    if variant == "planted":
        out["passed"] = bool(all(found) and max(circ_p) < alpha and min(circ_s) > 0.9
                             and ord_p < alpha)
        out["expect"] = ("family found in both, circularity high (> 0.9) with p < alpha in "
                         "both, cross-model ordering p < alpha")
    elif variant == "unplanted":
        out["passed"] = bool(not any(found) and min(circ_p) >= alpha and ord_p >= alpha)
        out["expect"] = "no family, circularity and cross-model ordering not significant"
    else:
        out["passed"] = bool(not any(found) and min(circ_p) >= alpha and rsa_p < alpha)
        out["expect"] = ("no circular family, circularity not significant, but the shared "
                         "geometry is (RSA p < alpha)")
    return out


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_circles(run, variant: str, pair, details: dict, cfg: dict) -> None:
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
                ax.annotate(pair.concept_items[o], (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
            ax.set_title(f"model {side.upper()}: item decoder vectors, top-2 PCs\n"
                         f"circularity {circ.score:.3f} (p={circ.p:.2g}), "
                         f"plane {circ.plane_fraction:.0%}", fontsize=9)
        else:
            ax.set_title(f"model {side.upper()}: too few items", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax = axes[1, col]
        rc = d.get("rcirc")
        if rc is not None:
            n = rc.points.shape[0]
            take = rng.permutation(n)[: cfg["plot_tokens"]]
            ax.scatter(rc.points[take, 0], rc.points[take, 1], s=4, alpha=0.4,
                       c=[cmap(o / m) for o in rc.point_order[take]])
            for c, o in zip(rc.centroids, rc.items):
                ax.annotate(pair.concept_items[o], c, fontsize=8, weight="bold",
                            ha="center", va="center",
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7))
            ax.set_title(f"model {side.upper()}: reconstructions of concept tokens "
                         f"(cluster features only)\ncircularity {rc.score:.3f} "
                         f"(p={rc.p:.2g}), plane {rc.plane_fraction:.0%}", fontsize=9)
        else:
            ax.set_title(f"model {side.upper()}: no reconstructions", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    fig.suptitle(f"{variant}: {pair.concept} ({'planted circle' if pair.planted else 'no circle'}"
                 f", {'shared' if pair.shared else 'independent'} geometry)")
    fig.tight_layout()
    fig.savefig(os.path.join(run.plots_dir, f"circle_{variant}.png"), dpi=90)
    plt.close(fig)


def _plot_cluster_sizes(run, variant: str, details: dict) -> None:
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
        ax.set_title("cosine graph (top-2, cos > 0.5)" if method == "graph"
                     else "spectral (angular affinity)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{variant}: cluster sizes")
    fig.tight_layout()
    fig.savefig(os.path.join(run.plots_dir, f"cluster_sizes_{variant}.png"), dpi=90)
    plt.close(fig)


def _plot_scores(run, variant: str, res: dict) -> None:
    """Observed score vs its permutation null (mean, 5-95 % band, 99 % mark)."""
    plt = _plt()
    entries = []
    for side in "ab":
        for key, label in (("circularity", "circularity"),
                           ("reconstruction_circularity", "recon. circularity")):
            r = res[f"model_{side}"].get(key)
            if r:
                entries.append((f"{label} {side.upper()}", r["score"], r["null"]))
    if res.get("cross_model"):
        entries.append(("RSA items", res["cross_model"]["rsa"]["observed"],
                        res["cross_model"]["rsa"]))
        entries.append(("ordering A~B", res["cross_model"]["ordering_agreement"]["observed"],
                        res["cross_model"]["ordering_agreement"]))
    if res.get("group_distances"):
        entries.append(("RSA groups", res["group_distances"]["rsa"]["observed"],
                        res["group_distances"]["rsa"]))
    if not entries:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(entries)), 3.8))
    x = np.arange(len(entries))
    ax.bar(x - 0.2, [e[1] for e in entries], 0.4, label="observed", color="tab:blue")
    nm = np.asarray([e[2]["null_mean"] for e in entries])
    lo = nm - np.asarray([e[2]["null_quantiles"]["0.05"] for e in entries])
    hi = np.asarray([e[2]["null_quantiles"]["0.95"] for e in entries]) - nm
    ax.bar(x + 0.2, nm, 0.4, yerr=[lo, hi], capsize=3, label="null mean (5-95 %)",
           color="tab:gray")
    ax.scatter(x + 0.2, [e[2]["null_quantiles"]["0.99"] for e in entries], marker="_",
               s=200, color="k", label="null 99 %", zorder=3)
    for xi, e in zip(x, entries):
        ax.annotate(f"p={e[2]['p']:.2g}", (xi - 0.2, e[1]), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([e[0] for e in entries], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"{variant}: scores vs permutation nulls", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run.plots_dir, f"scores_vs_null_{variant}.png"), dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def run_feature_geometry(run, **cfg) -> dict:
    """The experiment's logic (importable for tests); returns the results dict."""
    from engine import metrics_io
    writer = metrics_io.MetricWriter(run.metrics_path)
    writer.truncate_after(-1)
    results = {"variants": {}}
    for step, variant in enumerate(cfg["variants"]):
        res = run_variant(run, variant, cfg)
        results["variants"][variant] = res
        acc = res["acceptance"]
        writer.write(step, {"variant": variant, "passed": acc["passed"],
                            "family_found_a": acc["family_found"][0],
                            "family_found_b": acc["family_found"][1],
                            "circularity_a": acc["circularity_score"][0],
                            "circularity_b": acc["circularity_score"][1],
                            "circularity_p_a": acc["circularity_p"][0],
                            "circularity_p_b": acc["circularity_p"][1],
                            "ordering_p": acc["ordering_p"], "rsa_p": acc["rsa_p"]})
        logging.info("%s: acceptance %s", variant, acc)
    results["all_passed"] = all(v["acceptance"]["passed"]
                                for v in results["variants"].values())
    return results


CONFIG_KEYS = ("variants", "concept", "seed", "d", "n_tokens", "n_groups", "group_size",
               "n_other", "noise", "circle_offset", "dictionary", "sae_width", "sae_k",
               "sae_steps", "sae_batch", "sae_lr", "sae_dead_tokens", "graph_k",
               "graph_threshold", "min_size", "max_size", "spectral_clusters", "family_recall",
               "n_null", "alpha", "chunk_size", "min_token_count", "plot_tokens", "plots",
               "progress")


def body(run, settings):
    cfg = {k: getattr(settings, "width" if k == "d" else k) for k in CONFIG_KEYS}
    cfg["variants"] = list(cfg["variants"])
    results = run_feature_geometry(run, **cfg)
    run.write_results(results)
    print(f"feature_geometry: all acceptance checks passed = {results['all_passed']}")


if __name__ == "__main__":
    common.entry("feature_geometry", body, CONFIG)

"""Concept-family geometry of one dictionary, shared by the toy and the language-model paths.

Moved out of the `experiments.feature_geometry` entry point (issue 11): naming features by
their top token (`feature_names`), the Engels et al. clustering of decoder rows with the
family's cluster and circularity (`analyse_model`, toy planted path). The language-model path
(`experiments.pipeline.geometry_lm`) selects families by activation concentration
(`experiments.pipeline.concept_family`) and reuses the same engine primitives.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FeatureSummary:
    """Per-feature facts used to name features: never fired (dead) and max activation."""

    dead: np.ndarray
    max: np.ndarray


def feature_names(
    codes: np.ndarray, token_ids: np.ndarray, vocab_size: int, min_count: int, chunk_size: int
):
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
        tok = token_ids[lo : lo + chunk_size]
        block = np.asarray(codes[lo : lo + chunk_size], np.float64)
        onehot = scipy.sparse.csr_matrix(
            (np.ones(tok.size), (np.arange(tok.size), tok)), shape=(tok.size, vocab_size)
        )
        sums += onehot.T @ block
        fmax = np.maximum(fmax, block.max(axis=0))
        fired |= np.any(block > 0, axis=0)
    counts = np.bincount(token_ids, minlength=vocab_size)
    means = np.where(counts[:, None] >= min_count, sums / np.maximum(counts, 1)[:, None], -np.inf)
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


def analyse_model(
    run,
    W: np.ndarray,
    codes: np.ndarray,
    token_ids: np.ndarray,
    item_tokens: np.ndarray,
    period: int,
    cfg: dict,
    name: str,
) -> dict:
    """Clusters one dictionary, finds the concept family and scores its circularity."""
    from engine import accumulators, circular, clustering, pca, streaming

    top_token, stats = feature_names(
        codes, token_ids, cfg["vocab_size"], cfg["min_token_count"], cfg["chunk_size"]
    )
    live = np.flatnonzero(~stats.dead & (np.linalg.norm(W, axis=1) > 0))
    W_live = W[live]
    graph = clustering.cosine_graph_clusters(
        W_live,
        k=cfg["graph_k"],
        threshold=cfg["graph_threshold"],
        min_size=cfg["min_size"],
        max_size=cfg["max_size"] or None,
        mesh=run.mesh,
    )
    n_spec = cfg["spectral_clusters"] or max(2, len(live) // 8)
    spectral = clustering.spectral_clusters(W_live, n_spec, seed=cfg["seed"], mesh=run.mesh)

    items = concept_features(top_token, stats, item_tokens)
    found_items = np.flatnonzero(items >= 0)
    out = {
        "n_features": int(W.shape[0]),
        "n_live": int(len(live)),
        "graph": graph.summary(),
        "spectral": spectral.summary(),
        "items_with_feature": int(found_items.size),
        "item_features": items.tolist(),
    }
    local = {int(f): i for i, f in enumerate(live)}
    item_local = np.asarray([local[int(items[i])] for i in found_items], np.int64)
    fam = {
        "cluster": None,
        "members": np.zeros(0, np.int64),
        "hits": 0,
        "recall": 0.0,
        "precision": 0.0,
    }
    if item_local.size:
        fam = clustering.best_cluster_for(graph, item_local)
        fam["recall"] = fam["hits"] / len(item_tokens)  # over ALL items, found or not
    fam_members = live[fam["members"]]
    spec_fam = (
        clustering.best_cluster_for(spectral, item_local)
        if item_local.size
        else {"recall": 0.0, "precision": 0.0}
    )
    found = fam["recall"] >= cfg["family_recall"]
    out["family"] = {
        "found": bool(found),
        "cluster": fam["cluster"],
        "size": int(fam_members.size),
        "hits": fam["hits"],
        "recall": float(fam["recall"]),
        "precision": float(fam["precision"]),
        "members": fam_members.tolist(),
        "spectral_recall": float(spec_fam["hits"] / len(item_tokens) if item_local.size else 0.0),
        "spectral_precision": float(spec_fam["precision"]),
    }
    detail = {
        "graph": graph,
        "spectral": spectral,
        "items": items,
        "family": fam_members,
        "top_token": top_token,
    }
    if found_items.size < 3:
        out["circularity"] = None
        out["note"] = f"{found_items.size} concept item(s) have a feature; need 3"
        return out, detail

    # Decoder vectors of the items in the top-2 PCs of the family cluster (or of the items
    # themselves when no cluster holds them).
    fit = W[fam_members] if found and fam_members.size >= 3 else None
    circ, pc = circular.decoder_circularity(
        W[items[found_items]],
        found_items,
        period,
        fit_rows=fit,
        num_permutations=cfg["n_null"],
        seed=cfg["seed"],
    )
    out["circularity"] = circ.to_json()
    detail["circ"], detail["pca"] = circ, pc

    # Reconstructions (from the cluster's features only) of the tokens that activate it.
    feats = fam_members if found and fam_members.size >= 3 else items[found_items]
    sub = codes[:, feats]
    acc = pca.ActiveRowMoments(len(feats))
    moments = acc.finalize(
        accumulators.accumulate(
            acc,
            streaming.ChunkStream((sub,), cfg["chunk_size"], name=f"{name} cluster codes"),
            run.mesh,
        )
    )
    rpca = pca.reconstruction_pca(W[feats], moments=moments)
    order_of_token = {int(t): i for i, t in enumerate(item_tokens)}
    is_item = np.isin(token_ids, item_tokens) & np.any(sub > 0, axis=1)
    rows = np.flatnonzero(is_item)
    order = np.asarray([order_of_token[int(t)] for t in token_ids[rows]], np.int64)
    if np.unique(order).size >= 3:
        pts = rpca.project(sub[rows].astype(np.float64) @ W[feats])
        rcirc = circular.circularity(
            pts, order, period, num_permutations=cfg["n_null"], seed=cfg["seed"] + 7
        )
        rcirc.plane_fraction = float(rpca.explained_variance_ratio.sum())
        out["reconstruction_circularity"] = rcirc.to_json()
        detail["rcirc"] = rcirc
    else:
        out["reconstruction_circularity"] = None
    return out, detail

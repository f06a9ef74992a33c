"""Clusters of one dictionary's decoder vectors (Engels et al. 2024, "Not All Language Model
Features Are Linear"; see docs/references.md, "Concept features and geometry").

Two methods, both on the cosine similarity of the rows of ``W [n, d]`` (decoder rows of an
SAE, one per feature):

* `cosine_graph_clusters`: every feature is linked to its top-``k`` (default 2) nearest
  neighbours by cosine when that cosine is > ``threshold`` (default 0.5); clusters are the
  connected components of the (undirected) graph; components outside
  ``[min_size, max_size]`` are not reported (Engels et al. keep neither singletons nor giant
  components). Only the ``[n, k]`` neighbour lists are ever held, so it streams over
  dictionaries far larger than an ``n x n`` matrix would allow.
* `spectral_clusters`: spectral clustering (Ng, Jordan & Weiss 2001: top eigenvectors of
  ``D^-1/2 A D^-1/2``, rows normalised, k-means) on the angular affinity
  ``A_ij = 1 - arccos(cos_ij) / pi`` that Engels et al. use. Dense ``A`` for small
  dictionaries; beyond ``dense_limit`` features (or when ``n_neighbors`` is given) the affinity
  is kept only on the symmetrised top-``n_neighbors`` graph (sparse, ``O(n * n_neighbors)``)
  and the eigenvectors come from ARPACK (``scipy.sparse.linalg.eigsh``).

Top-k neighbours come from `engine.pairwise.max_cosine` (streamed in tiles over the mesh, exact
float64 ranking, ties to the lower index) with each row removed from its own list.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg

from engine import checks, pairwise

#: Up to this many features `spectral_clusters` builds the dense angular affinity (n^2 floats).
DENSE_LIMIT = 4096


@dataclasses.dataclass
class Clustering:
    """Clusters of a dictionary's features.

    Attributes:
      labels: ``[n]`` int, the kept cluster of each feature (0 = largest), -1 when the feature
        is in no kept cluster (a singleton or a component outside the size limits).
      clusters: feature indices of each kept cluster (ascending), largest cluster first.
      component_sizes: sizes of ALL components / raw clusters before the size limits.
      method: ``"cosine_graph"`` or ``"spectral"``.
      params: the method's parameters (JSON-ready).
    """

    labels: np.ndarray
    clusters: list[np.ndarray]
    component_sizes: np.ndarray
    method: str
    params: dict

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([len(c) for c in self.clusters], np.int64)

    def cluster_of(self, feature: int) -> np.ndarray | None:
        """Indices of the kept cluster that holds ``feature`` (None if it is in none)."""
        lab = int(self.labels[feature])
        return None if lab < 0 else self.clusters[lab]

    def summary(self) -> dict:
        """JSON-ready counts (number of clusters, sizes, features clustered)."""
        sizes = self.sizes
        return {
            "method": self.method,
            "params": self.params,
            "n_features": int(self.labels.shape[0]),
            "n_clusters": int(len(sizes)),
            "n_clustered": int(sizes.sum()) if len(sizes) else 0,
            "largest": int(sizes.max()) if len(sizes) else 0,
            "n_components": int(len(self.component_sizes)),
            "n_components_outside_size_limits": int(
                np.sum(
                    (self.component_sizes < self.params.get("min_size", 1))
                    | (self.component_sizes > (self.params.get("max_size") or np.inf))
                )
            ),
        }


# --------------------------------------------------------------------------------------------
# Input checks and neighbours.
# --------------------------------------------------------------------------------------------


def check_dictionary(name: str, W, min_rows: int = 2) -> np.ndarray:
    """Validates decoder rows ``[n, d]``: finite, at least ``min_rows``, no zero rows.

    A zero row has no direction (cosine undefined); it is rejected with its indices rather
    than turned into NaN similarities.
    """
    arr = checks.as_float_matrix(name, W, min_rows=min_rows)
    norms = np.linalg.norm(np.asarray(arr, np.float64), axis=1)
    zero = np.flatnonzero(norms <= 1e-12 * max(1.0, float(norms.max(initial=0.0))))
    if zero.size:
        raise checks.InputError(
            f"{name}: {zero.size} zero row(s) (no direction, cosine undefined), first at "
            f"{zero[:5].tolist()}; drop dead features before clustering"
        )
    return arr


def topk_neighbours(
    W, k: int, *, mesh=None, tile: int = 1024, name: str = "W"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of every row of ``W`` among the other rows.

    Uses ``engine.pairwise.max_cosine(W, W, k=k+1)`` (the project's one streamed, exact
    cosine engine: tiles over the mesh, float64-certified ranking) and removes each row
    itself from its list.

    Args:
      W: ``[n, d]`` rows (decoder vectors), finite, no zero rows.
      k: neighbours per row (< n).
      mesh: device mesh (default: engine.pairwise's default, all devices).
      tile: query rows per block.

    Returns:
      ``(values [n, k], indices [n, k])``: cosines descending and the neighbours' row indices.
    """
    W = check_dictionary(name, W)
    n = W.shape[0]
    k = checks.check_positive_int("topk_neighbours k", k)
    if k >= n:
        raise checks.InputError(
            f"topk_neighbours: k={k} must be < the number of rows of {name} ({n})"
        )
    return _pairwise_self_topk(W, k, mesh=mesh, tile=tile)


def _pairwise_self_topk(W: np.ndarray, k: int, *, mesh, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Self-excluded top-k from ``pairwise.max_cosine(W, W, k + 1)``.

    Each row's own index is dropped from its ``k + 1`` list; when it is absent (more than k
    exact duplicates of the row sort before it), the last entry is dropped instead.
    """
    n = W.shape[0]
    res = pairwise.max_cosine(W, W, mesh, k=k + 1, tile_a=tile)
    vals = np.asarray(res.a_topk_values, np.float64)
    idx = np.asarray(res.a_topk_indices, np.int64)
    is_self = idx == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), k)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    return vals[keep].reshape(n, k), idx[keep].reshape(n, k)


# --------------------------------------------------------------------------------------------
# The cosine graph method.
# --------------------------------------------------------------------------------------------


def _check_size_limits(min_size: int, max_size: int | None) -> None:
    checks.check_positive_int("min_size", min_size)
    if max_size is not None and checks.check_positive_int("max_size", max_size) < min_size:
        raise checks.InputError(f"max_size={max_size} is below min_size={min_size}")


def _from_labels(
    raw: np.ndarray, min_size: int, max_size: int | None, method: str, params: dict
) -> Clustering:
    """Keeps raw clusters inside the size limits, relabelled largest first (ties: lowest
    member index first, so the result is deterministic)."""
    n = raw.shape[0]
    n_raw = int(raw.max()) + 1 if n else 0
    sizes = np.bincount(raw, minlength=n_raw)
    keep = (sizes >= min_size) & (sizes <= (max_size if max_size is not None else n))
    first = np.full(n_raw, n, np.int64)
    np.minimum.at(first, raw, np.arange(n))
    kept = [c for c in np.lexsort((first, -sizes)) if keep[c]]
    labels = np.full(n, -1, np.int64)
    clusters = []
    for new, c in enumerate(kept):
        members = np.flatnonzero(raw == c)
        labels[members] = new
        clusters.append(members)
    return Clustering(
        labels=labels, clusters=clusters, component_sizes=sizes, method=method, params=params
    )


def cosine_graph_clusters(
    W,
    *,
    k: int = 2,
    threshold: float = 0.5,
    min_size: int = 2,
    max_size: int | None = None,
    mesh=None,
    tile: int = 1024,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
) -> Clustering:
    """Engels et al. 2024 cosine-graph clusters of the rows of ``W``.

    Each feature gets an (undirected) edge to each of its top-``k`` neighbours whose cosine is
    strictly greater than ``threshold``; clusters are the connected components.

    Args:
      W: ``[n, d]`` decoder rows.
      k: neighbours per feature (Engels et al.: 2).
      threshold: minimum cosine for an edge (Engels et al.: 0.5).
      min_size: smallest reported cluster (2 drops singletons).
      max_size: largest reported cluster (None: no limit).
      mesh: device mesh for the neighbour search.
      tile: query rows per neighbour block.
      neighbours: precomputed ``(values, indices)`` ``[n, >=k]`` (e.g. from the pairwise
        engine); skips the search.

    Returns:
      A `Clustering` (method ``"cosine_graph"``).
    """
    W = check_dictionary("W", W)
    n = W.shape[0]
    _check_size_limits(min_size, max_size)
    if not -1.0 <= float(threshold) < 1.0:
        raise checks.InputError(f"threshold must be a cosine in [-1, 1), got {threshold}")
    k = checks.check_positive_int("k", k)
    if neighbours is None:
        values, indices = topk_neighbours(W, min(k, n - 1), mesh=mesh, tile=tile)
    else:
        values, indices = (np.asarray(a) for a in neighbours)
        if (
            values.shape != indices.shape
            or values.ndim != 2
            or values.shape[0] != n
            or values.shape[1] < min(k, n - 1)
        ):
            raise checks.InputError(
                f"neighbours: expected (values, indices) of shape "
                f"[{n}, >={min(k, n - 1)}], got {values.shape} and "
                f"{indices.shape}"
            )
        values, indices = values[:, :k], indices[:, :k]
    rows = np.repeat(np.arange(n), values.shape[1])
    cols = indices.reshape(-1)
    on = values.reshape(-1) > threshold
    graph = scipy.sparse.coo_matrix(
        (np.ones(int(on.sum())), (rows[on], cols[on])), shape=(n, n)
    ).tocsr()
    _, raw = scipy.sparse.csgraph.connected_components(graph, directed=True, connection="weak")
    params = {
        "k": k,
        "threshold": float(threshold),
        "min_size": min_size,
        "max_size": max_size,
        "n_edges": int(on.sum()),
    }
    return _from_labels(np.asarray(raw, np.int64), min_size, max_size, "cosine_graph", params)


# --------------------------------------------------------------------------------------------
# Spectral clustering on the angular affinity.
# --------------------------------------------------------------------------------------------


def angular_affinity(cos) -> np.ndarray:
    """``1 - arccos(cos) / pi`` (1 for equal directions, 0.5 orthogonal, 0 opposite)."""
    return 1.0 - np.arccos(np.clip(np.asarray(cos, np.float64), -1.0, 1.0)) / np.pi


def kmeans(
    X, n_clusters: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding and restarts (float64 numpy).

    Returns:
      ``(labels [n], inertia)`` of the restart with the lowest inertia.
    """
    X = np.asarray(X, np.float64)
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    best = (None, np.inf)
    sq = np.sum(X * X, axis=1)
    for _ in range(n_init):
        centres = [X[rng.integers(n)]]
        d2 = np.sum((X - centres[0]) ** 2, axis=1)
        for _ in range(1, n_clusters):
            total = d2.sum()
            idx = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
            centres.append(X[idx])
            d2 = np.minimum(d2, np.sum((X - X[idx]) ** 2, axis=1))
        C = np.stack(centres)
        labels = None
        for _ in range(max_iter):
            dist = sq[:, None] - 2 * X @ C.T + np.sum(C * C, axis=1)[None, :]
            new = np.argmin(dist, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for c in range(n_clusters):
                members = labels == c
                # An emptied cluster takes the point farthest from its centre.
                C[c] = X[members].mean(0) if members.any() else X[np.argmax(dist.min(1))]
        inertia = float(np.sum((X - C[labels]) ** 2))
        if inertia < best[1]:
            best = (labels, inertia)
    assert best[0] is not None
    return best[0], best[1]


def spectral_clusters(
    W,
    n_clusters: int,
    *,
    n_neighbors: int | None = None,
    min_size: int = 1,
    max_size: int | None = None,
    seed: int = 0,
    mesh=None,
    tile: int = 1024,
    dense_limit: int = DENSE_LIMIT,
) -> Clustering:
    """Spectral clustering of the rows of ``W`` on the angular affinity (Engels et al. 2024).

    Affinity ``A_ij = 1 - arccos(cos_ij) / pi``. Dense when ``n <= dense_limit`` and
    ``n_neighbors`` is None; otherwise sparse: ``A_ij`` kept for ``j`` among the top
    ``n_neighbors`` cosine neighbours of ``i`` (symmetrised by the max), the rest 0. The
    embedding is the top ``n_clusters`` eigenvectors of ``D^-1/2 A D^-1/2`` with rows scaled
    to unit length (Ng, Jordan & Weiss 2001), clustered by k-means (10 k-means++ restarts).

    Args:
      W: ``[n, d]`` decoder rows.
      n_clusters: number of clusters (2 <= n_clusters < n).
      n_neighbors: sparse affinity graph with this many neighbours per feature.
      min_size / max_size: size limits of reported clusters.
      seed: k-means seed.
      mesh / tile: neighbour search (sparse path).
      dense_limit: largest n for the dense affinity.

    Returns:
      A `Clustering` (method ``"spectral"``).
    """
    W = check_dictionary("W", W, min_rows=3)
    n = W.shape[0]
    n_clusters = checks.check_positive_int("n_clusters", n_clusters, minimum=2)
    if n_clusters >= n:
        raise checks.InputError(f"n_clusters={n_clusters} must be < the number of features ({n})")
    _check_size_limits(min_size, max_size)
    sparse = n_neighbors is not None or n > dense_limit
    if sparse:
        kn = checks.check_positive_int("n_neighbors", n_neighbors or 10)
        kn = min(kn, n - 1)
        values, indices = topk_neighbours(W, kn, mesh=mesh, tile=tile)
        aff = scipy.sparse.coo_matrix(
            (
                angular_affinity(values).reshape(-1),
                (np.repeat(np.arange(n), kn), indices.reshape(-1)),
            ),
            shape=(n, n),
        ).tocsr()
        aff = aff.maximum(aff.T) + scipy.sparse.identity(n, format="csr")
        deg = np.asarray(aff.sum(axis=1)).reshape(-1)
        dinv = scipy.sparse.diags(1.0 / np.sqrt(deg))
        M = dinv @ aff @ dinv
        _, vecs = scipy.sparse.linalg.eigsh(
            M, k=n_clusters, which="LA", v0=np.random.default_rng(seed).normal(size=n)
        )
    else:
        Wn = np.asarray(W, np.float64)
        Wn = Wn / np.linalg.norm(Wn, axis=1, keepdims=True)
        aff = angular_affinity(Wn @ Wn.T)
        dinv = 1.0 / np.sqrt(aff.sum(axis=1))
        M = aff * dinv[:, None] * dinv[None, :]
        _, vecs = scipy.linalg.eigh(M, subset_by_index=[n - n_clusters, n - 1])
    emb = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    raw, _ = kmeans(emb, n_clusters, seed=seed)
    params = {
        "n_clusters": n_clusters,
        "affinity": "angular",
        "sparse": bool(sparse),
        "n_neighbors": (min(n_neighbors or 10, n - 1) if sparse else None),
        "min_size": min_size,
        "max_size": max_size,
        "seed": seed,
    }
    # Relabel raw k-means labels to 0..m-1 (some may be empty).
    _, raw = np.unique(raw, return_inverse=True)
    return _from_labels(raw.astype(np.int64), min_size, max_size, "spectral", params)


def same_partition(labels_a, labels_b) -> bool:
    """True when two labelings define the same partition (labels may differ by renaming)."""
    a = np.asarray(labels_a)
    b = np.asarray(labels_b)
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def best_cluster_for(clustering: Clustering, features) -> dict:
    """The kept cluster that holds most of ``features`` (e.g. the Monday..Sunday features).

    Ties go to the cluster with the higher precision (fewer non-concept members), then to the
    lower cluster id.

    Args:
      clustering: a `Clustering`.
      features: indices of the features of a concept family (non-empty).

    Returns:
      ``{"cluster": id or None, "members": indices, "hits": concept features inside,
      "recall": hits / len(features), "precision": hits / cluster size}``; ``cluster`` is
      None (recall 0) when no kept cluster holds any of them.
    """
    feats = np.unique(np.asarray(features, np.int64))
    if feats.size == 0:
        raise checks.InputError(
            "best_cluster_for: the concept has no features (empty list); "
            "expected at least one feature index"
        )
    n = clustering.labels.shape[0]
    if feats.min() < 0 or feats.max() >= n:
        raise checks.InputError(
            f"best_cluster_for: feature indices must lie in [0, {n}), got "
            f"[{feats.min()}, {feats.max()}]"
        )
    labs = clustering.labels[feats]
    labs = labs[labs >= 0]
    empty = {
        "cluster": None,
        "members": np.zeros(0, np.int64),
        "hits": 0,
        "recall": 0.0,
        "precision": 0.0,
    }
    if labs.size == 0:
        return empty
    counts = np.bincount(labs, minlength=len(clustering.clusters))
    sizes = clustering.sizes
    best = max(range(len(counts)), key=lambda c: (counts[c], counts[c] / sizes[c], -c))
    hits = int(counts[best])
    return {
        "cluster": int(best),
        "members": clustering.clusters[best],
        "hits": hits,
        "recall": hits / feats.size,
        "precision": hits / int(sizes[best]),
    }

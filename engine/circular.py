"""Geometry of a feature cluster: PCA, circularity, and comparisons across two models.

Engels et al. 2024 ("Not All Language Model Features Are Linear"; ../shared/REFERENCES.md,
"Concept features and geometry") find days of the week and months of the year on circles in
the top two principal components of an SAE cluster: of the cluster's decoder vectors and of
the reconstructions (from the cluster's features only) of the tokens that activate it. This
module measures that, and compares the geometry of the same concept items in two models.

* `pca`: float64 PCA of rows (optionally weighted). `reconstruction_pca`: PCA of
  ``x_hat = codes_c @ W_c`` over the rows where any cluster feature fires, from the running
  moments of the cluster's ``m`` codes only (`ActiveRowMoments`, an engine accumulator that
  streams over the mesh): ``cov(x_hat) = W_c^T cov(codes_c) W_c`` is diagonalised in the
  ``m``-dim span of ``W_c`` (QR), so no ``[tokens, d]`` matrix is ever formed.
* `circularity`: items with a known cyclic order (Monday..Sunday, January..December, planted
  indices) as 2-D points. Each point's angle ``theta`` about the centre of the item centroids
  is compared with the item's ideal angle ``phi = 2 pi order / period``; the score is the
  circular-circular alignment ``max_s |mean exp(i (theta - s phi))|``, ``s = +-1`` (either
  direction, any rotation): 1 when the angles follow the order exactly, about
  ``sqrt(pi / (4 n))`` by chance. A permutation null reassigns the order values to the items.
* `compare_geometry`: the same ``m`` items (rows aligned) in two models: RSA (Spearman of the
  upper triangles of the within-set cosine matrices) and the angle-ordering agreement of the
  two top-2-PC projections, each with a permutation null over model B's items (Mantel test).
* `group_distance_rsa`: the "Arabic script vs Arabic food" question: within-model distance
  matrices between named feature groups, compared across models by RSA with a label
  permutation null.

Nulls (`permutation_test`): when ``m! <= exact_limit`` every permutation is enumerated and
``p = #{null >= observed} / m!`` is exact (the identity is one of them); otherwise ``R``
random permutations give ``p = (1 + #{null >= observed}) / (1 + R)`` (REFERENCES.md, "Nulls").
Symmetries of a perfect circle (its ``2 m`` rotations and reflections) score exactly as high
as the truth, so the smallest attainable p for a perfect ``m``-item circle is ``2m / m!``
(0.0028 for m = 7; negligible for m = 12).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from engine import accumulators, checks

#: Enumerate all permutations (exact p-value) up to this many (8! = 40320).
EXACT_LIMIT = 40320
#: Null values within this of the observed value count as ">=" (float round-off of ties).
_TIE_TOL = 1e-9
#: (Dis)similarities closer than this (relative) are ties when ranked for RSA.
RANK_TIE_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# PCA.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PCAResult:
    """Principal components of a set of rows (float64).

    Attributes:
      mean: ``[d]`` (weighted) mean of the rows.
      components: ``[c, d]`` orthonormal principal directions, variance descending (the sign
        of each is fixed so that its largest-magnitude entry is positive).
      explained_variance: ``[c]`` variance along each component (population convention).
      total_variance: total variance of the rows (trace of their covariance).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / max(self.total_variance, 1e-300)

    def project(self, X) -> np.ndarray:
        """``[n, c]`` coordinates of rows ``X [n, d]`` on the components."""
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise checks.InputError(f"PCA project: expected rows [n, {self.mean.shape[0]}], "
                                    f"got {X.shape}")
        return (X - self.mean) @ self.components.T


def _fix_signs(components: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), idx])
    return components * np.where(signs == 0, 1.0, signs)[:, None]


def pca(X, n_components: int = 2, weights=None, name: str = "X") -> PCAResult:
    """PCA of rows ``X [n, d]`` in float64 (SVD of the weighted, centred rows).

    Args:
      X: rows (n >= 2, finite).
      n_components: components to keep (<= min(n, d)).
      weights: optional non-negative row weights ``[n]`` (frequency weights).
      name: used in error messages.
    """
    X = np.asarray(checks.as_float_matrix(name, X, min_rows=2), np.float64)
    n, d = X.shape
    c = checks.check_positive_int("n_components", n_components)
    if c > min(n, d):
        raise checks.InputError(f"{name}: n_components={c} exceeds min(rows, dims) = "
                                f"{min(n, d)}")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    checks.check_shape(f"{name} weights", w, (n,))
    checks.check_non_negative(f"{name} weights", w)
    if w.sum() <= 0:
        raise checks.InputError(f"{name} weights: all zero (no rows to fit)")
    mean = w @ X / w.sum()
    Xc = (X - mean) * np.sqrt(w / w.sum())[:, None]
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    var = s ** 2
    return PCAResult(mean=mean, components=_fix_signs(vt[:c]), explained_variance=var[:c],
                     total_variance=float(var.sum()))


class ActiveRowMoments(accumulators.CrossMoments):
    """`CrossMoments` of a cluster's codes ``[rows, m]`` over the rows where any fires (> 0).

    Feed it a `engine.streaming.ChunkStream` of the cluster's feature activations (columns of
    the SAE codes) with `engine.accumulators.accumulate`; `reconstruction_pca` turns the
    finalised moments into the PCA of the cluster's reconstructions.
    """

    def __init__(self, m: int, dtype=jnp.float32):
        super().__init__(m, 0, dtype=dtype)

    def update(self, state, arrays, weights):
        x = jnp.asarray(arrays[0])
        active = jnp.any(x > 0, axis=1).astype(self.dtype)
        return super().update(state, arrays, jnp.asarray(weights, self.dtype) * active)


def reconstruction_pca(W_cluster, codes=None, *, moments: accumulators.Moments | None = None,
                       n_components: int = 2) -> PCAResult:
    """PCA of the cluster reconstructions ``codes_c @ W_cluster`` over rows where any fires.

    The decoder bias is a constant shift and does not change the components, so it is left
    out (the returned ``mean`` is that of ``codes_c @ W_cluster``).

    Args:
      W_cluster: ``[m, d]`` decoder rows of the cluster's features.
      codes: ``[n, m]`` activations of those features (in memory), or
      moments: finalised `ActiveRowMoments` of them (streamed).
      n_components: components to keep (<= rank of ``W_cluster``).
    """
    W = np.asarray(checks.as_float_matrix("W_cluster", W_cluster), np.float64)
    m, d = W.shape
    if (codes is None) == (moments is None):
        raise checks.InputError("reconstruction_pca: pass exactly one of codes or moments")
    if codes is not None:
        C = np.asarray(checks.as_float_matrix("codes", codes), np.float64)
        if C.shape[1] != m:
            raise checks.InputError(f"codes: expected [n, {m}] (one column per cluster "
                                    f"feature), got {C.shape}")
        active = np.any(C > 0, axis=1)
        if active.sum() < 2:
            raise checks.InputError(f"codes: {int(active.sum())} row(s) activate the cluster; "
                                    f"need at least 2 for a PCA")
        mu = C[active].mean(0)
        cov = np.cov(C[active].T, bias=True).reshape(m, m)
    else:
        mu = np.asarray(moments.mean_x, np.float64)
        cov = np.asarray(moments.cov_xx, np.float64)
        if mu.shape != (m,):
            raise checks.InputError(f"moments: expected codes of {m} features, got "
                                    f"{mu.shape}")
    q, r = np.linalg.qr(W.T)                      # W^T = Q R, Q [d, m]
    small = r @ cov @ r.T                         # covariance in the span's coordinates
    vals, vecs = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(vals)[::-1]
    vals = np.clip(vals[order], 0.0, None)
    c = checks.check_positive_int("n_components", n_components)
    if c > min(m, d):
        raise checks.InputError(f"n_components={c} exceeds the cluster's rank bound "
                                f"min(m, d) = {min(m, d)}")
    comps = (q @ vecs[:, order[:c]]).T
    return PCAResult(mean=mu @ W, components=_fix_signs(comps), explained_variance=vals[:c],
                     total_variance=float(vals.sum()))


# --------------------------------------------------------------------------------------------
# Permutation nulls.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NullTest:
    """An observed statistic against a permutation null (JSON via `to_json`)."""

    observed: float
    p_value: float
    null_mean: float
    null_std: float
    null_quantiles: dict
    n_null: int
    exact: bool
    null: np.ndarray = dataclasses.field(repr=False)

    @property
    def z(self) -> float:
        return (self.observed - self.null_mean) / self.null_std if self.null_std > 0 else 0.0

    @property
    def min_p(self) -> float:
        """Smallest p-value this null could have produced."""
        return 1.0 / self.n_null if self.exact else 1.0 / (1 + self.n_null)

    def to_json(self) -> dict:
        return {"observed": self.observed, "p_value": self.p_value, "z": self.z,
                "null_mean": self.null_mean, "null_std": self.null_std,
                "null_quantiles": self.null_quantiles, "n_null": self.n_null,
                "exact": self.exact, "min_p": self.min_p,
                "excess_over_null": self.observed - self.null_mean}


def permutations(m: int, n_null: int, seed: int = 0, exact_limit: int = EXACT_LIMIT
                 ) -> tuple[np.ndarray, bool]:
    """All ``m!`` permutations when that is <= ``exact_limit``, else ``n_null`` random ones.

    Returns:
      ``(perms [R, m] int, exact)``.
    """
    if math.factorial(m) <= exact_limit:
        return np.asarray(list(itertools.permutations(range(m))), np.int64), True
    n_null = checks.check_positive_int("n_null", n_null)
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_null, m)), axis=1), False


def permutation_test(statistic: Callable[[np.ndarray], np.ndarray], m: int, *,
                     n_null: int = 1000, seed: int = 0, exact_limit: int = EXACT_LIMIT,
                     batch: int = 4096) -> NullTest:
    """Tests ``statistic(identity)`` against ``statistic(perm)`` over permutations of m items.

    Args:
      statistic: maps ``perms [R, m]`` to ``[R]`` values (vectorised over permutations).
      m: number of items.
      n_null: random permutations when enumeration is too large.
      seed: seed of the random permutations.
      exact_limit: enumerate all ``m!`` permutations up to this count (exact p).
      batch: permutations per call of ``statistic``.
    """
    observed = float(np.asarray(statistic(np.arange(m)[None, :]))[0])
    perms, exact = permutations(m, n_null, seed, exact_limit)
    null = np.concatenate([np.asarray(statistic(perms[i:i + batch]), np.float64)
                           for i in range(0, len(perms), batch)])
    hits = int(np.sum(null >= observed - _TIE_TOL))
    p = hits / len(null) if exact else (1 + hits) / (1 + len(null))
    q = np.quantile(null, [0.05, 0.5, 0.95, 0.99])
    return NullTest(observed=observed, p_value=float(p), null_mean=float(null.mean()),
                    null_std=float(null.std()),
                    null_quantiles={"q05": float(q[0]), "q50": float(q[1]),
                                    "q95": float(q[2]), "q99": float(q[3])},
                    n_null=int(len(null)), exact=bool(exact), null=null)


# --------------------------------------------------------------------------------------------
# Circularity.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CircularityResult:
    """How well ordered items follow an angle in a 2-D projection.

    Attributes:
      test: the alignment score (``test.observed`` in [0, 1]) with its permutation null.
      direction: +1 when the order runs counter-clockwise, -1 clockwise.
      offset: the angle (radians) of the item with order 0 under the fitted alignment.
      ring_cv: std / mean of the item centroids' distances from the centre (0 = a perfect
        ring; large = some items near the centre).
      items: the order values present, ascending; ``centroids [m, 2]`` their mean points.
      points: ``[n, 2]`` the points scored, ``point_order [n]`` their items' order values,
        ``angles [n]`` their angles about ``centre``.
      period: the cycle length (7 for days, 12 for months).
      plane_fraction: share of the variance in the two components (set by the callers that
        ran a PCA, None otherwise).
    """

    test: NullTest
    direction: int
    offset: float
    ring_cv: float
    items: np.ndarray
    centroids: np.ndarray
    centre: np.ndarray
    points: np.ndarray
    point_order: np.ndarray
    angles: np.ndarray
    period: int
    plane_fraction: float | None = None

    @property
    def score(self) -> float:
        return self.test.observed

    @property
    def p_value(self) -> float:
        return self.test.p_value

    def to_json(self) -> dict:
        return {"score": self.score, "p_value": self.p_value, "direction": self.direction,
                "offset": self.offset, "ring_cv": self.ring_cv, "n_items": int(len(self.items)),
                "n_points": int(len(self.points)), "period": self.period,
                "plane_fraction": self.plane_fraction, "null": self.test.to_json()}


def _check_order(order, n: int, period: int | None) -> tuple[np.ndarray, int]:
    order = np.asarray(order)
    if order.shape != (n,):
        raise checks.InputError(f"order: expected one order value per point ({n}), got shape "
                                f"{order.shape}")
    if not np.issubdtype(order.dtype, np.integer):
        if not np.all(np.asarray(order, np.float64) == np.round(np.asarray(order, np.float64))):
            raise checks.InputError("order: expected integer positions in the cycle")
        order = order.astype(np.int64)
    period = int(order.max()) + 1 if period is None else checks.check_positive_int(
        "period", period)
    if order.min() < 0 or order.max() >= period:
        raise checks.InputError(f"order: values must lie in [0, period={period}), got "
                                f"[{order.min()}, {order.max()}]")
    return order.astype(np.int64), period


def circularity(points, order, period: int | None = None, *, n_null: int = 1000,
                seed: int = 0, exact_limit: int = EXACT_LIMIT) -> CircularityResult:
    """Circular-circular alignment of points' angles with their items' cyclic order.

    The centre is the mean of the item centroids (so frequent items do not pull it); each
    point's angle ``theta`` about it is compared with ``phi = 2 pi order / period``. Score
    ``max_s |(1/n) sum_i exp(i (theta_i - s phi_i))|`` for ``s = +-1``: invariant to rotating
    or reflecting the plane, 1 iff ``theta = s phi + const`` for every point. The null
    reassigns the present order values to the items by permutation (points of one item keep
    their item), exact by enumeration for few items.

    Args:
      points: ``[n, 2]`` points (e.g. top-2 PC projections); one or many per item.
      order: ``[n]`` int position of each point's item in the cycle.
      period: cycle length (default ``max(order) + 1``).
      n_null / seed / exact_limit: the permutation null (see `permutation_test`).

    Raises:
      InputError: fewer than 3 distinct items, NaN points, order out of range.
    """
    P2 = np.asarray(checks.as_float_matrix("points", points), np.float64)
    if P2.shape[1] != 2:
        raise checks.InputError(f"points: expected 2-D points [n, 2], got {P2.shape}")
    order, period = _check_order(order, P2.shape[0], period)
    items, inverse = np.unique(order, return_inverse=True)
    m = len(items)
    if m < 3:
        raise checks.InputError(f"circularity: {m} distinct item(s); need at least 3 items "
                                f"to define an ordering on a circle")
    centroids = np.stack([P2[inverse == j].mean(0) for j in range(m)])
    centre = centroids.mean(0)
    rel = P2 - centre
    theta = np.arctan2(rel[:, 1], rel[:, 0])
    # Per-item sums of unit phasors: the statistic for any reassignment needs only these.
    z = np.bincount(inverse, weights=np.cos(theta), minlength=m) + 1j * np.bincount(
        inverse, weights=np.sin(theta), minlength=m)
    phi_items = 2 * np.pi * items / period
    n = P2.shape[0]

    def stat(perms):
        phi = phi_items[perms]                                     # [R, m]
        plus = np.abs(np.sum(z * np.exp(-1j * phi), axis=1))
        minus = np.abs(np.sum(z * np.exp(1j * phi), axis=1))
        return np.maximum(plus, minus) / n

    test = permutation_test(stat, m, n_null=n_null, seed=seed, exact_limit=exact_limit)
    zp = np.sum(z * np.exp(-1j * phi_items))
    zm = np.sum(z * np.exp(1j * phi_items))
    direction = 1 if abs(zp) >= abs(zm) else -1
    offset = float(np.angle(zp if direction == 1 else zm))
    radii = np.linalg.norm(centroids - centre, axis=1)
    ring_cv = float(radii.std() / radii.mean()) if radii.mean() > 0 else float("inf")
    return CircularityResult(test=test, direction=direction, offset=offset, ring_cv=ring_cv,
                             items=items, centroids=centroids, centre=centre, points=P2,
                             point_order=order, angles=theta, period=period)


def decoder_circularity(vectors, order, period: int | None = None, *, fit_rows=None,
                        n_null: int = 1000, seed: int = 0, exact_limit: int = EXACT_LIMIT
                        ) -> tuple[CircularityResult, PCAResult]:
    """Circularity of concept features' decoder vectors in the top-2 PCs of a cluster.

    Args:
      vectors: ``[m, d]`` decoder rows of the concept items' features (one per item).
      order: ``[m]`` their positions in the cycle.
      period: cycle length.
      fit_rows: ``[k, d]`` rows the PCA is fitted on (e.g. the whole cluster, which may hold
        features that are no concept item); default ``vectors``.

    Returns:
      ``(circularity with plane_fraction set, the PCA)``.
    """
    V = checks.as_float_matrix("vectors", vectors, min_rows=3)
    fit = V if fit_rows is None else checks.as_float_matrix("fit_rows", fit_rows, min_rows=3)
    if fit.shape[1] != V.shape[1]:
        raise checks.InputError(f"fit_rows: width {fit.shape[1]} differs from vectors' "
                                f"{V.shape[1]}")
    p = pca(fit, 2, name="cluster decoder vectors")
    res = circularity(p.project(V), order, period, n_null=n_null, seed=seed,
                      exact_limit=exact_limit)
    res.plane_fraction = float(p.explained_variance_ratio.sum())
    return res, p


# --------------------------------------------------------------------------------------------
# Across models.
# --------------------------------------------------------------------------------------------


def cosine_matrix(X, name: str = "X") -> np.ndarray:
    """``[m, m]`` cosine similarities of the rows of ``X`` (float64; zero rows rejected)."""
    X = np.asarray(checks.as_float_matrix(name, X), np.float64)
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms <= 1e-12 * max(1.0, norms.max()))
    if zero.size:
        raise checks.InputError(f"{name}: zero row(s) at {zero[:5].tolist()} (cosine "
                                f"undefined)")
    Xn = X / norms[:, None]
    return np.clip(Xn @ Xn.T, -1.0, 1.0)


def _upper_ranks(S: np.ndarray, name: str) -> np.ndarray:
    """Symmetric matrix of the average ranks of the strict upper triangle of ``S``."""
    m = S.shape[0]
    iu = np.triu_indices(m, 1)
    vals = S[iu]
    if np.ptp(vals) <= 1e-12 * max(1.0, np.abs(vals).max()):
        raise checks.InputError(f"{name}: all off-diagonal entries are equal; the rank "
                                f"correlation (RSA) is undefined")
    R = np.zeros((m, m))
    R[iu] = tied_ranks(vals)
    return R + R.T


def tied_ranks(vals, rel_tol: float = RANK_TIE_TOL) -> np.ndarray:
    """Average ranks (1-based) in which values closer than ``rel_tol * max|v|`` are ties.

    Exact ties of the underlying geometry (the circulant cosine matrix of a perfect circle)
    come out of float32 arithmetic a few ulps apart; ranking them as distinct would make the
    Spearman RSA of two identical geometries depend on round-off. Consecutive sorted values
    within the tolerance form one tie group (``scipy.stats.rankdata`` semantics otherwise).
    """
    v = np.asarray(vals, np.float64)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    tol = rel_tol * max(1.0, float(np.abs(sv).max(initial=0.0)))
    group = np.concatenate([[0], np.cumsum(np.diff(sv) > tol)])
    first = np.searchsorted(group, group, side="left")
    last = np.searchsorted(group, group, side="right")
    ranks = np.empty_like(v)
    ranks[order] = (first + last + 1) / 2.0
    return ranks


def rsa_test(S_a, S_b, *, n_null: int = 1000, seed: int = 0,
             exact_limit: int = EXACT_LIMIT, names: Sequence[str] = ("A", "B")) -> NullTest:
    """RSA of two ``[m, m]`` symmetric (dis)similarity matrices over the same items.

    Spearman correlation of the strict upper triangles (average ranks for ties, values within
    `RANK_TIE_TOL` counted as tied, see `tied_ranks`), against a Mantel null that permutes
    the items of ``S_b`` (rows and columns together).
    """
    S_a = np.asarray(S_a, np.float64)
    S_b = np.asarray(S_b, np.float64)
    if S_a.ndim != 2 or S_a.shape[0] != S_a.shape[1] or S_a.shape != S_b.shape:
        raise checks.InputError(f"rsa_test: expected two square matrices of the same size, "
                                f"got {S_a.shape} and {S_b.shape}")
    checks.check_finite(f"{names[0]} similarity matrix", S_a)
    checks.check_finite(f"{names[1]} similarity matrix", S_b)
    m = S_a.shape[0]
    if m < 3:
        raise checks.InputError(f"rsa_test: {m} item(s); need at least 3 (3 pairs)")
    iu = np.triu_indices(m, 1)
    ra = _upper_ranks(S_a, f"{names[0]} similarity matrix")[iu]
    ra = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    RB = _upper_ranks(S_b, f"{names[1]} similarity matrix")

    def stat(perms):
        rb = RB[perms[:, iu[0]], perms[:, iu[1]]]                  # [R, pairs]
        rb = rb - rb.mean(1, keepdims=True)
        return rb @ ra / np.linalg.norm(rb, axis=1)

    return permutation_test(stat, m, n_null=n_null, seed=seed, exact_limit=exact_limit)


@dataclasses.dataclass
class GeometryComparison:
    """The same ``m`` items in two models (rows aligned).

    Attributes:
      rsa: Spearman RSA of the within-set cosine matrices, Mantel null over B's items.
      ordering: angle-ordering agreement of the two top-2-PC projections
        (``max_s |mean exp(i (theta_a - s theta_b))|``), null over B's items.
      direction: +1 when both go round in the same sense, -1 mirrored.
      sim_a / sim_b: the cosine matrices; angles_a / angles_b: the projections' angles.
    """

    rsa: NullTest
    ordering: NullTest
    direction: int
    sim_a: np.ndarray
    sim_b: np.ndarray
    angles_a: np.ndarray
    angles_b: np.ndarray
    pca_a: PCAResult
    pca_b: PCAResult

    def to_json(self) -> dict:
        return {"rsa": self.rsa.to_json(), "ordering_agreement": self.ordering.to_json(),
                "direction": self.direction, "n_items": int(self.sim_a.shape[0]),
                "plane_fraction_a": float(self.pca_a.explained_variance_ratio.sum()),
                "plane_fraction_b": float(self.pca_b.explained_variance_ratio.sum())}


def _angles_2d(X, name: str) -> tuple[np.ndarray, PCAResult]:
    p = pca(X, 2, name=name)
    xy = p.project(X)
    return np.arctan2(xy[:, 1], xy[:, 0]), p


def compare_geometry(X_a, X_b, *, n_null: int = 1000, seed: int = 0,
                     exact_limit: int = EXACT_LIMIT) -> GeometryComparison:
    """Compares the geometry of the same concept items in two models.

    Args:
      X_a: ``[m, d_a]`` vectors of the items in model A (e.g. decoder rows of the Monday ..
        Sunday features), and
      X_b: ``[m, d_b]`` the same items, same row order, in model B (d_b may differ).
      n_null / seed / exact_limit: the permutation nulls (B's items permuted).

    Raises:
      InputError: fewer than 4 items, different item counts, NaN or zero vectors.
    """
    A = checks.as_float_matrix("X_a", X_a)
    B = checks.as_float_matrix("X_b", X_b)
    checks.check_rows_match("X_a (items of model A)", A, "X_b (items of model B)", B)
    m = A.shape[0]
    if m < 4:
        raise checks.InputError(f"compare_geometry: {m} item(s); need at least 4 shared items")
    sim_a = cosine_matrix(A, "X_a")
    sim_b = cosine_matrix(B, "X_b")
    rsa = rsa_test(sim_a, sim_b, n_null=n_null, seed=seed, exact_limit=exact_limit,
                   names=("model A items", "model B items"))
    th_a, pca_a = _angles_2d(A, "X_a")
    th_b, pca_b = _angles_2d(B, "X_b")
    ua = np.exp(1j * th_a)

    def stat(perms):
        tb = th_b[perms]                                           # [R, m]
        plus = np.abs(np.mean(ua * np.exp(-1j * tb), axis=1))
        minus = np.abs(np.mean(ua * np.exp(1j * tb), axis=1))
        return np.maximum(plus, minus)

    ordering = permutation_test(stat, m, n_null=n_null, seed=seed + 1,
                                exact_limit=exact_limit)
    direction = 1 if abs(np.mean(ua * np.exp(-1j * th_b))) >= abs(
        np.mean(ua * np.exp(1j * th_b))) else -1
    return GeometryComparison(rsa=rsa, ordering=ordering, direction=direction, sim_a=sim_a,
                              sim_b=sim_b, angles_a=th_a, angles_b=th_b, pca_a=pca_a,
                              pca_b=pca_b)


@dataclasses.dataclass
class GroupDistanceResult:
    """Within-model distances between named feature groups, compared across two models."""

    names: list
    dist_a: np.ndarray
    dist_b: np.ndarray
    rsa: NullTest
    linkage: str

    def to_json(self) -> dict:
        return {"groups": list(self.names), "linkage": self.linkage,
                "rsa": self.rsa.to_json(), "dist_a": self.dist_a.tolist(),
                "dist_b": self.dist_b.tolist()}


def group_distances(groups: Mapping[str, np.ndarray], *, linkage: str = "average",
                    model: str = "model") -> tuple[list, np.ndarray]:
    """``[G, G]`` cosine distances between feature groups of one model.

    ``linkage="average"``: ``1 - mean cos(u, v)`` over members ``u`` of one group and ``v``
    of the other; ``"centroid"``: ``1 - cos`` of the groups' mean unit vectors.

    Args:
      groups: name -> ``[n_g, d]`` vectors (decoder rows) of that group's features.
      linkage: ``"average"`` or ``"centroid"``.
      model: used in error messages.
    """
    if linkage not in ("average", "centroid"):
        raise checks.InputError(f"linkage: unknown {linkage!r}; expected 'average' or "
                                f"'centroid'")
    names = list(groups)
    units = []
    width = None
    for name in names:
        V = np.asarray(groups[name], np.float64)
        if V.ndim != 2 or V.shape[0] == 0:
            raise checks.InputError(f"group {name!r} in {model} has no features (expected "
                                    f"[n_g >= 1, d] vectors, got shape {V.shape})")
        if width is not None and V.shape[1] != width:
            raise checks.InputError(f"group {name!r} in {model}: width {V.shape[1]} differs "
                                    f"from the other groups' {width}")
        width = V.shape[1]
        checks.check_finite(f"group {name!r} in {model}", V)
        norms = np.linalg.norm(V, axis=1)
        if np.any(norms <= 1e-12 * max(1.0, norms.max())):
            raise checks.InputError(f"group {name!r} in {model}: zero vector(s) (cosine "
                                    f"undefined)")
        units.append(V / norms[:, None])
    G = len(names)
    D = np.zeros((G, G))
    cents = [u.mean(0) for u in units]
    for i in range(G):
        for j in range(i + 1, G):
            if linkage == "average":
                sim = float(np.mean(units[i] @ units[j].T))
            else:
                sim = float(cents[i] @ cents[j] / max(
                    np.linalg.norm(cents[i]) * np.linalg.norm(cents[j]), 1e-300))
            D[i, j] = D[j, i] = 1.0 - sim
    return names, D


def group_distance_rsa(groups_a: Mapping[str, np.ndarray], groups_b: Mapping[str, np.ndarray],
                       *, linkage: str = "average", n_null: int = 1000, seed: int = 0,
                       exact_limit: int = EXACT_LIMIT) -> GroupDistanceResult:
    """Are the distances between concept groups alike in two models?

    RSA (Spearman) of the two models' group distance matrices (`group_distances`) with a
    Mantel null permuting B's group labels. With ``G`` groups at most ``G!`` distinct
    reassignments exist, so p cannot fall below ``1 / G!`` (see ``rsa.min_p``): use >= 5
    groups for p < 0.01.

    Args:
      groups_a / groups_b: name -> ``[n_g, d]`` decoder rows, the same names in both models
        (the order of ``groups_a`` is used).

    Raises:
      InputError: fewer than 3 groups, names missing on either side, an empty group.
    """
    missing_b = [g for g in groups_a if g not in groups_b]
    missing_a = [g for g in groups_b if g not in groups_a]
    if missing_a or missing_b:
        raise checks.InputError(f"group_distance_rsa: unknown group name(s): missing in model "
                                f"B {missing_b}, missing in model A {missing_a}; both models "
                                f"need the same groups")
    if len(groups_a) < 3:
        raise checks.InputError(f"group_distance_rsa: {len(groups_a)} group(s); need at least "
                                f"3 (3 distances) to compare distance matrices")
    names, D_a = group_distances(groups_a, linkage=linkage, model="model A")
    _, D_b = group_distances({g: groups_b[g] for g in names}, linkage=linkage,
                             model="model B")
    rsa = rsa_test(D_a, D_b, n_null=n_null, seed=seed, exact_limit=exact_limit,
                   names=("model A group distances", "model B group distances"))
    return GroupDistanceResult(names=names, dist_a=D_a, dist_b=D_b, rsa=rsa, linkage=linkage)

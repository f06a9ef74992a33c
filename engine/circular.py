"""Circularity of concept features (days, months), and their geometry across two models.

Engels et al. 2024 ("Not All Language Model Features Are Linear", arXiv 2405.14860;
docs/references.md, "Concept features and geometry") find days of the week and months of the
year on circles in the top two principal components of an SAE cluster (`engine.pca`).

* `circularity`: items with a known cyclic order (Monday..Sunday, January..December, planted
  indices) as 2-D points. Each point's angle ``theta`` about the centre of the item centroids
  is compared with the item's ideal angle ``phi = 2 pi order / period``; the score is the
  circular-circular alignment ``max_s |mean exp(i (theta - s phi))|``, ``s = +-1`` (either
  direction, any rotation): 1 when the angles follow the order exactly, about
  ``sqrt(pi / (4 n))`` by chance. A permutation null reassigns the order values to the items.
* `compare_geometry`: the same ``m`` items (rows aligned) in two models: RSA (`engine.rsa.mantel`
  of the within-set cosine matrices) and the angle-ordering agreement of the two top-2-PC
  projections, each with a permutation null over model B's items.

Nulls are the engine's one convention (`engine.nulls.item_permutation_test`): exact by
enumeration when ``m! <= exact_limit`` (``p = #{null >= observed} / m!``, the identity among
them), else ``p = (1 + #) / (1 + R)``. Symmetries of a perfect circle (its ``2 m`` rotations and
reflections) score exactly as high as the truth, so the smallest attainable p for a perfect
``m``-item circle is ``2m / m!`` (0.0028 for m = 7; negligible for m = 12).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import checks, nulls, pairwise, rsa
from engine.pca import PCAResult, pca

EXACT_LIMIT = nulls.EXACT_LIMIT


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

    test: nulls.NullSummary
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
    def p(self) -> float:
        return self.test.p

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "p": self.p,
            "direction": self.direction,
            "offset": self.offset,
            "ring_cv": self.ring_cv,
            "n_items": int(len(self.items)),
            "n_points": int(len(self.points)),
            "period": self.period,
            "plane_fraction": self.plane_fraction,
            "null": self.test.to_json(),
        }


def _check_order(order, n: int, period: int | None) -> tuple[np.ndarray, int]:
    order = np.asarray(order)
    if order.shape != (n,):
        raise checks.InputError(
            f"order: expected one order value per point ({n}), got shape {order.shape}"
        )
    if not np.issubdtype(order.dtype, np.integer):
        if not np.all(np.asarray(order, np.float64) == np.round(np.asarray(order, np.float64))):
            raise checks.InputError("order: expected integer positions in the cycle")
        order = order.astype(np.int64)
    period = int(order.max()) + 1 if period is None else checks.check_positive_int("period", period)
    if order.min() < 0 or order.max() >= period:
        raise checks.InputError(
            f"order: values must lie in [0, period={period}), got [{order.min()}, {order.max()}]"
        )
    return order.astype(np.int64), period


def circularity(
    points,
    order,
    period: int | None = None,
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    exact_limit: int = EXACT_LIMIT,
) -> CircularityResult:
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
      num_permutations / seed / exact_limit: the permutation null
        (`engine.nulls.item_permutation_test`).

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
        raise checks.InputError(
            f"circularity: {m} distinct item(s); need at least 3 items "
            f"to define an ordering on a circle"
        )
    centroids = np.stack([P2[inverse == j].mean(0) for j in range(m)])
    centre = centroids.mean(0)
    rel = P2 - centre
    theta = np.arctan2(rel[:, 1], rel[:, 0])
    # Per-item sums of unit phasors: the statistic for any reassignment needs only these.
    z = np.bincount(inverse, weights=np.cos(theta), minlength=m) + 1j * np.bincount(
        inverse, weights=np.sin(theta), minlength=m
    )
    phi_items = 2 * np.pi * items / period
    n = P2.shape[0]

    def stat(perms):
        phi = phi_items[perms]  # [R, m]
        plus = np.abs(np.sum(z * np.exp(-1j * phi), axis=1))
        minus = np.abs(np.sum(z * np.exp(1j * phi), axis=1))
        return np.maximum(plus, minus) / n

    test = nulls.item_permutation_test(
        stat, m, num_permutations=num_permutations, seed=seed, exact_limit=exact_limit
    )
    zp = np.sum(z * np.exp(-1j * phi_items))
    zm = np.sum(z * np.exp(1j * phi_items))
    direction = 1 if abs(zp) >= abs(zm) else -1
    offset = float(np.angle(zp if direction == 1 else zm))
    radii = np.linalg.norm(centroids - centre, axis=1)
    ring_cv = float(radii.std() / radii.mean()) if radii.mean() > 0 else float("inf")
    return CircularityResult(
        test=test,
        direction=direction,
        offset=offset,
        ring_cv=ring_cv,
        items=items,
        centroids=centroids,
        centre=centre,
        points=P2,
        point_order=order,
        angles=theta,
        period=period,
    )


def decoder_circularity(
    vectors,
    order,
    period: int | None = None,
    *,
    fit_rows=None,
    num_permutations: int = 1000,
    seed: int = 0,
    exact_limit: int = EXACT_LIMIT,
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
        raise checks.InputError(
            f"fit_rows: width {fit.shape[1]} differs from vectors' {V.shape[1]}"
        )
    p = pca(fit, 2, name="cluster decoder vectors")
    res = circularity(
        p.project(V),
        order,
        period,
        num_permutations=num_permutations,
        seed=seed,
        exact_limit=exact_limit,
    )
    res.plane_fraction = float(p.explained_variance_ratio.sum())
    return res, p


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

    rsa: nulls.NullSummary
    ordering: nulls.NullSummary
    direction: int
    sim_a: np.ndarray
    sim_b: np.ndarray
    angles_a: np.ndarray
    angles_b: np.ndarray
    pca_a: PCAResult
    pca_b: PCAResult

    def to_json(self) -> dict:
        return {
            "rsa": self.rsa.to_json(),
            "ordering_agreement": self.ordering.to_json(),
            "direction": self.direction,
            "n_items": int(self.sim_a.shape[0]),
            "plane_fraction_a": float(self.pca_a.explained_variance_ratio.sum()),
            "plane_fraction_b": float(self.pca_b.explained_variance_ratio.sum()),
        }


def _angles_2d(X, name: str) -> tuple[np.ndarray, PCAResult]:
    p = pca(X, 2, name=name)
    xy = p.project(X)
    return np.arctan2(xy[:, 1], xy[:, 0]), p


def compare_geometry(
    X_a, X_b, *, num_permutations: int = 1000, seed: int = 0, exact_limit: int = EXACT_LIMIT
) -> GeometryComparison:
    """Compares the geometry of the same concept items in two models.

    Args:
      X_a: ``[m, d_a]`` vectors of the items in model A (e.g. decoder rows of the Monday ..
        Sunday features), and
      X_b: ``[m, d_b]`` the same items, same row order, in model B (d_b may differ).
      num_permutations / seed / exact_limit: the permutation nulls (B's items permuted).

    Raises:
      InputError: fewer than 4 items, different item counts, NaN or zero vectors.
    """
    A = checks.as_float_matrix("X_a", X_a)
    B = checks.as_float_matrix("X_b", X_b)
    checks.check_rows_match("X_a (items of model A)", A, "X_b (items of model B)", B)
    m = A.shape[0]
    if m < 4:
        raise checks.InputError(f"compare_geometry: {m} item(s); need at least 4 shared items")
    sim_a = pairwise.cosine_matrix(A, A, exact=True)
    sim_b = pairwise.cosine_matrix(B, B, exact=True)
    rsa_res = rsa.mantel(
        sim_a,
        sim_b,
        num_permutations=num_permutations,
        seed=seed,
        exact_limit=exact_limit,
        names=("model A items", "model B items"),
    )
    th_a, pca_a = _angles_2d(A, "X_a")
    th_b, pca_b = _angles_2d(B, "X_b")
    ua = np.exp(1j * th_a)

    def stat(perms):
        tb = th_b[perms]  # [R, m]
        plus = np.abs(np.mean(ua * np.exp(-1j * tb), axis=1))
        minus = np.abs(np.mean(ua * np.exp(1j * tb), axis=1))
        return np.maximum(plus, minus)

    ordering = nulls.item_permutation_test(
        stat, m, num_permutations=num_permutations, seed=seed + 1, exact_limit=exact_limit
    )
    direction = (
        1 if abs(np.mean(ua * np.exp(-1j * th_b))) >= abs(np.mean(ua * np.exp(1j * th_b))) else -1
    )
    return GeometryComparison(
        rsa=rsa_res,
        ordering=ordering,
        direction=direction,
        sim_a=sim_a,
        sim_b=sim_b,
        angles_a=th_a,
        angles_b=th_b,
        pca_a=pca_a,
        pca_b=pca_b,
    )

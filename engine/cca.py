"""CCA, SVCCA and PWCCA of paired matrices X [n, d1], Y [n, d2] from streamed second moments.

Everything here is a function of the weighted means and covariances Cxx, Cyy, Cxy, which one
pass of `engine.paired_stats.PairMoments` (built on `engine.accumulators.CrossMoments`) gives
over a `ChunkStream` of any length; memory is O(d^2). The finishing linear algebra runs in
float64 numpy on the host (d x d eigen-decompositions).

Definitions (docs/references.md, "Similarity of two paired matrices"):

* **CCA** (google/svcca ``cca_core.py``; Hotelling 1936): with whiteners ``Wx`` such that
  ``Wx^T (Cxx + eps I) Wx = I`` the canonical correlations are the singular values of
  ``Wx^T Cxy Wy``. Rank-aware: with ``eps = 0`` each side is whitened per column first (the
  correlation matrix), and only its eigen-directions above the statistics' NOISE level are
  kept (zero-variance or duplicated columns are dropped, not inverted; see
  ``RANK_NOISE_MULTIPLE``), so there are ``min(rank_x, rank_y)`` coefficients and the result
  is invariant to per-column scaling and to invertible linear maps (within the precision of
  the statistics: float32 accumulators resolve directions down to ~1e-6 of a column's
  variance; pass ``dtype=jnp.float64`` to `paired_stats.stream_stats`, or use
  `paired_stats.stats_from_numpy`, for worse-conditioned data). ``eps > 0`` is ridge-
  regularised CCA (all directions kept; coefficients shrink below 1).
* **SVCCA** (Raghu et al. 2017): each side is first reduced to its top principal directions
  explaining ``threshold`` (default 99 %) of its variance, i.e. the SMALLEST k with
  ``sum(top-k eigenvalues) >= threshold * sum(all eigenvalues)``; the score is the mean CCA
  coefficient of the reduced sides. This is the correct form of the pitfall in docs/references.md
  (Lan et al.'s and mklabunde/resi's ``top_k_pca_comps`` compares a normalised cumulative sum
  with ``threshold * total_variance`` and so keeps one component).
* **PWCCA** (Morcos et al. 2018): the CCA coefficients weighted by how much of the original
  representation each canonical direction accounts for: with canonical variates
  ``h_i = X_c a_i`` (unit variance, mutually uncorrelated), ``alpha_i = sum_j |<h_i, x_j>|``
  over the centred columns ``x_j`` of the weighting side, normalised to sum 1;
  ``PWCCA = sum_i alpha_i rho_i``. Computed from moments: ``<h_i, x_j> = n (Cxx a_i)_j``. This
  follows the paper, not google/svcca's ``pwcca.py`` (which skips whitening, projects
  uncentred activations and fails when X is wider than Y). Not symmetric: ``weight_side``
  picks the representation whose columns define the weights ("x" as in the paper, "y", or
  "smaller" = the side with fewer columns, google's choice).

Reported with every score: components kept per side, the weighted row count n, the rows with a
non-zero weight, n/d, and ``saturated`` = ``max(0, k_x + k_y - (rows - 1))``: the number of
coefficients that are 1 for any data because the two centred column spaces must intersect in
R^(rows-1) (Kornblith et al. 2019: CCA saturates when n is not >> d). A result with
``saturated > 0`` has ``informative = False`` and an ``uninformative_reason`` (e.g. SVCCA of 20
unrelated pairs keeping 19 components per side scores 1.0, and so does every null draw). Plain
CCA/PWCCA with
``eps = 0`` and ``max(d1, d2) >= rows`` raise `InputError` (pass ``epsilon > 0`` for the
documented ridge-regularised behaviour, or use SVCCA, which reduces d first).

Row weights are frequency weights (weighted means and covariances).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine import checks, nulls, paired_stats

HIGHEST = jax.lax.Precision.HIGHEST

# Rank decisions are made against the NOISE of the statistics, never against their scale
# (a column measured in other units is the same information). Each side is first whitened per
# column (the correlation matrix R = D C D, D = diag(C)^-1/2: invariant to per-column scaling),
# then eigen-directions of R with eigenvalue <= RANK_NOISE_MULTIPLE * sqrt(d) * precision are
# dropped, ``precision`` being the machine epsilon of the accumulation (float32: 1.2e-7;
# float64 statistics from `paired_stats.stats_from_numpy`: 2.2e-16). Measured: the spectral
# norm of the float32-accumulated R's error is ~2 eps for d = 16..256, n up to 1e5 and large
# means. A column is constant (dropped) when its spread is below the precision of its own
# values: ``std_j <= COLUMN_NOISE_MULTIPLE * precision * |mean_j|`` (or exactly 0).
RANK_NOISE_MULTIPLE = 8.0
COLUMN_NOISE_MULTIPLE = 16.0
FLOAT32_PRECISION = float(np.finfo(np.float32).eps)
DEFAULT_THRESHOLD = 0.99
WEIGHT_SIDES = ("x", "y", "smaller")


@dataclasses.dataclass(frozen=True)
class CCAResult:
    """A CCA-family score with what is needed to judge it.

    Attributes:
      method: "cca", "svcca" or "pwcca".
      score: mean coefficient (cca, svcca) or the PWCCA weighted sum.
      coefficients: canonical correlations, descending, ``[m]`` with m = min(k_x, k_y).
      components_x / components_y: directions kept per side (rank, or SVCCA components).
      n: sum of row weights; rows: rows with a non-zero weight; d1, d2: columns.
      saturated: coefficients forced to 1 by too few rows (see the module docstring).
      x_directions / y_directions: canonical directions in the original coordinates
        ``[d, m]`` (apply to centred rows: variates ``(x - mean_x) @ x_directions``).
      pwcca_weights: ``[m]`` PWCCA weights (pwcca only).
      epsilon, threshold, weight_side: the options used.
    """

    method: str
    score: float
    coefficients: np.ndarray
    components_x: int
    components_y: int
    n: float
    rows: int
    d1: int
    d2: int
    saturated: int
    x_directions: np.ndarray
    y_directions: np.ndarray
    pwcca_weights: np.ndarray | None = None
    epsilon: float = 0.0
    threshold: float | None = None
    weight_side: str | None = None

    @property
    def informative(self) -> bool:
        """False when some coefficients are 1 for ANY data (too few rows for the components
        kept: the score says nothing about the pairing; see ``uninformative_reason``)."""
        return self.saturated == 0

    @property
    def uninformative_reason(self) -> str | None:
        if self.informative:
            return None
        m = len(self.coefficients)
        return (
            f"{self.rows} rows for {self.components_x}+{self.components_y} components "
            f"(n/d = {self.rows / max(self.d1, self.d2):.2f}): {self.saturated} of {m} "
            f"canonical correlations are 1 for any data (k_x + k_y > rows - 1), so the "
            f"score is not evidence of shared structure"
        )

    def to_dict(self) -> dict:
        """JSON-ready summary (no directions)."""
        out = {
            "method": self.method,
            "score": float(self.score),
            "informative": bool(self.informative),
            "components": [int(self.components_x), int(self.components_y)],
            "n": float(self.n),
            "rows": int(self.rows),
            "d": [self.d1, self.d2],
            "n_over_d": self.rows / max(self.d1, self.d2),
            "n_over_components": self.rows / max(self.components_x, self.components_y, 1),
            "saturated": int(self.saturated),
            "epsilon": float(self.epsilon),
            "coefficients_head": [float(c) for c in self.coefficients[:10]],
        }
        if not self.informative:
            out["uninformative_reason"] = self.uninformative_reason
        if self.threshold is not None:
            out["threshold"] = float(self.threshold)
        if self.weight_side is not None:
            out["weight_side"] = self.weight_side
        return out


@dataclasses.dataclass(frozen=True)
class Whitener:
    """``matrix [d, k]`` with ``matrix^T (C + eps I) matrix = I`` on the kept directions.

    ``eigenvalues``: the spectrum the rank decision was made on, descending (the correlation
    matrix's for plain CCA, the covariance's for ridge CCA and SVCCA); ``tolerance``: the noise
    level it was compared with.
    """

    matrix: np.ndarray
    components: int
    eigenvalues: np.ndarray
    tolerance: float = 0.0


def column_scales(cov: np.ndarray, mean=None, precision: float = FLOAT32_PRECISION) -> np.ndarray:
    """Per-column ``1 / std`` (0 for columns that are constant at the statistics' precision)."""
    var = np.clip(np.diag(cov), 0.0, None)
    std = np.sqrt(var)
    floor = (
        0.0
        if mean is None
        else COLUMN_NOISE_MULTIPLE * precision * np.abs(np.asarray(mean, np.float64))
    )
    live = (std > floor) & (var > np.finfo(np.float64).tiny)
    return np.where(live, 1.0 / np.where(live, std, 1.0), 0.0)


def noise_rank(
    cov: np.ndarray, mean=None, precision: float = FLOAT32_PRECISION, rank_tol: float | None = None
):
    """Eigen-decomposition of the correlation matrix with the noise-relative rank.

    Returns ``(scales, evals, evecs, keep, tol)`` with evals descending; the first ``keep``
    eigen-directions of ``R = D C D`` (``D = diag(scales)``) are above the noise level ``tol``.
    """
    scales = column_scales(cov, mean, precision)
    corr = cov * scales[:, None] * scales[None, :]
    evals, evecs = np.linalg.eigh((corr + corr.T) / 2)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    tol = (
        RANK_NOISE_MULTIPLE * np.sqrt(cov.shape[0]) * precision
        if rank_tol is None
        else float(rank_tol)
    )
    keep = int(np.count_nonzero(evals > tol))
    return scales, evals, evecs, keep, tol


def whitener(
    cov: np.ndarray,
    *,
    name: str,
    epsilon: float = 0.0,
    rank_tol: float | None = None,
    threshold: float | None = None,
    num_components: int | None = None,
    mean=None,
    precision: float = FLOAT32_PRECISION,
) -> Whitener:
    """Rank-aware (optionally PCA-truncated) inverse square root of a covariance.

    Args:
      cov: ``[d, d]`` covariance.
      name: the side ("X" / "Y") for error messages.
      epsilon: ridge added to the covariance's eigenvalues; > 0 keeps every direction (ridge
        CCA is scale-dependent by definition).
      rank_tol: with ``epsilon == 0``, eigenvalues of the correlation matrix at or below this
        are noise (default ``RANK_NOISE_MULTIPLE * sqrt(d) * precision``).
      threshold: keep the smallest k whose top covariance eigenvalues reach this fraction of
        the total variance (SVCCA; PCA is scale-dependent by definition), at most the
        noise-relative rank.
      num_components: keep at most this many directions.
      mean: the columns' means (a column whose spread is below its values' precision is
        constant).
      precision: relative precision of the statistics (machine epsilon of the accumulation).
    """
    cov = np.asarray(cov, np.float64)
    cov = (cov + cov.T) / 2
    if not np.max(np.diag(cov), initial=0.0) > 0:
        raise checks.InputError(
            f"{name}: every column is constant (zero variance); CCA is undefined"
        )
    if threshold is not None and not 0 < threshold <= 1:
        raise checks.InputError(f"SVCCA threshold must be in (0, 1], got {threshold}")
    if num_components is not None:
        num_components = checks.check_positive_int("num_components", num_components)
    if epsilon == 0 and threshold is None and num_components is None:
        # Plain CCA: whiten per column, then the correlation matrix (scale-free).
        scales, evals, evecs, keep, tol = noise_rank(cov, mean, precision, rank_tol)
        if keep == 0:
            raise checks.InputError(
                f"{name}: every column is constant at the statistics' precision; CCA is undefined"
            )
        matrix = (evecs[:, :keep] / np.sqrt(evals[:keep])) * scales[:, None]
        return Whitener(matrix=matrix, components=keep, eigenvalues=evals, tolerance=tol)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    tol = 0.0
    if epsilon > 0:
        keep = len(evals)
    else:
        keep, tol = noise_rank(cov, mean, precision, rank_tol)[3:]
    if threshold is not None:
        pos = np.clip(evals, 0, None)
        frac = np.cumsum(pos) / pos.sum()
        keep = min(keep, int(np.searchsorted(frac, threshold, side="left")) + 1)
    if num_components is not None:
        keep = min(keep, num_components)
    scale = 1.0 / np.sqrt(np.clip(evals[:keep], 0, None) + epsilon)
    return Whitener(
        matrix=evecs[:, :keep] * scale, components=keep, eigenvalues=evals, tolerance=tol
    )


def side_whiteners(stats, method: str, **options) -> tuple[Whitener, Whitener]:
    """The X and Y whiteners of ``stats`` (means and precision taken from the statistics)."""
    precision = float(getattr(stats, "precision", FLOAT32_PRECISION))
    wx, wy = (
        whitener(cov, name=f"{method} {side}", mean=mean, precision=precision, **options)
        for side, cov, mean in (
            ("X", stats.cov_xx, stats.mean_x),
            ("Y", stats.cov_yy, stats.mean_y),
        )
    )
    return wx, wy


def _rows(stats) -> int:
    rows = getattr(stats, "rows", None)
    return int(round(float(stats.count))) if rows is None else int(rows)


def _check_n(stats, name: str, epsilon: float) -> None:
    rows = _rows(stats)
    if rows < 2:
        raise checks.InputError(f"{name}: needs at least 2 rows, got {rows}")
    d = max(stats.cov_xx.shape[0], stats.cov_yy.shape[0])
    if epsilon == 0 and d >= rows:
        raise checks.InputError(
            f"{name}: d={d} columns >= n={rows} rows, so the canonical correlations are "
            "trivially 1; pass epsilon > 0 (ridge-regularised CCA) or use svcca"
        )


def _cca_core(method: str, stats, wx: Whitener, wy: Whitener, epsilon: float, **extra) -> CCAResult:
    t = wx.matrix.T @ np.asarray(stats.cov_xy, np.float64) @ wy.matrix
    u, s, vt = np.linalg.svd(t, full_matrices=False)
    m = min(wx.components, wy.components)
    coefs = np.clip(s[:m], 0.0, 1.0)
    rows = _rows(stats)
    saturated = 0 if epsilon > 0 else max(0, wx.components + wy.components - (rows - 1))
    return CCAResult(
        method=method,
        score=float(coefs.mean()),
        coefficients=coefs,
        components_x=wx.components,
        components_y=wy.components,
        n=float(stats.count),
        rows=rows,
        d1=int(stats.cov_xx.shape[0]),
        d2=int(stats.cov_yy.shape[0]),
        saturated=int(min(saturated, m)),
        x_directions=wx.matrix @ u[:, :m],
        y_directions=wy.matrix @ vt[:m].T,
        epsilon=float(epsilon),
        **extra,
    )


def cca_from_stats(stats, *, epsilon: float = 0.0, rank_tol: float | None = None) -> CCAResult:
    """CCA coefficients from moments (`PairStats` or `accumulators.Moments`).

    Raises `InputError` when ``epsilon == 0`` and ``max(d1, d2) >= rows``.
    """
    _check_n(stats, "cca", epsilon)
    wx, wy = side_whiteners(stats, "cca", epsilon=epsilon, rank_tol=rank_tol)
    return _cca_core("cca", stats, wx, wy, epsilon)


def svcca_from_stats(
    stats,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    num_components: int | None = None,
    epsilon: float = 0.0,
    rank_tol: float | None = None,
) -> CCAResult:
    """SVCCA (Raghu et al. 2017) from moments: PCA to ``threshold`` variance, then mean CCA.

    Args:
      threshold: variance fraction each side keeps (0.99; 1.0 keeps the full rank).
      num_components: optional cap on the components per side (fixed-k SVCCA).
    """
    if _rows(stats) < 2:
        raise checks.InputError(f"svcca: needs at least 2 rows, got {_rows(stats)}")
    wx, wy = side_whiteners(
        stats,
        "svcca",
        epsilon=epsilon,
        rank_tol=rank_tol,
        threshold=threshold,
        num_components=num_components,
    )
    return _cca_core("svcca", stats, wx, wy, epsilon, threshold=float(threshold))


def _pwcca_side(stats, weight_side: str) -> str:
    if weight_side not in WEIGHT_SIDES:
        raise checks.InputError(
            f"pwcca weight_side must be one of {WEIGHT_SIDES}, got {weight_side!r}"
        )
    if weight_side == "smaller":
        return "x" if stats.cov_xx.shape[0] <= stats.cov_yy.shape[0] else "y"
    return weight_side


def pwcca_weights(cov: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Morcos et al. weights ``alpha_i ∝ sum_j |(C a_i)_j|`` normalised to sum 1."""
    alpha = np.abs(np.asarray(cov, np.float64) @ directions).sum(axis=0)
    total = alpha.sum()
    if not total > 0:
        raise checks.InputError(
            "pwcca: the canonical variates carry no variance of the weighting side"
        )
    return alpha / total


def pwcca_from_stats(
    stats, *, weight_side: str = "x", epsilon: float = 0.0, rank_tol: float | None = None
) -> CCAResult:
    """PWCCA (Morcos et al. 2018) from moments.

    Args:
      weight_side: "x" (the paper: weights from the first representation), "y", or "smaller"
        (the side with fewer columns; ties pick x).
    """
    side = _pwcca_side(stats, weight_side)
    base = cca_from_stats(stats, epsilon=epsilon, rank_tol=rank_tol)
    if side == "x":
        alpha = pwcca_weights(stats.cov_xx, base.x_directions)
    else:
        alpha = pwcca_weights(stats.cov_yy, base.y_directions)
    return dataclasses.replace(
        base,
        method="pwcca",
        score=float(np.sum(alpha * base.coefficients)),
        pwcca_weights=alpha,
        weight_side=side,
    )


METHODS = {"cca": cca_from_stats, "svcca": svcca_from_stats, "pwcca": pwcca_from_stats}


def from_stats(method: str, stats, **options) -> CCAResult:
    """Dispatches to `cca_from_stats` / `svcca_from_stats` / `pwcca_from_stats`."""
    if method not in METHODS:
        raise checks.InputError(f"unknown CCA method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[method](stats, **options)


# --------------------------------------------------------------------------------------------
# In-memory and streamed entry points.
# --------------------------------------------------------------------------------------------


def cca(x, y, weights=None, *, mesh=None, chunk_size: int | None = None, **options) -> CCAResult:
    """CCA of in-memory X [n, d1], Y [n, d2] (moments streamed over the mesh)."""
    return cca_from_stats(
        paired_stats.pair_stats(x, y, weights, mesh=mesh, chunk_size=chunk_size, name="cca"),
        **options,
    )


def svcca(x, y, weights=None, *, mesh=None, chunk_size: int | None = None, **options) -> CCAResult:
    """SVCCA of in-memory X, Y; options as `svcca_from_stats`."""
    return svcca_from_stats(
        paired_stats.pair_stats(x, y, weights, mesh=mesh, chunk_size=chunk_size, name="svcca"),
        **options,
    )


def pwcca(x, y, weights=None, *, mesh=None, chunk_size: int | None = None, **options) -> CCAResult:
    """PWCCA of in-memory X, Y; options as `pwcca_from_stats`."""
    return pwcca_from_stats(
        paired_stats.pair_stats(x, y, weights, mesh=mesh, chunk_size=chunk_size, name="pwcca"),
        **options,
    )


def from_stream(
    method: str,
    stream,
    mesh,
    *,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
    **options,
) -> CCAResult:
    """One streamed pass over ``(x, y)`` / ``(x, y, w)`` chunks, then the CCA-family score.

    Memory is O(d1^2 + d2^2 + d1 d2) whatever the number of rows.
    """
    stats = paired_stats.stream_stats(
        stream, mesh, checkpointer=checkpointer, save_every=save_every, progress=progress
    )
    return from_stats(method, stats, **options)


# --------------------------------------------------------------------------------------------
# Random-pairing null kernels (engine/nulls.py runs them batched over permutations).
# --------------------------------------------------------------------------------------------


def cross_stat(consts: dict, perm: jax.Array) -> jax.Array:
    """Whitened cross-covariance ``a^T b[perm] / n`` (``[k_x, k_y]``), batched over perms."""
    a, b = consts["a"], consts["b"]
    return jnp.dot(a.T, b[perm], precision=HIGHEST) / a.shape[0]


def cross_stat_t(consts: dict, perm: jax.Array) -> jax.Array:
    """The transposed cross matrix (Y's directions first: PWCCA weighted by Y)."""
    return cross_stat(consts, perm).T


def cca_finish(consts: dict, t: jax.Array) -> jax.Array:
    """Mean canonical correlation = mean singular value of the whitened cross matrix."""
    del consts
    s = jnp.linalg.svd(t, compute_uv=False)
    return jnp.mean(jnp.clip(s, 0.0, 1.0))


def pwcca_finish(consts: dict, t: jax.Array) -> jax.Array:
    """PWCCA from the whitened cross matrix; ``consts["g"]`` = C @ W of the weighting side."""
    u, s, _ = jnp.linalg.svd(t, full_matrices=False)
    alpha = jnp.sum(jnp.abs(jnp.dot(consts["g"], u, precision=HIGHEST)), axis=0)
    return jnp.sum(alpha * jnp.clip(s, 0.0, 1.0)) / jnp.sum(alpha)


def null_kernel(
    method: str,
    x,
    y,
    stats,
    result: CCAResult,
    *,
    epsilon: float = 0.0,
    rank_tol: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    num_components: int | None = None,
    weight_side: str = "x",
) -> nulls.NullKernel:
    """The `NullKernel` for the batched random-pairing null of unweighted rows.

    The whiteners (and SVCCA's principal directions) depend only on each side's own rows, so
    they do not change when the rows of Y are permuted: they are applied once here and each
    permutation costs one ``[k_x, n] x [n, k_y]`` product (batched) and a small SVD (one
    permutation at a time, see `engine.nulls.NullKernel.finish`).
    """
    kw = dict(epsilon=epsilon, rank_tol=rank_tol)
    if method == "svcca":
        kw.update(threshold=threshold, num_components=num_components)
    wx, wy = side_whiteners(stats, method, **kw)
    xc = np.asarray(x, np.float64) - stats.mean_x
    yc = np.asarray(y, np.float64) - stats.mean_y
    consts = {
        "a": jnp.asarray(xc @ wx.matrix, jnp.float32),
        "b": jnp.asarray(yc @ wy.matrix, jnp.float32),
    }
    row_bytes = 4 * xc.shape[0] * (wy.components + 1)
    if method != "pwcca":
        stat, finish = cross_stat, cca_finish
    elif result.weight_side == "x":
        consts["g"] = jnp.asarray(stats.cov_xx @ wx.matrix, jnp.float32)
        stat, finish = cross_stat, pwcca_finish
    else:
        consts["g"] = jnp.asarray(stats.cov_yy @ wy.matrix, jnp.float32)
        stat, finish = cross_stat_t, pwcca_finish
    return nulls.NullKernel(stat, consts, xc.shape[0], row_bytes=row_bytes, finish=finish)

"""PCA of a feature cluster: of its decoder vectors, and of its reconstructions (streamed).

Engels et al. 2024 ("Not All Language Model Features Are Linear", arXiv 2405.14860;
docs/references.md, "Concept features and geometry") look for circles in the top two principal
components of an SAE cluster: of the cluster's decoder vectors and of the reconstructions (from
the cluster's features only) of the tokens that activate it.

* `pca`: float64 PCA of rows (optionally weighted).
* `reconstruction_pca`: PCA of ``x_hat = codes_c @ W_c`` over the rows where any cluster feature
  fires, from the running moments of the cluster's ``m`` codes only (`ActiveRowMoments`, an
  engine accumulator that streams over the mesh): ``cov(x_hat) = W_c^T cov(codes_c) W_c`` is
  diagonalised in the ``m``-dim span of ``W_c`` (QR), so no ``[tokens, d]`` matrix is formed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from engine import accumulators, checks


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
            raise checks.InputError(
                f"PCA project: expected rows [n, {self.mean.shape[0]}], got {X.shape}"
            )
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
        raise checks.InputError(f"{name}: n_components={c} exceeds min(rows, dims) = {min(n, d)}")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    checks.check_shape(f"{name} weights", w, (n,))
    checks.check_non_negative(f"{name} weights", w)
    if w.sum() <= 0:
        raise checks.InputError(f"{name} weights: all zero (no rows to fit)")
    mean = w @ X / w.sum()
    Xc = (X - mean) * np.sqrt(w / w.sum())[:, None]
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    var = s**2
    return PCAResult(
        mean=mean,
        components=_fix_signs(vt[:c]),
        explained_variance=var[:c],
        total_variance=float(var.sum()),
    )


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


def reconstruction_pca(
    W_cluster, codes=None, *, moments: accumulators.Moments | None = None, n_components: int = 2
) -> PCAResult:
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
            raise checks.InputError(
                f"codes: expected [n, {m}] (one column per cluster feature), got {C.shape}"
            )
        active = np.any(C > 0, axis=1)
        if active.sum() < 2:
            raise checks.InputError(
                f"codes: {int(active.sum())} row(s) activate the cluster; need at least 2 for a PCA"
            )
        mu = C[active].mean(0)
        cov = np.cov(C[active].T, bias=True).reshape(m, m)
    else:
        assert moments is not None
        mu = np.asarray(moments.mean_x, np.float64)
        cov = np.asarray(moments.cov_xx, np.float64)
        if mu.shape != (m,):
            raise checks.InputError(f"moments: expected codes of {m} features, got {mu.shape}")
    q, r = np.linalg.qr(W.T)  # W^T = Q R, Q [d, m]
    small = r @ cov @ r.T  # covariance in the span's coordinates
    vals, vecs = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(vals)[::-1]
    vals = np.clip(vals[order], 0.0, None)
    c = checks.check_positive_int("n_components", n_components)
    if c > min(m, d):
        raise checks.InputError(
            f"n_components={c} exceeds the cluster's rank bound min(m, d) = {min(m, d)}"
        )
    comps = (q @ vecs[:, order[:c]]).T
    return PCAResult(
        mean=mu @ W,
        components=_fix_signs(comps),
        explained_variance=vals[:c],
        total_variance=float(vals.sum()),
    )

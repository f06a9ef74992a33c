"""Orthogonal Procrustes similarity/distance and mutual k-nearest-neighbour alignment.

Definitions (docs/references.md):

* **Orthogonal Procrustes** (Schönemann 1966; used as a shape metric by Ding et al. 2021 and
  Williams et al. 2021): centre X and Y, scale each to unit Frobenius norm; then
  ``min_{R orthogonal} ||X R - Y||_F^2 = 2 - 2 ||X^T Y||_*`` (nuclear norm). We report the
  similarity ``||X^T Y||_* in [0, 1]`` (1 = identical up to rotation, translation and scale)
  and the distance ``sqrt(2 - 2 similarity)``. When d1 != d2 this equals zero-padding the
  narrower side (padding adds only zero singular values), so no padding is materialised. It is
  a function of the moments only (``||Cxy||_* / sqrt(tr Cxx tr Cyy)``), so it streams from
  `engine.paired_stats.PairMoments` and takes frequency row weights.
* **Mutual kNN** (Huh et al. 2024, Platonic Representation Hypothesis): the k nearest
  neighbours of row i by INNER PRODUCT within each space, itself excluded; the score is the
  mean over rows of ``|kNN_X(i) ∩ kNN_Y(i)| / k``. Huh et al. l2-normalise the rows first
  (``normalize=True``; off by default, the plain inner product). Computed in row tiles on the
  mesh (rows split over ``data``), memory O(tile * n), ranked exactly as in float64 (a large
  common offset, e.g. offset / std = 1e4, does not break the ranking; see `knn_indices`).
  Ties in the k-th place go to the lower row index. Row weights weight the average over query rows;
  neighbours are taken among all rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from engine import checks, nulls, paired_stats
from engine import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GeometryResult:
    """A Procrustes or mutual-kNN score and its context."""

    method: str
    score: float
    n: float
    rows: int
    d1: int
    d2: int
    distance: float | None = None
    k: int | None = None

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "score": float(self.score),
            "n": float(self.n),
            "rows": int(self.rows),
            "d": [self.d1, self.d2],
            "n_over_d": self.rows / max(self.d1, self.d2),
        }
        if self.distance is not None:
            out["distance"] = float(self.distance)
        if self.k is not None:
            out["k"] = int(self.k)
        return out


# --------------------------------------------------------------------------------------------
# Procrustes.
# --------------------------------------------------------------------------------------------


def procrustes_from_stats(stats) -> GeometryResult:
    """Procrustes similarity and distance from moments (`PairStats` / `Moments`)."""
    paired_stats.require_variance("procrustes", stats)
    nuc = float(np.linalg.svd(np.asarray(stats.cov_xy, np.float64), compute_uv=False).sum())
    sim = min(1.0, nuc / np.sqrt(np.trace(stats.cov_xx) * np.trace(stats.cov_yy)))
    rows = getattr(stats, "rows", int(round(stats.count)))
    return GeometryResult(
        "procrustes",
        sim,
        float(stats.count),
        int(rows),
        stats.cov_xx.shape[0],
        stats.cov_yy.shape[0],
        distance=float(np.sqrt(max(0.0, 2.0 - 2.0 * sim))),
    )


def procrustes(x, y, weights=None, *, mesh=None, chunk_size: int | None = None) -> GeometryResult:
    """Orthogonal Procrustes similarity (``score``) and ``distance`` of in-memory X, Y."""
    return procrustes_from_stats(
        paired_stats.pair_stats(x, y, weights, mesh=mesh, chunk_size=chunk_size, name="procrustes")
    )


def from_stream(stream, mesh, **kwargs) -> GeometryResult:
    """Procrustes over a stream of ``(x, y)`` / ``(x, y, w)`` chunks."""
    return procrustes_from_stats(paired_stats.stream_stats(stream, mesh, **kwargs))


def _reduce_rows(a: np.ndarray) -> np.ndarray:
    """``U S`` of ``a = U S V^T`` when a is wider than tall (same singular values of a^T b)."""
    if a.shape[1] <= a.shape[0]:
        return a
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    return u * s


def procrustes_stat(consts: dict, perm: jax.Array) -> jax.Array:
    """``a^T b[perm]`` (rows pre-scaled to unit Frobenius norm), batched over permutations."""
    return jnp.dot(consts["a"].T, consts["b"][perm], precision=HIGHEST)


def procrustes_finish(consts: dict, t: jax.Array) -> jax.Array:
    """Nuclear norm (unbatched SVD, see `engine.nulls.NullKernel.finish`)."""
    del consts
    return jnp.sum(jnp.linalg.svd(t, compute_uv=False))


def procrustes_null_kernel(x, y, stats):
    """The `NullKernel` for the batched random-pairing null of unweighted rows."""
    a = np.asarray(x, np.float64) - stats.mean_x
    b = np.asarray(y, np.float64) - stats.mean_y
    a = _reduce_rows(a / np.linalg.norm(a))
    b = _reduce_rows(b / np.linalg.norm(b))
    return nulls.NullKernel(
        procrustes_stat,
        {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)},
        a.shape[0],
        row_bytes=4 * b.size,
        finish=procrustes_finish,
    )


# --------------------------------------------------------------------------------------------
# Mutual kNN.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _knn_fn(mesh, k: int):
    rows = mesh_lib.data_sharding(mesh, 2)
    rows1 = mesh_lib.data_sharding(mesh, 1)
    rep = mesh_lib.replicated(mesh)

    def f(block, ids, full, offset):
        sims = jnp.dot(block, full.T, precision=HIGHEST) + offset[None, :]
        sims = jnp.where(ids[:, None] == jnp.arange(full.shape[0])[None, :], -jnp.inf, sims)
        return jax.lax.top_k(sims, k)[1].astype(jnp.int32)

    return jax.jit(f, in_shardings=(rows, rows1, rep, rep), out_shardings=rows)


def _ranking_keys(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Float32-safe ranking keys of the inner products ``u_i . u_j`` (float64 rows).

    With the rows' mean ``c`` and ``e_i = u_i - c``: ``u_i . u_j = |c|^2 + c.e_i + e_i.e_j +
    c.e_j``; for a fixed query i only ``e_i.e_j + c.e_j`` varies with j. Both terms are
    computed from the small residuals (for l2-normalised rows ``c.e_j = (1 - |c|^2 - |e_j|^2)
    / 2`` is second order in e), so a large common offset no longer swamps the differences
    that decide the ranking. Returns ``(e / s, (e @ c) / s^2, bound)`` with ``s`` the rms
    residual norm and ``bound`` a float32 error bound of a key in units of ``u_i . u_j``.
    """
    c = u.mean(axis=0)
    e = u - c
    scale = float(np.sqrt(np.mean(np.einsum("ij,ij->i", e, e))))
    scale = scale if scale > 0 else 1.0
    e = e / scale
    a = (e @ c) / scale
    eps = float(np.finfo(np.float32).eps)
    bound = eps * (
        (2 * np.sqrt(u.shape[1]) + 4) * float(np.max(np.sum(e * e, axis=1)))
        + 4 * float(np.max(np.abs(a)))
    )
    return e, a, bound * scale**2


def knn_indices(x, k: int, *, mesh=None, tile: int = 1024, normalize: bool = False) -> np.ndarray:
    """``[n, k]`` indices of each row's k largest inner products with other rows.

    Exact against float64: candidates (k plus a margin) are ranked on the mesh in float32
    with offset-safe keys (`_ranking_keys`), then re-ranked on the host in float64 (ties to
    the lower row index); a query whose k-th candidate is not separated from the margin by
    more than the float32 error bound (near-ties at the boundary) is ranked over all rows in
    float64.

    Args:
      x: ``[n, d]`` rows.
      k: neighbours per row (1 <= k < n).
      mesh: rows of each tile are split over ``data`` (default one device).
      tile: query rows per step (memory ``tile x n``).
      normalize: l2-normalise the rows first (cosine neighbours, as Huh et al.).
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    k = checks.check_positive_int("mutual_knn k", k)
    if k >= n:
        raise checks.InputError(
            f"mutual_knn: k={k} must be smaller than the number of rows n={n} (self is excluded)"
        )
    if normalize:
        norms = np.linalg.norm(x, axis=1)
        if not np.all(norms > 0):
            raise checks.InputError(
                f"mutual_knn: row {int(np.argmin(norms))} is zero and cannot be normalised"
            )
        x = x / norms[:, None]
    e, a, bound = _ranking_keys(x)
    kk = min(n - 1, k + max(8, k))  # candidates: k plus a margin
    mesh = paired_stats.default_mesh() if mesh is None else mesh
    ndev = mesh.shape[mesh_lib.DATA]
    tile = max(ndev, -(-min(int(tile), n) // ndev) * ndev)
    full = jnp.asarray(e, jnp.float32)
    offset = jnp.asarray(a, jnp.float32)
    fn = _knn_fn(mesh, kk)
    out = []
    for start in range(0, n, tile):
        ids = np.arange(start, start + tile)
        block = e[start : start + tile]
        if block.shape[0] < tile:
            block = np.concatenate([block, np.zeros((tile - block.shape[0], x.shape[1]))])
        cand = np.asarray(
            mesh_lib.gather(
                fn(  # gather: several processes hold the rows
                    jnp.asarray(block, jnp.float32), jnp.asarray(ids, jnp.int32), full, offset
                )
            )
        )[: min(tile, n - start)]
        q = np.arange(start, start + cand.shape[0])
        # Float64 inner products themselves (exact ties stay ties, as in the reference).
        sims = np.einsum("id,ikd->ik", x[q], x[cand])
        order = np.lexsort((cand, -sims), axis=-1)
        sims = np.take_along_axis(sims, order, axis=1)
        cand = np.take_along_axis(cand, order, axis=1)
        slack = 2 * bound + 1e-12 * np.abs(sims[:, :1])
        unsafe = (
            (sims[:, k - 1 : k] - sims[:, -1:] <= slack)[:, 0]
            if kk < n - 1
            else np.zeros(len(q), bool)
        )
        for r in np.flatnonzero(unsafe):  # near-ties at the boundary: all rows, float64
            row = x @ x[q[r]]
            row[q[r]] = -np.inf
            cand[r, :k] = np.argsort(-row, kind="stable")[:k]
        out.append(cand[:, :k].astype(np.int32))
    return np.concatenate(out)


def overlap_counts(knn_x: np.ndarray, knn_y: np.ndarray) -> np.ndarray:
    """``|kNN_X(i) ∩ kNN_Y(i)|`` per row (neighbour lists hold distinct indices)."""
    return (knn_x[:, :, None] == knn_y[:, None, :]).sum(axis=(1, 2))


def mutual_knn(
    x, y, weights=None, *, k: int = 10, mesh=None, tile: int = 1024, normalize: bool = False
) -> GeometryResult:
    """Mutual kNN alignment (Huh et al. 2024) of paired X [n, d1], Y [n, d2]."""
    x, y, weights = paired_stats.check_pair(x, y, weights, min_rows=2, name="mutual_knn")
    kx = knn_indices(x, k, mesh=mesh, tile=tile, normalize=normalize)
    ky = knn_indices(y, k, mesh=mesh, tile=tile, normalize=normalize)
    frac = overlap_counts(kx, ky) / k
    w = np.ones(len(frac)) if weights is None else np.asarray(weights, np.float64)
    return GeometryResult(
        "mutual_knn",
        float(w @ frac / w.sum()),
        float(w.sum()),
        int(np.count_nonzero(w)),
        x.shape[1],
        y.shape[1],
        k=k,
    )


def mutual_knn_stat(consts: dict, perm: jax.Array) -> jax.Array:
    """Mutual kNN of X against Y[perm]: Y's neighbour lists are re-indexed, not recomputed.

    Row i of Y[perm] is Y row perm[i]; its neighbours are rows inv[knn_y[perm[i]]].
    """
    kx, ky, w = consts["knn_x"], consts["knn_y"], consts["w"]
    n, k = kx.shape
    inv = jnp.zeros((n,), perm.dtype).at[perm].set(jnp.arange(n, dtype=perm.dtype))
    ny = inv[ky[perm]]
    hits = jnp.sum(kx[:, :, None] == ny[:, None, :], axis=(1, 2)).astype(jnp.float32)
    return jnp.dot(w, hits, precision=HIGHEST) / (k * jnp.sum(w))


def mutual_knn_null_kernel(
    x, y, weights=None, *, k: int = 10, mesh=None, tile: int = 1024, normalize: bool = False
):
    """The `NullKernel` for the batched null; exact with row weights too."""
    kx = knn_indices(x, k, mesh=mesh, tile=tile, normalize=normalize)
    ky = knn_indices(y, k, mesh=mesh, tile=tile, normalize=normalize)
    w = np.ones(kx.shape[0]) if weights is None else np.asarray(weights, np.float64)
    n, k = kx.shape
    return nulls.NullKernel(
        mutual_knn_stat,
        {
            "knn_x": jnp.asarray(kx),
            "knn_y": jnp.asarray(ky),
            "w": jnp.asarray(w / w.max(), jnp.float32),
        },
        n,
        row_bytes=4 * n * k * (k + 2),
    )

"""Linear CKA (biased and debiased) streamed exactly, and minibatch CKA (Nguyen et al. 2021).

Definitions (Kornblith et al. 2019, arXiv 1905.00414; docs/references.md):

* **Linear CKA** on centred X [n, d1], Y [n, d2]:
  ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` = ``||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)``, so it
  streams exactly from the moments of `engine.paired_stats.PairMoments`. Row weights are
  frequency weights (weighted centring and sums).
* **Debiased CKA** replaces HSIC by the unbiased estimator of Song et al. 2012 with the linear
  kernel ``K = X X^T`` (diagonal removed: ``K~``):
  ``HSIC_u(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2))
  - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))``.
  For centred rows with ``a_i = |x_i|^2``, ``b_i = |y_i|^2`` (HSIC_u is invariant to
  centring): ``tr(K~ L~) = ||X^T Y||_F^2 - sum a b``, ``1^T K~ 1 = -sum a``,
  ``1^T K~ L~ 1 = sum a b``. These row sums are exactly what PairMoments streams; n is the
  sum of (frequency) weights, and n >= 4 is required.
* **Minibatch CKA** (Nguyen, Raghu, Kornblith 2021, "Do wide and deep networks learn the same
  things?"): ``mean_b HSIC_u(X_b, Y_b) / sqrt(mean_b HSIC_u(X_b, X_b) mean_b HSIC_u(Y_b, Y_b))``
  over fixed-size minibatches (here: the chunks of a `ChunkStream`; chunks with fewer than 4
  valid rows are skipped, a smaller last chunk counts as one batch). It depends on the batch
  size by design.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from engine import checks, nulls, paired_stats, streaming

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CKAResult:
    """A CKA score and its context (``n`` = sum of weights, ``rows`` = rows used)."""

    method: str
    score: float
    n: float
    rows: int
    d1: int
    d2: int
    batches: int | None = None

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "score": float(self.score),
            "n": float(self.n),
            "rows": int(self.rows),
            "d": [self.d1, self.d2],
            "n_over_d": self.rows / max(self.d1, self.d2),
        }
        if self.batches is not None:
            out["batches"] = int(self.batches)
        return out


def _norms(stats) -> tuple[float, float]:
    nx = float(np.linalg.norm(stats.cov_xx))
    ny = float(np.linalg.norm(stats.cov_yy))
    if not nx > 0 or not ny > 0:
        side = "X" if not nx > 0 else "Y"
        raise checks.InputError(
            f"cka: every column of {side} is constant (zero variance); CKA is undefined"
        )
    return nx, ny


def linear_cka_from_stats(stats) -> CKAResult:
    """Biased linear CKA from moments (`PairStats` or `accumulators.Moments`)."""
    nx, ny = _norms(stats)
    score = float(np.sum(np.square(stats.cov_xy)) / (nx * ny))
    rows = getattr(stats, "rows", int(round(stats.count)))
    return CKAResult(
        "cka", score, float(stats.count), int(rows), stats.cov_xx.shape[0], stats.cov_yy.shape[0]
    )


def unbiased_hsic(cross_sq: float, q: float, tr_k: float, tr_l: float, n: float) -> float:
    """``HSIC_u`` from centred-sum statistics (see the module docstring).

    Args:
      cross_sq: ``||X^T Y||_F^2`` of centred rows (sums, not means).
      q: ``sum_i |x_i|^2 |y_i|^2``.
      tr_k, tr_l: ``sum_i |x_i|^2`` and ``sum_i |y_i|^2``.
      n: number of rows (sum of frequency weights).
    """
    return (cross_sq - q + tr_k * tr_l / ((n - 1) * (n - 2)) - 2.0 * q / (n - 2)) / (n * (n - 3))


def hsic_triple(stats) -> tuple[float, float, float]:
    """``(HSIC_u(X,Y), HSIC_u(X,X), HSIC_u(Y,Y))`` from `PairStats`."""
    n = float(stats.count)
    if n < 4:
        raise checks.InputError(f"debiased CKA: needs n >= 4 rows, got n={n:g}")
    sxx, syy, sxy = stats.cov_xx * n, stats.cov_yy * n, stats.cov_xy * n
    tr_x, tr_y = float(np.trace(sxx)), float(np.trace(syy))
    return (
        unbiased_hsic(float(np.sum(sxy**2)), stats.q_xy, tr_x, tr_y, n),
        unbiased_hsic(float(np.sum(sxx**2)), stats.q_xx, tr_x, tr_x, n),
        unbiased_hsic(float(np.sum(syy**2)), stats.q_yy, tr_y, tr_y, n),
    )


def _ratio(hxy: float, hxx: float, hyy: float, what: str) -> float:
    if not (hxx > 0 and hyy > 0):
        raise checks.InputError(
            f"{what}: the unbiased HSIC of a side with itself is not "
            f"positive (HSIC(X,X)={hxx:.3g}, HSIC(Y,Y)={hyy:.3g}); too "
            "few rows or (nearly) constant columns"
        )
    return float(hxy / np.sqrt(hxx * hyy))


def debiased_cka_from_stats(stats) -> CKAResult:
    """Debiased linear CKA (unbiased HSIC) from `PairStats`."""
    _norms(stats)
    score = _ratio(*hsic_triple(stats), "debiased CKA")
    return CKAResult(
        "cka_debiased",
        score,
        float(stats.count),
        int(stats.rows),
        stats.cov_xx.shape[0],
        stats.cov_yy.shape[0],
    )


def linear_cka(
    x, y, weights=None, *, debiased: bool = False, mesh=None, chunk_size: int | None = None
) -> CKAResult:
    """Linear CKA of in-memory X [n, d1], Y [n, d2] (moments streamed over the mesh)."""
    stats = paired_stats.pair_stats(
        x, y, weights, mesh=mesh, chunk_size=chunk_size, name="cka", min_rows=4 if debiased else 2
    )
    return debiased_cka_from_stats(stats) if debiased else linear_cka_from_stats(stats)


def from_stream(
    stream,
    mesh,
    *,
    debiased: bool = False,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
) -> CKAResult:
    """Linear CKA over a stream of ``(x, y)`` / ``(x, y, w)`` chunks (one exact pass)."""
    stats = paired_stats.stream_stats(
        stream, mesh, checkpointer=checkpointer, save_every=save_every, progress=progress
    )
    return debiased_cka_from_stats(stats) if debiased else linear_cka_from_stats(stats)


def minibatch_cka_stream(
    stream: streaming.ChunkStream, mesh, *, progress: bool = False
) -> CKAResult:
    """Minibatch CKA (Nguyen et al. 2021): each chunk of the stream is one minibatch.

    Each chunk's unbiased HSICs come from a fresh `PairMoments` pass over that chunk on the
    mesh (so the batch does not depend on how many devices share it).
    """
    d1, d2, _ = paired_stats._peek_dims(stream)  # noqa: SLF001 (same package)
    acc = paired_stats._accumulator(d1, d2)  # noqa: SLF001
    sums = np.zeros(3)
    batches = rows = 0
    total = 0.0
    step = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.num_rows, unit="rows", desc="minibatch CKA")
    from engine import mesh as mesh_lib

    for chunk in streaming.prefetch_to_device(stream, mesh):
        if step is None:
            step = paired_stats._sharded_step(d1, d2, mesh, len(chunk.arrays))  # noqa: SLF001
        init = mesh_lib.replicate(mesh, acc.init(), copy=True)
        stats = acc.finalize(step(init, chunk.arrays, chunk.mask.astype(jnp.float32)))
        if bar is not None:
            bar.update(int(chunk.mask.shape[0]))
        if stats.count < 4:
            continue
        sums += np.asarray(hsic_triple(stats))
        batches += 1
        rows += stats.rows
        total += stats.count
    if bar is not None:
        bar.close()
    if batches == 0:
        raise checks.InputError(f"minibatch CKA: no chunk of {stream.name} had >= 4 valid rows")
    hxy, hxx, hyy = (float(v) for v in sums / batches)
    score = _ratio(hxy, hxx, hyy, "minibatch CKA")
    return CKAResult("cka_minibatch", score, total, rows, d1, d2, batches=batches)


def minibatch_cka(x, y, weights=None, *, batch_size: int = 256, mesh=None) -> CKAResult:
    """Minibatch CKA of in-memory X, Y over consecutive batches of ``batch_size`` rows."""
    x, y, weights = paired_stats.check_pair(x, y, weights, min_rows=4, name="minibatch CKA")
    mesh = paired_stats.default_mesh() if mesh is None else mesh
    from engine import mesh as mesh_lib

    mesh_lib.check_divisible(mesh, batch_size, "minibatch CKA batch_size")
    arrays = (x, y) if weights is None else (x, y, weights.astype(np.float32))
    return minibatch_cka_stream(
        streaming.ChunkStream(arrays, batch_size, check_finite=False, name="minibatch CKA"), mesh
    )


# --------------------------------------------------------------------------------------------
# Random-pairing null kernels (engine/nulls.py runs them batched over permutations).
# --------------------------------------------------------------------------------------------


def cka_stat(consts: dict, perm: jax.Array) -> jax.Array:
    """Biased linear CKA of centred X against centred Y[perm] (denominator is fixed)."""
    a, b = consts["a"], consts["b"]
    c = jnp.dot(a.T, b[perm], precision=HIGHEST)
    return jnp.sum(c * c) / consts["denominator"]


def _pad_rows(consts: dict, static: tuple, size: int) -> tuple[dict, tuple]:
    """Zero rows of the centred X and Y: ``X^T Y[perm]`` is unchanged when they stay put."""
    out = dict(consts)
    for k in ("a", "b"):
        x = consts[k]
        out[k] = jnp.concatenate([x, jnp.zeros((size - x.shape[0],) + x.shape[1:], x.dtype)])
    return out, static


def cka_debiased_stat(consts: dict, perm: jax.Array) -> jax.Array:
    """Debiased CKA of X against Y[perm]: only ``||X^T Y||^2`` and ``sum a b`` change."""
    a, b = consts["a"], consts["b"]
    n = a.shape[0]
    c = jnp.dot(a.T, b[perm], precision=HIGHEST)
    q = jnp.dot(consts["ra"], consts["rb"][perm], precision=HIGHEST)
    hxy = (
        jnp.sum(c * c)
        - q
        + consts["tr_x"] * consts["tr_y"] / ((n - 1) * (n - 2))
        - 2.0 * q / (n - 2)
    ) / (n * (n - 3))
    return hxy / consts["denominator"]


def null_kernel(x, y, stats, *, debiased: bool = False) -> nulls.NullKernel:
    """The `NullKernel` for the batched random-pairing null of unweighted rows.

    The rows are scaled by ``1 / sqrt(||X^T X||_F)`` (resp. Y) so the float32 sums stay O(1).
    """
    xc = np.asarray(x, np.float64) - stats.mean_x
    yc = np.asarray(y, np.float64) - stats.mean_y
    n = xc.shape[0]
    sx = np.sqrt(np.linalg.norm(stats.cov_xx) * n)
    sy = np.sqrt(np.linalg.norm(stats.cov_yy) * n)
    a, b = xc / sx, yc / sy
    consts = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    row_bytes = 4 * n * (yc.shape[1] + 1)
    if not debiased:
        consts["denominator"] = jnp.float32(1.0)
        return nulls.NullKernel(cka_stat, consts, n, row_bytes=row_bytes, pad=_pad_rows)
    ra = np.einsum("ij,ij->i", a, a)
    rb = np.einsum("ij,ij->i", b, b)
    _, hxx, hyy = hsic_triple(paired_stats.stats_from_numpy(a, b))
    consts.update(
        ra=jnp.asarray(ra, jnp.float32),
        rb=jnp.asarray(rb, jnp.float32),
        tr_x=jnp.float32(ra.sum()),
        tr_y=jnp.float32(rb.sum()),
        denominator=jnp.float32(np.sqrt(hxx * hyy)),
    )
    return nulls.NullKernel(cka_debiased_stat, consts, n, row_bytes=row_bytes)

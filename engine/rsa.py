"""RSA: compare the within-space row-similarity structure of X [n, d1] and Y [n, d2].

Definition (Lan et al. 2024, docs/references.md, "Similarity of two paired matrices"): in each
space the similarity of two rows
is their Pearson correlation over the columns (centre each row, then cosine); the score is the
Spearman (default) or Pearson correlation of the two upper triangles (pairs i < j).

Exactness and cost (N = n (n - 1) / 2 pairs):

* ``method="pearson"``: exact for every n. The two similarity matrices are produced in row tiles
  of ``tile`` rows on the mesh (rows split over the ``data`` axis) and reduced to weighted
  sums in two passes (means, then centred second moments), so memory is O(tile * n) and compute
  O(n^2 (d1 + d2)). Row weights enter as pair weights ``w_i w_j``.
* ``method="spearman"``: exact (similarities and average ranks for ties in float64 on the
  host, exact ties kept as ties as in ``scipy.stats.spearmanr``, see ``TIE_ATOL``) for
  ``n <= max_exact_n`` (default 8192: two N-vectors of float64 plus their sort, about
  ``48 N`` bytes, ~1.6 GB at the default). Beyond it the **sampled estimator** draws
  ``num_samples`` pairs uniformly with replacement (seeded), computes both similarities of
  each pair, and returns the Spearman correlation of the samples. These are i.i.d. draws from
  the finite population of pairs, so the estimate's standard error is approximately
  ``(1 - rho^2) sqrt(1.06 / (M - 3))`` (Fieller, Hartley & Pearson 1957), reported as
  ``standard_error``; at the default M = 2^20 that is <= 1e-3. The tests check the sampled
  estimate against the exact value within 4 standard errors. Spearman takes no row weights
  (weighted rank correlation is not defined here: use Pearson, or select rows).

Rows that are constant over their columns have no correlation with anything: `InputError`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from engine import checks, nulls, paired_stats
from engine import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_MAX_EXACT_N = 8192
DEFAULT_NUM_SAMPLES = 1 << 20
METHODS = ("spearman", "pearson")


@dataclasses.dataclass(frozen=True)
class RSAResult:
    """An RSA score; ``exact`` False means the sampled Spearman estimator was used."""

    method: str
    score: float
    n: int
    pairs: int
    d1: int
    d2: int
    exact: bool
    num_samples: int | None = None
    standard_error: float | None = None

    def to_dict(self) -> dict:
        out = {
            "method": f"rsa_{self.method}",
            "score": float(self.score),
            "n": self.n,
            "rows": self.n,
            "pairs": self.pairs,
            "d": [self.d1, self.d2],
            "n_over_d": self.n / max(self.d1, self.d2),
            "exact": self.exact,
        }
        if self.num_samples is not None:
            out["num_samples"] = int(self.num_samples)
            out["standard_error"] = (
                None if self.standard_error is None else float(self.standard_error)
            )
        return out


def standardize_rows(name: str, x) -> np.ndarray:
    """Centres each row over its columns and scales it to unit norm (float64).

    Raises `InputError` naming the first constant row (its correlation is undefined).
    """
    x = np.asarray(x, np.float64)
    if x.shape[1] < 2:
        raise checks.InputError(
            f"{name}: row correlations need at least 2 columns, got {x.shape[1]}"
        )
    xc = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(xc, axis=1)
    scale = np.abs(x).max(axis=1) + 1e-300
    bad = norms <= 1e-12 * scale * np.sqrt(x.shape[1])
    if bad.any():
        raise checks.InputError(
            f"{name}: {int(bad.sum())} row(s) are constant over the "
            f"columns (first: row {int(np.argmax(bad))}); their "
            "correlation with other rows is undefined"
        )
    return xc / norms[:, None]


def rankdata(v: np.ndarray, atol: float = 0.0, rel_tol: float = 0.0) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (float64), as ``scipy.stats.rankdata``.

    Args:
      v: ``[N]`` values.
      atol / rel_tol: sorted neighbours closer than ``max(atol, rel_tol * max(1, max|v|))``
        form one tie group. Values equal in exact arithmetic but computed along different
        float paths differ in the last bits (the circulant cosine matrix of a perfect circle);
        ranking them as distinct would make the Spearman RSA of two identical geometries depend
        on round-off. Both 0: exactly equal values are ties, nothing else.
    """
    v = np.asarray(v)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    # Start index of each run of tied values, and the run's average rank.
    new = np.empty(len(sv), bool)
    new[0] = True
    tol = max(float(atol), float(rel_tol) * max(1.0, float(np.abs(sv).max(initial=0.0))))
    if tol > 0:
        np.greater(np.diff(np.asarray(sv, np.float64)), tol, out=new[1:])
    else:
        np.not_equal(sv[1:], sv[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(sv))
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(v), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray, what: str) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if not den > 0:
        raise checks.InputError(
            f"{what}: one of the similarity vectors is constant; the correlation is undefined"
        )
    return float(np.dot(a, b) / den)


@functools.lru_cache(maxsize=16)
def _gram_fn(mesh):
    rows = mesh_lib.data_sharding(mesh, 2)
    rep = mesh_lib.replicated(mesh)
    return jax.jit(
        lambda zl, zr: jnp.dot(zl, zr.T, precision=HIGHEST),
        in_shardings=(rows, rep),
        out_shardings=rows,
    )


def row_similarity(z: np.ndarray, mesh) -> np.ndarray:
    """``z z^T`` as float64 host numpy, rows split over the mesh ``data`` axis (float32)."""
    n = z.shape[0]
    ndev = mesh.shape[mesh_lib.DATA]
    pad = (-n) % ndev
    zl = np.concatenate([z, np.zeros((pad, z.shape[1]))]) if pad else z
    out = _gram_fn(mesh)(jnp.asarray(zl, jnp.float32), jnp.asarray(z, jnp.float32))
    return np.asarray(mesh_lib.gather(out), np.float64)[:n]  # several processes: all rows


def row_correlation(x, *, mesh=None) -> np.ndarray:
    """``[n, n]`` Pearson correlations between the rows of ``x`` (float32 on the mesh)."""
    x = checks.as_float_matrix("row_correlation x", x, min_rows=1)
    mesh = paired_stats.default_mesh() if mesh is None else mesh
    return row_similarity(standardize_rows("row_correlation x", x), mesh)


# Spearman needs exact ties (binary or integer features give correlations with few distinct
# values and large tie groups): its similarities are computed in float64 on the host, and
# values within TIE_ATOL of each other (float64 error of a unit-norm dot product is ~d * 1e-16)
# share their average rank. Float32 similarities split tie groups arbitrarily (measured: 5.7e-4
# to 1.3e-3 off on binary data).
TIE_ATOL = 1e-12


def row_similarity_float64(z: np.ndarray, block: int = 2048) -> np.ndarray:
    """``z z^T`` in float64 on the host (row blocks; the exact-ties path of Spearman)."""
    z = np.asarray(z, np.float64)
    return np.concatenate([z[s : s + block] @ z.T for s in range(0, z.shape[0], block)])


def upper_triangle(r: np.ndarray) -> np.ndarray:
    """The entries i < j of a square matrix, row-major."""
    return r[np.triu(np.ones(r.shape, bool), 1)]


# --------------------------------------------------------------------------------------------
# Pearson RSA: exact, tiled, two passes.
# --------------------------------------------------------------------------------------------


def _tile_sims(zx, zy, w, start, tile):
    """Similarities of rows [start, start+tile) against all rows, with pair weights (i<j)."""
    n = zx.shape[0]
    rows = start + jnp.arange(tile)
    bx = jax.lax.dynamic_slice_in_dim(zx, start, tile)
    by = jax.lax.dynamic_slice_in_dim(zy, start, tile)
    rx = jnp.dot(bx, zx.T, precision=HIGHEST)
    ry = jnp.dot(by, zy.T, precision=HIGHEST)
    upper = (jnp.arange(n)[None, :] > rows[:, None]) & (rows[:, None] < n)
    wt = jax.lax.dynamic_slice_in_dim(w, start, tile)
    pw = jnp.where(upper, wt[:, None] * w[None, :], 0.0)
    return rx, ry, pw


@functools.lru_cache(maxsize=16)
def _pearson_fn(mesh, tile: int, tiles_per_device: int):
    """Two-pass weighted Pearson sums over row tiles; tiles are dealt out over ``data``."""

    def local(zx, zy, w, starts):
        def pass1(carry, start):
            rx, ry, pw = _tile_sims(zx, zy, w, start, tile)
            return carry + jnp.stack([jnp.sum(pw), jnp.sum(pw * rx), jnp.sum(pw * ry)]), None

        s1, _ = jax.lax.scan(pass1, jnp.zeros(3, jnp.float32), starts)
        s1 = jax.lax.psum(s1, mesh_lib.DATA)
        mx, my = s1[1] / s1[0], s1[2] / s1[0]

        def pass2(carry, start):
            rx, ry, pw = _tile_sims(zx, zy, w, start, tile)
            cx, cy = rx - mx, ry - my
            return carry + jnp.stack(
                [jnp.sum(pw * cx * cx), jnp.sum(pw * cy * cy), jnp.sum(pw * cx * cy)]
            ), None

        s2, _ = jax.lax.scan(pass2, jnp.zeros(3, jnp.float32), starts)
        return jax.lax.psum(s2, mesh_lib.DATA)

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P(), P(mesh_lib.DATA)), out_specs=P(), check_vma=False
    )
    return jax.jit(f)


def pearson_tiled(zx: np.ndarray, zy: np.ndarray, weights, mesh, tile: int = 256) -> float:
    """Weighted Pearson correlation of the upper triangles of ``zx zx^T`` and ``zy zy^T``."""
    n = zx.shape[0]
    tile = max(1, min(int(tile), n))
    ndev = mesh.shape[mesh_lib.DATA]
    num_tiles = -(-n // tile)
    per_dev = -(-num_tiles // ndev)
    pad_rows = per_dev * ndev * tile - n
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    zxp = np.concatenate([zx, np.zeros((pad_rows, zx.shape[1]))])
    zyp = np.concatenate([zy, np.zeros((pad_rows, zy.shape[1]))])
    wp = np.concatenate([w, np.zeros(pad_rows)])
    starts = np.arange(per_dev * ndev, dtype=np.int32) * tile
    # Note: padded rows have zero weight, so they add nothing to any sum; the `j > i` mask
    # also runs over them harmlessly.
    s = _pearson_fn(mesh, tile, per_dev)(
        jnp.asarray(zxp, jnp.float32),
        jnp.asarray(zyp, jnp.float32),
        jnp.asarray(wp / wp.max(), jnp.float32),
        jnp.asarray(starts),
    )
    sxx, syy, sxy = (float(v) for v in np.asarray(s, np.float64))
    if not (sxx > 0 and syy > 0):
        raise checks.InputError(
            "rsa pearson: one of the similarity vectors is constant; the correlation is undefined"
        )
    return sxy / np.sqrt(sxx * syy)


# --------------------------------------------------------------------------------------------
# Sampled Spearman estimator.
# --------------------------------------------------------------------------------------------


def sample_pairs(n: int, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform pairs i != j (with replacement), returned with i < j."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, num_samples)
    j = (i + 1 + rng.integers(0, n - 1, num_samples)) % n
    return np.minimum(i, j), np.maximum(i, j)


def _sampled_sims(z: np.ndarray, i: np.ndarray, j: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Similarities of the sampled pairs, float64 on the host (exact ties, see TIE_ATOL)."""
    z = np.asarray(z, np.float64)
    return np.concatenate(
        [
            np.einsum("ij,ij->i", z[i[s : s + block]], z[j[s : s + block]])
            for s in range(0, len(i), block)
        ]
    )


def spearman_standard_error(rho: float, num_samples: int) -> float:
    """Approximate standard error of a Spearman estimate from M i.i.d. pairs."""
    return float((1.0 - rho * rho) * np.sqrt(1.06 / max(num_samples - 3, 1)))


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def rsa(
    x,
    y,
    weights=None,
    *,
    method: str = "spearman",
    mesh=None,
    max_exact_n: int = DEFAULT_MAX_EXACT_N,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    tile: int = 256,
) -> RSAResult:
    """RSA score of paired X [n, d1], Y [n, d2] (see the module docstring).

    Args:
      weights: optional row weights (``method="pearson"`` only; pair weight ``w_i w_j``).
      method: "spearman" or "pearson".
      mesh: device mesh (default: one device).
      max_exact_n: largest n for the exact Spearman (larger n: sampled estimator).
      num_samples / seed: pairs drawn by the sampled estimator.
      tile: rows per tile of the similarity matrices.
    """
    if method not in METHODS:
        raise checks.InputError(f"rsa method must be one of {METHODS}, got {method!r}")
    x, y, weights = paired_stats.check_pair(x, y, weights, min_rows=3, name=f"rsa_{method}")
    if method == "spearman" and weights is not None:
        raise checks.InputError(
            "rsa_spearman takes no row weights (weighted rank correlation "
            "is not defined here); use method='pearson' or select rows"
        )
    mesh = paired_stats.default_mesh() if mesh is None else mesh
    n = x.shape[0]
    pairs = n * (n - 1) // 2
    zx = standardize_rows("rsa X", x)
    zy = standardize_rows("rsa Y", y)
    base = dict(method=method, n=n, pairs=pairs, d1=x.shape[1], d2=y.shape[1])
    if method == "pearson":
        return RSAResult(score=pearson_tiled(zx, zy, weights, mesh, tile), exact=True, **base)
    if n <= max_exact_n:
        rx = upper_triangle(row_similarity_float64(zx))
        ry = upper_triangle(row_similarity_float64(zy))
        score = _pearson(rankdata(rx, TIE_ATOL), rankdata(ry, TIE_ATOL), "rsa_spearman")
        return RSAResult(score=score, exact=True, **base)
    m = checks.check_positive_int("rsa num_samples", num_samples, minimum=4)
    i, j = sample_pairs(n, m, seed)
    score = _pearson(
        rankdata(_sampled_sims(zx, i, j), TIE_ATOL),
        rankdata(_sampled_sims(zy, i, j), TIE_ATOL),
        "rsa_spearman (sampled)",
    )
    return RSAResult(
        score=score,
        exact=False,
        num_samples=m,
        standard_error=spearman_standard_error(score, m),
        **base,
    )


# --------------------------------------------------------------------------------------------
# Random-pairing null kernels (engine/nulls.py runs them batched over permutations).
# --------------------------------------------------------------------------------------------


def _standardize_matrix(r: np.ndarray) -> np.ndarray:
    """Symmetric matrix with zero diagonal whose upper triangle has mean 0 and variance 1."""
    mask = np.triu(np.ones(r.shape, bool), 1)
    vals = r[mask]
    vals = (vals - vals.mean()) / vals.std()
    out = np.zeros(r.shape, np.float32)
    out[mask] = vals
    return out + out.T


def _matrix_from_upper(vals: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, n), np.float64)
    out[np.triu(np.ones((n, n), bool), 1)] = vals
    return out + out.T


def _circular_blocks(sx: np.ndarray, tile: int) -> np.ndarray:
    """``[T, tile, L]`` row tiles of ``sx`` (zero-padded to ``T * tile``), tile ``t`` holding the
    columns ``t * tile .. t * tile + L - 1`` (mod ``T * tile``), weighted so that the sum over
    tiles of ``<block, sy block>`` is the sum over the whole symmetric matrix.

    Block pairs ``(t, t + d mod T)``: ``d = 0`` weight 1, ``d = 1 .. (T - 1) // 2`` weight 2
    (each stands for ``(t + d, t)`` too), and for even ``T`` the pair ``d = T / 2`` weight 1 (met
    from both sides). Only about half of ``sy`` is gathered per permutation.
    """
    n = sx.shape[0]
    t_num = -(-n // tile)
    size = t_num * tile
    half = (t_num - 1) // 2
    extra = 1 if t_num % 2 == 0 else 0
    width = (1 + half + extra) * tile
    weights = np.concatenate(
        [np.ones(tile), np.full(half * tile, 2.0), np.ones(extra * tile)]
    ).astype(np.float32)
    padded = np.zeros((size, size), np.float32)
    padded[:n, :n] = sx
    rows = np.arange(t_num)[:, None, None] * tile + np.arange(tile)[None, :, None]
    cols = (np.arange(t_num)[:, None, None] * tile + np.arange(width)[None, None, :]) % size
    return padded[rows, cols] * weights


def rsa_matrix_stat(consts: dict, perm: jax.Array, tile: int = 64) -> jax.Array:
    """Pearson of standardised upper triangles ``sx`` and ``sy[perm][:, perm]``.

    ``consts["sxc"]`` is ``sx`` in `_circular_blocks` layout: row tile ``t`` of ``sy[perm]``
    is gathered at about half of the columns (``tile x L``, L ~ n / 2), using the symmetry of
    both matrices (1.6x less CPU time than the full ``tile x n`` at n = 5000). The indices
    are gathered as uint32 (no negative-index wrap-around to compute).
    """
    sxc, sy = consts["sxc"], consts["sy"]
    n = sy.shape[0]
    t_num, _, width = sxc.shape
    size = t_num * tile
    perm = perm.astype(jnp.uint32)
    perm_p = jnp.concatenate([perm, jnp.zeros((size - n,), perm.dtype)])
    perm_2 = jnp.concatenate([perm_p, perm_p])

    def body(acc, t):
        rows = jax.lax.dynamic_slice_in_dim(perm_p, t * tile, tile)
        cols = jax.lax.dynamic_slice_in_dim(perm_2, t * tile, width)
        return acc + jnp.sum(sxc[t] * sy[rows][:, cols]), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(t_num))
    # the full matrix counts every pair twice; a padded kernel carries its real row count
    pairs = consts["pairs"] if "pairs" in consts else n * (n - 1)
    return total / pairs


def _pad_matrices(sx: np.ndarray, consts: dict, static: tuple, size: int) -> tuple[dict, tuple]:
    """Zero rows and columns of the standardised matrices (they add nothing to the sum while
    they stay put), the real pair count, and a tile fixed by ``size``. ``sx`` (host) is bound
    by `null_kernel` (the kernel keeps only its circular blocks)."""
    n = sx.shape[0]
    tile = max(1, min(64, size))
    out = {
        "sxc": jnp.asarray(_circular_blocks(np.pad(sx, ((0, size - n), (0, size - n))), tile)),
        "sy": jnp.pad(consts["sy"], ((0, size - n), (0, size - n))),
        "pairs": jnp.float32(n * (n - 1)),
    }
    return out, (("tile", tile),)


def rsa_sampled_stat(consts: dict, perm: jax.Array, m: int, block: int = 1 << 16) -> jax.Array:
    """Sampled Spearman of fixed pairs: X ranks fixed, Y similarities recomputed at perm.

    ``consts["i"]``, ``["j"]`` hold the M pairs padded to a multiple of ``block`` (padding
    pairs carry ``rank_x = 0`` and rank last, so they add nothing); the gathered rows are
    bounded to ``block x d`` at a time. Y's ties rank in index order (float32 on the device;
    continuous data has none): with heavily tied features (binary), prefer the exact path
    (raise ``max_exact_n``), whose null ranks are computed once in float64 with average ranks.
    """
    zy, i, j, rank_x = consts["zy"], consts["i"], consts["j"], consts["rank_x"]

    def sims_block(ij):
        bi, bj = ij
        return jnp.sum(zy[perm[bi]] * zy[perm[bj]], axis=1)

    sims = jax.lax.map(sims_block, (i.reshape(-1, block), j.reshape(-1, block))).reshape(-1)
    valid = jnp.arange(sims.shape[0]) < m
    sims = jnp.where(valid, sims, jnp.inf)
    ranks = jnp.argsort(jnp.argsort(sims)).astype(jnp.float32)
    ranks = jnp.where(valid, (ranks - (m - 1) / 2.0) / jnp.sqrt((m * m - 1) / 12.0), 0.0)
    return jnp.sum(rank_x * ranks) / m


def null_kernel(
    x,
    y,
    result: RSAResult,
    *,
    mesh=None,
    max_exact_n: int = DEFAULT_MAX_EXACT_N,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    tile: int = 64,
):
    """The `NullKernel` for the batched random-pairing null of unweighted rows.

    Exact path: the (rank-transformed for Spearman) similarity matrices are standardised once;
    the multiset of Y's similarities does not change under a permutation of Y's rows, so the
    null statistic is just ``<sx, sy[perm][:, perm]>`` over the upper triangle. Sampled
    path: the same pairs as the score, Y's similarities and ranks recomputed per permutation.
    """
    mesh = paired_stats.default_mesh() if mesh is None else mesh
    zx = standardize_rows("rsa X", x)
    zy = standardize_rows("rsa Y", y)
    n = zx.shape[0]
    if result.exact:
        if result.method == "spearman":
            rx = rankdata(upper_triangle(row_similarity_float64(zx)), TIE_ATOL)
            ry = rankdata(upper_triangle(row_similarity_float64(zy)), TIE_ATOL)
        else:
            rx = upper_triangle(row_similarity(zx, mesh))
            ry = upper_triangle(row_similarity(zy, mesh))
        sx = _standardize_matrix(_matrix_from_upper(rx, n))
        sy = _standardize_matrix(_matrix_from_upper(ry, n))
        tile = max(1, min(int(tile), n))
        return nulls.NullKernel(
            rsa_matrix_stat,
            {"sxc": jnp.asarray(_circular_blocks(sx, tile)), "sy": jnp.asarray(sy)},
            n,
            static=(("tile", tile),),
            # A permutation gathers half of sy (n x n float32) tile by tile; vmapping many
            # permutations multiplies the gathered working set past the caches (n = 5000:
            # batch 25 ran 2-3x slower per permutation than batch 1 on 2 CPU cores).
            row_bytes=4 * n * n,
            pad=functools.partial(_pad_matrices, sx),
        )
    assert result.num_samples is not None  # the sampled estimator recorded its sample size
    i, j = sample_pairs(n, result.num_samples, seed)
    rank_x = rankdata(_sampled_sims(zx, i, j), TIE_ATOL)
    m = len(rank_x)
    rank_x = (rank_x - (m + 1) / 2.0) / np.sqrt((m * m - 1) / 12.0)
    block = int(min(1 << 16, m))
    pad = (-m) % block
    consts = {
        "zy": jnp.asarray(zy, jnp.float32),
        "i": jnp.asarray(np.concatenate([i, np.zeros(pad, i.dtype)]), jnp.int32),
        "j": jnp.asarray(np.concatenate([j, np.zeros(pad, j.dtype)]), jnp.int32),
        "rank_x": jnp.asarray(np.concatenate([rank_x, np.zeros(pad)]), jnp.float32),
    }
    return nulls.NullKernel(
        rsa_sampled_stat,
        consts,
        n,
        static=(("m", m), ("block", block)),
        row_bytes=4 * (m + pad) * 8 + 8 * block * zy.shape[1],
    )


# --------------------------------------------------------------------------------------------
# RSA of two similarity matrices over the same few items (Mantel test).
# --------------------------------------------------------------------------------------------

#: (Dis)similarities closer than this (relative) are ties when ranked for the Mantel RSA.
RANK_TIE_TOL = 1e-6


def _upper_ranks(S: np.ndarray, name: str) -> np.ndarray:
    """Symmetric matrix of the average ranks of the strict upper triangle of ``S``."""
    m = S.shape[0]
    iu = np.triu_indices(m, 1)
    vals = S[iu]
    if np.ptp(vals) <= 1e-12 * max(1.0, np.abs(vals).max()):
        raise checks.InputError(
            f"{name}: all off-diagonal entries are equal; the rank correlation (RSA) is undefined"
        )
    R = np.zeros((m, m))
    R[iu] = rankdata(vals, rel_tol=RANK_TIE_TOL)
    return R + R.T


def mantel(
    S_a,
    S_b,
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    exact_limit: int = nulls.EXACT_LIMIT,
    names=("A", "B"),
) -> nulls.NullSummary:
    """Spearman RSA of two ``[m, m]`` symmetric (dis)similarity matrices over the same items.

    The same score as `rsa` (Spearman of the strict upper triangles, average ranks for ties,
    values within `RANK_TIE_TOL` counted as tied), for callers that already hold the two
    matrices (concept items, group distances), against a Mantel null that permutes the items of
    ``S_b`` (rows and columns together); exact by enumeration for few items
    (`nulls.item_permutation_test`).
    """
    S_a = np.asarray(S_a, np.float64)
    S_b = np.asarray(S_b, np.float64)
    if S_a.ndim != 2 or S_a.shape[0] != S_a.shape[1] or S_a.shape != S_b.shape:
        raise checks.InputError(
            f"mantel RSA: expected two square matrices of the same size, "
            f"got {S_a.shape} and {S_b.shape}"
        )
    checks.check_finite(f"{names[0]} similarity matrix", S_a)
    checks.check_finite(f"{names[1]} similarity matrix", S_b)
    m = S_a.shape[0]
    if m < 3:
        raise checks.InputError(f"mantel RSA: {m} item(s); need at least 3 (3 pairs)")
    iu = np.triu_indices(m, 1)
    ra = _upper_ranks(S_a, f"{names[0]} similarity matrix")[iu]
    ra = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    RB = _upper_ranks(S_b, f"{names[1]} similarity matrix")

    def stat(perms):
        rb = RB[perms[:, iu[0]], perms[:, iu[1]]]  # [R, pairs]
        rb = rb - rb.mean(1, keepdims=True)
        return rb @ ra / np.linalg.norm(rb, axis=1)

    return nulls.item_permutation_test(
        stat, m, num_permutations=num_permutations, seed=seed, exact_limit=exact_limit
    )

"""Pairwise cosine similarity of two dictionaries, streamed in tiles, with exact argmax.

Given two dictionaries ``A [n_a, d]`` and ``B [n_b, d]`` (e.g. SAE decoder rows of two models),
`max_cosine` finds, for every row of A, its most similar rows of B (max, argmax, top-k) and, in
the same pass, the most similar rows of A for every row of B; it also counts the partners above
given thresholds and derives mutual nearest neighbours. This is the decoder-cosine pairing of
Paulo & Belrose 2025 (arXiv 2501.16615) and the MMCS of Sharkey et al. 2022 (see
docs/references.md, "Feature pairing across two SAEs"): a 131072 x 131072 float32 cosine
matrix is 64 GiB, so it is never materialised beyond one ``tile_a x tile_b`` tile.

Algorithm (per device):

* Rows of A are split over every device of the mesh (the ``feature`` axis and, since this
  primitive has no token rows, the ``data`` axis too: all devices work). B is replicated.
* Each device loops over its A tiles and, inside, over the B tiles: ``S = A_t B_t^T`` (one
  GEMM), then the top-K of every row and of every column of ``S`` are merged into running
  top-K lists. Top-K of a tile is hierarchical: the max of every strip of 16 columns
  (32 rows for the column side) is one vectorised pass over ``S``; the top-K strips are
  gathered (any element of the tile top-K lies in a top-K strip) and searched exactly. This
  keeps the work beyond the GEMM to about one extra pass over the tile instead of a full
  per-element argmax/top_k (which cost 30-40 % of the GEMM time on CPU).
* Padded rows are zero vectors (cosine exactly 0 with anything): the host drops them from
  the candidate lists and from the counts, so the kernel needs no per-element masking.
* The column (B-side) lists of all devices are gathered and merged in device order.

Exactness (``exact=True``, the default): the float32 GEMM is accurate to
``tol = (d + 3) * 2**-24`` (a rigorous bound for unit vectors), so the kernel keeps
``K = k + margin`` float32 candidates per row, and the host rescores them in float64 and sorts
them. When the K-th float32 candidate is more than ``2 * tol`` below the k-th, the true float64
top-k is provably among the candidates; otherwise (many near-ties) that row is recomputed
against all of the other side in float64. The result is then the same as ``argmax`` /
``argsort`` of a dense float64 numpy cosine matrix.

Ties: exact float64 ties go to the LOWEST index (numpy ``argmax`` convention). Bit-identical
duplicate rows tie exactly; values that differ only in the last float64 bit (different
summation orders) may resolve either way, as they would between two BLAS libraries. With
``exact=False`` the float32 values are returned and float32 ties go to the lowest index.

Counts above thresholds use the float32 cosines, so a partner within ``tol`` (~6e-5 for
d = 1024) of a threshold may be counted either way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib

STRIP_ROWS = 16  # columns per strip of the row-wise hierarchical tile top-K
STRIP_COLS = 32  # rows per strip of the column-wise one (both measured best on CPU)
ALIGN = 128  # tiles are multiples of this (GEMM-friendly, divisible by the strips)
U32 = 2.0**-24  # float32 unit roundoff
DEFAULT_MAX_FULL = 1 << 26  # opt-in full matrix: at most 64M entries (256 MiB float32)


@dataclasses.dataclass
class PairwiseResult:
    """Nearest neighbours between the rows of A and B by cosine similarity.

    Attributes:
      a_topk_values: ``[n_a, k]`` cosines of the k most similar rows of B, descending
        (float64 when exact, else float32).
      a_topk_indices: ``[n_a, k]`` their row indices in B.
      b_topk_values / b_topk_indices: the same for every row of B over the rows of A.
      thresholds: the thresholds of the counts.
      a_counts: ``[n_a, len(thresholds)]`` number of rows of B with cosine >= each threshold.
      b_counts: ``[n_b, len(thresholds)]`` number of rows of A with cosine >= each threshold.
      exact: whether values/indices were refined in float64.
      tol: the float32 error bound used for the refinement.
      n_fallback_a / n_fallback_b: rows recomputed fully in float64 (near-ties).
      full: the ``[n_a, n_b]`` float32 cosine matrix when requested (small inputs only).
    """

    a_topk_values: np.ndarray
    a_topk_indices: np.ndarray
    b_topk_values: np.ndarray
    b_topk_indices: np.ndarray
    thresholds: tuple[float, ...]
    a_counts: np.ndarray
    b_counts: np.ndarray
    exact: bool
    tol: float
    n_fallback_a: int = 0
    n_fallback_b: int = 0
    full: np.ndarray | None = None

    @property
    def a_max(self) -> np.ndarray:
        """``[n_a]`` max cosine of each row of A over B."""
        return self.a_topk_values[:, 0]

    @property
    def a_argmax(self) -> np.ndarray:
        """``[n_a]`` index in B of each row of A's nearest neighbour."""
        return self.a_topk_indices[:, 0]

    @property
    def b_max(self) -> np.ndarray:
        return self.b_topk_values[:, 0]

    @property
    def b_argmax(self) -> np.ndarray:
        return self.b_topk_indices[:, 0]

    @property
    def mutual(self) -> np.ndarray:
        """``[n_a]`` bool: row i of A and its nearest row of B are each other's nearest."""
        return self.b_argmax[self.a_argmax] == np.arange(self.a_argmax.shape[0])

    def mutual_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mutual nearest neighbours as ``(rows_a, rows_b, cosines)``, by row of A."""
        rows = np.flatnonzero(self.mutual)
        return rows, self.a_argmax[rows], self.a_max[rows]

    def mmcs(self) -> float:
        """Mean over rows of A of the max cosine to B (Sharkey et al. 2022)."""
        return float(np.mean(self.a_max))


# --------------------------------------------------------------------------------------------
# Input handling.
# --------------------------------------------------------------------------------------------


def _row_norms(name: str, x: np.ndarray, block: int = 8192) -> np.ndarray:
    """float64 row norms in blocks (bounded memory); raises on zero rows."""
    out = np.empty(x.shape[0], np.float64)
    for lo in range(0, x.shape[0], block):
        blk = np.asarray(x[lo : lo + block], np.float64)
        out[lo : lo + block] = np.sqrt(np.einsum("nd,nd->n", blk, blk))
    zero = np.flatnonzero(out == 0)
    if zero.size:
        raise checks.InputError(
            f"{name}: {zero.size} row(s) with zero norm (first: row {zero[0]}); cosine is "
            "undefined for them: drop dead/empty rows first"
        )
    return out


def _normalised_f32(x: np.ndarray, norms: np.ndarray, rows: int, block: int = 8192) -> np.ndarray:
    """Unit rows in float32, zero-padded to ``rows`` rows.

    Computed in float32 from the float64 norms: rounding the input, the norm and the quotient
    gives a relative error <= 3u per entry, the ``3u`` of `cosine_tolerance`.
    """
    out = np.zeros((rows, x.shape[1]), np.float32)
    inv = norms.astype(np.float32)
    for lo in range(0, x.shape[0], block):
        blk = np.asarray(x[lo : lo + block], np.float32)
        np.divide(blk, inv[lo : lo + blk.shape[0], None], out=out[lo : lo + blk.shape[0]])
    return out


def _validate_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = checks.as_float_matrix("A", a)
    b = checks.as_float_matrix("B", b)
    if a.shape[1] != b.shape[1]:
        raise checks.InputError(
            f"A has {a.shape[1]} columns but B has {b.shape[1]}; the two "
            "dictionaries must live in the same space (same d)"
        )
    return a, b


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _device_axes(mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _linear_index(mesh, axes: Sequence[str]):
    idx = 0
    for name in axes:
        idx = idx * mesh.shape[name] + jax.lax.axis_index(name)
    return idx


# --------------------------------------------------------------------------------------------
# The tiled kernel.
# --------------------------------------------------------------------------------------------


def _tile_topk_rows(s: jax.Array, k: int, strip: int = STRIP_ROWS):
    """Exact top-k of every row of the tile ``s [r, c]`` (c a multiple of ``strip``).

    Returns ``(values [r, k], column indices [r, k])``; float32 ties go to the lower column.
    """
    r, c = s.shape
    nstrips = c // strip
    s3 = s.reshape(r, nstrips, strip)
    strip_max = jnp.max(s3, axis=2)  # [r, nstrips]
    ks = min(k, nstrips)
    _, sid = jax.lax.top_k(strip_max, ks)  # [r, ks]
    # Ascending strip order makes the candidate array ascending in column index, so that
    # top_k's lower-index-first rule gives the lowest column among float32 ties.
    sid = jnp.sort(sid, axis=1)
    cand = jnp.take_along_axis(s3, sid[:, :, None], axis=1).reshape(r, ks * strip)
    vals, pos = jax.lax.top_k(cand, k)
    cols = jnp.take_along_axis(sid, pos // strip, axis=1) * strip + pos % strip
    return vals, cols.astype(jnp.int32)


def _tile_topk_cols(s: jax.Array, k: int, strip: int = STRIP_COLS):
    """Exact top-k of every column of the tile ``s [r, c]`` (r a multiple of ``strip``).

    Returns ``(values [c, k], row indices [c, k])``.
    """
    r, c = s.shape
    nstrips = r // strip
    s3 = s.reshape(nstrips, strip, c)
    strip_max = jnp.max(s3, axis=1)  # [nstrips, c]
    ks = min(k, nstrips)
    _, sid = jax.lax.top_k(strip_max.T, ks)  # [c, ks]
    sid = jnp.sort(sid, axis=1)
    cand = jnp.take_along_axis(s3, sid.T[:, None, :], axis=0)  # [ks, STRIP, c]
    cand = cand.reshape(ks * strip, c).T  # [c, ks*strip]
    vals, pos = jax.lax.top_k(cand, k)
    rows = jnp.take_along_axis(sid, pos // strip, axis=1) * strip + pos % strip
    return vals, rows.astype(jnp.int32)


def _merge_topk(vals_old, idx_old, vals_new, idx_new, k: int):
    """Merges two top-k lists (old first: it wins ties, it holds the lower indices)."""
    v = jnp.concatenate([vals_old, vals_new], axis=1)
    i = jnp.concatenate([idx_old, idx_new], axis=1)
    top, pos = jax.lax.top_k(v, k)
    return top, jnp.take_along_axis(i, pos, axis=1)


# Public names of the tile primitives (used by engine.correlation for its best matches).
tile_topk_rows = _tile_topk_rows
tile_topk_cols = _tile_topk_cols
merge_topk = _merge_topk


def _counts(s: jax.Array, thresholds: tuple[float, ...], axis: int) -> jax.Array:
    if not thresholds:
        return jnp.zeros((s.shape[1 - axis], 0), jnp.int32)
    return jnp.stack([jnp.sum(s >= t, axis=axis, dtype=jnp.int32) for t in thresholds], -1)


@functools.lru_cache(maxsize=32)
def _build_kernel(
    mesh, ta: int, tb: int, k: int, thresholds: tuple[float, ...], precision_name: str
):
    """Jitted, sharded ``(a, b) -> (a_vals, a_idx, a_cnt, b_vals, b_idx, b_cnt)``.

    Padded rows of A and B are zero vectors, so every cosine involving them is exactly 0;
    the host drops padded candidates and corrects the counts (no per-element masking here,
    which cost ~10 % of the GEMM time).
    """
    axes = _device_axes(mesh)
    precision = getattr(jax.lax.Precision, precision_name)
    n_t = len(thresholds)

    def local(a_loc, b):
        na_loc, nb = a_loc.shape[0], b.shape[0]
        nt_a, nt_b = na_loc // ta, nb // tb
        a_off = _linear_index(mesh, axes) * na_loc

        def a_step(carry_b, ia):
            at = jax.lax.dynamic_slice_in_dim(a_loc, ia * ta, ta)
            init_a = (
                jnp.full((ta, k), -jnp.inf, jnp.float32),
                jnp.full((ta, k), -1, jnp.int32),
                jnp.zeros((ta, n_t), jnp.int32),
            )

            def b_step(carry, ib):
                (av, ai, ac), (bv, bi, bc) = carry
                bt = jax.lax.dynamic_slice_in_dim(b, ib * tb, tb)
                s = jnp.dot(at, bt.T, precision=precision, preferred_element_type=jnp.float32)
                # A side: this tile's best columns, merged into the running lists.
                tv, tc = _tile_topk_rows(s, k)
                av, ai = _merge_topk(av, ai, tv, tc + ib * tb, k)
                ac = ac + _counts(s, thresholds, axis=1)
                # B side: this tile's best rows for each column.
                cv, cr = _tile_topk_cols(s, k)
                ov = jax.lax.dynamic_slice_in_dim(bv, ib * tb, tb)
                oi = jax.lax.dynamic_slice_in_dim(bi, ib * tb, tb)
                nv, ni = _merge_topk(ov, oi, cv, cr + a_off + ia * ta, k)
                bv = jax.lax.dynamic_update_slice_in_dim(bv, nv, ib * tb, 0)
                bi = jax.lax.dynamic_update_slice_in_dim(bi, ni, ib * tb, 0)
                oc = jax.lax.dynamic_slice_in_dim(bc, ib * tb, tb)
                bc = jax.lax.dynamic_update_slice_in_dim(
                    bc, oc + _counts(s, thresholds, axis=0), ib * tb, 0
                )
                return ((av, ai, ac), (bv, bi, bc)), None

            ((av, ai, ac), carry_b), _ = jax.lax.scan(b_step, (init_a, carry_b), jnp.arange(nt_b))
            return carry_b, (av, ai, ac)

        init_b = (
            jnp.full((nb, k), -jnp.inf, jnp.float32),
            jnp.full((nb, k), -1, jnp.int32),
            jnp.zeros((nb, n_t), jnp.int32),
        )
        (bv, bi, bc), (av, ai, ac) = jax.lax.scan(a_step, init_b, jnp.arange(nt_a))
        av = av.reshape(na_loc, k)
        ai = ai.reshape(na_loc, k)
        ac = ac.reshape(na_loc, n_t)
        # Merge the B-side lists of all devices, in device order (= ascending A rows).
        gv = jax.lax.all_gather(bv, axes)  # [D, nb, k]
        gi = jax.lax.all_gather(bi, axes)
        ndev = gv.shape[0]
        gv = jnp.transpose(gv, (1, 0, 2)).reshape(nb, ndev * k)
        gi = jnp.transpose(gi, (1, 0, 2)).reshape(nb, ndev * k)
        top, pos = jax.lax.top_k(gv, k)
        bi = jnp.take_along_axis(gi, pos, axis=1)
        bc = jax.lax.psum(bc, axes)
        return av, ai, ac, top, bi, bc

    row = P(axes)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(row, P()),
        out_specs=(row, row, row, P(), P(), P()),
        check_vma=False,
    )
    return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# Host float64 refinement.
# --------------------------------------------------------------------------------------------


def _refine(
    q: np.ndarray,
    q_norm: np.ndarray,
    r: np.ndarray,
    r_norm: np.ndarray,
    cand_vals: np.ndarray,
    cand_idx: np.ndarray,
    k: int,
    tol: float,
    *,
    rescore: bool = True,
    block: int = 1024,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of each row of q over the rows of r from the kernel's float32 candidates.

    Candidates with an index >= ``len(r)`` are padding (cosine exactly 0) and are dropped.
    A row is certified when it has >= k real candidates and its last (K-th) candidate is more
    than ``2 tol`` below its k-th real one: then no row outside the list can belong to the
    true top-k (see the module docstring). Uncertified rows are recomputed fully in float64.

    Args:
      rescore: rescore certified rows in float64 (exact); else keep their float32 values.

    Returns:
      ``(values [n, k], indices [n, k], number of rows recomputed in full)``.
    """
    n, kk = cand_idx.shape
    n_r = r.shape[0]
    out_v = np.empty((n, k), np.float64 if rescore else np.float32)
    out_i = np.empty((n, k), np.int64)
    uncertain = np.zeros(n, bool)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        ci = cand_idx[lo:hi].astype(np.int64)
        cv = cand_vals[lo:hi]
        valid = (ci >= 0) & (ci < n_r)
        n_valid = valid.sum(axis=1)
        # float32 value of the k-th real candidate (lists are sorted descending).
        kth = np.sort(np.where(valid, cv, -np.inf), axis=1)[:, ::-1][:, k - 1]
        if kk < n_r:
            uncertain[lo:hi] = (n_valid < k) | (cv[:, kk - 1] >= kth - 2.0 * tol)
        else:
            uncertain[lo:hi] = n_valid < k
        # Rows whose first k+1 float32 values are more than 2 tol apart: their float32 order
        # is the exact order, so only the k kept values need float64 (most rows).
        clean = valid[:, :k].all(axis=1)
        if kk > k:
            clean &= (-np.diff(cv[:, : k + 1], axis=1) > 2.0 * tol).all(axis=1)
        if rescore:
            qb = np.asarray(q[lo:hi], np.float64) / q_norm[lo:hi, None]
            v = np.full(ci.shape, -np.inf)
            for sel, cols in ((clean, slice(0, k)), (~clean, slice(0, kk))):
                rows_b = np.flatnonzero(sel)
                if rows_b.size:
                    c = ci[rows_b, cols]
                    safe = np.where(valid[rows_b, cols], c, 0)
                    rb = np.asarray(r[safe.ravel()], np.float64).reshape(
                        rows_b.size, c.shape[1], -1
                    )
                    v[rows_b, cols] = np.einsum("nd,nkd->nk", qb[rows_b], rb) / (r_norm[safe])
        else:
            v = cv.astype(np.float64)
        v[~valid] = -np.inf
        order = np.lexsort((ci, -v), axis=-1)[:, :k]  # value desc, then lowest index
        out_v[lo:hi] = np.take_along_axis(v, order, axis=1)
        out_i[lo:hi] = np.take_along_axis(ci, order, axis=1)
    rows = np.flatnonzero(uncertain)
    if rows.size:
        _full_rows(q, q_norm, r, r_norm, rows, k, out_v, out_i)
    return out_v, out_i, int(rows.size)


def _full_rows(
    q, q_norm, r, r_norm, rows, k, out_v, out_i, block_rows: int = 64, block_cols: int = 65536
) -> None:
    """float64 top-k of the given rows of q against every row of r (bounded memory)."""
    for lo in range(0, rows.size, block_rows):
        sel = rows[lo : lo + block_rows]
        qb = np.asarray(q[sel], np.float64) / q_norm[sel, None]
        parts = []
        for c0 in range(0, r.shape[0], block_cols):
            rb = (
                np.asarray(r[c0 : c0 + block_cols], np.float64) / r_norm[c0 : c0 + block_cols, None]
            )
            parts.append(qb @ rb.T)
        v = np.concatenate(parts, axis=1)
        order = np.argsort(-v, axis=1, kind="stable")[:, :k]  # stable: lowest index on ties
        out_v[sel] = np.take_along_axis(v, order, axis=1)
        out_i[sel] = order


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


# Unit roundoff of the GEMM's INPUTS per hardware format (products are accumulated in float32
# in every case): float32; TF32 (10-bit mantissa: NVIDIA tensor cores at precision DEFAULT /
# HIGH); bf16 (7-bit mantissa: TPUs at DEFAULT). TPUs' HIGH (bf16_3x, three bf16 passes) is
# more accurate than TF32 and is bounded by it. `experiments/bench_precision.py` measures them
# against float64 on the CPU (docs/precision.md).
INPUT_ROUNDOFF = {"float32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
PRECISIONS = ("HIGHEST", "HIGH", "DEFAULT")


def input_format(precision: str, platform: str = "cpu") -> str:
    """The input rounding (`INPUT_ROUNDOFF` key) of matmul ``precision`` on ``platform``."""
    if precision in INPUT_ROUNDOFF:
        return precision
    if precision not in PRECISIONS:
        raise checks.InputError(
            f"matmul precision {precision!r}: expected one of "
            f"{PRECISIONS} or {tuple(INPUT_ROUNDOFF)}"
        )
    if precision == "HIGHEST" or platform == "cpu":
        return "float32"  # XLA:CPU computes float32 products at every precision
    if platform == "tpu" and precision == "DEFAULT":
        return "bf16"
    return "tf32"  # GPU DEFAULT / HIGH; TPU HIGH (bf16_3x, bounded by TF32)


def default_precision(platform: str) -> str:
    """The matmul precision `max_cosine` uses by default on ``platform`` (docs/precision.md).

    The float64 refinement keeps the result exact at any precision; lower precision only
    widens the error bound and so the rows recomputed on the host. Measured on decoder-like
    dictionaries (d = 1024, margin 4): TF32 leaves 0.05 % of rows uncertified, bf16 12 %. So:
    CPU HIGHEST (lower precision is not faster there), GPU DEFAULT (TF32), TPU HIGH (bf16_3x;
    one bf16 pass would send an eighth of the rows to the host).
    """
    return {"gpu": "DEFAULT", "cuda": "DEFAULT", "rocm": "DEFAULT", "tpu": "HIGH"}.get(
        platform, "HIGHEST"
    )


def cosine_tolerance(d: int, precision: str = "HIGHEST", platform: str = "cpu") -> float:
    """Rigorous bound on |computed cosine - exact cosine| for unit rows of dimension d.

    ``gamma_d = d u`` for the float32 dot product of unit vectors (Cauchy-Schwarz bounds the
    sum of |products| by 1) plus ``~3u`` for rounding the normalised inputs; a GEMM that
    rounds its inputs to ``u_in`` (`INPUT_ROUNDOFF`, from `input_format`) adds
    ``2 u_in + u_in^2`` (each product ``a_i (1 + e) b_i (1 + e')``, under Cauchy-Schwarz).
    """
    u_in = INPUT_ROUNDOFF[input_format(precision, platform)]
    return float(((d + 3) * U32 + 2 * u_in + u_in * u_in) * 1.01)


def default_tiles(mesh, n_b: int, d: int) -> tuple[int, int]:
    """Tile shape from the device's memory: 1024 x 2048 on CPU (measured best there: the
    tile stays in cache); on accelerators the largest square-ish tile whose float32 scores
    take at most 1/16 of one device's memory budget beside the replicated B, capped at 8192
    (GEMMs of that size run near the device's peak)."""
    dev = np.asarray(mesh.devices).flat[0]
    if dev.platform == "cpu":
        return 1024, 2048
    budget = mesh_lib.default_memory_budget(mesh) - 4 * n_b * d
    side = 8192
    while side > ALIGN and 4 * side * side * 3 > budget // 16:
        side //= 2
    return side, side


def max_cosine(
    a,
    b,
    mesh=None,
    *,
    k: int = 1,
    thresholds: Sequence[float] = (),
    tile_a: int | None = None,
    tile_b: int | None = None,
    exact: bool = True,
    margin: int = 4,
    full: bool = False,
    max_full: int = DEFAULT_MAX_FULL,
    precision: str | None = None,
) -> PairwiseResult:
    """Top-k cosine neighbours between the rows of A and B, both directions, in tiles.

    Args:
      a: ``[n_a, d]`` first dictionary (host or device array; rows need not be unit).
      b: ``[n_b, d]`` second dictionary.
      mesh: device mesh (default: all devices); A's rows are split over all its devices.
      k: neighbours kept per row (1 <= k <= min(n_a, n_b)).
      thresholds: cosines in [-1, 1]; the number of partners >= each is counted.
      tile_a / tile_b: tile shape (rounded to multiples of 128); memory per device is about
        ``4 * tile_a * tile_b`` bytes for the tile plus the inputs (default: `default_tiles`,
        from the device's memory).
      exact: refine in float64 on the host (exact argmax/top-k, see the module docstring).
      margin: extra float32 candidates kept per row for the refinement.
      full: also return the full ``[n_a, n_b]`` float32 matrix (needs n_a * n_b <= max_full).
      max_full: the largest full matrix allowed (entries).
      precision: matmul precision name (HIGHEST: float32; HIGH / DEFAULT: TF32 or bf16 inputs
        on accelerators, faster); default `default_precision` of the mesh's platform. The
        refinement's error bound follows it (`cosine_tolerance`), so ``exact=True`` stays
        exact at any precision; lower precision only leaves more rows uncertified
        (recomputed on the host; raise ``margin``). docs/precision.md has the measured cost.

    Returns:
      A `PairwiseResult`.
    """
    a, b = _validate_pair(a, b)
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    k = checks.check_positive_int("max_cosine k", k)
    if k > min(n_a, n_b):
        raise checks.InputError(f"max_cosine k={k} exceeds min(n_a, n_b)={min(n_a, n_b)}")
    thresholds = tuple(float(t) for t in thresholds)
    for t in thresholds:
        if not -1.0 <= t <= 1.0:
            raise checks.InputError(f"max_cosine thresholds must lie in [-1, 1], got {t}")
    margin = checks.check_positive_int("max_cosine margin", margin, minimum=0)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    platform = np.asarray(mesh.devices).flat[0].platform
    precision = default_precision(platform) if precision is None else precision
    if precision not in PRECISIONS:
        raise checks.InputError(
            f"max_cosine precision {precision!r}: expected one of "
            f"{PRECISIONS} (jax.lax.Precision names)"
        )
    auto_a, auto_b = default_tiles(mesh, n_b, d)
    tile_a = checks.check_positive_int("max_cosine tile_a", auto_a if tile_a is None else tile_a)
    tile_b = checks.check_positive_int("max_cosine tile_b", auto_b if tile_b is None else tile_b)
    if full and n_a * n_b > max_full:
        raise checks.InputError(
            f"max_cosine full=True needs n_a*n_b={n_a * n_b} <= "
            f"max_full={max_full}; use the streamed results instead"
        )
    axes = _device_axes(mesh)
    ndev = int(np.prod([mesh.shape[x] for x in axes]))

    norm_a = _row_norms("A", a)
    norm_b = _row_norms("B", b)
    # K candidates per row: k + margin (the refinement needs the margin to certify rows; the
    # float32-only path keeps it too, to drop padded candidates).
    kk = max(k, min(k + margin, n_a, n_b))
    # Tiles: multiples of ALIGN, no larger than needed, and wide enough for kk.
    ta = max(min(_round_up(tile_a, ALIGN), _round_up(-(-n_a // ndev), ALIGN)), _round_up(kk, ALIGN))
    tb = max(min(_round_up(tile_b, ALIGN), _round_up(n_b, ALIGN)), _round_up(kk, ALIGN))
    na_pad = _round_up(n_a, ndev * ta)
    nb_pad = _round_up(n_b, tb)

    a32 = _normalised_f32(a, norm_a, na_pad)
    b32 = _normalised_f32(b, norm_b, nb_pad)
    kernel = _build_kernel(mesh, ta, tb, kk, thresholds, precision)
    outs = kernel(
        jax.device_put(a32, NamedSharding(mesh, P(axes))),
        jax.device_put(b32, NamedSharding(mesh, P())),
    )
    del a32, b32
    av, ai, ac, bv, bi, bc = (np.asarray(x) for x in mesh_lib.gather(outs))
    av, ai, ac = av[:n_a], ai[:n_a], ac[:n_a]
    bv, bi, bc = bv[:n_b], bi[:n_b], bc[:n_b]
    # Padded partners have cosine exactly 0: they were counted for every threshold <= 0.
    nonpos = np.asarray([t <= 0.0 for t in thresholds], bool)
    ac = ac - nonpos[None, :] * (nb_pad - n_b)
    bc = bc - nonpos[None, :] * (na_pad - n_a)

    tol = cosine_tolerance(d, precision, platform)
    a_vals, a_idx, n_fa = _refine(a, norm_a, b, norm_b, av, ai, k, tol, rescore=exact)
    b_vals, b_idx, n_fb = _refine(b, norm_b, a, norm_a, bv, bi, k, tol, rescore=exact)
    out = PairwiseResult(
        a_topk_values=a_vals,
        a_topk_indices=a_idx,
        b_topk_values=b_vals,
        b_topk_indices=b_idx,
        thresholds=thresholds,
        a_counts=ac,
        b_counts=bc,
        exact=exact,
        tol=tol,
        n_fallback_a=n_fa,
        n_fallback_b=n_fb,
    )
    if full:
        out.full = cosine_matrix(a, b, mesh, max_elements=max_full)
    return out


@functools.lru_cache(maxsize=8)
def _build_matrix(mesh, precision_name: str):
    axes = _device_axes(mesh)
    precision = getattr(jax.lax.Precision, precision_name)
    return jax.jit(
        lambda x, y: jnp.dot(x, y.T, precision=precision),
        in_shardings=(NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())),
        out_shardings=NamedSharding(mesh, P(axes)),
    )


def cosine_matrix(
    a,
    b,
    mesh=None,
    *,
    max_elements: int = DEFAULT_MAX_FULL,
    precision: str = "HIGHEST",
    exact: bool = False,
) -> np.ndarray:
    """The full ``[n_a, n_b]`` cosine matrix (opt-in, small inputs only): the one helper.

    Args:
      a / b: ``[n_a, d]`` and ``[n_b, d]`` rows (zero rows rejected: cosine undefined).
      mesh: devices of the float32 product (default: all).
      max_elements: the largest matrix allowed; `InputError` beyond it (default 64M entries,
        256 MiB): use `max_cosine` for large dictionaries.
      precision: matmul precision of the float32 path.
      exact: float64 on the host, clipped to [-1, 1] (concept items, group distances: a few
        hundred rows whose exact ties matter for rank statistics).
    """
    a, b = _validate_pair(a, b)
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a * n_b > max_elements:
        raise checks.InputError(
            f"cosine_matrix: n_a*n_b={n_a * n_b} exceeds max_elements="
            f"{max_elements}; use max_cosine (streamed) instead"
        )
    if exact:
        an = np.asarray(a, np.float64) / _row_norms("A", a)[:, None]
        bn = an if b is a else np.asarray(b, np.float64) / _row_norms("B", b)[:, None]
        return np.clip(an @ bn.T, -1.0, 1.0)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    ndev = int(np.prod([mesh.shape[x] for x in _device_axes(mesh)]))
    na_pad = _round_up(n_a, ndev)
    a32 = _normalised_f32(a, _row_norms("A", a), na_pad)
    b32 = _normalised_f32(b, _row_norms("B", b), n_b)
    s = _build_matrix(mesh, precision)(a32, b32)
    return np.asarray(mesh_lib.gather(s))[:n_a]

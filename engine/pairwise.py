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

Host GEMM (``gemm="host"``, the default on a single CPU device): NumPy's (OpenBLAS) float32
GEMM is ~1.5x XLA:CPU's, so each ``4096 x 4096`` score tile is computed by NumPy in a worker
thread into one of two 64-byte aligned buffers (JAX wraps them without a copy), while the
jitted top-K above runs on the previous tile (NumPy releases the GIL). The last tile of each
side masks its padded rows/columns to -inf, so padding is never a candidate nor counted.

Exactness (``exact=True``, the default): the float32 GEMM is accurate to
``tol = (d + 3) * 2**-24`` (a rigorous bound for unit vectors), so the kernel keeps
``K = k + margin`` float32 candidates per row. The host certifies first, from the float32
values: every row outside a list has a float32 cosine <= the list's K-th value (whatever
filled the list, padding included, bounds what it left out). When that value is more than
``2 * tol`` below the k-th REAL candidate (or every real row is in the list), the true float64
top-k is provably among the real candidates; otherwise (near-ties) that row is recomputed
against all of the other side in float64. Padded candidates never count as real ones: with
``K >= n`` the old "every row is a candidate" shortcut was wrong when padding had displaced
a real row whose float32 cosine came out below 0. Certified rows are rescored in float64 by a
batched einsum over their candidates only (only the k kept ones when the float32 gaps already
fix the order); no float64 copy of the inputs is made. The result is then the same as
``argmax`` / ``argsort`` of a dense float64 numpy cosine matrix.

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
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib

STRIP_ROWS = 16  # columns per strip of the row-wise hierarchical tile top-K
STRIP_COLS = 32  # rows per strip of the column-wise one (both measured best on CPU)
HOST_STRIP_COLS = 16  # rows per strip of the host step's column top-K (4096-row tiles)
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


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    JAX's CPU client wraps such host buffers without copying (``device_put`` is zero-copy for
    64-byte aligned arrays), and BLAS kernels prefer aligned rows.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def _row_norms(name: str, x: np.ndarray, block: int = 256) -> np.ndarray:
    """float64 row norms in blocks (bounded memory); raises on zero rows and on NaN/Inf.

    The NaN/Inf check rides on this pass (a row with NaN/Inf has a non-finite norm), so the
    caller skips `checks.as_float_matrix`'s separate scan.
    """
    out = np.empty(x.shape[0], np.float64)
    for lo in range(0, x.shape[0], block):  # cache-sized blocks, float64 accumulation
        blk = np.asarray(x[lo : lo + block])
        out[lo : lo + block] = np.einsum("nd,nd->n", blk, blk, dtype=np.float64)
    np.sqrt(out, out=out)
    checks.check_finite_rows(name, x, out)
    zero = np.flatnonzero(out == 0)
    if zero.size:
        raise checks.InputError(
            f"{name}: {zero.size} row(s) with zero norm (first: row {zero[0]}); cosine is "
            "undefined for them: drop dead/empty rows first"
        )
    return out


def _normalised_f32(x: np.ndarray, norms: np.ndarray, rows: int, block: int = 8192) -> np.ndarray:
    """Unit rows in float32, zero-padded to ``rows`` rows, in a 64-byte aligned buffer.

    Computed in float32 from the float64 norms: rounding the input, the norm and the quotient
    gives a relative error <= 3u per entry, the ``3u`` of `cosine_tolerance`.
    """
    out = aligned_empty((rows, x.shape[1]), np.float32)
    out[x.shape[0] :] = 0.0
    inv = norms.astype(np.float32)
    for lo in range(0, x.shape[0], block):
        blk = np.asarray(x[lo : lo + block], np.float32)
        np.divide(blk, inv[lo : lo + blk.shape[0], None], out=out[lo : lo + blk.shape[0]])
    return out


def _prepare(name: str, x: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 row norms (checked) and the unit float32 rows padded to ``rows``."""
    norms = _row_norms(name, x)
    return norms, _normalised_f32(x, norms, rows)


def _validate_pair(a, b, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    a = checks.as_float_matrix("A", a, finite=finite)
    b = checks.as_float_matrix("B", b, finite=finite)
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
# The host-GEMM kernel (single CPU device).
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _build_host_step(ta: int, tb: int, k: int, thresholds: tuple[float, ...], masked: bool):
    """Jitted top-K/count update of one ``[ta, tb]`` score tile computed by NumPy.

    ``masked``: the tile holds padded rows/columns (the last tile of a side); they are set to
    -inf, so padding is never a candidate and never counted.
    """

    def step(s, av, ai, ac, bv, bi, bc, a_off, b_off, rows_valid, cols_valid):
        if masked:
            ok = (jnp.arange(ta) < rows_valid)[:, None] & (jnp.arange(tb) < cols_valid)[None, :]
            s = jnp.where(ok, s, -jnp.inf)
        tv, tc = _tile_topk_rows(s, k)
        av, ai = _merge_topk(av, ai, tv, tc + b_off, k)
        ac = ac + _counts(s, thresholds, axis=1)
        # 16-row strips: 34 vs 37 ms per 4096 x 4096 tile at K = 5 (9 interleaved rounds).
        cv, cr = _tile_topk_cols(s, k, strip=HOST_STRIP_COLS)
        bv, bi = _merge_topk(bv, bi, cv, cr + a_off, k)
        bc = bc + _counts(s, thresholds, axis=0)
        return av, ai, ac, bv, bi, bc

    return jax.jit(step)


_TILE_BUFFERS: dict[tuple[int, int], list[np.ndarray]] = {}
_TILE_LOCK = threading.Lock()


def _tile_buffers(ta: int, tb: int) -> list[np.ndarray]:
    """Two aligned ``[ta, tb]`` float32 buffers, reused across calls of the same tile shape
    (fresh 64 MiB buffers cost page faults on every call); a concurrent call, or another
    shape, gets fresh ones. Only the most recent shape is kept."""
    with _TILE_LOCK:
        bufs = _TILE_BUFFERS.pop((ta, tb), None)
        _TILE_BUFFERS.clear()
    return bufs if bufs is not None else [aligned_empty((ta, tb), np.float32) for _ in range(2)]


def _release_tile_buffers(bufs: list[np.ndarray]) -> None:
    with _TILE_LOCK:
        _TILE_BUFFERS[bufs[0].shape] = bufs  # type: ignore[index]


HOST_OVERLAP = True  # run tile t+1's GEMM in a thread while tile t's top-K runs


class _Serial:
    """Stand-in for a thread pool that runs each job at once (no overlap)."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self._Done(fn(*args))


def _host_kernel(a32, b32, n_a: int, n_b: int, ta: int, tb: int, k: int, thresholds):
    """Both-direction top-K and counts with NumPy (BLAS) tile GEMMs on the host.

    Tile GEMMs run in a worker thread (NumPy releases the GIL) into two 64-byte aligned
    buffers: the GEMM of tile t+1 overlaps the jitted top-K of tile t, which reads its buffer
    without a copy. Returns host arrays like `_build_kernel`'s (padding never included).
    """
    nt_a, nt_b = a32.shape[0] // ta, b32.shape[0] // tb
    n_t = len(thresholds)
    tiles = [(ia, ib) for ia in range(nt_a) for ib in range(nt_b)]
    bufs = _tile_buffers(ta, tb)
    steps = {m: _build_host_step(ta, tb, k, thresholds, m) for m in (False, True)}

    def gemm(t: int) -> np.ndarray:
        ia, ib = tiles[t]
        out = bufs[t % 2]
        np.matmul(a32[ia * ta : (ia + 1) * ta], b32[ib * tb : (ib + 1) * tb].T, out=out)
        return out

    def init(n):
        return (
            jnp.full((n, k), -jnp.inf, jnp.float32),
            jnp.full((n, k), -1, jnp.int32),
            jnp.zeros((n, n_t), jnp.int32),
        )

    b_state = [init(tb) for _ in range(nt_b)]
    a_out = []
    a_state = init(ta)
    prev = None
    with ThreadPoolExecutor(1) as pool:
        if not HOST_OVERLAP:
            pool = _Serial()  # type: ignore[assignment]
        fut = pool.submit(gemm, 0)
        for t, (ia, ib) in enumerate(tiles):
            s = fut.result()
            if ib == 0 and ia > 0:
                a_state = init(ta)
            rows_valid = min(ta, n_a - ia * ta)
            cols_valid = min(tb, n_b - ib * tb)
            step = steps[rows_valid < ta or cols_valid < tb]
            out = step(s, *a_state, *b_state[ib], ia * ta, ib * tb, rows_valid, cols_valid)
            a_state, b_state[ib] = out[:3], out[3:]
            if t + 1 < len(tiles):
                if prev is not None:  # the buffer GEMM t+1 overwrites was read by step t-1
                    jax.block_until_ready(prev)
                fut = pool.submit(gemm, t + 1)
            prev = out
            if ib == nt_b - 1:
                a_out.append(a_state)
        jax.block_until_ready(prev)
    _release_tile_buffers(bufs)
    av, ai, ac = (np.concatenate([np.asarray(x[j]) for x in a_out]) for j in range(3))
    bv, bi, bc = (np.concatenate([np.asarray(x[j]) for x in b_state]) for j in range(3))
    return av, ai, ac, bv, bi, bc


# --------------------------------------------------------------------------------------------
# Host float64 refinement.
# --------------------------------------------------------------------------------------------


def _rescore(q, q_norm, r, r_norm, rows, cols, max_elems: int = 1 << 18) -> np.ndarray:
    """float64 cosines of ``q[rows[i]]`` with ``r[cols[i, j]]`` (batched einsum, in blocks).

    Only the rows and candidate columns involved are gathered, in their own dtype, and the
    einsum accumulates in float64 (products of float32 values are exact in float64): never a
    float64 copy of the inputs. ``max_elems`` bounds the gathered block (cache-sized).
    """
    m = cols.shape[1]
    out = np.empty(cols.shape, np.float64)
    step = max(1, max_elems // max(1, m * q.shape[1]))
    for lo in range(0, rows.size, step):
        sel = rows[lo : lo + step]
        c = cols[lo : lo + step]
        rb = np.asarray(r[c.ravel()]).reshape(c.shape[0], m, -1)
        dots = np.einsum("nd,nmd->nm", np.asarray(q[sel]), rb, dtype=np.float64)
        out[lo : lo + step] = dots / q_norm[sel, None].astype(np.float64) / r_norm[c]
    return out


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
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of each row of q over the rows of r from the kernel's float32 candidates.

    Candidates with an index outside ``[0, len(r))`` are padding and are dropped; they never
    count as real candidates. Certification (first, on the float32 values): every row of r
    outside a row's list has a float32 cosine <= the list's last (K-th) value ``c_K`` (padding
    included: whatever filled the list bounds what it left out), so its exact cosine is
    <= ``c_K + tol``. A row is certified when it has >= k real candidates and either all of
    r is among them or ``c_K < v_k - 2 tol`` (``v_k``: its k-th real float32 value); else it
    is recomputed against all of r in float64 (`_full_rows`). Certified rows whose first
    ``k + 1`` real float32 values are more than ``2 tol`` apart have the exact order already:
    only their k kept values are rescored in float64; the other certified rows rescore every
    real candidate and re-sort.

    Args:
      rescore: rescore certified rows in float64 (exact); else keep their float32 values.

    Returns:
      ``(values [n, k], indices [n, k], number of rows recomputed in full)``.
    """
    n, kk = cand_idx.shape
    n_r = r.shape[0]
    ci = cand_idx.astype(np.int64)
    valid = (ci >= 0) & (ci < n_r)
    bound = np.min(cand_vals, axis=1)  # the K-th value of the kernel's list, padding included
    cv = np.where(valid, cand_vals.astype(np.float32), -np.inf)
    # Real candidates first, by float32 value descending, ties to the lowest index.
    order = np.lexsort((np.where(valid, ci, n_r), -cv), axis=-1)
    cv = np.take_along_axis(cv, order, axis=1)
    ci = np.take_along_axis(ci, order, axis=1)
    n_valid = valid.sum(axis=1)
    kth = cv[:, k - 1]
    uncertain = (n_valid < k) | ((n_valid < n_r) & (bound.astype(np.float64) >= kth - 2.0 * tol))
    m = min(k + 1, kk)
    with np.errstate(invalid="ignore"):
        gaps = -np.diff(cv[:, :m].astype(np.float64), axis=1)
    # A missing (k+1)-th real candidate is no competitor (+inf gap: -inf minus a value).
    clean = ~uncertain & (np.where(np.isnan(gaps), np.inf, gaps) > 2.0 * tol).all(axis=1)
    out_v = np.empty((n, k), np.float64 if rescore else np.float32)
    out_i = ci[:, :k].copy()
    if rescore:
        rows = np.flatnonzero(clean)
        out_v[rows] = _rescore(q, q_norm, r, r_norm, rows, ci[rows, :k])
        rows = np.flatnonzero(~clean & ~uncertain)
        if rows.size:
            c = ci[rows]
            ok = np.take_along_axis(valid, order, axis=1)[rows]
            v = _rescore(q, q_norm, r, r_norm, rows, np.where(ok, c, 0))
            v[~ok] = -np.inf
            o = np.lexsort((np.where(ok, c, n_r), -v), axis=-1)[:, :k]
            out_v[rows] = np.take_along_axis(v, o, axis=1)
            out_i[rows] = np.take_along_axis(c, o, axis=1)
    else:
        out_v[:] = cv[:, :k]
    rows = np.flatnonzero(uncertain)
    if rows.size:
        _full_rows(q, q_norm, r, r_norm, rows, k, out_v, out_i)
    return out_v, out_i, int(rows.size)


def _full_rows(
    q, q_norm, r, r_norm, rows, k, out_v, out_i, block_cols: int = 16384, max_elems: int = 1 << 22
) -> None:
    """float64 top-k of the given rows of q against every row of r (bounded memory).

    Column blocks of r are converted to float64 once each (outer loop) and scored against all
    the given rows; the running top-k keeps the lowest index on exact ties (earlier blocks
    first, stable sorts).
    """
    qb = np.asarray(q[rows], np.float64) / q_norm[rows, None]
    best_v = np.full((rows.size, 0), -np.inf)
    best_i = np.zeros((rows.size, 0), np.int64)
    row_step = max(1, max_elems // block_cols)
    for c0 in range(0, r.shape[0], block_cols):
        rb = np.asarray(r[c0 : c0 + block_cols], np.float64) / r_norm[c0 : c0 + block_cols, None]
        kb = min(k, rb.shape[0])
        bv = np.empty((rows.size, kb))
        bi = np.empty((rows.size, kb), np.int64)
        for lo in range(0, rows.size, row_step):
            v = qb[lo : lo + row_step] @ rb.T
            o = np.argsort(-v, axis=1, kind="stable")[:, :kb]
            bv[lo : lo + row_step] = np.take_along_axis(v, o, axis=1)
            bi[lo : lo + row_step] = o + c0
        v = np.concatenate([best_v, bv], axis=1)
        i = np.concatenate([best_i, bi], axis=1)
        o = np.argsort(-v, axis=1, kind="stable")[:, :k]
        best_v = np.take_along_axis(v, o, axis=1)
        best_i = np.take_along_axis(i, o, axis=1)
    out_v[rows] = best_v
    out_i[rows] = best_i


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


GEMMS = ("host", "xla")
HOST_TILE = 4096  # host-GEMM tile side: OpenBLAS runs near its peak, 64 MiB score tile


def default_gemm(mesh) -> str:
    """``"host"`` (NumPy tile GEMMs) on a single CPU device, else ``"xla"`` (see `max_cosine`)."""
    dev = np.asarray(mesh.devices).flat[0]
    return "host" if dev.platform == "cpu" and mesh.size == 1 else "xla"


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
    gemm: str | None = None,
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
      gemm: ``"host"``: NumPy (BLAS) float32 tile GEMMs on the host (default tiles
        `HOST_TILE`), overlapped with the jitted top-K of the previous tile; ``"xla"``: the
        sharded jitted kernel over the mesh. Default (`default_gemm`): ``"host"`` on a
        single CPU device (OpenBLAS's GEMM is ~1.5x XLA:CPU's), ``"xla"`` on multi-device
        meshes and accelerators. Both give the same result (exact when ``exact=True``).

    Returns:
      A `PairwiseResult`.
    """
    a, b = _validate_pair(a, b, finite=False)  # NaN/Inf: checked by the row norms
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
    gemm = default_gemm(mesh) if gemm is None else gemm
    if gemm not in GEMMS:
        raise checks.InputError(f"max_cosine gemm {gemm!r}: expected one of {GEMMS}")
    if gemm == "host" and precision != "HIGHEST":
        precision = "HIGHEST"  # NumPy's float32 GEMM: float32 inputs whatever was asked
    auto_a, auto_b = (HOST_TILE, HOST_TILE) if gemm == "host" else default_tiles(mesh, n_b, d)
    tile_a = checks.check_positive_int("max_cosine tile_a", auto_a if tile_a is None else tile_a)
    tile_b = checks.check_positive_int("max_cosine tile_b", auto_b if tile_b is None else tile_b)
    if full and n_a * n_b > max_full:
        raise checks.InputError(
            f"max_cosine full=True needs n_a*n_b={n_a * n_b} <= "
            f"max_full={max_full}; use the streamed results instead"
        )
    axes = _device_axes(mesh)
    ndev = int(np.prod([mesh.shape[x] for x in axes])) if gemm == "xla" else 1

    # K candidates per row: k + margin (the refinement needs the margin to certify rows; the
    # float32-only path keeps it too, to drop padded candidates).
    kk = max(k, min(k + margin, n_a, n_b))
    # Tiles: multiples of ALIGN, no larger than needed, and wide enough for kk.
    ta = max(min(_round_up(tile_a, ALIGN), _round_up(-(-n_a // ndev), ALIGN)), _round_up(kk, ALIGN))
    tb = max(min(_round_up(tile_b, ALIGN), _round_up(n_b, ALIGN)), _round_up(kk, ALIGN))
    na_pad = _round_up(n_a, ndev * ta)
    nb_pad = _round_up(n_b, tb)

    # Norms (+ the NaN/Inf check) and unit float32 copies, B in a thread (A's errors first).
    with ThreadPoolExecutor(1) as pool:
        fut_b = pool.submit(_prepare, "B", b, nb_pad)
        norm_a, a32 = _prepare("A", a, na_pad)
        norm_b, b32 = fut_b.result()
    if gemm == "host":
        av, ai, ac, bv, bi, bc = _host_kernel(a32, b32, n_a, n_b, ta, tb, kk, thresholds)
        del a32, b32
        av, ai, ac = av[:n_a], ai[:n_a], ac[:n_a]
        bv, bi, bc = bv[:n_b], bi[:n_b], bc[:n_b]
        platform = "cpu"
    else:
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
    # The two sides are independent (NumPy releases the GIL): refine them concurrently.
    with ThreadPoolExecutor(1) as pool:
        fut_ref = pool.submit(_refine, b, norm_b, a, norm_a, bv, bi, k, tol, rescore=exact)
        a_vals, a_idx, n_fa = _refine(a, norm_a, b, norm_b, av, ai, k, tol, rescore=exact)
        b_vals, b_idx, n_fb = fut_ref.result()
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

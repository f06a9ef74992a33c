"""Activation correlation between the features of two SAEs over the same tokens, streamed.

Pearson correlation of every feature of A with every feature of B over tokens, then each
feature's best match in the other SAE and the mean best correlation (Lan et al. 2024, arXiv
2410.06981; "Towards Monosemanticity" 2023; see docs/references.md, "Feature pairing
across two SAEs"). Lan et al. z-score dense activations of <= 30k tokens in memory; here the
sums are accumulated over token chunks by a `CorrelationAccumulator` (the engine's
``init / update / merge / finalize`` protocol, usable with `engine.accumulators.accumulate`),
so any number of tokens streams through in bounded memory.

Two input paths, same result:

* dense: chunks ``(acts_a [rows, n_a], acts_b [rows, n_b][, row_weights [rows]])``; the
  cross-product is one GEMM per chunk, O(rows * n_a * n_b).
* sparse (TopK-style): chunks ``(vals_a [rows, k_a], idx_a [rows, k_a], vals_b [rows, k_b],
  idx_b [rows, k_b][, row_weights])``; the cross-product is a sparse outer-product
  accumulation (one scatter-add of ``k_a * k_b`` products per token), O(rows * k_a * k_b).
  Indices within a row must be distinct (checked by `correlate`; entries with value 0 are
  ignored); out-of-range indices are counted and `finalize` refuses the state.

Numerics. The state holds weighted sums relative to a per-feature ``shift``: ``count``,
``sum = sum w (x - shift)``, ``sq = sum w (x - shift)^2``, ``cross = sum w (x - sa)(y - sb)^T``.

* dense: the shift is the first chunk's weighted mean (as in `engine.accumulators`), so the
  sums are of the order of the spread and float32 agrees with float64 to ~1e-6 even for
  features with a large mean; merging two states re-expresses one on the other's shift
  (two rank-1 corrections of ``cross``).
* sparse: the shift must be 0 (a shift would make every token dense), so
  ``cov = cross / n - mean_a mean_b``. SAE features are mostly zero, so ``mean^2`` is small
  against the variance and nothing cancels; the exception is a feature active on nearly every
  token with a tiny relative spread (std / rms < ~3e-3), which is reported as constant
  (``constant_tol``). Per-feature sums are Neumaier-compensated across chunks; ``cross`` is
  added in place (relative error ~ sqrt(co-activations) * 6e-8 per entry).

Dead and constant features (zero variance) are reported in masks; their correlations are 0,
they are never anyone's best match, and they are left out of the mean best correlation. No
NaN is ever returned.

Feature tiling: the state is ``n_a x n_b`` float32 (16384^2 = 1 GiB). `correlate` splits the
features into blocks of at most ``max_block_elements`` entries and makes one pass over the
tokens per block (the stream is re-read from position 0), keeping only each block's best
matches. Feature subsets (``a_features`` / ``b_features``) restrict both. A block's feature
ids are runtime data in the state, so all blocks of one shape share one compiled program.

Drivers: the accumulator works with the generic `engine.accumulators.accumulate` (a fresh
state per chunk, merged: fine for small blocks), and with `accumulate_inplace`, which updates
one state per device in place (donated buffers) and merges once at the end: the generic
path would allocate, zero and add a 1 GiB state per chunk at 16384^2.

Sparse kernel: on CPU the cross sums are added by a native kernel called through JAX's FFI
(`engine.kernels`, ``engine/kernels/sparse_cross.cc``): each chunk's (row, A slot) entries
are counting-sorted by A feature, so every row of the state is updated while it sits in
cache, and the A features are split over threads (``SAE_KERNEL_THREADS``). Per cell the
products are added in the same order as XLA's scatter (rows in increasing order, no FMA),
so the result is bit-identical to the XLA path, which GPUs/TPUs and ``SAE_NATIVE_KERNELS=0``
use. The per-device state is passed to the kernel with its device axis: a reshape between
the donated parameter and the aliased kernel operand made XLA copy the 1 GiB state twice per
chunk.

Performance (experiments/bench_similarity.py --only=correlation --threads=2, TopK k = 32,
16384 x 16384 features, 131072-row chunks, this project's shared 2-core CPU, load 5-8): the
native kernel costs ~3.1 ns of CPU per product (XLA's scatter-add: ~17 ns, a random
read-modify-write into the 1 GiB state), the whole update ~4.6 ns; 1M tokens end to end
(init, 8 chunks, finalize) in 17-18.5 s wall, 8.3-9.1 s CPU; against scipy.sparse CSR
``A.T @ B`` 3.5x by wall time, 4.0x by CPU time at 1M tokens and 3.2x at 262144 tokens
(issue 18's goal: 3x). The dense path costs ~9 ms of CPU per token (a 16384^2 GEMM per token
row), ~1100-1200x the sparse path at 1M tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_MAX_BLOCK = 1 << 28  # 256M entries = 1 GiB of float32 cross sums per block
DEFAULT_KEEP_MATRIX = 1 << 24  # finalize returns the matrix up to 16M entries by default
DENSE_CONSTANT_TOL = 1e-17  # var / E[x^2]: a spread below ~1 float32 ulp
SPARSE_CONSTANT_TOL = 1e-5
# Rows per sparse (TopK codes) chunk by default: a chunk is rows * k values and ids (64 MiB at
# k = 32 per side), and the native kernel's per-chunk sort by A id keeps each state row in
# cache longer the more rows a chunk has (1.3-1.6x faster than 8192-row chunks at 16k^2).
DEFAULT_SPARSE_CHUNK = 1 << 17
DEFAULT_DENSE_CHUNK = 4096


def sparse_chunk_rows(num_rows: int | None, n_data: int = 1) -> int:
    """Default rows per sparse chunk: `DEFAULT_SPARSE_CHUNK`, or fewer when the stream is
    shorter (no padding to a mostly empty chunk), a multiple of ``n_data``."""
    rows = DEFAULT_SPARSE_CHUNK if not num_rows else min(DEFAULT_SPARSE_CHUNK, int(num_rows))
    n_data = max(1, int(n_data))
    return -(-max(rows, 1) // n_data) * n_data


@flax.struct.dataclass
class CorrState:
    """Running weighted sums of one block of features (see the module docstring)."""

    count: jax.Array  # [] sum of weights (Neumaier pair: count + count_c)
    count_c: jax.Array
    rows: jax.Array  # [] number of rows with positive weight
    bad: jax.Array  # [] sparse indices out of range (real rows only)
    shift_a: jax.Array  # [fa]
    shift_b: jax.Array  # [fb]
    sum_a: jax.Array  # [fa] sum w (x - shift)
    sum_a_c: jax.Array
    sum_b: jax.Array
    sum_b_c: jax.Array
    sq_a: jax.Array  # [fa] sum w (x - shift)^2
    sq_a_c: jax.Array
    sq_b: jax.Array
    sq_b_c: jax.Array
    nnz_a: jax.Array  # [fa] sum w [x != 0]
    nnz_b: jax.Array
    cross: jax.Array  # [fa, fb] sum w (x - shift_a)(y - shift_b)
    # The block's features as runtime data (so that every block of one shape shares one
    # compiled program): global ids [fa] / [fb] and global id -> block position (-1 outside)
    # [n_a] / [n_b]. Empty ([0]) when the block is all features.
    sel_a: jax.Array
    sel_b: jax.Array
    lut_a: jax.Array
    lut_b: jax.Array

    if TYPE_CHECKING:  # flax.struct adds `replace` at run time; declared for the type checker

        def replace(self, **changes: Any) -> CorrState: ...


@dataclasses.dataclass
class CorrelationResult:
    """Finalised statistics of one block of features (host numpy).

    Attributes:
      a_features / b_features: global feature ids of the block's rows / columns.
      count: total row weight; rows: rows with positive weight.
      mean_a, std_a, density_a: per-feature mean, standard deviation (population) and
        weighted fraction of rows where the feature is nonzero (float64).
      dead_a: never nonzero; constant_a: nonzero somewhere but zero variance (within
        ``constant_tol``). Same for B.
      a_best / a_best_value: for each feature of the block's A, the global id of the most
        correlated valid feature of the block's B and the correlation (-1 and 0 when none).
      b_best / b_best_value: the reverse.
      corr: ``[fa, fb]`` float32 correlations (0 where undefined) when kept, else None.
    """

    a_features: np.ndarray
    b_features: np.ndarray
    count: float
    rows: int
    mean_a: np.ndarray
    std_a: np.ndarray
    density_a: np.ndarray
    dead_a: np.ndarray
    constant_a: np.ndarray
    mean_b: np.ndarray
    std_b: np.ndarray
    density_b: np.ndarray
    dead_b: np.ndarray
    constant_b: np.ndarray
    a_best: np.ndarray
    a_best_value: np.ndarray
    b_best: np.ndarray
    b_best_value: np.ndarray
    corr: np.ndarray | None = None

    @property
    def valid_a(self) -> np.ndarray:
        return ~(self.dead_a | self.constant_a)

    @property
    def valid_b(self) -> np.ndarray:
        return ~(self.dead_b | self.constant_b)


@dataclasses.dataclass
class CorrelationMatches:
    """Best matches of every feature in both directions, over all blocks (host numpy).

    Per side (``a_*`` for the n_a features of A, ``b_*`` for B): ``included`` (in the feature
    subset), ``dead``, ``constant``, ``mean``, ``std``, ``density`` (0 where not included),
    ``match`` (global id of the best partner, -1 when none) and ``value`` (its correlation,
    0 when none). ``mean_best_a`` is the mean over A features with a match of their best
    correlation (Lan et al.'s mean activation correlation); ``mean_best_b`` the reverse.
    """

    n_a: int
    n_b: int
    count: float
    rows: int
    a_included: np.ndarray
    a_dead: np.ndarray
    a_constant: np.ndarray
    a_mean: np.ndarray
    a_std: np.ndarray
    a_density: np.ndarray
    a_match: np.ndarray
    a_value: np.ndarray
    b_included: np.ndarray
    b_dead: np.ndarray
    b_constant: np.ndarray
    b_mean: np.ndarray
    b_std: np.ndarray
    b_density: np.ndarray
    b_match: np.ndarray
    b_value: np.ndarray

    @property
    def a_has_match(self) -> np.ndarray:
        return self.a_match >= 0

    @property
    def b_has_match(self) -> np.ndarray:
        return self.b_match >= 0

    @property
    def mean_best_a(self) -> float:
        m = self.a_has_match
        return float(np.mean(self.a_value[m])) if m.any() else 0.0

    @property
    def mean_best_b(self) -> float:
        m = self.b_has_match
        return float(np.mean(self.b_value[m])) if m.any() else 0.0

    def pairs(
        self, direction: str = "a", min_value: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best-match pairs ``(ids in A, ids in B, correlations)`` of one direction."""
        if direction == "a":
            rows = np.flatnonzero(self.a_has_match)
            cols, vals = self.a_match[rows], self.a_value[rows]
        elif direction == "b":
            cols = np.flatnonzero(self.b_has_match)
            rows, vals = self.b_match[cols], self.b_value[cols]
        else:
            raise checks.InputError(f"pairs: direction must be 'a' or 'b', got {direction!r}")
        if min_value is not None:
            keep = vals >= min_value
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return rows, cols, vals

    def summary(self) -> dict[str, Any]:
        return {
            "n_a": self.n_a,
            "n_b": self.n_b,
            "count": self.count,
            "rows": self.rows,
            "mean_best_a": self.mean_best_a,
            "mean_best_b": self.mean_best_b,
            "matched_a": int(self.a_has_match.sum()),
            "matched_b": int(self.b_has_match.sum()),
            "dead_a": int(self.a_dead.sum()),
            "constant_a": int(self.a_constant.sum()),
            "dead_b": int(self.b_dead.sum()),
            "constant_b": int(self.b_constant.sum()),
        }


# --------------------------------------------------------------------------------------------
# Compensated sums.
# --------------------------------------------------------------------------------------------


def _neumaier(s, c, x):
    """Adds x to the compensated pair (s, c) (Neumaier's variant of Kahan summation)."""
    t = s + x
    c = c + jnp.where(jnp.abs(s) >= jnp.abs(x), (s - t) + x, (x - t) + s)
    return t, c


def _native_cross(cross, la, wa, lb, vb, threads: int | None = None):
    """``cross[la[r, j], lb[r, l]] += wa[r, j] * vb[r, l]`` (ids outside the block dropped)
    by the native kernel, in place (the output aliases ``cross``; leading axes of size 1
    allowed). ``threads``: default `engine.kernels.threads` (the result does not depend on
    it)."""
    from engine import kernels

    name = kernels.target("sparse_cross")
    if name is None:
        raise checks.InputError("CorrelationAccumulator(native=True): native kernel unavailable")
    call = jax.ffi.ffi_call(
        name,
        jax.ShapeDtypeStruct(cross.shape, jnp.float32),
        input_output_aliases={0: 0},
    )
    return call(
        cross,
        la.astype(jnp.int32),
        wa.astype(jnp.float32),
        lb.astype(jnp.int32),
        vb.astype(jnp.float32),
        threads=np.int64(kernels.threads() if threads is None else threads),
    )


def _subset(name: str, features, n: int) -> np.ndarray | None:
    if features is None:
        return None
    f = np.asarray(features)
    if f.ndim != 1 or not np.issubdtype(f.dtype, np.integer) or f.size == 0:
        raise checks.InputError(
            f"{name}: expected a non-empty 1-D array of feature ids, got "
            f"shape {f.shape} dtype {f.dtype}"
        )
    if f.min() < 0 or f.max() >= n:
        raise checks.InputError(
            f"{name}: feature ids must lie in [0, {n}), got [{f.min()}, {f.max()}]"
        )
    if np.unique(f).size != f.size:
        raise checks.InputError(f"{name}: feature ids must be distinct")
    return f.astype(np.int64)


class CorrelationAccumulator:
    """Streaming Pearson correlation of the features of A and B (one block of features).

    Args:
      n_a, n_b: number of features of each SAE.
      sparse: chunks are ``(vals_a, idx_a, vals_b, idx_b[, row_weights])`` (TopK-style)
        instead of ``(acts_a, acts_b[, row_weights])``.
      a_features / b_features: optional feature ids to restrict to (the block); default all.
      constant_tol: a feature is constant when ``var <= constant_tol * E[x^2]``. Default
        dense 1e-17: an exactly constant float32 column gives ~1e-20 (shifted sums), any
        spread of one float32 ulp or more gives >= ~1e-15. Default sparse 1e-5: unshifted
        float32 sums cancel to ~1e-7 relative (see the module docstring).
      keep_matrix: finalize returns the correlation matrix (default: when it has at most
        16M entries).
      native: sparse cross sums on CPU by the native kernel (`engine.kernels`, bit-identical
        to the XLA scatter) instead of XLA's scatter-add. Default: when the kernel is
        available (``SAE_NATIVE_KERNELS`` not 0, a C++ compiler, a successful build); GPUs and
        TPUs always use the scatter.
    """

    def __init__(
        self,
        n_a: int,
        n_b: int,
        *,
        sparse: bool = False,
        a_features=None,
        b_features=None,
        constant_tol: float | None = None,
        keep_matrix: bool | None = None,
        native: bool | None = None,
    ):
        self.n_a = checks.check_positive_int("CorrelationAccumulator n_a", n_a)
        self.n_b = checks.check_positive_int("CorrelationAccumulator n_b", n_b)
        self.sparse = bool(sparse)
        self.a_sel = _subset("a_features", a_features, self.n_a)
        self.b_sel = _subset("b_features", b_features, self.n_b)
        self.fa = self.n_a if self.a_sel is None else int(self.a_sel.size)
        self.fb = self.n_b if self.b_sel is None else int(self.b_sel.size)
        if self.sparse and self.fa * self.fb >= 2**31 - 1:
            raise checks.InputError(
                f"CorrelationAccumulator: a {self.fa} x {self.fb} block exceeds 2^31 entries "
                "(int32 scatter indices); tile the features (correlate(max_block_elements=))"
            )
        self.constant_tol = float(
            constant_tol
            if constant_tol is not None
            else (SPARSE_CONSTANT_TOL if self.sparse else DENSE_CONSTANT_TOL)
        )
        self.keep_matrix = (
            self.fa * self.fb <= DEFAULT_KEEP_MATRIX if keep_matrix is None else bool(keep_matrix)
        )
        if not self.sparse:
            self.native = False
        elif native is None:
            from engine import kernels

            self.native = kernels.available("sparse_cross")
        else:
            self.native = bool(native)

    @staticmethod
    def _lut(sel, n):
        if sel is None:
            return np.zeros(0, np.int32)
        lut = np.full(n, -1, np.int32)
        lut[sel] = np.arange(sel.size, dtype=np.int32)
        return lut

    def _key(self):
        return (
            self.n_a,
            self.n_b,
            self.sparse,
            self.fa,
            self.fb,
            self.a_sel is None,
            self.b_sel is None,
            self.constant_tol,
            self.keep_matrix,
            self.native,
        )

    def __hash__(self):
        # Accumulators of one block shape are interchangeable inside jit: the block's
        # feature ids live in the state, so compiled programs are shared between blocks.
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, CorrelationAccumulator) and self._key() == other._key()

    def zeros(self) -> CorrState:
        """The empty state without the block's feature ids (shape-only, jit-friendly)."""
        z = lambda *s: jnp.zeros(s, jnp.float32)
        fa, fb = self.fa, self.fb
        ids = lambda sel, n: jnp.zeros((0 if sel is None else sel.size,), jnp.int32)
        lut = lambda sel, n: jnp.zeros((0 if sel is None else n,), jnp.int32)
        return CorrState(
            count=z(),
            count_c=z(),
            rows=z(),
            bad=jnp.zeros((), jnp.int32),
            shift_a=z(fa),
            shift_b=z(fb),
            sum_a=z(fa),
            sum_a_c=z(fa),
            sum_b=z(fb),
            sum_b_c=z(fb),
            sq_a=z(fa),
            sq_a_c=z(fa),
            sq_b=z(fb),
            sq_b_c=z(fb),
            nnz_a=z(fa),
            nnz_b=z(fb),
            cross=z(fa, fb),
            sel_a=ids(self.a_sel, self.n_a),
            sel_b=ids(self.b_sel, self.n_b),
            lut_a=lut(self.a_sel, self.n_a),
            lut_b=lut(self.b_sel, self.n_b),
        )

    def selection(self) -> dict[str, np.ndarray]:
        """The block's feature-id fields of the state (host arrays)."""
        ids = lambda sel: np.zeros(0, np.int32) if sel is None else sel.astype(np.int32)
        return dict(
            sel_a=ids(self.a_sel),
            sel_b=ids(self.b_sel),
            lut_a=self._lut(self.a_sel, self.n_a),
            lut_b=self._lut(self.b_sel, self.n_b),
        )

    @property
    def a_features(self) -> np.ndarray:
        return np.arange(self.n_a) if self.a_sel is None else self.a_sel

    @property
    def b_features(self) -> np.ndarray:
        return np.arange(self.n_b) if self.b_sel is None else self.b_sel

    @property
    def num_arrays(self) -> tuple[int, ...]:
        """Accepted numbers of arrays per chunk (without / with row weights)."""
        return (4, 5) if self.sparse else (2, 3)

    # -- protocol ----------------------------------------------------------------------------

    def init(self) -> CorrState:
        return self.zeros().replace(**{k: jnp.asarray(v) for k, v in self.selection().items()})

    def _weights(self, arrays, weights):
        n_ok = self.num_arrays
        if len(arrays) not in n_ok:
            what = (
                "(vals_a, idx_a, vals_b, idx_b[, row_weights])"
                if self.sparse
                else "(acts_a, acts_b[, row_weights])"
            )
            raise checks.InputError(
                f"CorrelationAccumulator: expected chunks {what}, got {len(arrays)} arrays"
            )
        w = jnp.asarray(weights, jnp.float32)
        if len(arrays) == n_ok[1]:
            w = w * jnp.asarray(arrays[-1], jnp.float32)
        return w

    def update(self, state: CorrState, arrays, weights) -> CorrState:
        w = self._weights(arrays, weights)
        if self.sparse:
            return self._update_sparse(state, arrays, w)
        return self._update_dense(state, arrays, w)

    def _add_vectors(self, state: CorrState, w, ca, cb, qa, qb, za, zb, bad=0) -> dict:
        count, count_c = _neumaier(state.count, state.count_c, jnp.sum(w))
        sum_a, sum_a_c = _neumaier(state.sum_a, state.sum_a_c, ca)
        sum_b, sum_b_c = _neumaier(state.sum_b, state.sum_b_c, cb)
        sq_a, sq_a_c = _neumaier(state.sq_a, state.sq_a_c, qa)
        sq_b, sq_b_c = _neumaier(state.sq_b, state.sq_b_c, qb)
        return dict(
            count=count,
            count_c=count_c,
            rows=state.rows + jnp.sum(w > 0),
            bad=state.bad + bad,
            sum_a=sum_a,
            sum_a_c=sum_a_c,
            sum_b=sum_b,
            sum_b_c=sum_b_c,
            sq_a=sq_a,
            sq_a_c=sq_a_c,
            sq_b=sq_b,
            sq_b_c=sq_b_c,
            nnz_a=state.nnz_a + za,
            nnz_b=state.nnz_b + zb,
        )

    def _update_dense(self, state: CorrState, arrays, w) -> CorrState:
        x = jnp.asarray(arrays[0], jnp.float32)
        y = jnp.asarray(arrays[1], jnp.float32)
        if x.ndim != 2 or x.shape[1] != self.n_a or y.ndim != 2 or y.shape[1] != self.n_b:
            raise checks.InputError(
                f"CorrelationAccumulator (dense): expected acts_a [rows, {self.n_a}] and acts_b "
                f"[rows, {self.n_b}], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.a_sel is not None:
            x = jnp.take(x, state.sel_a, axis=1)
        if self.b_sel is not None:
            y = jnp.take(y, state.sel_b, axis=1)
        # The first rows ever seen fix the shift (their weighted mean, refined by a second
        # pass), as in CrossMoments, except that a feature whose values in those rows are all equal
        # is shifted by that
        # value exactly: a float32 mean of n rows is off by up to ~n eps |mean|, which left a
        # feature that is constant and non-zero with a spurious variance above constant_tol
        # when many rows came in one chunk (the result depended on the chunk size).
        first = state.count + state.count_c == 0
        n0 = jnp.maximum(jnp.sum(w), 1e-30)
        live = (w > 0)[:, None]

        def first_shift(v):
            hi = jnp.max(jnp.where(live, v, -jnp.inf), axis=0)
            lo = jnp.min(jnp.where(live, v, jnp.inf), axis=0)
            mean = jnp.einsum("r,rf->f", w, v, precision=HIGHEST) / n0
            mean = mean + jnp.einsum("r,rf->f", w, v - mean, precision=HIGHEST) / n0
            return jnp.where(hi == lo, hi, mean)

        shift_a = jnp.where(first, first_shift(x), state.shift_a)
        shift_b = jnp.where(first, first_shift(y), state.shift_b)
        xs = x - shift_a
        ys = y - shift_b
        wx = xs * w[:, None]
        wy = ys * w[:, None]
        vec = self._add_vectors(
            state,
            w,
            jnp.sum(wx, 0),
            jnp.sum(wy, 0),
            jnp.sum(wx * xs, 0),
            jnp.sum(wy * ys, 0),
            jnp.einsum("r,rf->f", w, (x != 0).astype(jnp.float32)),
            jnp.einsum("r,rf->f", w, (y != 0).astype(jnp.float32)),
        )
        cross = state.cross + jnp.dot(wx.T, ys, precision=HIGHEST)
        return state.replace(shift_a=shift_a, shift_b=shift_b, cross=cross, **vec)

    def _local_ids(self, idx, n, lut, f, w):
        """Block positions of global ids (f = dropped), and the count of bad real ids."""
        idx = jnp.asarray(idx)
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise checks.InputError(
                f"CorrelationAccumulator (sparse): indices must be integers, got {idx.dtype}"
            )
        idx = idx.astype(jnp.int32)
        in_range = (idx >= 0) & (idx < n)
        bad = jnp.sum((~in_range) & (w[:, None] > 0))
        safe = jnp.where(in_range, idx, 0)
        loc = safe if lut is None else lut[safe]
        ok = in_range & (loc >= 0)
        return jnp.where(ok, loc, f), ok, bad

    def _update_sparse(self, state: CorrState, arrays, w) -> CorrState:
        va = jnp.asarray(arrays[0], jnp.float32)
        vb = jnp.asarray(arrays[2], jnp.float32)
        if (
            va.ndim != 2
            or vb.ndim != 2
            or np.shape(arrays[1]) != va.shape
            or np.shape(arrays[3]) != vb.shape
        ):
            raise checks.InputError(
                "CorrelationAccumulator (sparse): expected vals/idx pairs [rows, k] of equal "
                f"shapes, got {va.shape}, {np.shape(arrays[1])}, {vb.shape}, "
                f"{np.shape(arrays[3])}"
            )
        fa, fb = self.fa, self.fb
        la, ok_a, bad_a = self._local_ids(
            arrays[1], self.n_a, None if self.a_sel is None else state.lut_a, fa, w
        )
        lb, ok_b, bad_b = self._local_ids(
            arrays[3], self.n_b, None if self.b_sel is None else state.lut_b, fb, w
        )
        wa = jnp.where(ok_a, va, 0.0) * w[:, None]
        vb_ok = jnp.where(ok_b, vb, 0.0)
        wb = vb_ok * w[:, None]
        add = lambda n, i, v: jnp.zeros((n,), jnp.float32).at[i.ravel()].add(v.ravel(), mode="drop")
        vec = self._add_vectors(
            state,
            w,
            add(fa, la, wa),
            add(fb, lb, wb),
            add(fa, la, wa * va),
            add(fb, lb, wb * vb),
            add(fa, la, w[:, None] * (va != 0)),
            add(fb, lb, w[:, None] * (vb != 0)),
            bad=bad_a + bad_b,
        )

        # Sparse outer products: k_a * k_b products per row (ids fa / fb are dropped),
        # added in place into the cross sums.
        def xla_cross(cross, la, wa, lb, vb_ok):
            lin = la[:, :, None] * fb + lb[:, None, :]
            lin = jnp.where((la < fa)[:, :, None] & (lb < fb)[:, None, :], lin, fa * fb)
            prod = wa[:, :, None] * vb_ok[:, None, :]
            out = cross.reshape(-1).at[lin.ravel()].add(prod.ravel(), mode="drop")
            return out.reshape(cross.shape)

        if self.native:
            # The native kernel (engine/kernels/sparse_cross.cc) on CPU, bit-identical to
            # the scatter; other platforms keep the scatter.
            cross = jax.lax.platform_dependent(
                state.cross, la, wa, lb, vb_ok, cpu=_native_cross, default=xla_cross
            )
        else:
            cross = xla_cross(state.cross, la, wa, lb, vb_ok)
        return state.replace(cross=cross, **vec)

    # -- merging -----------------------------------------------------------------------------

    def _reshift(self, s: CorrState, shift_a, shift_b) -> CorrState:
        """Re-expresses state ``s`` on other shifts (exact algebra, rank-1 corrections)."""
        if self.sparse:
            return s  # the sparse shift is always 0
        n = s.count + s.count_c
        da = s.shift_a - shift_a
        db = s.shift_b - shift_b
        ta = s.sum_a + s.sum_a_c
        tb = s.sum_b + s.sum_b_c
        cross = s.cross + jnp.outer(ta + n * da, db) + jnp.outer(da, tb)
        return s.replace(
            shift_a=shift_a,
            shift_b=shift_b,
            sum_a=ta + n * da,
            sum_a_c=jnp.zeros_like(ta),
            sum_b=tb + n * db,
            sum_b_c=jnp.zeros_like(tb),
            sq_a=(s.sq_a + s.sq_a_c) + 2 * da * ta + n * da * da,
            sq_a_c=jnp.zeros_like(ta),
            sq_b=(s.sq_b + s.sq_b_c) + 2 * db * tb + n * db * db,
            sq_b_c=jnp.zeros_like(tb),
            cross=cross,
        )

    @staticmethod
    def _add_states(a: CorrState, b: CorrState) -> CorrState:
        count, count_c = _neumaier(a.count, a.count_c + b.count_c, b.count)
        sum_a, sum_a_c = _neumaier(a.sum_a, a.sum_a_c + b.sum_a_c, b.sum_a)
        sum_b, sum_b_c = _neumaier(a.sum_b, a.sum_b_c + b.sum_b_c, b.sum_b)
        sq_a, sq_a_c = _neumaier(a.sq_a, a.sq_a_c + b.sq_a_c, b.sq_a)
        sq_b, sq_b_c = _neumaier(a.sq_b, a.sq_b_c + b.sq_b_c, b.sq_b)
        return a.replace(
            count=count,
            count_c=count_c,
            rows=a.rows + b.rows,
            bad=a.bad + b.bad,
            sum_a=sum_a,
            sum_a_c=sum_a_c,
            sum_b=sum_b,
            sum_b_c=sum_b_c,
            sq_a=sq_a,
            sq_a_c=sq_a_c,
            sq_b=sq_b,
            sq_b_c=sq_b_c,
            nnz_a=a.nnz_a + b.nnz_a,
            nnz_b=a.nnz_b + b.nnz_b,
            cross=a.cross + b.cross,
        )

    def merge(self, a: CorrState, b: CorrState) -> CorrState:
        if self.sparse:
            return self._add_states(a, b)
        a_empty = (a.count + a.count_c) == 0
        shift_a = jnp.where(a_empty, b.shift_a, a.shift_a)
        shift_b = jnp.where(a_empty, b.shift_b, a.shift_b)
        a2 = self._reshift(a, shift_a, shift_b)
        b2 = self._reshift(b, shift_a, shift_b)
        return self._add_states(a2, b2)

    def merge_across(self, state: CorrState, axis_name) -> CorrState:
        """Exact merge over a mesh axis: a common shift, then sums (call in shard_map)."""
        if not self.sparse:
            idx = jax.lax.axis_index(axis_name)
            nonempty = (state.count + state.count_c) > 0
            big = jnp.iinfo(jnp.int32).max
            leader = jax.lax.pmin(jnp.where(nonempty, idx, big), axis_name)
            is_leader = (idx == leader).astype(jnp.float32)
            shift_a = jax.lax.psum(state.shift_a * is_leader, axis_name)
            shift_b = jax.lax.psum(state.shift_b * is_leader, axis_name)
            state = self._reshift(state, shift_a, shift_b)
        keep = ("shift_a", "shift_b", "sel_a", "sel_b", "lut_a", "lut_b")
        summed = state.replace(
            **{
                f.name: jax.lax.psum(getattr(state, f.name), axis_name)
                for f in dataclasses.fields(state)
                if f.name not in keep
            }
        )
        return summed

    # -- results -----------------------------------------------------------------------------

    def finalize(self, state: CorrState) -> CorrelationResult:
        """Correlations, dead/constant masks and the block's best matches (host numpy)."""
        host = jax.tree.map(
            lambda x: np.asarray(jax.device_get(x), np.float64),
            state.replace(cross=jnp.zeros((0,), jnp.float32)),
        )
        if host.bad > 0:
            raise checks.InputError(
                f"CorrelationAccumulator: {int(host.bad)} sparse feature "
                f"index(es) out of range [0, n_a={self.n_a}) / "
                f"[0, n_b={self.n_b}) in real rows"
            )
        n = host.count + host.count_c
        if host.rows < 2 or n <= 0:
            raise checks.InputError(
                f"CorrelationAccumulator: correlation needs at least 2 rows "
                f"with positive weight, got {int(host.rows)}"
            )
        stats = {}
        for side in ("a", "b"):
            m = (getattr(host, f"sum_{side}") + getattr(host, f"sum_{side}_c")) / n
            q = (getattr(host, f"sq_{side}") + getattr(host, f"sq_{side}_c")) / n
            var = np.maximum(q - m * m, 0.0)
            mean = getattr(host, f"shift_{side}") + m
            second = var + mean * mean
            nnz = getattr(host, f"nnz_{side}")
            dead = nnz <= 0
            const = ~dead & (var <= self.constant_tol * second)
            stats[side] = dict(
                m=m, var=var, mean=mean, std=np.sqrt(var), density=nnz / n, dead=dead, const=const
            )
        sa, sb = stats["a"], stats["b"]
        valid_a = ~(sa["dead"] | sa["const"])
        valid_b = ~(sb["dead"] | sb["const"])
        corr, a_pos, a_val, b_pos, b_val = _finalize_device(
            self.keep_matrix,
            state.cross,
            jnp.asarray(n, jnp.float32),
            jnp.asarray(sa["m"], jnp.float32),
            jnp.asarray(sb["m"], jnp.float32),
            jnp.asarray(np.where(valid_a, sa["std"], 1.0), jnp.float32),
            jnp.asarray(np.where(valid_b, sb["std"], 1.0), jnp.float32),
            jnp.asarray(valid_a),
            jnp.asarray(valid_b),
        )
        a_pos, a_val, b_pos, b_val = (
            np.asarray(x) for x in jax.device_get((a_pos, a_val, b_pos, b_val))
        )
        a_ok = valid_a & valid_b.any()
        b_ok = valid_b & valid_a.any()
        a_best = np.where(a_ok, self.b_features[np.clip(a_pos, 0, None)], -1)
        b_best = np.where(b_ok, self.a_features[np.clip(b_pos, 0, None)], -1)
        return CorrelationResult(
            a_features=self.a_features,
            b_features=self.b_features,
            count=float(n),
            rows=int(host.rows),
            mean_a=sa["mean"],
            std_a=np.where(valid_a, sa["std"], 0.0),
            density_a=sa["density"],
            dead_a=sa["dead"],
            constant_a=sa["const"],
            mean_b=sb["mean"],
            std_b=np.where(valid_b, sb["std"], 0.0),
            density_b=sb["density"],
            dead_b=sb["dead"],
            constant_b=sb["const"],
            a_best=a_best.astype(np.int64),
            a_best_value=np.where(a_ok, a_val, 0.0),
            b_best=b_best.astype(np.int64),
            b_best_value=np.where(b_ok, b_val, 0.0),
            corr=np.asarray(jax.device_get(corr)) if corr is not None else None,
        )


BLOCKED_FINALIZE_MIN = 1 << 22  # blocks of at least this many entries use the strip kernel
FINALIZE_ROWS = 256  # rows per step of the blocked finalize (multiple of 32)


def _corr_rows(cross, n, ma, mb, sda, sdb, valid_a, valid_b):
    """Correlations of a row block (0 where undefined) and the same with -inf there."""
    cov = cross / n - jnp.outer(ma, mb)
    both = valid_a[:, None] & valid_b[None, :]
    corr = jnp.where(both, jnp.clip(cov / jnp.outer(sda, sdb), -1.0, 1.0), 0.0)
    return corr, jnp.where(both, corr, -jnp.inf)


@functools.partial(jax.jit, static_argnums=0)
def _finalize_device(keep: bool, cross, n, ma, mb, sda, sdb, valid_a, valid_b):
    """Correlation of a block and its best matches in both directions (float32, on device).

    Invalid (dead/constant) features get correlation 0 and never win an argmax; argmax ties
    go to the lowest index. Large blocks without ``keep`` are scanned in row blocks with the
    hierarchical strip max/argmax of `engine.pairwise` (XLA's variadic argmax over a
    16384^2 matrix took ~5 s of CPU; this is about one pass over memory).
    """
    fa, fb = cross.shape
    if keep or fa * fb < BLOCKED_FINALIZE_MIN or fa < FINALIZE_ROWS:
        corr, masked = _corr_rows(cross, n, ma, mb, sda, sdb, valid_a, valid_b)
        a_pos = jnp.argmax(masked, axis=1)
        b_pos = jnp.argmax(masked, axis=0)
        return (
            (corr if keep else None),
            a_pos,
            jnp.max(masked, axis=1),
            b_pos,
            jnp.max(masked, axis=0),
        )
    from engine import pairwise

    r = FINALIZE_ROWS
    fb_pad = -(-fb // pairwise.STRIP_ROWS) * pairwise.STRIP_ROWS
    n_blocks = -(-fa // r)

    def body(carry, i):
        bv, bi = carry
        # The last block is shifted back to stay inside the matrix: rows it repeats give
        # the same values and indices, so they change nothing.
        r0 = jnp.minimum(i * r, fa - r)
        blk = jax.lax.dynamic_slice_in_dim(cross, r0, r)
        sl = lambda v: jax.lax.dynamic_slice_in_dim(v, r0, r)
        _, masked = _corr_rows(blk, n, sl(ma), mb, sl(sda), sdb, sl(valid_a), valid_b)
        masked = jnp.pad(masked, ((0, 0), (0, fb_pad - fb)), constant_values=-jnp.inf)
        rv, rc = pairwise.tile_topk_rows(masked, 1)
        cv, cr = pairwise.tile_topk_cols(masked, 1)
        bv, bi = pairwise.merge_topk(bv, bi, cv, cr + r0, 1)
        return (bv, bi), (r0, rv[:, 0], rc[:, 0])

    init = (jnp.full((fb_pad, 1), -jnp.inf, jnp.float32), jnp.zeros((fb_pad, 1), jnp.int32))
    (bv, bi), (starts, rv, rc) = jax.lax.scan(body, init, jnp.arange(n_blocks))
    rows = (starts[:, None] + jnp.arange(r)[None, :]).reshape(-1)
    a_val = jnp.zeros((fa,), jnp.float32).at[rows].set(rv.reshape(-1))
    a_pos = jnp.zeros((fa,), jnp.int32).at[rows].set(rc.reshape(-1))
    return None, a_pos, a_val, bi[:fb, 0], bv[:fb, 0]


# --------------------------------------------------------------------------------------------
# Drivers.
# --------------------------------------------------------------------------------------------


def check_sparse_chunk(
    name: str, vals: np.ndarray, idx: np.ndarray, n: int, mask: np.ndarray | None = None
) -> None:
    """Host check of one TopK-style chunk: integer ids in [0, n), distinct nonzero entries.

    Raises:
      InputError naming the stream, the row and the problem.
    """
    vals = np.asarray(vals)
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise checks.InputError(f"{name}: feature indices must be integers, got {idx.dtype}")
    if vals.shape != idx.shape or vals.ndim != 2:
        raise checks.InputError(
            f"{name}: values {vals.shape} and indices {idx.shape} must be equal [rows, k] arrays"
        )
    real = np.ones(idx.shape[0], bool) if mask is None else np.asarray(mask, bool)
    live = (vals != 0) & real[:, None]
    bad = live & ((idx < 0) | (idx >= n))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise checks.InputError(f"{name}: feature index {idx[r, c]} at row {r} is outside [0, {n})")
    # Distinct ids among the nonzero entries of each row (duplicates would be summed in the
    # means but squared separately in the variances).
    key = np.where(live, idx.astype(np.int64), -1 - np.arange(idx.shape[1])[None, :])
    key = np.sort(key, axis=1)
    dup = (np.diff(key, axis=1) == 0) & (key[:, 1:] >= 0)
    if dup.any():
        r = int(np.argwhere(dup)[0][0])
        raise checks.InputError(
            f"{name}: row {r} lists a feature index twice among its "
            "nonzero entries; TopK indices must be distinct"
        )


@functools.lru_cache(maxsize=16)
def _inplace_fns(acc: CorrelationAccumulator, mesh):
    """Jitted ``init() / step(state, arrays, weights) / merge(state)`` for per-device states
    stacked on a leading axis split over the mesh ``data`` axis."""
    spec = P(mesh_lib.DATA)

    def local_update(state, arrays, weights):
        if acc.native:
            # The native kernel takes this device's cross sums with their device axis
            # ([1, fa, fb]): an indexing or reshape between the donated parameter and the
            # kernel's aliased operand made XLA copy the whole state twice per chunk.
            st = jax.tree.map(lambda x: x[0], state.replace(cross=None))
            st = acc.update(st.replace(cross=state.cross), arrays, weights)
            out = jax.tree.map(lambda x: x[None], st.replace(cross=None))
            return out.replace(cross=st.cross)
        st = jax.tree.map(lambda x: x[0], state)
        st = acc.update(st, arrays, weights)
        return jax.tree.map(lambda x: x[None], st)

    # ``spec`` is a pytree prefix: it applies to every array of the chunk tuple.
    step = jax.jit(
        jax.shard_map(
            local_update, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
        ),
        donate_argnums=0,
    )

    def local_merge(state):
        from engine import accumulators

        return accumulators.merge_across(acc, jax.tree.map(lambda x: x[0], state), mesh_lib.DATA)

    n_data = mesh.shape[mesh_lib.DATA]
    if n_data == 1:
        # Nothing to merge: drop the device axis in place (a 1 GiB psum copy otherwise).
        merge = jax.jit(
            lambda st: jax.tree.map(lambda x: x.reshape(x.shape[1:]), st),
            out_shardings=NamedSharding(mesh, P()),
            donate_argnums=0,
        )
    else:
        merge = jax.jit(
            jax.shard_map(local_merge, mesh=mesh, in_specs=(spec,), out_specs=P(), check_vma=False)
        )
    zeros = jax.jit(
        lambda: jax.tree.map(lambda x: jnp.broadcast_to(x, (n_data,) + x.shape), acc.zeros()),
        out_shardings=NamedSharding(mesh, spec),
    )

    def init(block: CorrelationAccumulator) -> CorrState:
        # The block's ids are data: the same compiled program serves every block.
        sharding = NamedSharding(mesh, spec)
        sel = {
            k: jax.device_put(np.broadcast_to(v, (n_data,) + v.shape), sharding)
            for k, v in block.selection().items()
        }
        return zeros().replace(**sel)

    return init, step, merge


def accumulate_inplace(
    acc: CorrelationAccumulator,
    stream,
    mesh,
    *,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
    check_chunks: bool = True,
) -> CorrState:
    """Like `engine.accumulators.accumulate`, but each device updates its running state in
    place (donated) instead of folding every chunk into a fresh state and merging it.

    For an ``n_a x n_b`` state (1 GiB at 16384^2) the generic driver allocates, zeroes and
    adds a full state per chunk; here the per-device states are merged once at the end.
    Chunk rows are split over the mesh ``data`` axis (devices along ``feature`` repeat the
    work). With a ``checkpointer`` (`engine.checkpoint.Checkpointer`) the per-device states
    and the stream position are saved every ``save_every`` chunks and at the end, and a
    previous checkpoint is resumed. Sparse chunks and row weights are checked on the host
    (``check_chunks``). Returns the merged, replicated state; call ``acc.finalize`` on it.
    """
    from engine import streaming

    mesh_lib.check_divisible(mesh, stream.chunk_size, f"{stream.name} chunk_size")
    init, step, merge = _inplace_fns(acc, mesh)
    state = init(acc)
    count = 0
    saved = -1
    if checkpointer is not None:
        restored = checkpointer.restore(_sums(state))
        if restored is not None:
            count, sums, meta = restored
            state = state.replace(**sums)
            stream.seek(int(meta["position"]))
            saved = count  # already on disk: a rerun of a finished block saves nothing
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stream.num_rows, initial=stream.position, unit="rows", desc=stream.name)

    # Stream position after each chunk. The prefetch runs ahead of the consumer, so
    # ``stream.position`` is already past chunks not yet folded in: checkpoints must record
    # the end of the last chunk actually accumulated.
    ends: dict[int, int] = {}

    def host_checked(chunks):
        for chunk in chunks:
            if check_chunks:
                _check_chunk(acc, stream.name, chunk)
            ends[chunk.start] = chunk.start + (
                stream.chunk_size if chunk.mask.all() else chunk.num_valid
            )
            yield chunk

    for chunk in streaming.prefetch_to_device(host_checked(stream), mesh):
        state = step(state, chunk.arrays, chunk.mask.astype(jnp.float32))
        count += 1
        end = ends.pop(chunk.start)
        if bar is not None:
            bar.update(int(chunk.mask.shape[0]))
        if checkpointer is not None and save_every and count % save_every == 0:
            checkpointer.save(count, _sums(state), {"position": end})
            saved = count
    if bar is not None:
        bar.close()
    if checkpointer is not None and count and saved != count:
        checkpointer.save(count, _sums(state), {"position": stream.position})
    return merge(state)


def _sums(state: CorrState) -> dict:
    """The checkpointed part of a state: everything but the block's ids (which the
    accumulator re-creates, and which may be empty arrays that orbax refuses)."""
    ids = ("sel_a", "sel_b", "lut_a", "lut_b")
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in ids}


def _check_chunk(acc: CorrelationAccumulator, name: str, chunk) -> None:
    arrays = chunk.arrays
    where = f"{name} rows {chunk.start}..{chunk.start + chunk.num_valid}"
    if len(arrays) not in acc.num_arrays:
        acc._weights(arrays, chunk.mask)  # raises the one-line error
    if len(arrays) == acc.num_arrays[1]:
        w = np.asarray(arrays[-1])
        if w.ndim != 1 or not np.all(w[chunk.mask] >= 0):
            raise checks.InputError(
                f"{where}: row weights must be a 1-D array of finite values >= 0"
            )
    if acc.sparse:
        check_sparse_chunk(f"{where} (A)", arrays[0], arrays[1], acc.n_a, chunk.mask)
        check_sparse_chunk(f"{where} (B)", arrays[2], arrays[3], acc.n_b, chunk.mask)


def state_copies(n_data: int, inplace: bool = True, shared_memory: bool = True) -> int:
    """``n_a x n_b`` float32 matrices alive at once per block in one memory.

    `accumulate_inplace` keeps one state per device of the ``data`` axis plus one merged
    copy (none when ``n_data == 1``: the device axis is dropped in place); the generic
    `engine.accumulators.accumulate` path also builds a fresh per-device state per chunk, a
    collective sum and the merged result. ``shared_memory``: the devices share one memory
    (simulated CPU devices: all copies count); False (GPUs/TPUs): each device's own memory
    holds its state and a replica of the merged one.
    """
    merged = 0 if n_data == 1 else 1
    if not shared_memory:
        return 1 + merged if inplace else 4
    if inplace:
        return n_data + merged
    return n_data + 3


def tiles_for_budget(
    n_a: int,
    n_b: int,
    budget_bytes: int,
    *,
    n_data: int = 1,
    sparse: bool = False,
    reserved_bytes: int = 0,
    shared_memory: bool = True,
) -> tuple[int, int]:
    """Block sizes ``(tile_a, tile_b)`` whose cross sums fit ``budget_bytes`` (see
    `state_copies`), near-square (fewest passes over the tokens), at most ``n_a x n_b``.

    Raises:
      InputError: when not even a 1 x 1 block fits (the budget is below ``reserved_bytes``).
    """
    free = int(budget_bytes) - int(reserved_bytes)
    elements = free // (4 * state_copies(n_data, shared_memory=shared_memory))
    if elements < 1:
        raise checks.InputError(
            f"memory budget {budget_bytes} bytes leaves no room for a "
            f"correlation block (reserved {reserved_bytes} bytes for "
            "chunks and codes); raise the budget"
        )
    if sparse:
        elements = min(elements, 2**31 - 2)
    if n_a * n_b <= elements:
        return n_a, n_b
    tile_b = min(n_b, max(math.isqrt(elements), elements // n_a))
    tile_a = max(1, min(n_a, elements // tile_b))
    return tile_a, tile_b


def _blocks(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i : i + size] for i in range(0, ids.size, size)]


def correlate(
    source,
    n_a: int,
    n_b: int,
    mesh=None,
    *,
    sparse: bool = False,
    chunk_size: int | None = None,
    a_features=None,
    b_features=None,
    max_block_elements: int = DEFAULT_MAX_BLOCK,
    tile_a: int | None = None,
    tile_b: int | None = None,
    constant_tol: float | None = None,
    progress: bool = False,
    checkpoint_dir: str | None = None,
) -> CorrelationMatches:
    """Best activation-correlation matches between all features of A and B, tiled.

    Args:
      source: an `engine.streaming.ChunkStream` (re-read from position 0 for every feature
        block), or a tuple of row-aligned host arrays (dense ``(acts_a, acts_b[, w])`` or
        sparse ``(vals_a, idx_a, vals_b, idx_b[, w])``).
      n_a, n_b: number of features of each SAE.
      mesh: device mesh (default: all devices on the data axis); chunk rows are split over
        ``data``.
      sparse: the chunks are TopK-style (values, indices).
      chunk_size: rows per chunk when ``source`` is a tuple of arrays (default: sparse
        `sparse_chunk_rows` (up to 131072: codes are small), dense 4096).
      a_features / b_features: optional subsets of feature ids.
      max_block_elements: most entries of one block's cross-sum matrix (1 GiB of float32 by
        default); larger feature sets are tiled into near-square blocks, one pass over the
        tokens per block.
      tile_a / tile_b: explicit block sizes (features of A / B per block) instead.
      constant_tol: see `CorrelationAccumulator`.
      progress: tqdm bars.
      checkpoint_dir: optional directory; each block checkpoints there and a rerun resumes.

    Returns:
      `CorrelationMatches` over all features (and the blocks' statistics).
    """
    from engine import streaming

    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    if isinstance(source, streaming.ChunkStream):
        stream = source
    else:
        source = tuple(source)
        if chunk_size is None:
            chunk_size = (
                sparse_chunk_rows(len(source[0]), mesh.shape[mesh_lib.DATA])
                if sparse
                else DEFAULT_DENSE_CHUNK
            )
        stream = streaming.ChunkStream(source, chunk_size, name="correlation stream")
    n_a = checks.check_positive_int("correlate n_a", n_a)
    n_b = checks.check_positive_int("correlate n_b", n_b)
    ids_a = _subset("a_features", a_features, n_a)
    ids_b = _subset("b_features", b_features, n_b)
    ids_a = np.arange(n_a) if ids_a is None else ids_a
    ids_b = np.arange(n_b) if ids_b is None else ids_b
    max_block_elements = checks.check_positive_int("max_block_elements", max_block_elements)
    if sparse:
        max_block_elements = min(max_block_elements, 2**31 - 2)
    fa, fb = ids_a.size, ids_b.size
    if tile_a is None and tile_b is None:
        if fa * fb <= max_block_elements:
            tile_a, tile_b = fa, fb
        else:
            # Near-square blocks (fewest passes over the tokens for a given block size).
            tile_b = min(fb, max(math.isqrt(max_block_elements), max_block_elements // fa))
            tile_a = max(1, min(fa, max_block_elements // tile_b))
    else:
        tile_a = checks.check_positive_int("correlate tile_a", tile_a or fa)
        tile_b = checks.check_positive_int("correlate tile_b", tile_b or fb)
        if sparse and tile_a * tile_b >= 2**31 - 1:
            raise checks.InputError(
                f"correlate: a {tile_a} x {tile_b} block exceeds 2^31 entries; use smaller tiles"
            )
    results = []
    for ia, block_a in enumerate(_blocks(ids_a, tile_a)):
        for ib, block_b in enumerate(_blocks(ids_b, tile_b)):
            full_a = block_a.size == n_a
            full_b = block_b.size == n_b
            acc = CorrelationAccumulator(
                n_a,
                n_b,
                sparse=sparse,
                a_features=None if full_a else block_a,
                b_features=None if full_b else block_b,
                constant_tol=constant_tol,
                keep_matrix=False,
            )
            ckpt = None
            if checkpoint_dir is not None:
                import os

                from engine import checkpoint

                ckpt = checkpoint.Checkpointer(os.path.join(checkpoint_dir, f"block_{ia}_{ib}"))
            stream.seek(0)
            state = accumulate_inplace(
                acc,
                stream,
                mesh,
                checkpointer=ckpt,
                save_every=64 if ckpt is not None else 0,
                progress=progress,
            )
            results.append(acc.finalize(state))
            del state
    return correlation_matches(*results, n_a=n_a, n_b=n_b)


def correlation_matches(
    *results: CorrelationResult, n_a: int | None = None, n_b: int | None = None
) -> CorrelationMatches:
    """Combines blocks' results into each feature's best match in both directions.

    Args:
      results: `CorrelationResult`s of blocks (any tiling of the features; blocks covering
        the same features must come from the same tokens).
      n_a, n_b: total feature counts (default: 1 + the largest id seen).

    Returns:
      `CorrelationMatches`: best partner over all blocks (ties to the lowest id).
    """
    if not results:
        raise checks.InputError("correlation_matches: no results given")
    n_a = int(n_a if n_a is not None else 1 + max(int(r.a_features.max()) for r in results))
    n_b = int(n_b if n_b is not None else 1 + max(int(r.b_features.max()) for r in results))

    def side(prefix):
        return dict(
            included=np.zeros(n, bool),
            dead=np.zeros(n, bool),
            constant=np.zeros(n, bool),
            mean=np.zeros(n),
            std=np.zeros(n),
            density=np.zeros(n),
            match=np.full(n, -1, np.int64),
            value=np.zeros(n),
            best=np.full(n, -np.inf),
        )

    n = n_a
    a = side("a")
    n = n_b
    b = side("b")
    for r in results:
        for s, ids, mean, std, dens, dead, const, best, val in (
            (
                a,
                r.a_features,
                r.mean_a,
                r.std_a,
                r.density_a,
                r.dead_a,
                r.constant_a,
                r.a_best,
                r.a_best_value,
            ),
            (
                b,
                r.b_features,
                r.mean_b,
                r.std_b,
                r.density_b,
                r.dead_b,
                r.constant_b,
                r.b_best,
                r.b_best_value,
            ),
        ):
            s["included"][ids] = True
            s["dead"][ids] = dead
            s["constant"][ids] = const
            s["mean"][ids] = mean
            s["std"][ids] = std
            s["density"][ids] = dens
            has = best >= 0
            cur_v = s["best"][ids]
            cur_i = s["match"][ids]
            better = has & ((val > cur_v) | ((val == cur_v) & ((cur_i < 0) | (best < cur_i))))
            s["best"][ids[better]] = val[better]
            s["match"][ids[better]] = best[better]
    for s in (a, b):
        s["value"] = np.where(s["match"] >= 0, s["best"], 0.0)
        del s["best"]
    return CorrelationMatches(
        n_a=n_a,
        n_b=n_b,
        count=results[0].count,
        rows=results[0].rows,
        **{f"a_{k}": v for k, v in a.items()},
        **{f"b_{k}": v for k, v in b.items()},
    )

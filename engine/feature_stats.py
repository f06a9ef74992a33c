"""Per-feature statistics of a stream of feature activations, as a streaming accumulator.

For every feature of a dictionary (SAE features, neurons) over a stream of rows (tokens):
weighted count of rows where it fires (> 0), mean and variance of its activation (Chan merges
per feature), its maximum, and its ``top_n`` highest activations with their global row ids
(so that a caller can show the top-activating tokens with context). Dead features (never
fire) and constant features (zero variance) are flagged at finalize, never turned into NaN.

Chunks are ``(acts [rows, F], row_ids [rows] int32)``; ``row_ids`` are stream positions so
that results do not depend on chunking or device count. Ties among equal activations are
broken by lower row id (deterministic).

`SparseFeatureStatsAccumulator` computes the same statistics from TopK codes ``(values [rows,
k], indices [rows, k], row_ids)``: O(rows * k) work and memory per chunk instead of the dense
accumulator's O(rows * F) (a ``[F, rows]`` transpose and top-k per chunk, which dominated the
feature pass at 16k-32k features: experiments/bench_feature_pass.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from engine import checks


@flax.struct.dataclass
class FeatureStatsState:
    count: jax.Array  # sum of row weights
    fired: jax.Array  # [F] weighted count of rows with act > 0
    mean: jax.Array  # [F]
    m2: jax.Array  # [F] centred sum of squares
    max: jax.Array  # [F]
    # [F, N] descending / global row ids (-1 = empty slot); None only inside `update`, between
    # the moments of a chunk and its top-k.
    top_values: jax.Array | None
    top_rows: jax.Array | None

    if TYPE_CHECKING:  # flax.struct adds `replace` at run time; declared for the type checker

        def replace(self, **changes: Any) -> FeatureStatsState: ...


@flax.struct.dataclass
class FeatureStats:
    """Finalised statistics (host numpy)."""

    count: float
    density: np.ndarray  # [F] fraction of (weighted) rows where the feature fires
    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    max: np.ndarray  # [F]
    top_values: np.ndarray  # [F, N]
    top_rows: np.ndarray  # [F, N] (-1 where fewer than N rows fired)
    dead: np.ndarray  # [F] bool: never fired
    constant: np.ndarray  # [F] bool: zero variance (dead features included)


def _merge_top(va, ra, vb, rb, n):
    v = jnp.concatenate([va, vb], axis=1)
    r = jnp.concatenate([ra, rb], axis=1)
    # Sort key: value desc, then row id asc (empty slots carry -inf and sort last).
    order = jnp.lexsort((jnp.where(r < 0, jnp.iinfo(jnp.int32).max, r), -v), axis=1)[:, :n]
    return jnp.take_along_axis(v, order, 1), jnp.take_along_axis(r, order, 1)


def _top_by_sort(fi, fv, rid, cand, f: int, n_top: int):
    """Each feature's ``n_top`` largest candidate entries (value desc, row asc): one sort of
    the entries by (feature, -value, row), each run's first ``n_top`` scattered to slots."""
    key_f = jnp.where(cand, fi, f)
    sf, nv, sr = jax.lax.sort((key_f, -fv, rid), num_keys=3)
    sv = -nv
    rank = jnp.arange(sf.shape[0]) - jnp.searchsorted(sf, sf, side="left")
    slot = jnp.minimum(rank, n_top)
    tv = jnp.full((f + 1, n_top + 1), -jnp.inf).at[sf, slot].set(sv)[:f, :n_top]
    tr = jnp.full((f + 1, n_top + 1), -1, jnp.int32).at[sf, slot].set(sr)[:f, :n_top]
    return tv, tr


# Survivors of the pre-filter sorted per kept slot (F * top_n): the filter keeps ~1.5 per slot
# on random TopK codes. It runs when a chunk has at least twice as many entries: the sort of
# `_top_by_sort` is then most of a feature pass's statistics (a comparator call per comparison
# on CPU; ~0.2 s per 8192 x 32 chunk on 2 cores), and most entries cannot be top rows.
PREFILTER_CAPACITY = 3


def _sparse_top(fi, fv, rid, cand, f: int, n_top: int, rows: int):
    """`_top_by_sort` of the entries that can be in a feature's top ``n_top``, same result.

    The entries of row r fall in group ``r mod G`` (G = 2 ``n_top``); a feature appears at
    most once per row, so the maxima of its groups are distinct entries, and the ``n_top``-th
    largest group maximum ``m_f`` is at most its ``n_top``-th largest entry. Entries below
    ``m_f`` are dropped (ties with the ``n_top``-th value are kept, so the row-asc tie
    break is unchanged); the survivors, at most ``capacity``, are sorted instead of all
    ``rows * k`` entries. A chunk with more survivors (adversarial orders) takes the full
    sort, so the result never depends on the filter.
    """
    total = fi.shape[0]
    capacity = PREFILTER_CAPACITY * n_top * f
    if total < 2 * capacity:
        return _top_by_sort(fi, fv, rid, cand, f, n_top)
    groups = 2 * n_top
    k = total // rows
    group = jnp.broadcast_to((jnp.arange(rows, dtype=jnp.int32) % groups)[:, None], (rows, k))
    seg = jnp.where(cand, fi * groups + group.reshape(-1), f * groups)
    gmax = jax.ops.segment_max(
        jnp.where(cand, fv, -jnp.inf), seg, f * groups + 1, indices_are_sorted=False
    )[: f * groups].reshape(f, groups)
    m = jax.lax.top_k(gmax, n_top)[0][:, -1]  # -inf when fewer than n_top groups fired
    keep = cand & (fv >= m[fi])
    count = jnp.sum(keep)

    def compact(_):
        (idx,) = jnp.nonzero(keep, size=capacity, fill_value=0)
        valid = jnp.arange(capacity) < count
        return _top_by_sort(fi[idx], fv[idx], rid[idx], valid, f, n_top)

    return jax.lax.cond(
        count <= capacity, compact, lambda _: _top_by_sort(fi, fv, rid, cand, f, n_top), None
    )


class FeatureStatsAccumulator:
    """Streaming per-feature statistics for ``num_features`` features.

    Args:
      num_features: F.
      top_n: how many top activations (and their rows) to keep per feature.
    """

    def __init__(self, num_features: int, top_n: int = 10):
        self.num_features = checks.check_positive_int("FeatureStats num_features", num_features)
        self.top_n = checks.check_positive_int("FeatureStats top_n", top_n)

    def init(self) -> FeatureStatsState:
        f, n = self.num_features, self.top_n
        return FeatureStatsState(
            count=jnp.zeros(()),
            fired=jnp.zeros((f,)),
            mean=jnp.zeros((f,)),
            m2=jnp.zeros((f,)),
            max=jnp.full((f,), -jnp.inf),
            top_values=jnp.full((f, n), -jnp.inf),
            top_rows=jnp.full((f, n), -1, jnp.int32),
        )

    def update(self, state: FeatureStatsState, arrays, weights) -> FeatureStatsState:
        acts, row_ids = arrays
        acts = jnp.asarray(acts, jnp.float32)
        if acts.ndim != 2 or acts.shape[1] != self.num_features:
            raise checks.InputError(
                f"FeatureStats: expected acts [rows, {self.num_features}], got {tuple(acts.shape)}"
            )
        w = jnp.asarray(weights, jnp.float32)
        n_b = jnp.sum(w)
        safe = jnp.where(n_b > 0, n_b, 1.0)
        mean_b = (w @ acts) / safe
        m2_b = w @ ((acts - mean_b) ** 2)
        real = (w > 0)[:, None]
        part = FeatureStatsState(
            count=n_b,
            fired=w @ (acts > 0).astype(jnp.float32),
            mean=mean_b,
            m2=m2_b,
            max=jnp.max(jnp.where(real, acts, -jnp.inf), axis=0),
            top_values=None,
            top_rows=None,
        )
        k = min(self.top_n, acts.shape[0])
        masked = jnp.where(real, acts, -jnp.inf).T  # [F, rows]
        # top_k breaks ties by lower index; rows within a chunk are in stream order.
        tv, ti = jax.lax.top_k(masked, k)
        tr = jnp.where(jnp.isfinite(tv), jnp.asarray(row_ids, jnp.int32)[ti], -1)
        if k < self.top_n:
            pad = self.top_n - k
            tv = jnp.pad(tv, ((0, 0), (0, pad)), constant_values=-jnp.inf)
            tr = jnp.pad(tr, ((0, 0), (0, pad)), constant_values=-1)
        part = part.replace(top_values=tv, top_rows=tr)
        return self.merge(state, part)

    def merge(self, a: FeatureStatsState, b: FeatureStatsState) -> FeatureStatsState:
        n = a.count + b.count
        safe = jnp.where(n > 0, n, 1.0)
        delta = b.mean - a.mean
        mean = a.mean + delta * b.count / safe
        m2 = a.m2 + b.m2 + delta**2 * a.count * b.count / safe
        tv, tr = _merge_top(a.top_values, a.top_rows, b.top_values, b.top_rows, self.top_n)
        return FeatureStatsState(
            count=n,
            fired=a.fired + b.fired,
            mean=mean,
            m2=m2,
            max=jnp.maximum(a.max, b.max),
            top_values=tv,
            top_rows=tr,
        )

    def finalize(self, state: FeatureStatsState) -> FeatureStats:
        s = jax.device_get(state)
        count = float(s.count)
        if count <= 0:
            raise checks.InputError("FeatureStats: no rows were accumulated")
        var = np.maximum(np.asarray(s.m2, np.float64) / count, 0.0)
        fired = np.asarray(s.fired, np.float64)
        top_v = np.asarray(s.top_values, np.float64)
        top_r = np.asarray(s.top_rows)
        # Rows that never fired are not "top activating": keep only positive activations.
        top_r = np.where(top_v > 0, top_r, -1)
        top_v = np.where(top_v > 0, top_v, 0.0)
        return FeatureStats(
            count=count,
            density=fired / count,
            mean=np.asarray(s.mean, np.float64),
            std=np.sqrt(var),
            max=np.asarray(s.max, np.float64),
            top_values=top_v,
            top_rows=top_r,
            dead=fired == 0,
            constant=var <= 1e-12 * np.maximum(1.0, np.abs(s.mean) ** 2),
        )


class SparseFeatureStatsAccumulator(FeatureStatsAccumulator):
    """`FeatureStatsAccumulator` over sparse codes ``(values [rows, k], indices [rows, k],
    row_ids [rows])``: row r has activation ``values[r, j]`` at feature ``indices[r, j]`` and 0
    at every other feature (TopK SAEs; indices distinct within a row).

    Per chunk: segment sums over the ``rows * k`` entries give the weighted count, firing
    count, mean and centred sum of squares (the rows where a feature is absent contribute
    ``(0 - mean)^2`` each, added in closed form); the maximum is the largest entry, or 0 when
    some real row does not select the feature; the top rows come from one sort of the entries
    by (feature, value desc, row asc). Finalised results equal the dense accumulator's on the
    densified codes (tests/test_feature_stats.py).
    """

    def update(self, state: FeatureStatsState, arrays, weights) -> FeatureStatsState:
        vals, idx, row_ids = arrays
        f, n_top = self.num_features, self.top_n
        v = jnp.asarray(vals, jnp.float32)
        i = jnp.asarray(idx, jnp.int32)
        if v.ndim != 2 or i.shape != v.shape:
            raise checks.InputError(
                f"SparseFeatureStats: expected values and indices [rows, "
                f"k] of one shape, got {tuple(v.shape)} and "
                f"{tuple(i.shape)}"
            )
        rows, k = v.shape
        w = jnp.asarray(weights, jnp.float32)
        n_b = jnp.sum(w)
        safe = jnp.where(n_b > 0, n_b, 1.0)
        fi = i.reshape(-1)
        fv = v.reshape(-1)
        fw = jnp.broadcast_to(w[:, None], (rows, k)).reshape(-1)
        cnt = jax.ops.segment_sum(fw, fi, f)  # weighted entries per feature
        mean_b = jax.ops.segment_sum(fw * fv, fi, f) / safe
        m2_b = (
            jax.ops.segment_sum(fw * (fv - mean_b[fi]) ** 2, fi, f)
            + jnp.maximum(n_b - cnt, 0.0) * mean_b**2
        )
        fired = jax.ops.segment_sum(fw * (fv > 0), fi, f)
        real = fw > 0
        mx = jax.ops.segment_max(jnp.where(real, fv, -jnp.inf), fi, f)
        n_real = jnp.sum(w > 0)
        real_cnt = jax.ops.segment_sum(real.astype(jnp.int32), fi, f)
        mx = jnp.where(real_cnt < n_real, jnp.maximum(mx, 0.0), mx)
        # Top rows: only positive entries of real rows can be top-activating (finalize drops
        # the rest); sort entries by feature, value desc, row asc and keep each run's first n.
        rid = jnp.broadcast_to(jnp.asarray(row_ids, jnp.int32)[:, None], (rows, k)).reshape(-1)
        cand = real & (fv > 0)
        tv, tr = _sparse_top(fi, fv, rid, cand, f, n_top, rows)
        part = FeatureStatsState(
            count=n_b, fired=fired, mean=mean_b, m2=m2_b, max=mx, top_values=tv, top_rows=tr
        )
        return self.merge(state, part)

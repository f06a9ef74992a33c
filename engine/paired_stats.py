"""One streaming pass over paired rows X [n, d1], Y [n, d2] for every moment-based metric.

`PairMoments` is an engine accumulator (``init / update / merge / finalize``, see
engine/accumulators.py) that extends `engine.accumulators.CrossMoments` (count, means, centred
XtX, YtY, XtY) with the few extra row sums that the UNBIASED HSIC needs (debiased CKA,
Kornblith et al. 2019 / Song et al. 2012, see docs/references.md), and with the number of
rows that carry a non-zero weight (the rank bound of CCA). From one pass over a `ChunkStream`
of ``(x, y)`` or ``(x, y, w)`` chunks it gives CCA, SVCCA, PWCCA (engine/cca.py), biased and
debiased linear CKA (engine/cka.py) and the Procrustes similarity (engine/geometry.py), so n can
be millions of rows while memory stays O(d1^2 + d2^2 + d1 d2).

The extra sums, for rows centred on the pooled mean (``a_i = |x_i - m_x|^2``,
``b_i = |y_i - m_y|^2``, ``w_i`` the row weight):

* ``q_xy = sum w a b``, ``q_xx = sum w a^2``, ``q_yy = sum w b^2``;
* ``u = sum w a (y - m_y)`` [d2], ``v = sum w b (x - m_x)`` [d1], ``wx = sum w a (x - m_x)``
  [d1], ``wy = sum w b (y - m_y)`` [d2] (third moments, needed only to move the q's when two
  parts with different means are merged).

Merging (Chan et al. style, exact): a part centred on its own mean is re-centred on the pooled
mean by ``delta = pooled - own``; with ``a' = a - 2 (x - m).delta + |delta|^2`` the sums move as

  q'_PQ = q - 2 u.dQ - 2 v.dP + |dQ|^2 tr S_PP + |dP|^2 tr S_QQ + 4 dP^T S_PQ dQ + n |dP|^2 |dQ|^2
  u'_PQ = u - tr(S_PP) dQ - 2 S_PQ^T dP - n |dP|^2 dQ
  v'_PQ = v - tr(S_QQ) dP - 2 S_PQ dQ - n |dQ|^2 dP

(terms with ``sum (x - m)`` vanish because each part is centred on its own mean). All stored
quantities stay of the order of the data's spread, as in CrossMoments, so float32 agrees with a
float64 reference to ~1e-6.

Row weights act as frequency weights: an integer weight ``w`` gives the same statistics as the
row repeated ``w`` times (this is what makes bootstrap-by-weights exact for these metrics).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from engine import accumulators, checks, streaming
from engine import mesh as mesh_lib

HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class PairState:
    """Running state of `PairMoments` (all sums centred on the running pooled mean)."""

    moments: accumulators.MomentsState
    rows: jax.Array  # int32: rows with a non-zero weight
    q_xx: jax.Array
    q_yy: jax.Array
    q_xy: jax.Array
    u: jax.Array  # [d2] sum w a (y - m_y)
    v: jax.Array  # [d1] sum w b (x - m_x)
    wx: jax.Array  # [d1] sum w a (x - m_x)
    wy: jax.Array  # [d2] sum w b (y - m_y)


@dataclasses.dataclass(frozen=True)
class PairStats:
    """Finalised statistics (host numpy float64).

    Attributes:
      count: sum of row weights (n for unweighted rows).
      rows: rows with a non-zero weight.
      mean_x, mean_y: weighted means.
      cov_xx, cov_yy, cov_xy: weighted population covariances (centred sums / count).
      q_xx, q_yy, q_xy: ``sum w |x-m_x|^4``, ``sum w |y-m_y|^4``,
        ``sum w |x-m_x|^2 |y-m_y|^2``.
    """

    count: float
    rows: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    cov_xx: np.ndarray
    cov_yy: np.ndarray
    cov_xy: np.ndarray
    q_xx: float
    q_yy: float
    q_xy: float
    # Relative precision of the accumulation (machine epsilon of its dtype; float64 for
    # `stats_from_numpy`): CCA's rank decisions are made against this noise level.
    precision: float = float(np.finfo(np.float32).eps)

    @property
    def d1(self) -> int:
        return int(self.cov_xx.shape[0])

    @property
    def d2(self) -> int:
        return int(self.cov_yy.shape[0])


def _shift_pair(n, tr_pp, tr_qq, s_pq, q, u, v, dp, dq):
    """Re-centres (q, u, v) of one part by (dp, dq); see the module docstring."""
    dp2 = jnp.dot(dp, dp, precision=HIGHEST)
    dq2 = jnp.dot(dq, dq, precision=HIGHEST)
    s_dq = jnp.dot(s_pq, dq, precision=HIGHEST)  # S_PQ dQ   [dP]
    st_dp = jnp.dot(dp, s_pq, precision=HIGHEST)  # S_PQ^T dP [dQ]
    q_new = (
        q
        - 2.0 * jnp.dot(u, dq, precision=HIGHEST)
        - 2.0 * jnp.dot(v, dp, precision=HIGHEST)
        + dq2 * tr_pp
        + dp2 * tr_qq
        + 4.0 * jnp.dot(dp, s_dq, precision=HIGHEST)
        + n * dp2 * dq2
    )
    u_new = u - tr_pp * dq - 2.0 * st_dp - n * dp2 * dq
    v_new = v - tr_qq * dp - 2.0 * s_dq - n * dq2 * dp
    return q_new, u_new, v_new


def _recentre(state: PairState, dx, dy):
    """The part's (q_xx, q_yy, q_xy, u, v, wx, wy) re-centred by (dx, dy)."""
    m = state.moments
    n = m.count
    tr_x = jnp.trace(m.sxx)
    tr_y = jnp.trace(m.syy)
    q_xy, u, v = _shift_pair(n, tr_x, tr_y, m.sxy, state.q_xy, state.u, state.v, dx, dy)
    q_xx, wx, _ = _shift_pair(n, tr_x, tr_x, m.sxx, state.q_xx, state.wx, state.wx, dx, dx)
    q_yy, wy, _ = _shift_pair(n, tr_y, tr_y, m.syy, state.q_yy, state.wy, state.wy, dy, dy)
    return q_xx, q_yy, q_xy, u, v, wx, wy


class PairMoments:
    """Accumulator of `PairState` over chunks ``(x, y)`` or ``(x, y, w)``.

    With three arrays the third is a per-row weight that multiplies the stream's mask (so a
    `ChunkStream((X, Y, w), ...)` carries importance / bootstrap weights).

    Args:
      d1, d2: columns of X and Y (both >= 1).
      dtype: accumulation dtype (float32; float64 when ``jax_enable_x64`` is on).
    """

    def __init__(self, d1: int, d2: int, dtype=jnp.float32):
        self.d1 = checks.check_positive_int("PairMoments d1", d1)
        self.d2 = checks.check_positive_int("PairMoments d2", d2)
        self.dtype = dtype
        self._cm = accumulators.CrossMoments(self.d1, self.d2, dtype)

    def init(self) -> PairState:
        z = lambda *s: jnp.zeros(s, self.dtype)
        return PairState(
            moments=self._cm.init(),
            rows=jnp.zeros((), jnp.int32),
            q_xx=z(),
            q_yy=z(),
            q_xy=z(),
            u=z(self.d2),
            v=z(self.d1),
            wx=z(self.d1),
            wy=z(self.d2),
        )

    def update(self, state: PairState, arrays, weights) -> PairState:
        w = jnp.asarray(weights, self.dtype)
        if len(arrays) == 3:
            w = w * jnp.asarray(arrays[2], self.dtype).reshape(-1)
        elif len(arrays) != 2:
            raise checks.InputError(
                f"PairMoments: expected chunks (x, y) or (x, y, w), got {len(arrays)} arrays"
            )
        x = jnp.asarray(arrays[0], self.dtype)
        y = jnp.asarray(arrays[1], self.dtype)
        part = self._cm.update(self._cm.init(), (x, y), w)
        # Centre the chunk on its own (weighted) mean: shift + refinement, kept apart for
        # precision.
        xc = (x - part.shift_x) - part.mean_x
        yc = (y - part.shift_y) - part.mean_y
        a = jnp.sum(xc * xc, axis=1)
        b = jnp.sum(yc * yc, axis=1)
        wa = w * a
        wb = w * b
        chunk = PairState(
            moments=part,
            rows=jnp.sum(w != 0).astype(jnp.int32),
            q_xx=jnp.dot(wa, a, precision=HIGHEST),
            q_yy=jnp.dot(wb, b, precision=HIGHEST),
            q_xy=jnp.dot(wa, b, precision=HIGHEST),
            u=jnp.dot(wa, yc, precision=HIGHEST),
            v=jnp.dot(wb, xc, precision=HIGHEST),
            wx=jnp.dot(wa, xc, precision=HIGHEST),
            wy=jnp.dot(wb, yc, precision=HIGHEST),
        )
        return self.merge(state, chunk)

    def merge(self, a: PairState, b: PairState) -> PairState:
        pooled = self._cm.merge(a.moments, b.moments)

        def own_mean(m):  # a part's mean, on the pooled state's shift
            return (
                m.mean_x + (m.shift_x - pooled.shift_x),
                m.mean_y + (m.shift_y - pooled.shift_y),
            )

        parts = []
        for s in (a, b):
            mx, my = own_mean(s.moments)
            parts.append(_recentre(s, pooled.mean_x - mx, pooled.mean_y - my))
        summed = [pa + pb for pa, pb in zip(*parts)]
        q_xx, q_yy, q_xy, u, v, wx, wy = summed
        return PairState(
            moments=pooled,
            rows=a.rows + b.rows,
            q_xx=q_xx,
            q_yy=q_yy,
            q_xy=q_xy,
            u=u,
            v=v,
            wx=wx,
            wy=wy,
        )

    def merge_across(self, state: PairState, axis_name: str) -> PairState:
        """Exact k-way merge by collectives (inside `shard_map`): every part is re-centred on
        the pooled mean, then summed."""
        pooled = self._cm.merge_across(state.moments, axis_name)
        m = state.moments
        mx = m.mean_x + (m.shift_x - pooled.shift_x)
        my = m.mean_y + (m.shift_y - pooled.shift_y)
        parts = _recentre(state, pooled.mean_x - mx, pooled.mean_y - my)
        q_xx, q_yy, q_xy, u, v, wx, wy = (jax.lax.psum(p, axis_name) for p in parts)
        return PairState(
            moments=pooled,
            rows=jax.lax.psum(state.rows, axis_name),
            q_xx=q_xx,
            q_yy=q_yy,
            q_xy=q_xy,
            u=u,
            v=v,
            wx=wx,
            wy=wy,
        )

    def finalize(self, state: PairState) -> PairStats:
        m = self._cm.finalize(state.moments)
        s = jax.tree.map(lambda t: np.asarray(jax.device_get(t), np.float64), state)
        return PairStats(
            count=float(m.count),
            rows=int(s.rows),
            mean_x=m.mean_x,
            mean_y=m.mean_y,
            cov_xx=m.cov_xx,
            cov_yy=m.cov_yy,
            cov_xy=m.cov_xy,
            q_xx=float(s.q_xx),
            q_yy=float(s.q_yy),
            q_xy=float(s.q_xy),
            precision=m.precision,
        )


# --------------------------------------------------------------------------------------------
# Input checks and convenience entry points.
# --------------------------------------------------------------------------------------------


def check_pair(
    x, y, weights=None, *, min_rows: int = 2, name: str = "metric"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validates paired matrices and optional row weights; returns numpy arrays.

    Raises `engine.checks.InputError` (one line, naming the input) on: non-2-D input, fewer
    than ``min_rows`` rows, mismatched row counts, NaN/Inf, non-float dtypes, X and Y of
    different dtypes, and weights that are not a finite non-negative ``[n]`` vector with a
    positive sum.
    """
    x = checks.as_float_matrix(f"{name} X", x, min_rows=min_rows)
    y = checks.as_float_matrix(f"{name} Y", y, min_rows=min_rows)
    checks.check_rows_match(f"{name} X", x, f"{name} Y", y)
    if x.dtype != y.dtype:
        raise checks.InputError(
            f"{name}: X has dtype {x.dtype} but Y has dtype {y.dtype}; "
            "convert both to the same float dtype"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise checks.InputError(f"{name}: expected float arrays, got dtype {x.dtype}")
    if weights is not None:
        weights = np.asarray(weights)
        checks.check_shape(f"{name} weights", weights, (x.shape[0],))
        checks.check_finite(f"{name} weights", weights)
        checks.check_non_negative(f"{name} weights", weights)
        if int(np.count_nonzero(weights)) < min_rows:
            raise checks.InputError(
                f"{name} weights: expected at least {min_rows} rows with a "
                f"positive weight, got {int(np.count_nonzero(weights))}"
            )
    return x, y, weights


def default_mesh():
    """A one-device mesh: the in-memory helpers run on it unless a mesh is passed."""
    return mesh_lib.make_mesh(devices=jax.devices()[:1])


def chunk_rows(mesh, rows: int, chunk_size: int | None) -> int:
    """A chunk size that divides over the mesh's data axis.

    The default is the next power of two >= rows, capped at 65536, so that inputs of similar
    size share one compiled step (the last chunk is zero-padded and masked).
    """
    ndev = mesh.shape[mesh_lib.DATA]
    if chunk_size is None:
        chunk_size = min(65536, 1 << max(0, int(rows - 1).bit_length()))
    return max(ndev, -(-int(chunk_size) // ndev) * ndev)


@functools.lru_cache(maxsize=64)
def _accumulator(d1: int, d2: int, dtype=jnp.float32) -> PairMoments:
    return PairMoments(d1, d2, dtype)


@functools.lru_cache(maxsize=64)
def _sharded_step(d1: int, d2: int, mesh, num_arrays: int, dtype=jnp.float32):
    # Cached so that repeated calls on same-shaped inputs (bootstrap, loop nulls) compile once.
    return accumulators.make_sharded_update(_accumulator(d1, d2, dtype), mesh, num_arrays)


def _fold(
    acc: PairMoments,
    stream: streaming.ChunkStream,
    mesh,
    num_arrays: int,
    *,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
) -> PairState:
    """`engine.accumulators.accumulate` with the cached compiled step (state and resume
    position saved every ``save_every`` chunks and at the end, resumed from the latest
    checkpoint)."""
    step = _sharded_step(acc.d1, acc.d2, mesh, num_arrays, acc.dtype)
    return accumulators.accumulate(
        acc,
        stream,
        mesh,
        checkpointer=checkpointer,
        save_every=save_every,
        progress=progress,
        step=step,
    )


def pair_stats(
    x,
    y,
    weights=None,
    *,
    mesh=None,
    chunk_size: int | None = None,
    name: str = "metric",
    min_rows: int = 2,
) -> PairStats:
    """Statistics of in-memory X, Y (validated, streamed in chunks over the mesh).

    Args:
      x, y: ``[n, d1]``, ``[n, d2]`` float arrays of the same dtype.
      weights: optional ``[n]`` non-negative frequency weights.
      mesh: device mesh (default: one device); rows are split over ``data``.
      chunk_size: rows per chunk (default: next power of two >= n, at most 65536).
      name: used in error messages.
      min_rows: rows (with a positive weight) required.
    """
    x, y, weights = check_pair(x, y, weights, min_rows=min_rows, name=name)
    mesh = default_mesh() if mesh is None else mesh
    arrays = (x, y) if weights is None else (x, y, weights.astype(np.float32))
    stream = streaming.ChunkStream(
        arrays, chunk_rows(mesh, x.shape[0], chunk_size), check_finite=False, name=name
    )
    acc = _accumulator(x.shape[1], y.shape[1])
    return acc.finalize(_fold(acc, stream, mesh, len(arrays)))


def _peek_dims(stream: streaming.ChunkStream) -> tuple[int, int, int]:
    """Columns of X and Y and the number of arrays of a stream, without consuming it."""
    position = stream.position
    first = next(iter(stream))
    stream.seek(position)
    if len(first.arrays) not in (2, 3):
        raise checks.InputError(
            f"{stream.name}: expected chunks (x, y) or (x, y, w), got {len(first.arrays)} arrays"
        )
    x, y = first.arrays[:2]
    if np.ndim(x) != 2 or np.ndim(y) != 2:
        raise checks.InputError(
            f"{stream.name}: expected 2-D chunks x [rows, d1], y [rows, "
            f"d2], got shapes {np.shape(x)} and {np.shape(y)}"
        )
    return int(np.shape(x)[1]), int(np.shape(y)[1]), len(first.arrays)


def stream_stats(
    stream: streaming.ChunkStream,
    mesh,
    *,
    checkpointer=None,
    save_every: int = 0,
    progress: bool = False,
    dtype=jnp.float32,
) -> PairStats:
    """One pass of `PairMoments` over a stream of ``(x, y)`` or ``(x, y, w)`` chunks.

    Args:
      stream: the chunk stream (its chunk size must divide over the mesh ``data`` axis).
      mesh: the device mesh (rows are split over ``data``; the result does not depend on it).
      checkpointer / save_every: resume mid-stream (see `engine.accumulators.accumulate`).
      progress: tqdm bar over rows.
      dtype: accumulation dtype; float64 needs ``jax_enable_x64`` (about 2x slower on CPU,
        for inputs whose covariances are too ill-conditioned for float32's ~1e-6).
    """
    d1, d2, num_arrays = _peek_dims(stream)
    acc = _accumulator(d1, d2, dtype)
    return acc.finalize(
        _fold(
            acc,
            stream,
            mesh,
            num_arrays,
            checkpointer=checkpointer,
            save_every=save_every,
            progress=progress,
        )
    )


def stats_from_numpy(x, y, weights=None) -> PairStats:
    """Float64 statistics computed directly in numpy (small inputs, references, fallbacks)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
    n = float(w.sum())
    mx = w @ x / n
    my = w @ y / n
    xc = x - mx
    yc = y - my
    a = np.einsum("ij,ij->i", xc, xc)
    b = np.einsum("ij,ij->i", yc, yc)
    return PairStats(
        count=n,
        rows=int(np.count_nonzero(w)),
        mean_x=mx,
        mean_y=my,
        cov_xx=(xc * w[:, None]).T @ xc / n,
        cov_yy=(yc * w[:, None]).T @ yc / n,
        cov_xy=(xc * w[:, None]).T @ yc / n,
        q_xx=float(w @ (a * a)),
        q_yy=float(w @ (b * b)),
        q_xy=float(w @ (a * b)),
        precision=float(np.finfo(np.float64).eps),
    )


def require_variance(name: str, stats: PairStats) -> None:
    """Raises when either side has (numerically) zero total variance: every metric is 0/0."""
    for side, cov in (("X", stats.cov_xx), ("Y", stats.cov_yy)):
        if not np.trace(cov) > 0:
            raise checks.InputError(
                f"{name}: every column of {side} is constant (zero "
                f"variance over the rows); the similarity is undefined"
            )

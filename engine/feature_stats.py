"""Per-feature statistics of a stream of feature activations, as a streaming accumulator.

For every feature of a dictionary (SAE features, neurons) over a stream of rows (tokens):
weighted count of rows where it fires (> 0), mean and variance of its activation (Chan merges
per feature), its maximum, and its ``top_n`` highest activations with their global row ids
(so that a caller can show the top-activating tokens with context). Dead features (never
fire) and constant features (zero variance) are flagged at finalize, never turned into NaN.

Chunks are ``(acts [rows, F], row_ids [rows] int32)``; ``row_ids`` are stream positions so
that results do not depend on chunking or device count. Ties among equal activations are
broken by lower row id (deterministic).
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
    count: jax.Array        # sum of row weights
    fired: jax.Array        # [F] weighted count of rows with act > 0
    mean: jax.Array         # [F]
    m2: jax.Array           # [F] centred sum of squares
    max: jax.Array          # [F]
    # [F, N] descending / global row ids (-1 = empty slot); None only inside `update`, between
    # the moments of a chunk and its top-k.
    top_values: jax.Array | None
    top_rows: jax.Array | None

    if TYPE_CHECKING:   # flax.struct adds `replace` at run time; declared for the type checker
        def replace(self, **changes: Any) -> FeatureStatsState: ...


@flax.struct.dataclass
class FeatureStats:
    """Finalised statistics (host numpy)."""

    count: float
    density: np.ndarray       # [F] fraction of (weighted) rows where the feature fires
    mean: np.ndarray          # [F]
    std: np.ndarray           # [F]
    max: np.ndarray           # [F]
    top_values: np.ndarray    # [F, N]
    top_rows: np.ndarray      # [F, N] (-1 where fewer than N rows fired)
    dead: np.ndarray          # [F] bool: never fired
    constant: np.ndarray      # [F] bool: zero variance (dead features included)


def _merge_top(va, ra, vb, rb, n):
    v = jnp.concatenate([va, vb], axis=1)
    r = jnp.concatenate([ra, rb], axis=1)
    # Sort key: value desc, then row id asc (empty slots carry -inf and sort last).
    order = jnp.lexsort((jnp.where(r < 0, jnp.iinfo(jnp.int32).max, r), -v), axis=1)[:, :n]
    return jnp.take_along_axis(v, order, 1), jnp.take_along_axis(r, order, 1)


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
            count=jnp.zeros(()), fired=jnp.zeros((f,)), mean=jnp.zeros((f,)),
            m2=jnp.zeros((f,)), max=jnp.full((f,), -jnp.inf),
            top_values=jnp.full((f, n), -jnp.inf), top_rows=jnp.full((f, n), -1, jnp.int32))

    def update(self, state: FeatureStatsState, arrays, weights) -> FeatureStatsState:
        acts, row_ids = arrays
        acts = jnp.asarray(acts, jnp.float32)
        if acts.ndim != 2 or acts.shape[1] != self.num_features:
            raise checks.InputError(f"FeatureStats: expected acts [rows, {self.num_features}], "
                                    f"got {tuple(acts.shape)}")
        w = jnp.asarray(weights, jnp.float32)
        n_b = jnp.sum(w)
        safe = jnp.where(n_b > 0, n_b, 1.0)
        mean_b = (w @ acts) / safe
        m2_b = w @ ((acts - mean_b) ** 2)
        real = (w > 0)[:, None]
        part = FeatureStatsState(
            count=n_b, fired=w @ (acts > 0).astype(jnp.float32), mean=mean_b, m2=m2_b,
            max=jnp.max(jnp.where(real, acts, -jnp.inf), axis=0),
            top_values=None, top_rows=None)
        k = min(self.top_n, acts.shape[0])
        masked = jnp.where(real, acts, -jnp.inf).T                      # [F, rows]
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
        m2 = a.m2 + b.m2 + delta ** 2 * a.count * b.count / safe
        tv, tr = _merge_top(a.top_values, a.top_rows, b.top_values, b.top_rows, self.top_n)
        return FeatureStatsState(count=n, fired=a.fired + b.fired, mean=mean, m2=m2,
                                 max=jnp.maximum(a.max, b.max), top_values=tv, top_rows=tr)

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
        return FeatureStats(count=count, density=fired / count,
                            mean=np.asarray(s.mean, np.float64), std=np.sqrt(var),
                            max=np.asarray(s.max, np.float64), top_values=top_v,
                            top_rows=top_r, dead=fired == 0,
                            constant=var <= 1e-12 * np.maximum(1.0, np.abs(s.mean) ** 2))

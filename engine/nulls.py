"""Random-pairing nulls (batched over permutations, sharded over the mesh) and bootstrap CIs.

Random-pairing null (Lan et al. 2024; docs/references.md "Nulls"): the metric is
recomputed on R random row permutations of Y, which breaks the pairing but keeps both sets of
rows. Every null in the engine is summarised by `summarize_null` into a `NullSummary`: null
mean, sample std, quantiles, ``z = (observed - mean) / std``, the excess ``observed - mean``,
and ``p = (1 + #{null >= observed}) / (1 + R)`` (Lan et al.'s ``mean(null >= observed)`` can
be 0, which no finite test supports); an exact null that enumerates every permutation of a few
items (`item_permutation_test`) has ``p = #{null >= observed} / R``.

Batching: a metric supplies a `NullKernel`: a module-level ``stat(consts, perm, **static)``
that is pure JAX, plus the permutation-invariant work done once (whitened or standardised rows,
rank matrices, neighbour lists) in ``consts``. `permutation_null` draws permutation r as
``jax.random.permutation(fold_in(key(seed), r), n)`` ON the devices (bit for bit, by the
faster `permutation`), ``vmap``s ``stat`` over a
batch of permutations, ``lax.scan``s over batches, and splits the permutations over the mesh
``data`` axis with `jax.shard_map`. Permutation r is the same whatever the number of devices,
so the null values agree across meshes up to float rounding. `permutations` returns the same
permutations on the host (for Python-loop baselines and tests).

Bootstrap: `bootstrap` resamples rows with replacement (seeded) and recomputes any metric
``fn(X, Y, weights)``; percentile confidence interval. For the moment-based metrics
(CCA family, CKA, Procrustes) whose weights are frequency weights, passing the resampling
counts as weights is exactly a resample (``by_weights=True``, no copies of the data). For
RSA and mutual kNN a resample duplicates rows, and a duplicated row is its own nearest /
most-correlated neighbour: their bootstrap intervals are biased upward (documented, as in
any row bootstrap of pairwise statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Bytes one device may spend on the gathered rows of one batch of permutations.
BATCH_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class NullKernel:
    """What a metric needs to be recomputed under row permutations of Y.

    Attributes:
      stat: module-level ``stat(consts, perm, **static) -> scalar`` (pure JAX); ``perm[i]`` is
        the row of Y paired with row i of X. ``stat(consts, arange(n))`` is the observed value.
      consts: pytree of arrays (replicated on every device).
      n: number of rows.
      static: hashable ``((name, value), ...)`` keyword arguments of ``stat``.
      row_bytes: bytes gathered per permutation (sizes the vmap batch).
      finish: optional module-level ``finish(consts, part) -> scalar`` applied to each output
        of ``stat`` one permutation at a time (``lax.map``, not ``vmap``). Small dense
        factorisations (SVD, eigh) go here: jaxlib's CPU LAPACK kernels split a BATCHED call
        over the intra-op thread pool and block on it, which deadlocks when several CPU
        devices of the mesh run such calls at once (seen with JAX 0.10.2 on 4 simulated
        devices). Unbatched calls run inline.
      pad: optional ``pad(consts, static, size) -> (consts, static)``: the same kernel on
        ``size >= n`` rows, such that ``stat`` at a permutation that keeps rows ``n..size-1``
        in place equals ``stat`` of the unpadded kernel at the permutation of the first ``n``
        (zero rows that add nothing). Used by `padded_null` (one compile for many ``n``).
    """

    stat: Callable[..., Any]
    consts: Any
    n: int
    static: tuple = ()
    row_bytes: int = 0
    finish: Callable[..., Any] | None = None
    pad: Callable[..., Any] | None = None

    def observed(self) -> float:
        """The statistic at the identity permutation (same code path as the null)."""
        perm = jnp.arange(self.n, dtype=jnp.int32)
        fn = _observed_fn(self.stat, self.finish, self.static)
        return float(fn(self.consts, perm))


def _apply(stat, finish, consts, perms, kwargs, batched_finish: bool = False):
    """``stat`` vmapped over a batch of permutations, then ``finish`` mapped one by one (or,
    with ``batched_finish``, vmapped: one batched LAPACK call, which uses the intra-op
    threads; safe only when a single device runs it, see `NullKernel.finish`)."""
    part = jax.vmap(lambda p: stat(consts, p, **kwargs))(perms)
    if finish is None:
        return part
    if batched_finish:
        return jax.vmap(lambda t: finish(consts, t))(part)
    return jax.lax.map(lambda t: finish(consts, t), part)


@functools.lru_cache(maxsize=64)
def _observed_fn(stat, finish, static):
    return jax.jit(lambda consts, perm: _apply(stat, finish, consts, perm[None], dict(static))[0])


#: Largest n for which `permutation` uses its packed-sort argsort (index and half of a sort
#: key share one uint32 word: 2 * ceil(log2 n) <= 32); above it, ``jax.random.permutation``.
FAST_PERMUTATION_MAX_N = 1 << 16


def _stable_argsort_u32(bits: jax.Array) -> jax.Array:
    """Stable argsort of ``[n]`` uint32 keys (n <= 2^16) by two single-operand uint32 sorts.

    LSD radix with ``b = ceil(log2 n)`` index bits: sort the words ``low (32-b) key bits |
    index`` (unique, so the order is by low bits, ties by index), then, stably, the words
    ``high b key bits | position in that order``. The result orders by (key, index): exactly
    the stable argsort, equal keys included. XLA's CPU sort of one uint32 operand is ~4.7x
    faster than its two-operand key-value sort (0.17 vs 0.80 ms at n = 5000).
    """
    n = bits.shape[0]
    b = max(1, (n - 1).bit_length())
    idx = jnp.arange(n, dtype=jnp.uint32)
    mask = jnp.uint32((1 << b) - 1)
    first = jax.lax.sort((bits << b) | idx) & mask
    second = jax.lax.sort(((bits[first] >> (32 - b)) << b) | idx) & mask
    return first[second].astype(jnp.int32)


def permutation(key: jax.Array, n: int) -> jax.Array:
    """``jax.random.permutation(key, n)`` as int32, bit for bit, but ~2x faster on CPU.

    JAX shuffles by ``ceil(3 ln n / ln(2^32 - 1))`` rounds of a stable key-value sort by fresh
    32-bit keys (``key, sub = split(key)``; ``bits(sub, (n,), uint32)``). The same rounds
    with the same keys are done here by `_stable_argsort_u32` (two one-operand sorts per
    round), so every permutation, and every null value computed from one, is unchanged.
    Above `FAST_PERMUTATION_MAX_N` rows it calls ``jax.random.permutation``. Checked against
    it in tests/test_nulls.py (many keys and sizes, tied keys, the fallback).
    """
    n = int(n)
    if n > FAST_PERMUTATION_MAX_N:
        return jax.random.permutation(key, n).astype(jnp.int32)
    rounds = int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))
    perm = jnp.arange(n, dtype=jnp.int32)
    for _ in range(rounds):
        key, sub = jax.random.split(key)
        perm = perm[_stable_argsort_u32(jax.random.bits(sub, (n,), jnp.uint32))]
    return perm


def _perm(key, r, n):
    return permutation(jax.random.fold_in(key, r), n)


@functools.lru_cache(maxsize=16)
def _permutations_fn(n: int):
    return jax.jit(jax.vmap(lambda key, r: _perm(key, r, n), in_axes=(None, 0)))


def permutations(n: int, num: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """``[num, n]`` int32 host copy of permutations ``start .. start+num-1``.

    They are exactly the permutations `permutation_null` draws on the devices. The jitted
    draw is cached per ``n`` (a loop calling this per block compiles once).
    """
    key = jax.random.PRNGKey(seed)
    ids = jnp.arange(start, start + num)
    return np.asarray(_permutations_fn(int(n))(key, ids))


@functools.lru_cache(maxsize=64)
def _null_fn(stat, finish, static, mesh, n: int, batch: int):
    kwargs = dict(static)
    # One device: no other device's LAPACK call can contend for the intra-op pool, so the
    # small factorisations of a batch run as one batched call (SVCCA's 200 x [371, 371] SVDs
    # on 2 threads: 2.9 s one by one, 1.8 s batched); several devices keep ``lax.map``.
    batched_finish = mesh.devices.size == 1

    def local(consts, key, ids):
        def body(_, idb):
            perms = jax.vmap(lambda r: _perm(key, r, n))(idb)
            return None, _apply(stat, finish, consts, perms, kwargs, batched_finish)

        _, out = jax.lax.scan(body, None, ids.reshape(-1, batch))
        return out.reshape(-1)

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(mesh_lib.DATA)),
        out_specs=P(mesh_lib.DATA),
        check_vma=False,
    )
    return jax.jit(f)


def permutation_null(
    kernel: NullKernel,
    num_permutations: int = 1000,
    *,
    seed: int = 0,
    mesh=None,
    batch_size: int | None = None,
    rounds: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """The statistic on ``num_permutations`` random row permutations of Y, batched.

    Args:
      kernel: from the metric (see `engine.similarity`).
      num_permutations: R.
      seed: permutation r is drawn from ``fold_in(PRNGKey(seed), r)``.
      mesh: permutations are split over the ``data`` axis (default: one device).
      batch_size: permutations per vmap batch per device (default from ``row_bytes``).
      rounds: split the work into this many jitted calls (a progress bar ticks per round;
        with ``progress`` at least 10). The values do not depend on it.
      progress: a tqdm bar; a string is its label (e.g. which comparison and metric).

    Returns:
      ``[R]`` float64 null values, in permutation order.
    """
    num = checks.check_positive_int("num_permutations", num_permutations)
    if mesh is None:
        mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    ndev = mesh.shape[mesh_lib.DATA]
    rounds = max(int(rounds), 10 if progress else 1)
    if batch_size is None:
        batch_size = int(np.clip(BATCH_BYTES // max(kernel.row_bytes, 1), 1, 64))
    per_dev = -(-num // (ndev * rounds))
    batch = max(1, min(int(batch_size), per_dev))
    per_dev = -(-per_dev // batch) * batch
    per_round = per_dev * ndev
    fn = _null_fn(kernel.stat, kernel.finish, kernel.static, mesh, int(kernel.n), batch)
    consts = mesh_lib.replicate(mesh, kernel.consts)
    key = mesh_lib.replicate(mesh, jax.random.PRNGKey(seed))
    out = []
    it = range(0, num, per_round)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(
            it, desc=progress if isinstance(progress, str) else "null permutations", unit="round"
        )
    for start in it:
        ids = jax.device_put(
            np.arange(start, start + per_round, dtype=np.int32), mesh_lib.data_sharding(mesh, 1)
        )
        # gather, not device_get: with several processes the rows live on other hosts too
        out.append(np.asarray(mesh_lib.gather(fn(consts, key, ids)), np.float64))
    return np.concatenate(out)[:num]


def _perm_prefix(key, r, n, size: int):
    """Permutation ``r`` of the first ``n`` of ``size`` rows (rows ``n..size-1`` stay put).

    Row ``i`` gets the key ``bits(fold_in(fold_in(key, r), i))`` (rows ``>= n``: the maximum)
    and rows are stably sorted by key, so the first ``n`` entries do not depend on ``size``:
    padding never changes the permutation of the real rows. ``n`` may be traced.
    """
    k = jax.random.fold_in(key, r)
    idx = jnp.arange(size, dtype=jnp.int32)
    bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(k, i), (), jnp.uint32))(idx)
    keys = jnp.where(idx < n, bits, jnp.uint32(0xFFFFFFFF))
    _, perm = jax.lax.sort((keys, idx), num_keys=1, is_stable=True)
    return perm


def prefix_permutations(n: int, num: int, seed: int = 0, size: int | None = None) -> np.ndarray:
    """``[num, size]`` host copy of the permutations `padded_null` draws (default size n)."""
    size = n if size is None else int(size)
    key = jax.random.PRNGKey(seed)
    fn = jax.jit(jax.vmap(lambda r: _perm_prefix(key, r, n, size)))
    return np.asarray(fn(jnp.arange(num)))


@functools.lru_cache(maxsize=64)
def _padded_null_fn(stat, finish, static, mesh, size: int, batch: int):
    kwargs = dict(static)

    def local(consts, key, n, ids):
        def body(_, idb):
            perms = jax.vmap(lambda r: _perm_prefix(key, r, n, size))(idb)
            return None, _apply(stat, finish, consts, perms, kwargs)

        _, out = jax.lax.scan(body, None, ids.reshape(-1, batch))
        return out.reshape(-1)

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(mesh_lib.DATA)),
        out_specs=P(mesh_lib.DATA),
        check_vma=False,
    )
    return jax.jit(f)


def padded_null(
    kernel: NullKernel, size: int, num_permutations: int = 1000, *, seed: int = 0, mesh=None
) -> tuple[float, np.ndarray]:
    """``(observed, null)`` of ``kernel`` padded to ``size`` rows: one compile per ``size``.

    Many null calls on different row counts (importance bins, top-k restrictions) otherwise
    compile one kernel per count. Here the kernel is padded with rows that add nothing
    (``kernel.pad``), ``n`` is a run-time argument, and permutation ``r`` is `_perm_prefix`
    (a uniform random permutation of the real rows that does not depend on ``size``): the
    values equal the unpadded kernel's under the same permutations (`prefix_permutations`),
    whatever ``size``. These permutations differ from `permutation_null`'s
    (``jax.random.permutation``), so the two nulls agree in distribution, not value by value.
    """
    num = checks.check_positive_int("num_permutations", num_permutations)
    n = int(kernel.n)
    size = int(size)
    if kernel.pad is None:
        raise checks.InputError("padded_null: this metric's null kernel cannot be padded")
    if size < n:
        raise checks.InputError(f"padded_null: size {size} < rows {n}")
    if mesh is None:
        mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    consts, static = kernel.pad(kernel.consts, kernel.static, size)
    ndev = mesh.shape[mesh_lib.DATA]
    row_bytes = -(-int(kernel.row_bytes) * size // max(n, 1))
    batch = int(np.clip(BATCH_BYTES // max(row_bytes, 1), 1, 64))
    per_dev = -(-num // ndev)
    batch = max(1, min(batch, per_dev))
    per_dev = -(-per_dev // batch) * batch
    fn = _padded_null_fn(kernel.stat, kernel.finish, static, mesh, size, batch)
    consts = mesh_lib.replicate(mesh, consts)
    key = mesh_lib.replicate(mesh, jax.random.PRNGKey(seed))
    n_arr = mesh_lib.replicate(mesh, jnp.int32(n))
    ids = jax.device_put(np.arange(per_dev * ndev, dtype=np.int32), mesh_lib.data_sharding(mesh, 1))
    null = np.asarray(jax.device_get(fn(consts, key, n_arr, ids)), np.float64)[:num]
    observed = _observed_fn(kernel.stat, kernel.finish, static)(
        consts, jnp.arange(size, dtype=jnp.int32)
    )
    return float(observed), null


def loop_null(
    metric: Callable[..., float],
    x,
    y,
    weights=None,
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """The same null by a Python loop over permutations (any metric; weighted fallback).

    Uses the same permutations as `permutation_null`; weights stay with the rows of X.
    """
    num = checks.check_positive_int("num_permutations", num_permutations)
    y = np.asarray(y)
    out = np.empty(num)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=num, desc=progress if isinstance(progress, str) else "null permutations (loop)"
        )
    block = 256
    for start in range(0, num, block):
        perms = permutations(y.shape[0], min(block, num - start), seed, start)
        for r, perm in enumerate(perms):
            out[start + r] = float(metric(x, y[perm], weights))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


@dataclasses.dataclass(frozen=True)
class NullSummary:
    """An observed statistic against its permutation null: the one result type of every null.

    Attributes:
      observed: the statistic on the real pairing.
      null_mean / null_std: mean and sample standard deviation (ddof=1) of the null values.
      null_quantiles: ``{"0.05": ..., ...}`` at `QUANTILES`.
      null_min / null_max: range of the null values.
      p: ``(1 + #{null >= observed}) / (1 + R)`` for R random permutations; for an exact test
        (every permutation enumerated, the identity among them) ``#{null >= observed} / R``.
      num_permutations: R (the number of null values).
      num_null_at_or_above: ``#{null >= observed}`` (ties within ``tie_tol`` count).
      exact: whether the null enumerated every permutation.
      null: the null values (kept out of `to_json`).
    """

    observed: float
    null_mean: float
    null_std: float
    null_quantiles: dict
    null_min: float
    null_max: float
    p: float
    num_permutations: int
    num_null_at_or_above: int
    exact: bool = False
    null: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def z(self) -> float | None:
        """``(observed - null_mean) / null_std``; None when the null has no spread."""
        return (self.observed - self.null_mean) / self.null_std if self.null_std > 0 else None

    @property
    def excess(self) -> float:
        """``observed - null_mean``: the score above chance, comparable across comparisons."""
        return self.observed - self.null_mean

    @property
    def min_p(self) -> float:
        """The smallest p this null could have produced."""
        r = self.num_permutations
        return 1.0 / r if self.exact else 1.0 / (1 + r)

    def to_json(self) -> dict:
        return {
            "observed": self.observed,
            "null_mean": self.null_mean,
            "null_std": self.null_std,
            "null_quantiles": dict(self.null_quantiles),
            "null_min": self.null_min,
            "null_max": self.null_max,
            "z": self.z,
            "excess": self.excess,
            "p": self.p,
            "num_permutations": self.num_permutations,
            "num_null_at_or_above": self.num_null_at_or_above,
            "exact": self.exact,
            "min_p": self.min_p,
        }


def summarize_null(
    observed: float, null, *, exact: bool = False, tie_tol: float = 0.0, quantiles=QUANTILES
) -> NullSummary:
    """The one p-value / spread convention of the engine (docs/references.md, "Nulls").

    Args:
      observed: the statistic on the real pairing.
      null: ``[R]`` null values (R >= 2, finite).
      exact: the null enumerated every permutation (identity included): ``p = # / R``.
        Otherwise ``p = (1 + #) / (1 + R)`` (Lan et al.'s ``mean(null >= observed)`` can be 0,
        which no finite random test supports).
      tie_tol: null values within this of ``observed`` count as ``>=`` (float round-off of
        exact ties, e.g. the rotations of a perfect circle).
    """
    null = np.asarray(null, np.float64)
    if null.ndim != 1 or len(null) < 2:
        raise checks.InputError(f"null: expected at least 2 null values, got shape {null.shape}")
    checks.check_finite("null values", null)
    if not np.isfinite(observed):
        raise checks.InputError(f"observed statistic: expected a finite value, got {observed}")
    r = len(null)
    exceed = int(np.sum(null >= float(observed) - tie_tol))
    return NullSummary(
        observed=float(observed),
        null_mean=float(null.mean()),
        null_std=float(null.std(ddof=1)),
        null_quantiles={f"{q:g}": float(np.quantile(null, q)) for q in quantiles},
        null_min=float(null.min()),
        null_max=float(null.max()),
        p=exceed / r if exact else (1.0 + exceed) / (1.0 + r),
        num_permutations=r,
        num_null_at_or_above=exceed,
        exact=bool(exact),
        null=null,
    )


def summarize(observed: float, null: np.ndarray, quantiles=QUANTILES) -> dict:
    """`summarize_null` of a random-permutation null, as a JSON-ready dict."""
    return summarize_null(observed, null, quantiles=quantiles).to_json()


# --------------------------------------------------------------------------------------------
# Host-side permutation tests over few items (concept geometry: 7 days, 12 months, G groups).
# --------------------------------------------------------------------------------------------

#: Enumerate all permutations (exact p-value) up to this many (8! = 40320).
EXACT_LIMIT = 40320
#: Null values within this of the observed value count as ">=" (float round-off of ties).
TIE_TOL = 1e-9


def item_permutations(
    m: int, num: int, seed: int = 0, exact_limit: int = EXACT_LIMIT
) -> tuple[np.ndarray, bool]:
    """All ``m!`` permutations of m items when that is <= ``exact_limit``, else ``num`` random.

    Returns:
      ``(perms [R, m] int, exact)``.
    """
    m = checks.check_positive_int("number of items", m)
    if math.factorial(m) <= exact_limit:
        return np.asarray(list(itertools.permutations(range(m))), np.int64), True
    num = checks.check_positive_int("number of null permutations", num)
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((num, m)), axis=1), False


def item_permutation_test(
    statistic: Callable[[np.ndarray], np.ndarray],
    m: int,
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    exact_limit: int = EXACT_LIMIT,
    batch: int = 4096,
) -> NullSummary:
    """Tests ``statistic(identity)`` against ``statistic(perm)`` over permutations of m items.

    For statistics over a handful of items (a Mantel test, a circle's order) the permutation
    space is small enough to enumerate, giving an exact p; `permutation_null` is the batched,
    sharded mechanism for the row-pairing nulls of thousands of features.

    Args:
      statistic: maps ``perms [R, m]`` to ``[R]`` values (vectorised over permutations).
      m: number of items.
      num_permutations: random permutations when enumeration is too large.
      seed: seed of the random permutations.
      exact_limit: enumerate all ``m!`` permutations up to this count (exact p).
      batch: permutations per call of ``statistic``.
    """
    observed = float(np.asarray(statistic(np.arange(m)[None, :]))[0])
    perms, exact = item_permutations(m, num_permutations, seed, exact_limit)
    null = np.concatenate(
        [
            np.asarray(statistic(perms[i : i + batch]), np.float64)
            for i in range(0, len(perms), batch)
        ]
    )
    return summarize_null(observed, null, exact=exact, tie_tol=TIE_TOL)


def bootstrap(
    metric: Callable[..., float],
    x,
    y,
    weights=None,
    *,
    num_samples: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    by_weights: bool = False,
    progress: bool = False,
) -> dict:
    """Percentile bootstrap over rows for any metric ``metric(X, Y, weights) -> float``.

    Args:
      by_weights: pass the resample counts (times the original weights) as frequency weights
        instead of copying rows (exact for the moment-based metrics).
      confidence: two-sided coverage of the interval.

    Returns:
      JSON-ready dict: mean, std, low, high, confidence, num_samples.
    """
    num = checks.check_positive_int("bootstrap num_samples", num_samples, minimum=2)
    if not 0 < confidence < 1:
        raise checks.InputError(f"bootstrap confidence must be in (0, 1), got {confidence}")
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    base = None if weights is None else np.asarray(weights, np.float64)
    rng = np.random.default_rng(seed)
    values = np.empty(num)
    it = range(num)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{progress} bootstrap" if isinstance(progress, str) else "bootstrap")
    for b in it:
        idx = rng.integers(0, n, n)
        if by_weights:
            counts = np.bincount(idx, minlength=n).astype(np.float64)
            w = counts if base is None else counts * base
            values[b] = float(metric(x, y, w))
        else:
            values[b] = float(metric(x[idx], y[idx], None if base is None else base[idx]))
    alpha = (1.0 - confidence) / 2.0
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)),
        "low": float(np.quantile(values, alpha)),
        "high": float(np.quantile(values, 1.0 - alpha)),
        "confidence": float(confidence),
        "num_samples": num,
        "method": "weights" if by_weights else "resample",
    }

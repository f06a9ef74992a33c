"""Random-pairing nulls (batched over permutations, sharded over the mesh) and bootstrap CIs.

Random-pairing null (Lan et al. 2024; ../shared/REFERENCES.md "Nulls"): the metric is
recomputed on R random row permutations of Y, which breaks the pairing but keeps both sets of
rows. We report the null mean, std, quantiles, ``z = (observed - mean) / std``, the excess
``observed - mean``, and ``p = (1 + #{null >= observed}) / (1 + R)`` (Lan et al.'s
``mean(null >= observed)`` can be 0, which no finite test supports).

Batching: a metric supplies a `NullKernel`: a module-level ``stat(consts, perm, **static)``
that is pure JAX, plus the permutation-invariant work done once (whitened or standardised rows,
rank matrices, neighbour lists) in ``consts``. `permutation_null` draws permutation r as
``jax.random.permutation(fold_in(key(seed), r), n)`` ON the devices, ``vmap``s ``stat`` over a
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
from typing import Any, Callable

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
    """

    stat: Callable[..., Any]
    consts: Any
    n: int
    static: tuple = ()
    row_bytes: int = 0
    finish: Callable[..., Any] | None = None

    def observed(self) -> float:
        """The statistic at the identity permutation (same code path as the null)."""
        perm = jnp.arange(self.n, dtype=jnp.int32)
        fn = _observed_fn(self.stat, self.finish, self.static)
        return float(fn(self.consts, perm))


def _apply(stat, finish, consts, perms, kwargs):
    """``stat`` vmapped over a batch of permutations, then ``finish`` mapped one by one."""
    part = jax.vmap(lambda p: stat(consts, p, **kwargs))(perms)
    if finish is None:
        return part
    return jax.lax.map(lambda t: finish(consts, t), part)


@functools.lru_cache(maxsize=64)
def _observed_fn(stat, finish, static):
    return jax.jit(lambda consts, perm: _apply(stat, finish, consts, perm[None], dict(static))[0])


def _perm(key, r, n):
    return jax.random.permutation(jax.random.fold_in(key, r), n).astype(jnp.int32)


def permutations(n: int, num: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """``[num, n]`` int32 host copy of permutations ``start .. start+num-1``.

    They are exactly the permutations `permutation_null` draws on the devices.
    """
    key = jax.random.PRNGKey(seed)
    ids = jnp.arange(start, start + num)
    return np.asarray(jax.jit(jax.vmap(lambda r: _perm(key, r, n)))(ids))


@functools.lru_cache(maxsize=64)
def _null_fn(stat, finish, static, mesh, n: int, batch: int):
    kwargs = dict(static)

    def local(consts, key, ids):
        def body(_, idb):
            perms = jax.vmap(lambda r: _perm(key, r, n))(idb)
            return None, _apply(stat, finish, consts, perms, kwargs)

        _, out = jax.lax.scan(body, None, ids.reshape(-1, batch))
        return out.reshape(-1)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(mesh_lib.DATA)),
                      out_specs=P(mesh_lib.DATA), check_vma=False)
    return jax.jit(f)


def permutation_null(kernel: NullKernel, num_permutations: int = 1000, *, seed: int = 0,
                     mesh=None, batch_size: int | None = None, rounds: int = 1,
                     progress: bool = False) -> np.ndarray:
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
        it = tqdm(it, desc=progress if isinstance(progress, str) else "null permutations",
                  unit="round")
    for start in it:
        ids = jax.device_put(np.arange(start, start + per_round, dtype=np.int32),
                             mesh_lib.data_sharding(mesh, 1))
        out.append(np.asarray(jax.device_get(fn(consts, key, ids)), np.float64))
    return np.concatenate(out)[:num]


def loop_null(metric: Callable[..., float], x, y, weights=None, *, num_permutations: int = 1000,
              seed: int = 0, progress: bool = False) -> np.ndarray:
    """The same null by a Python loop over permutations (any metric; weighted fallback).

    Uses the same permutations as `permutation_null`; weights stay with the rows of X.
    """
    num = checks.check_positive_int("num_permutations", num_permutations)
    y = np.asarray(y)
    out = np.empty(num)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num, desc=progress if isinstance(progress, str)
                   else "null permutations (loop)")
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


def summarize(observed: float, null: np.ndarray, quantiles=QUANTILES) -> dict:
    """Null mean/std/quantiles, z, excess and ``p = (1 + #{null >= observed}) / (1 + R)``.

    Returns a JSON-ready dict (a zero null std gives ``z = None``, never NaN/Inf).
    """
    null = np.asarray(null, np.float64)
    if null.ndim != 1 or len(null) < 2:
        raise checks.InputError(f"null: expected at least 2 null values, got shape {null.shape}")
    checks.check_finite("null values", null)
    r = len(null)
    mean = float(null.mean())
    std = float(null.std(ddof=1))
    exceed = int(np.sum(null >= observed))
    return {"observed": float(observed), "null_mean": mean, "null_std": std,
            "null_quantiles": {f"{q:g}": float(np.quantile(null, q)) for q in quantiles},
            "null_min": float(null.min()), "null_max": float(null.max()),
            "z": (float(observed) - mean) / std if std > 0 else None,
            "excess": float(observed) - mean,
            "p": (1.0 + exceed) / (1.0 + r), "num_permutations": r,
            "num_null_at_or_above": exceed}


def bootstrap(metric: Callable[..., float], x, y, weights=None, *, num_samples: int = 200,
              seed: int = 0, confidence: float = 0.95, by_weights: bool = False,
              progress: bool = False) -> dict:
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
        it = tqdm(it, desc=f"{progress} bootstrap" if isinstance(progress, str)
                  else "bootstrap")
    for b in it:
        idx = rng.integers(0, n, n)
        if by_weights:
            counts = np.bincount(idx, minlength=n).astype(np.float64)
            w = counts if base is None else counts * base
            values[b] = float(metric(x, y, w))
        else:
            values[b] = float(metric(x[idx], y[idx], None if base is None else base[idx]))
    alpha = (1.0 - confidence) / 2.0
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
            "low": float(np.quantile(values, alpha)),
            "high": float(np.quantile(values, 1.0 - alpha)),
            "confidence": float(confidence), "num_samples": num,
            "method": "weights" if by_weights else "resample"}

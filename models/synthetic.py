"""Data generators with known ground truth (toy models, SAE recovery tests, the toy pipeline).

* `sparse_features`: Elhage et al. 2022 feature vectors: feature i is 0 with probability S_i,
  else uniform [0, 1]; S may vary per feature and per instance.
* `correlated_features` / `anticorrelated_features`: features in groups that fire together
  (or, anti-correlated, at most one per group).
* `Dictionary` / `dictionary_data`: the Sharkey et al. 2022 setting: a fixed random dictionary
  of ``n_true`` unit directions in ``d`` dims; each sample is a sparse non-negative
  combination with ``k`` active features on average (optionally correlated through a
  Gaussian copula), so that an SAE's recovery can be scored with `mmcs`.

All generators are pure functions of a PRNG key (jit-able), so a training run can regenerate
step ``t``'s batch from ``fold_in(key, t)`` and resume exactly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from engine import checks


def sparse_features(
    key: jax.Array, batch: int, sparsity: jax.Array, n: int | None = None
) -> jax.Array:
    """Elhage et al. features ``[..., batch, n]``.

    Args:
      key: PRNG key.
      batch: rows to draw.
      sparsity: S, probability that a feature is zero: scalar, ``[n]`` or ``[instances, n]``.
        With a batch of instances the output is ``[instances, batch, n]``.
      n: number of features (needed only when ``sparsity`` is a scalar).
    """
    s = jnp.asarray(sparsity, jnp.float32)
    if s.ndim == 0:
        if n is None:
            raise checks.InputError("sparse_features: pass n when sparsity is a scalar")
        s = jnp.full((n,), s)
    shape = s.shape[:-1] + (batch, s.shape[-1])
    k1, k2 = jax.random.split(key)
    values = jax.random.uniform(k1, shape)
    on = jax.random.uniform(k2, shape) >= s[..., None, :]
    return jnp.where(on, values, 0.0)


def correlated_features(
    key: jax.Array, batch: int, n_groups: int, group_size: int, sparsity: float
) -> jax.Array:
    """Groups of ``group_size`` features that are all on or all off together.

    Each group is active with probability ``1 - sparsity``; active features get independent
    uniform [0, 1] magnitudes. Returns ``[batch, n_groups * group_size]``.
    """
    k1, k2 = jax.random.split(key)
    on = jax.random.uniform(k1, (batch, n_groups, 1)) >= sparsity
    values = jax.random.uniform(k2, (batch, n_groups, group_size))
    return jnp.where(on, values, 0.0).reshape(batch, n_groups * group_size)


def anticorrelated_features(
    key: jax.Array, batch: int, n_groups: int, group_size: int, sparsity: float
) -> jax.Array:
    """Groups in which at most one feature is on (chosen uniformly) when the group is active."""
    k1, k2, k3 = jax.random.split(key, 3)
    on = jax.random.uniform(k1, (batch, n_groups)) >= sparsity
    which = jax.random.randint(k2, (batch, n_groups), 0, group_size)
    values = jax.random.uniform(k3, (batch, n_groups))
    onehot = jax.nn.one_hot(which, group_size) * jnp.where(on, values, 0.0)[..., None]
    return onehot.reshape(batch, n_groups * group_size)


@flax.struct.dataclass
class Dictionary:
    """A ground-truth dictionary: ``atoms [n_true, d]`` unit rows, and a copula factor.

    ``chol`` is the Cholesky factor of the features' latent correlation (identity when
    features fire independently).
    """

    atoms: jax.Array
    chol: jax.Array
    k: float = flax.struct.field(pytree_node=False, default=5.0)

    @property
    def n_true(self) -> int:
        return int(self.atoms.shape[0])

    @property
    def d(self) -> int:
        return int(self.atoms.shape[1])


def make_dictionary(
    key: jax.Array, n_true: int, d: int, k: float = 5.0, correlation: float = 0.0, n_blocks: int = 1
) -> Dictionary:
    """A random unit dictionary; ``correlation`` > 0 correlates features within blocks.

    Args:
      n_true: number of ground-truth features.
      d: ambient dimension.
      k: mean number of active features per sample.
      correlation: latent Gaussian correlation between features in the same block (0..1).
      n_blocks: features are split into this many contiguous blocks for the correlation.
    """
    checks.check_positive_int("make_dictionary n_true", n_true)
    checks.check_positive_int("make_dictionary d", d)
    if not 0 < k <= n_true:
        raise checks.InputError(f"make_dictionary k={k} must be in (0, n_true={n_true}]")
    if not 0 <= correlation < 1:
        raise checks.InputError(f"make_dictionary correlation={correlation} must be in [0, 1)")
    atoms = jax.random.normal(key, (n_true, d))
    atoms = atoms / jnp.linalg.norm(atoms, axis=1, keepdims=True)
    block = np.arange(n_true) * n_blocks // n_true
    corr = np.where(block[:, None] == block[None, :], correlation, 0.0)
    np.fill_diagonal(corr, 1.0)
    chol = jnp.asarray(np.linalg.cholesky(corr), jnp.float32)
    return Dictionary(atoms=atoms, chol=chol, k=float(k))


def dictionary_codes(key: jax.Array, dictionary: Dictionary, batch: int) -> jax.Array:
    """Sparse non-negative codes ``[batch, n_true]`` with ``k`` active on average.

    A feature is active when its latent Gaussian exceeds the quantile that gives probability
    ``k / n_true``; magnitudes are uniform [0, 1] (as in the toy-model data).
    """
    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, (batch, dictionary.n_true)) @ dictionary.chol.T
    p = dictionary.k / dictionary.n_true
    threshold = jax.scipy.stats.norm.ppf(1.0 - p)
    values = jax.random.uniform(k2, (batch, dictionary.n_true))
    return jnp.where(z > threshold, values, 0.0)


def dictionary_data(
    key: jax.Array, dictionary: Dictionary, batch: int
) -> tuple[jax.Array, jax.Array]:
    """``(x [batch, d], codes [batch, n_true])`` with ``x = codes @ atoms``."""
    codes = dictionary_codes(key, dictionary, batch)
    return codes @ dictionary.atoms, codes


def mmcs(true_atoms: ArrayLike, learned_atoms: ArrayLike) -> float:
    """Mean max cosine similarity (Sharkey et al. 2022).

    Mean over ground-truth atoms of the max cosine to any learned atom. Both ``[*, d]``.
    """
    t = np.asarray(true_atoms, np.float64)
    l = np.asarray(learned_atoms, np.float64)
    if t.ndim != 2 or l.ndim != 2 or t.shape[1] != l.shape[1]:
        raise checks.InputError(
            f"mmcs: expected [n, d] arrays with the same d, got {t.shape} and {l.shape}"
        )
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    l = l / np.maximum(np.linalg.norm(l, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.max(t @ l.T, axis=1)))

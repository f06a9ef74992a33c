"""Two toy "language models" whose feature GEOMETRY is shared: the pipeline's embedded default.

Why not two trained toy models of superposition (`models.toy_pair`)? Measured here: two ReLU
toy models (32 features in 16 dims, S = 0.95) trained from different seeds share feature
identity but not feature geometry: which features end up superposed together depends on the
seed, so SVCCA / CKA / RSA of their true feature directions are at the random-pairing null
(p 0.2-0.7). They are the right test of PAIRING (correlation finds the identity) but a null
case for GEOMETRY. The universality question needs a known positive and a known negative for
both, so the default pair is built from a shared ground-truth dictionary (Sharkey et al. 2022
setting, `models.synthetic`):

* codes ``[N, n]``: sparse non-negative activity of ``n`` true features per token (``k``
  active on average, magnitudes uniform [0, 1]);
* side A: ``acts_a = codes @ D_a`` with ``D_a [n, d_a]`` random unit directions;
* side B (shared): ``D_b = normalise((D_a + eps * E) @ M)``: A's directions perturbed by
  ``eps`` (independent Gaussian ``E``) and mapped by a random orthogonal matrix (``d_b ==
  d_a``) or a random full-rank linear map (``d_b != d_a``); ``acts_b = codes @ D_b`` on the
  SAME codes. Shared: per-token feature activity and the feature geometry up to the map and
  the perturbation. Feature i of A is feature i of B.
* control (``shared=False``): independent codes (same statistics) and an independent random
  dictionary: nothing is shared.
* random-init floor (``random_init=True``): the SAME codes through an independent random
  dictionary (what a randomly initialised network does to the same text: it still has
  "features", which an SAE finds and correlation pairs, but their geometry is unrelated).

Tokens as in `models.toy_pair`: ``token_ids = 1 + dominant active feature`` (0 = "<none>").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import checks
from models import toy_pair


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _codes(rng: np.random.Generator, n_tokens: int, n: int, k: float) -> np.ndarray:
    on = rng.random((n_tokens, n)) < k / n
    return np.where(on, rng.random((n_tokens, n)), 0.0).astype(np.float32)


def make_dictionary_pair(
    seed: int,
    *,
    n_features: int = 96,
    d_a: int = 32,
    d_b: int = 32,
    n_tokens: int = 20_000,
    k: float = 3.0,
    perturbation: float = 0.15,
    shared: bool = True,
    random_init: bool = False,
    noise_std: float = 0.0,
) -> toy_pair.ToyPair:
    """Builds the shared-geometry pair, its control, or the random-init floor (see module).

    Args:
      seed: everything derives from it; the same seed gives the same side A (codes and
        ``D_a``) in all three variants, so one SAE of side A serves every comparison.
      n_features: true features n.
      d_a / d_b: widths of the two sides.
      n_tokens: rows.
      k: mean active features per token.
      perturbation: eps, how far B's directions are from a linear image of A's.
      shared / random_init: which variant (``random_init`` needs ``shared=True``: the same
        codes, an unrelated dictionary).
      noise_std: i.i.d. Gaussian noise added to both sides' activations.
    """
    n = checks.check_positive_int("make_dictionary_pair n_features", n_features)
    d_a = checks.check_positive_int("make_dictionary_pair d_a", d_a)
    d_b = checks.check_positive_int("make_dictionary_pair d_b", d_b)
    n_tokens = checks.check_positive_int("make_dictionary_pair n_tokens", n_tokens)
    if not 0 < k <= n:
        raise checks.InputError(f"make_dictionary_pair k={k} must be in (0, n_features={n}]")
    if not (np.isfinite(perturbation) and perturbation >= 0):
        raise checks.InputError(
            f"make_dictionary_pair perturbation must be >= 0, got {perturbation}"
        )
    if random_init and not shared:
        raise checks.InputError("make_dictionary_pair: random_init=True needs shared=True")
    words = np.random.SeedSequence(seed).generate_state(6)
    rng_a = np.random.default_rng(words[0])
    codes_a = _codes(np.random.default_rng(words[1]), n_tokens, n, k)
    dict_a = _unit_rows(rng_a.normal(size=(n, d_a)))
    rng_b = np.random.default_rng(words[2] + (1 if random_init else 0) + (2 if not shared else 0))
    if shared and not random_init:
        mixed = dict_a + perturbation * rng_b.normal(size=dict_a.shape) / np.sqrt(d_a)
        if d_a == d_b:
            q, r = np.linalg.qr(rng_b.normal(size=(d_a, d_a)))
            mapping = q * np.sign(np.diag(r))
        else:
            mapping = rng_b.normal(size=(d_a, d_b)) / np.sqrt(d_a)
        dict_b = _unit_rows(mixed @ mapping)
        codes_b = codes_a
        true_match = np.arange(n)
    else:
        dict_b = _unit_rows(rng_b.normal(size=(n, d_b)))
        codes_b = (
            codes_a if random_init else _codes(np.random.default_rng(words[3]), n_tokens, n, k)
        )
        true_match = np.arange(n) if random_init else np.full(n, -1)
    rng_noise = np.random.default_rng(words[4])
    acts_a = codes_a.astype(np.float64) @ dict_a
    acts_b = codes_b.astype(np.float64) @ dict_b
    if noise_std > 0:
        acts_a += noise_std * rng_noise.normal(size=acts_a.shape)
        acts_b += noise_std * rng_noise.normal(size=acts_b.shape)
    active = codes_a > 0
    token_ids = np.where(active.any(1), 1 + np.argmax(codes_a, 1), 0).astype(np.int32)
    vocab = (toy_pair.NONE_TOKEN,) + tuple(f"feat{i}" for i in range(n))
    kind = (
        ("random-init floor" if random_init else "shared-geometry pair")
        if shared
        else "control pair"
    )
    description = {
        "kind": f"dictionary toy {kind}",
        "seed": seed,
        "n_features": n,
        "d_a": d_a,
        "d_b": d_b,
        "n_tokens": n_tokens,
        "k": k,
        "perturbation": perturbation,
        "noise_std": noise_std,
        "what_is_shared": {
            "shared-geometry pair": "per-token codes and the dictionary geometry up to a "
            "random linear map and a perturbation",
            "control pair": "nothing (independent codes and dictionary)",
            "random-init floor": "per-token codes only (independent random dictionary)",
        }[kind],
        "mean_active_features_per_token": float(active.sum(1).mean()),
    }
    everything = np.ones(n, bool)
    return toy_pair.ToyPair(
        acts_a=acts_a.astype(np.float32),
        acts_b=acts_b.astype(np.float32),
        token_ids=token_ids,
        vocab=vocab,
        features_a=dict_a.astype(np.float32),
        features_b=dict_b.astype(np.float32),
        codes_a=codes_a,
        codes_b=codes_b,
        represented_a=everything,
        represented_b=everything,
        true_match=true_match,
        rotation_b=np.eye(d_b, dtype=np.float32),
        description=description,
    )


def make_partial_pair(
    seed: int,
    *,
    n_shared: int = 32,
    n_exclusive_a: int = 16,
    n_exclusive_b: int = 16,
    d_a: int = 32,
    d_b: int = 32,
    n_tokens: int = 20_000,
    k: float = 3.0,
    perturbation: float = 0.15,
    noise_std: float = 0.0,
) -> toy_pair.ToyPair:
    """Two sides with a KNOWN set of shared and exclusive features (joint-SAE validation).

    A world of ``n_shared + n_exclusive_a + n_exclusive_b`` independent sparse features
    (codes as in `make_dictionary_pair`, ``k`` active per token on average over the world).
    Side A sees the shared features and A's exclusive ones, side B the shared ones and B's
    exclusive ones, on the SAME tokens (row-aligned codes). Shared feature i has direction
    ``D_a[i]`` in A and ``D_b[i] = normalise((D_a[i] + eps E_i) M)`` in B (as the shared
    pair); exclusive features get independent random unit directions in their own side.

    Rows of ``features_a`` / ``codes_a``: the shared features (``0 .. n_shared-1``) then A's
    exclusive ones; likewise for B. ``true_match[i] = i`` for shared features of A, -1 for
    A's exclusive ones. ``n_shared=0`` is the nothing-shared control: the two sides' codes are
    independent columns of the world and the dictionaries independent.
    """
    n_s = checks.check_positive_int("make_partial_pair n_shared", n_shared, 0)
    n_ea = checks.check_positive_int("make_partial_pair n_exclusive_a", n_exclusive_a, 0)
    n_eb = checks.check_positive_int("make_partial_pair n_exclusive_b", n_exclusive_b, 0)
    if n_s + n_ea == 0 or n_s + n_eb == 0:
        raise checks.InputError(
            "make_partial_pair: each side needs at least one feature "
            f"(n_shared={n_s}, n_exclusive_a={n_ea}, n_exclusive_b={n_eb})"
        )
    d_a = checks.check_positive_int("make_partial_pair d_a", d_a)
    d_b = checks.check_positive_int("make_partial_pair d_b", d_b)
    n_tokens = checks.check_positive_int("make_partial_pair n_tokens", n_tokens)
    n_world = n_s + n_ea + n_eb
    if not 0 < k <= n_world:
        raise checks.InputError(f"make_partial_pair k={k} must be in (0, {n_world}]")
    if not (np.isfinite(perturbation) and perturbation >= 0):
        raise checks.InputError(f"make_partial_pair perturbation must be >= 0, got {perturbation}")
    words = np.random.SeedSequence([seed, 15]).generate_state(6)
    world = _codes(np.random.default_rng(words[0]), n_tokens, n_world, k)
    cols_a = np.r_[0:n_s, n_s : n_s + n_ea]
    cols_b = np.r_[0:n_s, n_s + n_ea : n_world]
    codes_a, codes_b = world[:, cols_a], world[:, cols_b]
    rng_a, rng_b = np.random.default_rng(words[1]), np.random.default_rng(words[2])
    dict_a = _unit_rows(rng_a.normal(size=(n_s + n_ea, d_a)))
    shared_a = dict_a[:n_s]
    mixed = shared_a + perturbation * rng_b.normal(size=shared_a.shape) / np.sqrt(d_a)
    if d_a == d_b:
        q, r = np.linalg.qr(rng_b.normal(size=(d_a, d_a)))
        mapping = q * np.sign(np.diag(r))
    else:
        mapping = rng_b.normal(size=(d_a, d_b)) / np.sqrt(d_a)
    excl_b = rng_b.normal(size=(n_eb, d_b))
    dict_b = _unit_rows(np.concatenate([mixed @ mapping, excl_b]) if n_s else excl_b)
    acts_a = codes_a.astype(np.float64) @ dict_a
    acts_b = codes_b.astype(np.float64) @ dict_b
    if noise_std > 0:
        rng_noise = np.random.default_rng(words[3])
        acts_a += noise_std * rng_noise.normal(size=acts_a.shape)
        acts_b += noise_std * rng_noise.normal(size=acts_b.shape)
    active = world > 0
    token_ids = np.where(active.any(1), 1 + np.argmax(world, 1), 0).astype(np.int32)
    vocab = (toy_pair.NONE_TOKEN,) + tuple(f"feat{i}" for i in range(n_world))
    true_match = np.r_[np.arange(n_s), np.full(n_ea, -1)].astype(np.int64)
    description = {
        "kind": "dictionary toy partial pair" if n_s else "dictionary toy nothing-shared control",
        "seed": seed,
        "n_shared": n_s,
        "n_exclusive_a": n_ea,
        "n_exclusive_b": n_eb,
        "d_a": d_a,
        "d_b": d_b,
        "n_tokens": n_tokens,
        "k": k,
        "perturbation": perturbation,
        "noise_std": noise_std,
        "what_is_shared": (
            f"{n_s} features (codes on the same tokens and directions up to a "
            "random linear map and a perturbation)"
        )
        if n_s
        else "nothing",
        "mean_active_features_per_token": {
            "a": float((codes_a > 0).sum(1).mean()),
            "b": float((codes_b > 0).sum(1).mean()),
        },
    }
    return toy_pair.ToyPair(
        acts_a=acts_a.astype(np.float32),
        acts_b=acts_b.astype(np.float32),
        token_ids=token_ids,
        vocab=vocab,
        features_a=dict_a.astype(np.float32),
        features_b=dict_b.astype(np.float32),
        codes_a=codes_a,
        codes_b=codes_b,
        represented_a=np.ones(n_s + n_ea, bool),
        represented_b=np.ones(n_s + n_eb, bool),
        true_match=true_match,
        rotation_b=np.eye(d_b, dtype=np.float32),
        description=description,
    )


@dataclasses.dataclass(frozen=True)
class PartialSides:
    """``M >= 2`` row-aligned sides with a known set of features shared by ALL sides and
    exclusive features per side (`make_partial_sides`).

    Attributes:
      acts: per side ``[N, d]`` float32 activations (``acts[m] == codes[m] @ features[m]``).
      features: per side ``[n_shared + n_exclusive, d]`` unit directions; rows
        ``0 .. n_shared-1`` are the shared features (same index on every side).
      codes: per side ``[N, n_shared + n_exclusive]`` ground-truth activity.
      n_shared: shared features.
      description: JSON-ready summary.
    """

    acts: tuple
    features: tuple
    codes: tuple
    n_shared: int
    description: dict

    def pair(self, a: int, b: int) -> toy_pair.ToyPair:
        """Sides ``a`` and ``b`` as a `ToyPair` (its truth: the shared features)."""
        M = len(self.acts)
        if not (0 <= a < M and 0 <= b < M and a != b):
            raise checks.InputError(
                f"PartialSides.pair: need two distinct sides in [0, {M}), got ({a}, {b})"
            )
        n_a, n_b = self.features[a].shape[0], self.features[b].shape[0]
        active = (self.codes[a] > 0).any(1) | (self.codes[b] > 0).any(1)
        return toy_pair.ToyPair(
            acts_a=self.acts[a],
            acts_b=self.acts[b],
            token_ids=active.astype(np.int32),
            vocab=(toy_pair.NONE_TOKEN, "active"),
            features_a=self.features[a],
            features_b=self.features[b],
            codes_a=self.codes[a],
            codes_b=self.codes[b],
            represented_a=np.ones(n_a, bool),
            represented_b=np.ones(n_b, bool),
            true_match=np.r_[np.arange(self.n_shared), np.full(n_a - self.n_shared, -1)].astype(
                np.int64
            ),
            rotation_b=np.eye(self.acts[b].shape[1], dtype=np.float32),
            description={**self.description, "sides": [a, b]},
        )


def make_partial_sides(
    seed: int,
    n_models: int,
    *,
    n_shared: int = 32,
    n_exclusive: int = 16,
    d: int = 32,
    n_tokens: int = 20_000,
    k: float = 3.0,
    perturbation: float = 0.15,
) -> PartialSides:
    """`make_partial_pair` for ``n_models`` sides: a world of ``n_shared + n_models *
    n_exclusive`` independent sparse features; every side sees the shared ones (same codes,
    direction ``normalise((D_0[i] + eps E_i^m) Q_m)`` with a random orthogonal ``Q_m``;
    side 0 uses ``D_0`` itself) and its own ``n_exclusive`` (independent directions and
    codes). ``n_shared=0`` is the nothing-shared control."""
    M = checks.check_positive_int("make_partial_sides n_models", n_models, 2)
    n_s = checks.check_positive_int("make_partial_sides n_shared", n_shared, 0)
    n_e = checks.check_positive_int("make_partial_sides n_exclusive", n_exclusive, 0)
    if n_s + n_e == 0:
        raise checks.InputError("make_partial_sides: each side needs at least one feature")
    d = checks.check_positive_int("make_partial_sides d", d)
    n_tokens = checks.check_positive_int("make_partial_sides n_tokens", n_tokens)
    n_world = n_s + M * n_e
    if not 0 < k <= n_world:
        raise checks.InputError(f"make_partial_sides k={k} must be in (0, {n_world}]")
    words = np.random.SeedSequence([seed, 16, M]).generate_state(M + 2)
    world = _codes(np.random.default_rng(words[0]), n_tokens, n_world, k)
    base = (
        _unit_rows(np.random.default_rng(words[1]).normal(size=(n_s, d)))
        if n_s
        else np.zeros((0, d))
    )
    acts, feats, codes = [], [], []
    for m in range(M):
        rng = np.random.default_rng(words[2 + m])
        cols = np.r_[0:n_s, n_s + m * n_e : n_s + (m + 1) * n_e]
        if m == 0:
            shared = base
        else:
            q, r = np.linalg.qr(rng.normal(size=(d, d)))
            shared = (base + perturbation * rng.normal(size=base.shape) / np.sqrt(d)) @ (
                q * np.sign(np.diag(r))
            )
        f = _unit_rows(np.concatenate([shared, rng.normal(size=(n_e, d))]))
        c = world[:, cols]
        feats.append(f.astype(np.float32))
        codes.append(c)
        acts.append((c.astype(np.float64) @ f).astype(np.float32))
    description = {
        "kind": f"dictionary toy, {M} sides" + ("" if n_s else ", nothing-shared control"),
        "seed": seed,
        "n_models": M,
        "n_shared": n_s,
        "n_exclusive": n_e,
        "d": d,
        "n_tokens": n_tokens,
        "k": k,
        "perturbation": perturbation,
    }
    return PartialSides(
        acts=tuple(acts),
        features=tuple(feats),
        codes=tuple(codes),
        n_shared=n_s,
        description=description,
    )

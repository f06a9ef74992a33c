"""A "toy language model pair": two toy models whose true features are known and shared.

This is the embedded default of the universality pipeline (DESIGN.md, "Data flow of the main
job"): it stands in for two LLMs run on the same text, so the pipeline can be checked where
the truth is known. `make_toy_pair` returns row-aligned host arrays for ``n_tokens`` synthetic
"tokens":

* ``codes [N, n]``: the ground-truth feature activity per token (Elhage et al. 2022 data:
  feature i is 0 with probability ``S_i``, else uniform [0, 1]).
* side A: a ReLU toy model ``n -> d_a`` (`models.toy`) trained from seed ``seed_a`` on data
  with that distribution; ``acts_a = codes_a @ W_a^T`` are its hidden activations ``h = W x``
  on the tokens, and ``features_a = W_a^T [n, d_a]`` are the true feature directions (row i =
  column i of ``W_a``, the embedding of feature i).
* side B: another toy model ``n -> d_b`` trained from a DIFFERENT seed (other initial W, other
  training batches), optionally of another width, and by default followed by a random
  rotation ``Q [d_b, d_b]`` of its hidden space: ``acts_b = codes_b @ W_b^T @ Q``,
  ``features_b = W_b^T Q``.

What is shared (``shared=True``, the default): ``codes_b`` IS ``codes_a``: on every token the
same ground-truth features are active with the same magnitudes, and both models were trained
on the same feature distribution (same n, sparsity, importance). Feature i of A corresponds to
feature i of B (``true_match[i] = i``). Nothing else is shared: the seeds, hence the learned
geometry, the hidden basis (rotation) and possibly the width all differ.

The control (``shared=False``): side B's features are a different set of latent variables:
``codes_b`` is drawn independently of ``codes_a`` (same count and same marginal statistics, so
the control differs from the shared pair ONLY in what is shared), and model B is trained from
its own seed. No feature of B corresponds to any feature of A (``true_match = -1``).

Tokens: ``token_ids[t] = 1 + argmax_i codes_a[t, i]`` (the dominant active feature of side A),
0 when no feature is active; ``vocab[0] = "<none>"`` (a special token that the pipeline's
non-concept filter drops) and ``vocab[1 + i] = "feat{i}"``. So an SAE feature that recovers
true feature i has top activating tokens ``feat{i}``, on both sides of a shared pair.

A feature the toy model did not learn (``||W_i|| <= 0.5``, e.g. at low sparsity or low
importance) cannot be found in that side's activations; ``represented_a`` / ``represented_b``
say which features each side represents and `ToyPair.true_pairs` lists the correspondences a
perfect pipeline can recover.

Generation is seeded and takes seconds on a CPU (two small toy models trained jointly when
the widths agree).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import checks, streaming
from models import toy

if TYPE_CHECKING:
    from jax.sharding import Mesh

NONE_TOKEN = "<none>"


@dataclasses.dataclass
class ToyPair:
    """Row-aligned activations of two toy models on the same tokens, with the ground truth.

    Attributes:
      acts_a: ``[N, d_a]`` float32 hidden activations of side A.
      acts_b: ``[N, d_b]`` float32 hidden activations of side B (rotated if requested).
      token_ids: ``[N]`` int32 synthetic token per row (see module docstring).
      vocab: token strings, ``vocab[token_ids[t]]``; ``vocab[0] == "<none>"``.
      features_a: ``[n, d_a]`` float32 true feature directions of A (row i = W_a[:, i]).
      features_b: ``[n, d_b]`` float32 true feature directions of B (row i = (W_b^T Q)[i]).
      codes_a: ``[N, n]`` float32 ground-truth activity behind ``acts_a``
        (``acts_a == codes_a @ features_a``).
      codes_b: ``[N, n]`` float32 ground-truth activity behind ``acts_b`` (the same array as
        ``codes_a`` when shared).
      represented_a / represented_b: ``[n]`` bool, feature learned by that side's model.
      true_match: ``[n]`` int, the B feature that is A's feature i, or -1 (control).
      rotation_b: ``[d_b, d_b]`` orthogonal matrix applied to B's hidden space (identity when
        ``rotate=False``).
      description: JSON-ready dict saying what is shared and how the pair was made.
    """

    acts_a: np.ndarray
    acts_b: np.ndarray
    token_ids: np.ndarray
    vocab: tuple[str, ...]
    features_a: np.ndarray
    features_b: np.ndarray
    codes_a: np.ndarray
    codes_b: np.ndarray
    represented_a: np.ndarray
    represented_b: np.ndarray
    true_match: np.ndarray
    rotation_b: np.ndarray
    description: dict

    @property
    def n_tokens(self) -> int:
        return int(self.acts_a.shape[0])

    @property
    def shared(self) -> bool:
        return bool(self.description["shared"])

    def true_pairs(self) -> np.ndarray:
        """``[k, 2]`` (feature of A, feature of B) that correspond AND are learned by both."""
        a = np.flatnonzero((self.true_match >= 0) & self.represented_a)
        b = self.true_match[a]
        keep = self.represented_b[b]
        return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)

    def tokens(self, ids: Any) -> list[str]:
        """Token strings of token ids."""
        return [self.vocab[int(i)] for i in np.asarray(ids).ravel()]


def _haar_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))[None, :]


def _codes(rng: np.random.Generator, n_tokens: int, sparsity: np.ndarray) -> np.ndarray:
    """``[n_tokens, n]`` ground-truth codes: 0 w.p. S_i, else U[0, 1) (one uniform, as toy.py)."""
    u = rng.random((n_tokens, sparsity.size))
    return np.where(u >= sparsity, (u - sparsity) / (1.0 - sparsity), 0.0).astype(np.float32)


def _train_models(
    widths: tuple[int, int],
    seeds: tuple[int, int],
    *,
    n_features: int,
    sparsity: np.ndarray,
    importance: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int,
    mesh,
    progress: bool,
) -> tuple[list[np.ndarray], list[float]]:
    """Trains the two sides' toy models; returns their ``W [m, n]`` and final losses."""

    def config(width):
        return toy.ToyConfig(n_features, width, activation="relu", lr=lr, batch_size=batch_size)

    def instances(seed_list):
        return toy.make_instances(
            n_features, sparsity=sparsity, importance=importance, seeds=list(seed_list)
        )

    if steps == 0:  # untrained (random-init) models: a floor for the pipeline
        out = []
        for width, seed in zip(widths, seeds):
            params = toy.init_params(config(width), instances([seed]))
            out.append(np.asarray(params.W[0]))
        return out, [float("nan"), float("nan")]
    log_every = min(500, steps)
    if widths[0] == widths[1]:  # one program, two instances
        result = toy.train(
            config(widths[0]),
            instances(seeds),
            steps=steps,
            log_every=log_every,
            mesh=mesh,
            progress=progress,
        )
        return [result.params.W[0], result.params.W[1]], [float(x) for x in result.loss]
    weights, losses = [], []
    for width, seed in zip(widths, seeds):
        result = toy.train(
            config(width),
            instances([seed]),
            steps=steps,
            log_every=log_every,
            mesh=mesh,
            progress=progress,
        )
        weights.append(result.params.W[0])
        losses.append(float(result.loss[0]))
    return weights, losses


def make_toy_pair(
    seed: int,
    *,
    n_features: int = 32,
    d_a: int = 16,
    d_b: int = 16,
    n_tokens: int = 50_000,
    sparsity: Any = 0.95,
    importance: Any = 1.0,
    shared: bool = True,
    rotate: bool = True,
    steps: int = 2000,
    lr: float = 1e-2,
    batch_size: int = 256,
    noise_std: float = 0.0,
    represented_norm: float = 0.5,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> ToyPair:
    """Builds a toy model pair (shared ground truth) or its control (independent ground truth).

    Args:
      seed: everything (codes, model seeds, rotation, noise) derives from it.
      n_features: n, ground-truth features per side.
      d_a / d_b: hidden widths of the two toy models (may differ).
      n_tokens: rows.
      sparsity: S in [0, 1), scalar or ``[n]`` (probability a feature is off on a token).
      importance: loss weight per feature, scalar or ``[n]`` (> 0).
      shared: True: B sees the same per-token codes as A; False: the control with an
        independent feature set.
      rotate: apply a random orthogonal rotation to B's hidden space.
      steps: AdamW steps of each toy model (0: untrained, random-init models).
      lr / batch_size: toy-model training settings (lr 1e-2 and batch 256 converge in ~2000
        steps for these sizes; the paper's 1e-3 / 1024 / 10k steps also work).
      noise_std: standard deviation of i.i.d. Gaussian noise added to both sides' activations.
      represented_norm: a feature is "represented" by a side when ``||W_i||`` exceeds this.
      mesh: engine mesh for training (default: all devices).
      progress: show the toy models' progress bars.

    Returns:
      A `ToyPair`.

    Raises:
      InputError: bad sizes, sparsity outside [0, 1), non-positive importance, NaN, ...
    """
    n = checks.check_positive_int("make_toy_pair n_features", n_features)
    d_a = checks.check_positive_int("make_toy_pair d_a", d_a)
    d_b = checks.check_positive_int("make_toy_pair d_b", d_b)
    n_tokens = checks.check_positive_int("make_toy_pair n_tokens", n_tokens)
    steps = checks.check_positive_int("make_toy_pair steps", steps, minimum=0)
    seed = checks.check_positive_int("make_toy_pair seed", seed, minimum=0)
    if not (np.isfinite(noise_std) and noise_std >= 0):
        raise checks.InputError(f"make_toy_pair noise_std must be >= 0, got {noise_std}")
    # make_instances validates sparsity / importance (range, length, NaN) with clear messages.
    settings = toy.make_instances(n, sparsity=sparsity, importance=importance)
    s = np.asarray(settings.sparsity[0], np.float64)
    imp = np.asarray(settings.importance[0], np.float64)

    words = np.random.SeedSequence(seed).generate_state(6)
    seed_a = int(words[0] % 2**30)
    seed_b = int(words[1] % 2**30) + 2**30  # disjoint ranges: never equal to seed_a
    rng_codes = np.random.default_rng(words[2])
    rng_codes_b = np.random.default_rng(words[3])
    rng_rot = np.random.default_rng(words[4])
    rng_noise = np.random.default_rng(words[5])

    codes_a = _codes(rng_codes, n_tokens, s)
    codes_b = codes_a if shared else _codes(rng_codes_b, n_tokens, s)
    (W_a, W_b), losses = _train_models(
        (d_a, d_b),
        (seed_a, seed_b),
        n_features=n,
        sparsity=s,
        importance=imp,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    rotation = _haar_orthogonal(rng_rot, d_b) if rotate else np.eye(d_b)
    features_a = np.asarray(W_a, np.float64).T
    features_b = np.asarray(W_b, np.float64).T @ rotation
    acts_a = codes_a.astype(np.float64) @ features_a
    acts_b = codes_b.astype(np.float64) @ features_b
    if noise_std > 0:
        acts_a = acts_a + noise_std * rng_noise.normal(size=acts_a.shape)
        acts_b = acts_b + noise_std * rng_noise.normal(size=acts_b.shape)

    active = codes_a > 0
    token_ids = np.where(active.any(axis=1), 1 + np.argmax(codes_a, axis=1), 0).astype(np.int32)
    vocab = (NONE_TOKEN,) + tuple(f"feat{i}" for i in range(n))
    rep_a = np.linalg.norm(features_a, axis=1) > represented_norm
    rep_b = np.linalg.norm(features_b, axis=1) > represented_norm
    true_match = np.arange(n) if shared else np.full(n, -1)

    differs = [f"toy-model seed (A {seed_a}, B {seed_b}): initial W and training batches"]
    if d_a != d_b:
        differs.append(f"hidden width (d_a={d_a}, d_b={d_b})")
    if rotate:
        differs.append("a random orthogonal rotation of B's hidden space")
    if steps == 0:
        differs.append("nothing was trained: both toy models are random-init (steps=0)")
    if shared:
        what_shared = (
            "the per-token ground-truth codes (codes_b is codes_a: the same features "
            "are active on every token with the same magnitudes) and the feature "
            "distribution both models were trained on; feature i of A is feature i "
            "of B"
        )
    else:
        what_shared = (
            "nothing per token: codes_b is drawn independently of codes_a, with the "
            "same count and marginal statistics (sparsity, importance); no feature "
            "of B corresponds to a feature of A (true_match = -1)"
        )
    description = {
        "kind": "toy model pair" if shared else "toy model control pair",
        "shared": bool(shared),
        "what_is_shared": what_shared,
        "what_differs": differs,
        "seed": seed,
        "n_features": n,
        "d_a": d_a,
        "d_b": d_b,
        "n_tokens": n_tokens,
        "sparsity": s.tolist(),
        "importance": imp.tolist(),
        "model": "ReLU toy model x' = ReLU(W^T W x + b) (Elhage et al. 2022); acts = W x",
        "training": {
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": "AdamW (weight decay 0.01)",
            "final_loss_a": losses[0],
            "final_loss_b": losses[1],
        },
        "rotation_b": bool(rotate),
        "noise_std": float(noise_std),
        "tokens": "token_ids = 1 + argmax of codes_a per row (dominant active feature of A), "
        "0 = '<none>' when no feature is active",
        "n_represented_a": int(rep_a.sum()),
        "n_represented_b": int(rep_b.sum()),
        "n_true_pairs": int(np.sum(rep_a & rep_b)) if shared else 0,
        "mean_active_features_per_token": float(active.sum(axis=1).mean()),
    }
    return ToyPair(
        acts_a=acts_a.astype(np.float32),
        acts_b=acts_b.astype(np.float32),
        token_ids=token_ids,
        vocab=vocab,
        features_a=features_a.astype(np.float32),
        features_b=features_b.astype(np.float32),
        codes_a=codes_a,
        codes_b=codes_b,
        represented_a=rep_a,
        represented_b=rep_b,
        true_match=true_match,
        rotation_b=rotation.astype(np.float32),
        description=description,
    )


def pair_stream(pair: ToyPair, chunk_size: int, **kwargs: Any) -> streaming.ChunkStream:
    """A `ChunkStream` of ``(token_ids, acts_a, acts_b)`` chunks (row-aligned, resumable).

    ``kwargs`` go to `ChunkStream` (``repeat``, ``shuffle_seed``, ``drop_remainder``...).
    """
    return streaming.ChunkStream(
        (pair.token_ids, pair.acts_a, pair.acts_b),
        chunk_size,
        name=kwargs.pop("name", "toy_pair"),
        **kwargs,
    )


def side_stream(pair: ToyPair, side: str, chunk_size: int, **kwargs: Any) -> streaming.ChunkStream:
    """An activation source for ONE side: chunks of ``(token_ids, acts)`` (DESIGN.md)."""
    if side not in ("a", "b"):
        raise checks.InputError(f"side_stream side must be 'a' or 'b', got {side!r}")
    acts = pair.acts_a if side == "a" else pair.acts_b
    return streaming.ChunkStream(
        (pair.token_ids, acts), chunk_size, name=kwargs.pop("name", f"toy_pair.{side}"), **kwargs
    )

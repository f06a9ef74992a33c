"""The one SAE type used everywhere, whatever trained it or whatever file it came from.

``SAE`` is a pytree (jit / vmap / orbax friendly) of parameters with a static `SAEConfig`:

* ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
  ``threshold [d_sae]`` (JumpReLU thresholds, BatchTopK's inference threshold; zeros otherwise).
* activation: ``relu`` | ``topk`` | ``batchtopk`` | ``jumprelu``, with ``k`` for the top-k ones.

Forward (all conventions of the anchors map onto these switches):

    x_n  = x * input_scale                      # input normalisation (1.0 = none)
    pre  = (x_n - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    f    = act(pre)                             # feature activations, >= 0
    x_hat = (f @ W_dec + b_dec) / input_scale

Activations: relu(pre); topk: the k largest of relu(pre) per row (= relu of the top-k of
pre); batchtopk: at inference a threshold (``pre > threshold``) like JumpReLU, during training
the top ``k * rows`` over the whole batch (`batch_topk`); jumprelu: ``pre * (pre > threshold)``
and ``pre > 0`` (Gemma Scope: ``(pre > threshold) * relu(pre)``).

Loaders convert INTO this type and check shapes; nothing downstream knows about formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from engine import checks

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Static description of an SAE (hashable: it is a static pytree field).

    Attributes:
      d_in: input width (the hookpoint's hidden size).
      d_sae: number of features.
      activation: one of `ACTIVATIONS`.
      k: active features per row for topk / batchtopk (0 otherwise).
      apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens flag; sparsify
        always does; Gemma Scope does not).
      input_scale: multiply inputs by this before encoding and divide reconstructions by it
        (recorded input normalisation, e.g. sqrt(d_in) / E||x||).
      metadata: free-form provenance as a tuple of (key, value) pairs (source model,
        hookpoint, data, training config, original format). Use `meta` to read it as a dict.
    """

    d_in: int
    d_sae: int
    activation: str = "relu"
    k: int = 0
    apply_b_dec_to_input: bool = True
    input_scale: float = 1.0
    metadata: tuple = ()

    def __post_init__(self):
        checks.check_positive_int("SAEConfig.d_in", self.d_in)
        checks.check_positive_int("SAEConfig.d_sae", self.d_sae)
        if self.activation not in ACTIVATIONS:
            raise checks.InputError(f"SAEConfig.activation: unknown {self.activation!r}; "
                                    f"expected one of {ACTIVATIONS}")
        if self.activation in ("topk", "batchtopk"):
            checks.check_positive_int(f"SAEConfig.k ({self.activation})", self.k)
            if self.k > self.d_sae:
                raise checks.InputError(f"SAEConfig.k={self.k} exceeds d_sae={self.d_sae}")
        if not (np.isfinite(self.input_scale) and self.input_scale > 0):
            raise checks.InputError(f"SAEConfig.input_scale must be a positive finite number, "
                                    f"got {self.input_scale}")

    @property
    def meta(self) -> dict:
        return dict(self.metadata)

    def with_metadata(self, **kw) -> "SAEConfig":
        merged = dict(self.metadata)
        merged.update(kw)
        return dataclasses.replace(self, metadata=tuple(sorted(
            (k, _freeze(v)) for k, v in merged.items())))


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@flax.struct.dataclass
class SAE:
    """Parameters (pytree leaves) plus the static config.

    Stacking SAEs with the same config along a leading axis (``jax.tree.map(jnp.stack, ...)``)
    gives a sweep that `jax.vmap` runs in one program.
    """

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    threshold: jax.Array
    config: SAEConfig = flax.struct.field(pytree_node=False)

    # -- forward ----------------------------------------------------------------------------

    def pre_activations(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x * cfg.input_scale
        if cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: jax.Array) -> jax.Array:
        """Feature activations from pre-activations (inference semantics)."""
        cfg = self.config
        if cfg.activation == "relu":
            return jax.nn.relu(pre)
        if cfg.activation == "topk":
            return topk_dense(jax.nn.relu(pre), cfg.k)
        # jumprelu and batchtopk at inference: a per-feature threshold gate on positive pre.
        return jnp.where((pre > self.threshold) & (pre > 0), pre, 0.0)

    def encode(self, x: jax.Array) -> jax.Array:
        """Dense feature activations ``[..., d_sae]``."""
        return self.activate(self.pre_activations(x))

    def encode_sparse(self, x: jax.Array, k: int | None = None
                      ) -> tuple[jax.Array, jax.Array]:
        """``(values, indices)``, each ``[..., k]``: the k largest activations per row.

        Exact for topk SAEs (k defaults to ``config.k``); for other activations it keeps the
        k largest, which is exact whenever a row has at most k active features.
        """
        k = self.config.k if k is None else k
        checks.check_positive_int("encode_sparse k", k)
        if self.config.activation == "topk":
            return jax.lax.top_k(jax.nn.relu(self.pre_activations(x)), k)
        return jax.lax.top_k(self.encode(x), k)

    def decode(self, acts: jax.Array) -> jax.Array:
        """Reconstruction in the input's (un-normalised) space."""
        return (acts @ self.W_dec + self.b_dec) / self.config.input_scale

    def decode_sparse(self, values: jax.Array, indices: jax.Array) -> jax.Array:
        """Same as `decode` for ``(values, indices)``: a gather of k decoder rows per row."""
        rows = jnp.take(self.W_dec, indices, axis=0)               # [..., k, d_in]
        out = jnp.einsum("...k,...kd->...d", values, rows) + self.b_dec
        return out / self.config.input_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    # -- checks -----------------------------------------------------------------------------

    def validate(self, name: str = "SAE") -> "SAE":
        """Checks every shape against the config and that weights are finite."""
        c = self.config
        expected = {"W_enc": (c.d_in, c.d_sae), "b_enc": (c.d_sae,), "W_dec": (c.d_sae, c.d_in),
                    "b_dec": (c.d_in,), "threshold": (c.d_sae,)}
        for field, shape in expected.items():
            value = getattr(self, field)
            checks.check_shape(f"{name}.{field}", value, shape)
            checks.check_finite(f"{name}.{field}", value)
        return self

    def check_input(self, x, name: str = "activations") -> None:
        """One-line error when activations do not fit this SAE (width, NaN)."""
        shape = np.shape(x)
        if not shape or shape[-1] != self.config.d_in:
            raise checks.InputError(f"{name}: last dimension {shape[-1] if shape else None} "
                                    f"does not match SAE d_in={self.config.d_in}")
        checks.check_finite(name, x)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {f: np.asarray(getattr(self, f)) for f in
                ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def topk_dense(acts: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest entries of each row (others 0); dense output."""
    values, indices = jax.lax.top_k(acts, k)
    return _scatter_rows(values, indices, acts.shape[-1])


def batch_topk(acts: jax.Array, k: int) -> jax.Array:
    """BatchTopK (Bussmann et al. 2024): keeps the ``k * rows`` largest entries of a batch."""
    flat = acts.reshape(-1)
    kk = min(k * acts.shape[0], flat.shape[0])
    values, indices = jax.lax.top_k(flat, kk)
    return jnp.zeros_like(flat).at[indices].set(values).reshape(acts.shape)


def _scatter_rows(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """Dense ``[..., width]`` rows holding ``values`` at ``indices`` (zeros elsewhere)."""
    k = values.shape[-1]
    v2 = values.reshape(-1, k)
    i2 = indices.reshape(-1, k)
    rows = jnp.arange(v2.shape[0])[:, None]
    out = jnp.zeros((v2.shape[0], width), values.dtype).at[rows, i2].set(v2)
    return out.reshape(values.shape[:-1] + (width,))


def from_arrays(config: SAEConfig, W_enc, b_enc, W_dec, b_dec, threshold=None,
                dtype=jnp.float32, name: str = "SAE") -> SAE:
    """Builds and validates an SAE from host arrays (the loaders' single entry point)."""
    threshold = np.zeros((config.d_sae,), np.float32) if threshold is None else threshold
    arrays = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    host = {}
    for field, value in arrays.items():
        arr = np.asarray(value)
        checks.check_finite(f"{name}.{field}", arr)
        host[field] = arr
    sae = SAE(**{k: jnp.asarray(v, dtype) for k, v in host.items()}, config=config)
    return sae.validate(name)


def init(key: jax.Array, config: SAEConfig, data_sample: Any = None,
         dtype=jnp.float32) -> SAE:
    """A fresh SAE: unit-norm random decoder rows, ``W_enc = W_dec^T``, ``b_dec`` = mean of
    ``data_sample`` (normalised space) when given, zero biases otherwise."""
    w_dec = jax.random.normal(key, (config.d_sae, config.d_in), dtype)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    b_dec = jnp.zeros((config.d_in,), dtype)
    if data_sample is not None:
        sample = jnp.asarray(data_sample, dtype) * config.input_scale
        b_dec = jnp.mean(sample.reshape(-1, config.d_in), axis=0)
    return SAE(W_enc=w_dec.T, b_enc=jnp.zeros((config.d_sae,), dtype), W_dec=w_dec,
               b_dec=b_dec, threshold=jnp.zeros((config.d_sae,), dtype), config=config)

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

Sparse TopK path (Gao et al. 2024, openai/sparse_autoencoder; docs/references.md "SAE training"):
`gather_combine` (decode: a weighted sum of k gathered decoder rows) and `gather_dot` (encode at
k chosen features; both in `engine.sparse_ops`, re-exported here) have custom VJPs whose
backward passes are a scatter-add of ``rows * k`` outer products and a gather,
O(rows * k * d_in) instead of O(rows * d_sae * d_in). Neither materialises a
``[rows, k, d_in]`` tensor: both loop over the k slots with `jax.lax.scan` (or, with
``native=True`` on CPU, run as native kernels, `engine.sparse_ops`).
`prefer_sparse` picks the sparse or the dense path by size.

Loaders convert INTO this type and check shapes; nothing downstream knows about formats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from numpy.typing import ArrayLike

from engine import checks, sparse_ops

# The generic sparse primitives live in engine.sparse_ops; re-exported here (older callers).
from engine.sparse_ops import _combine as _combine
from engine.sparse_ops import _dot as _dot
from engine.sparse_ops import _flat2 as _flat2
from engine.sparse_ops import _scatter_outer as _scatter_outer
from engine.sparse_ops import gather_combine as gather_combine
from engine.sparse_ops import gather_dot as gather_dot
from engine.sparse_ops import scatter_outer as scatter_outer
from engine.sparse_ops import scatter_rows as scatter_rows

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
            raise checks.InputError(
                f"SAEConfig.activation: unknown {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        if self.activation in ("topk", "batchtopk"):
            checks.check_positive_int(f"SAEConfig.k ({self.activation})", self.k)
            if self.k > self.d_sae:
                raise checks.InputError(f"SAEConfig.k={self.k} exceeds d_sae={self.d_sae}")
        if not (np.isfinite(self.input_scale) and self.input_scale > 0):
            raise checks.InputError(
                f"SAEConfig.input_scale must be a positive finite number, got {self.input_scale}"
            )

    @property
    def meta(self) -> dict:
        return dict(self.metadata)

    def with_metadata(self, **kw: Any) -> SAEConfig:
        merged = dict(self.metadata)
        merged.update(kw)
        return dataclasses.replace(
            self, metadata=tuple(sorted((k, _freeze(v)) for k, v in merged.items()))
        )


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

    def describe(self) -> str:
        """``SAE(d_in=.., d_sae=.., activation[, model, hookpoint, label])`` for messages."""
        c = self.config
        meta = c.meta
        extra = [
            str(meta[key])
            for key in ("model_name", "hookpoint", "label")
            if meta.get(key) not in (None, "")
        ]
        return (
            f"SAE(d_in={c.d_in}, d_sae={c.d_sae}, {c.activation}"
            + "".join(f", {e}" for e in extra)
            + ")"
        )

    def _check_width(self, what: str, x, width: int, axis: str) -> None:
        """One-line error (static shapes: also inside jit / vmap) on a wrong last dimension."""
        shape = tuple(np.shape(x))
        if not shape or shape[-1] != width:
            raise checks.InputError(
                f"{self.describe()}.{what}: got shape {shape}, expected [..., {width}] ({axis})"
            )

    def pre_activations(self, x: jax.Array) -> jax.Array:
        return self.centred_input(x) @ self.W_enc + self.b_enc

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

    def encode_sparse(
        self,
        x: jax.Array,
        k: int | None = None,
        *,
        forward_only: bool = False,
        native: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """``(values, indices)``, each ``[..., k]``: the k largest activations per row.

        Exact for topk SAEs (k defaults to ``config.k``); for other activations it keeps the
        k largest, which is exact whenever a row has at most k active features.
        ``forward_only`` (topk): ``relu`` of the top-k pre-activations without
        `sparse_topk_encode`'s gradient machinery (its values subtract and re-add the chosen
        biases for their sparse gradient): same indices, values equal to float32 rounding.
        For passes that take no gradient (the feature pass).
        ``native`` (static): top-k and the sparse gradient by the native CPU kernels
        (`engine.sparse_ops`, `engine.sparse_ops.native_default`).
        """
        k = self.config.k if k is None else k
        checks.check_positive_int("encode_sparse k", k)
        if k > self.config.d_sae:
            raise checks.InputError(f"encode_sparse: k={k} exceeds d_sae={self.config.d_sae}")
        if self.config.activation == "topk":
            if forward_only:
                vals, idx = sparse_ops.top_k(self.pre_activations(x), k, native=native)
                return jax.nn.relu(vals), idx
            return sparse_topk_encode(
                self.W_enc, self.b_enc, self.centred_input(x), k, native=native
            )
        return sparse_ops.top_k(self.encode(x), k, native=native)

    def centred_input(self, x: jax.Array) -> jax.Array:
        """``x * input_scale - b_dec`` (or without ``b_dec``): what ``W_enc`` multiplies."""
        self._check_width("encode", x, self.config.d_in, "the input width d_in")
        x = x * self.config.input_scale
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    def decode(self, acts: jax.Array) -> jax.Array:
        """Reconstruction in the input's (un-normalised) space."""
        self._check_width("decode", acts, self.config.d_sae, "one activation per feature, d_sae")
        return (acts @ self.W_dec + self.b_dec) / self.config.input_scale

    def decode_sparse(self, values: jax.Array, indices: jax.Array) -> jax.Array:
        """Same as `decode` for ``(values, indices)``: a gather of k decoder rows per row.

        Forward and backward are O(rows * k * d_in) (`gather_combine`).
        """
        if np.shape(values) != np.shape(indices):
            raise checks.InputError(
                f"{self.describe()}.decode_sparse: values "
                f"{tuple(np.shape(values))} and indices "
                f"{tuple(np.shape(indices))} must have the same shape "
                "[..., k]"
            )
        out = gather_combine(self.W_dec, values, indices) + self.b_dec
        return out / self.config.input_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    # -- checks -----------------------------------------------------------------------------

    def validate(self, name: str = "SAE") -> SAE:
        """Checks every shape against the config and that weights are finite."""
        c = self.config
        expected = {
            "W_enc": (c.d_in, c.d_sae),
            "b_enc": (c.d_sae,),
            "W_dec": (c.d_sae, c.d_in),
            "b_dec": (c.d_in,),
            "threshold": (c.d_sae,),
        }
        for field, shape in expected.items():
            value = getattr(self, field)
            checks.check_shape(f"{name}.{field}", value, shape)
            checks.check_finite(f"{name}.{field}", value)
        return self

    def check_input(self, x: ArrayLike, name: str = "activations") -> None:
        """One-line error when activations do not fit this SAE (width, NaN)."""
        shape = np.shape(x)
        if not shape or shape[-1] != self.config.d_in:
            raise checks.InputError(
                f"{name}: last dimension {shape[-1] if shape else None} "
                f"does not match SAE d_in={self.config.d_in}"
            )
        checks.check_finite(name, x)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {
            f: np.asarray(getattr(self, f))
            for f in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        }

    def fingerprint(self) -> str:
        """Hash of every weight and the config (`engine.fingerprint.digest`): the key under
        which results computed from this SAE are cached."""
        from engine import fingerprint as fp_lib

        p = self.to_numpy()
        return fp_lib.digest(*(p[k] for k in sorted(p)), self.config)


def topk_dense(acts: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest entries of each row (others 0); dense output."""
    values, indices = jax.lax.top_k(acts, k)
    return scatter_rows(values, indices, acts.shape[-1])


def batch_topk(acts: jax.Array, k: int) -> jax.Array:
    """BatchTopK (Bussmann et al. 2024): keeps the ``k * rows`` largest entries of a batch."""
    flat = acts.reshape(-1)
    kk = min(k * acts.shape[0], flat.shape[0])
    values, indices = jax.lax.top_k(flat, kk)
    return jnp.zeros_like(flat).at[indices].set(values).reshape(acts.shape)


def from_arrays(
    config: SAEConfig,
    W_enc: ArrayLike,
    b_enc: ArrayLike,
    W_dec: ArrayLike,
    b_dec: ArrayLike,
    threshold: ArrayLike | None = None,
    dtype: DTypeLike = jnp.float32,
    name: str = "SAE",
) -> SAE:
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


def init(
    key: jax.Array,
    config: SAEConfig,
    data_sample: Any = None,
    dtype: DTypeLike = jnp.float32,
    b_dec_init: str = "mean",
) -> SAE:
    """A fresh SAE: unit-norm random decoder rows, ``W_enc = W_dec^T``, ``b_dec`` = mean
    (or ``b_dec_init="geometric_median"``) of ``data_sample`` (normalised space) when given,
    zero biases otherwise."""
    w_dec = jax.random.normal(key, (config.d_sae, config.d_in), dtype)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    b_dec = jnp.zeros((config.d_in,), dtype)
    if data_sample is not None:
        sample = jnp.asarray(data_sample, dtype) * config.input_scale
        sample = sample.reshape(-1, config.d_in)
        if b_dec_init == "geometric_median":
            b_dec = jnp.asarray(geometric_median(np.asarray(sample)), dtype)
        elif b_dec_init == "mean":
            b_dec = jnp.mean(sample, axis=0)
        else:
            raise checks.InputError(
                f"init b_dec_init: unknown {b_dec_init!r}; expected 'mean' or 'geometric_median'"
            )
    return SAE(
        W_enc=w_dec.T,
        b_enc=jnp.zeros((config.d_sae,), dtype),
        W_dec=w_dec,
        b_dec=b_dec,
        threshold=jnp.zeros((config.d_sae,), dtype),
        config=config,
    )


def sparse_topk_select(
    enc_rows: jax.Array, b_enc: jax.Array, x_centred: jax.Array, k: int, native: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TopK encoder whose gradient is sparse, from encoder rows ``enc_rows = W_enc^T``
    ``[d_sae, d_in]``: ``(values, indices, pre)``.

    The dense pre-activations ``pre`` are computed without gradient, only to choose the k
    features; the values are ``relu`` of the k largest of them, with the gradient of the k
    dot products that made them (`engine.sparse_ops.gather_dot_values`: not recomputed), so
    the backward pass touches only k encoder rows per row of ``x_centred``. ``native``:
    top-k and the sparse gradient by the native CPU kernels (`engine.sparse_ops`; static).
    """
    pre = jax.lax.stop_gradient(x_centred @ enc_rows.T + b_enc)
    top, idx = sparse_ops.top_k(pre, k, native=native)
    b_sel = jnp.take(b_enc, idx)
    dots = sparse_ops.gather_dot_values(
        top - jax.lax.stop_gradient(b_sel), enc_rows, x_centred, idx, native=native
    )
    return jax.nn.relu(dots + b_sel), idx, pre


def sparse_topk_encode(
    W_enc: jax.Array, b_enc: jax.Array, x_centred: jax.Array, k: int, native: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`sparse_topk_select` for ``W_enc [d_in, d_sae]``: ``(values, indices)``, each
    ``[..., k]``."""
    vals, idx, _ = sparse_topk_select(W_enc.T, b_enc, x_centred, k, native)
    return vals, idx


# Above this many features with k at most 1/16 of them the sparse path wins on CPU (measured
# by experiments/bench_sae.py, whole training step: 2.9-3.7x at 16384 features, k=32, batch
# 4096; 1.3x at 2048 features, batch 512) and on GPUs (Gao et al.).
SPARSE_MIN_D_SAE = 2048
SPARSE_MAX_K_FRACTION = 1 / 16


# With the native CPU kernels (engine.sparse_ops) the sparse path wins from much smaller
# widths: whole training step at d_in 384, k 16, batch 1024, 2 threads, quiet machine: 1.4x
# the dense path at 256 features, 2.1x at 512, 3.4x at 1024, 3.5x at 1536 (15.5 vs 54 ms).
SPARSE_MIN_D_SAE_NATIVE = 256


def prefer_sparse(d_sae: int, k: int, native: bool = False) -> bool:
    """Automatic choice of the sparse TopK path by size (``native``: the native CPU kernels
    will run it)."""
    least = SPARSE_MIN_D_SAE_NATIVE if native else SPARSE_MIN_D_SAE
    return d_sae >= least and k <= d_sae * SPARSE_MAX_K_FRACTION


# -- initialisation helpers -------------------------------------------------------------------


def geometric_median(points: ArrayLike, max_iter: int = 200, tol: float = 1e-7) -> np.ndarray:
    """Geometric median of rows (Weiszfeld's algorithm, float64), the b_dec init of
    Gao et al. 2024 / openai/sparse_autoencoder.

    Args:
      points: ``[n, d]`` finite rows.
      max_iter: Weiszfeld iterations at most.
      tol: stop when the estimate moves less than ``tol`` times the data scale.
    """
    x = checks.as_float_matrix("geometric_median points", points).astype(np.float64)
    guess = x.mean(axis=0)
    scale = max(float(np.sqrt(np.mean(np.sum((x - guess) ** 2, axis=1)))), 1e-30)
    for _ in range(max_iter):
        dist = np.linalg.norm(x - guess, axis=1)
        # A point that coincides with the estimate would get infinite weight; clamping its
        # distance keeps the iteration defined (the standard Weiszfeld fix-up).
        w = 1.0 / np.maximum(dist, 1e-12 * scale)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        moved = float(np.linalg.norm(new - guess))
        guess = new
        if moved < tol * scale:
            break
    return guess


def expected_norm_scale(sample: ArrayLike) -> float:
    """``sqrt(d_in) / mean ||x||``: the input scale that makes the mean row norm sqrt(d_in)
    (SAELens ``normalize_activations="expected_average_only_in"``). Undo by dividing."""
    x = checks.as_float_matrix("input-normalisation sample", sample).astype(np.float64)
    mean_norm = float(np.mean(np.linalg.norm(x, axis=1)))
    if not mean_norm > 0:
        raise checks.InputError(
            "input-normalisation sample: every row is zero; expected "
            "activations with a non-zero norm"
        )
    return math.sqrt(x.shape[1]) / mean_norm


@jax.jit
def _fired_counts(sae: SAE, x: jax.Array) -> jax.Array:
    return jnp.sum(sae.encode(x) > 0, axis=0)


def feature_density(sae: SAE, acts: ArrayLike, batch_size: int = 4096) -> np.ndarray:
    """Fraction of rows on which each feature fires (``[d_sae]``, float64), over ``acts``."""
    x = checks.as_float_matrix("feature_density acts", acts)
    sae.check_input(x, "feature_density acts")
    counts = np.zeros((sae.config.d_sae,), np.int64)
    for lo in range(0, x.shape[0], batch_size):
        counts += np.asarray(_fired_counts(sae, jnp.asarray(x[lo : lo + batch_size], jnp.float32)))
    return counts / x.shape[0]

"""SAE training: the four activations' losses and sweeps vmapped into one jitted program.

Losses (``x`` is the normalised input, ``x_hat`` the reconstruction, both ``[rows, d_in]``;
``recon = mean_rows ||x - x_hat||^2``; see docs/references.md "SAE training"):

* ``relu``: ``recon + l1_t * mean_rows sum_i f_i ||W_dec_i||`` (Anthropic, "Circuits
  Updates, April 2024": the L1 is weighted by decoder row norms and the decoder is left
  unconstrained; ``l1_t`` ramps linearly from 0 over the first ``l1_warmup_steps``, 5 % of
  the run by default; decoder rows start at norm 0.1).
* ``topk`` (Gao et al. 2024): ``recon + aux_coeff * AuxK``. AuxK reconstructs the residual
  ``stop_gradient(x - x_hat)`` from the top ``k_aux`` pre-activations among dead latents
  (no firing in ``dead_tokens`` tokens), ``W_dec`` without ``b_dec``, scaled by
  ``min(n_dead / k_aux, 1)`` as in SAELens; it is skipped (`jax.lax.cond`) while no SAE of
  the program has a dead latent. Decoder rows unit-norm.
* ``batchtopk`` (Bussmann et al. 2024): training keeps the top ``k * rows`` activations of
  the batch; the inference threshold is an EMA (``batchtopk_beta``) of the smallest positive
  training activation per batch (dictionary_learning's rule); AuxK as for topk.
* ``jumprelu`` (Rajamanoharan et al. 2024): ``f = pre * H(pre - theta)``,
  ``recon + l0_coeff * mean_rows sum_i H(pre_i - theta_i)`` with straight-through estimators
  for ``theta`` (rectangle kernel of width ``bandwidth``); ``theta = exp(log_threshold)``
  (as SAELens' JumpReLUTrainingSAE). Decoder rows unit-norm.

Shared machinery: ``W_enc = W_dec^T`` init, ``b_dec`` = geometric median of a sample (or
mean / zeros), inputs scaled to mean norm ``sqrt(d_in)`` (recorded in
``SAEConfig.input_scale``), unit-norm decoder rows by removing the gradient's component
parallel to each row before Adam and renormalising after it, sparse TopK encode/decode
(`engine.sparse_ops`) when `models.sae.prefer_sparse` says so, on the native CPU kernels
in single-device CPU programs (`engine.sparse_ops.native_default`; `SAE_NATIVE_KERNELS=0`
turns them off).

Sweeps: configs that differ only in `TUNABLE` fields (seed, k, l1_coeff, l0_coeff,
aux_coeff, lr) form one group; the group's parameters are stacked on a leading SAE axis and
one jitted step runs `jax.vmap` over it (or `jax.lax.map` on CPU, see
``TrainConfig.sweep_axis``), every SAE seeing the same batch (the batch is sharded over the
mesh's ``data`` axis, parameters are replicated). Configs that differ in
anything else (width, activation...) are separate programs run one after another by
`train_saes`. Different ``k`` in one group use the largest k for the top-k selection and a
per-SAE mask.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine import checks, metrics_io, sparse_ops, streaming
from engine import mesh as mesh_lib
from engine import train as train_lib
from models import sae as sae_lib

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from models.activation_source import ActivationSource

TUNABLE = ("seed", "k", "l1_coeff", "l0_coeff", "aux_coeff", "lr")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECODE_MODES = ("auto", "sparse", "dense")
SWEEP_AXES = ("auto", "vmap", "map")
LR_DECAYS = ("linear", "cosine")
_NEVER = np.iinfo(np.int32).max // 2  # saturation value of the tokens-since-fired counters
SAELENS_DIR = "saelens"  # SAELens copy inside each saved SAE's directory
_STEP_CACHE: dict = {}  # compiled steps by program shape (see SweepProgram.step_fn)
_STEP_CACHE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One SAE's training recipe (hashable; `TUNABLE` fields may differ inside one program).

    Attributes:
      d_sae: number of features.
      activation: ``relu`` | ``topk`` | ``batchtopk`` | ``jumprelu``.
      k: active features per row (topk, batchtopk).
      l1_coeff: relu's L1 coefficient (>= 0).
      l1_warmup_steps: steps of the linear L1 ramp; None = 5 % of the run.
      l0_coeff: jumprelu's L0 coefficient (>= 0; SAELens' default 1.0).
      jumprelu_bandwidth: width of the straight-through rectangle kernel.
      jumprelu_init_threshold: initial threshold. Both are in units of the normalised
        pre-activations (about unit scale at init when inputs have norm sqrt(d_in)). The
        anchors' 0.001 / 0.001 left the thresholds stuck on our toy data (L0 58 of 64
        features after 1500 steps for every L0 coefficient tried); 0.05 / 0.5 with
        l0_coeff 1 recovered a 64-atom dictionary at MMCS 0.98, L0 2.4 (true 3).
      k_aux: AuxK latents; None = d_in // 2 (Gao et al.); 0 disables AuxK.
      aux_coeff: AuxK coefficient (Gao et al.: 1/32).
      dead_tokens: a latent is dead after this many tokens without firing (Gao: 10M).
      lr: Adam learning rate.
      lr_warmup_steps: linear learning-rate warm-up.
      lr_decay_frac: decay to 0 over this final fraction of the run.
      lr_decay: shape of that decay, ``linear`` or ``cosine`` (`lr_schedule`).
      adam_b1, adam_b2, adam_eps: Adam (Gao et al.: eps 6.25e-10).
      grad_clip: clip each SAE's gradient global norm (0 = off).
      unit_norm_decoder: keep decoder rows unit-norm; None = all activations but relu.
      init_decoder_norm: initial decoder row norm; None = 0.1 for relu, 1 otherwise.
      b_dec_init: ``geometric_median`` | ``mean`` | ``zeros``.
      normalize_input: scale inputs to mean norm sqrt(d_in) (recorded in the SAE).
      decode: ``auto`` | ``sparse`` | ``dense`` TopK path.
      batchtopk_beta: EMA factor of batchtopk's inference threshold.
      sweep_axis: how one program runs the SAEs of a sweep: ``vmap`` (batched; best on
        accelerators), ``map`` (`jax.lax.map`, one SAE after another inside the same jitted
        step; on CPU XLA's batched matmuls run ~1.6-2x slower than plain ones), ``auto``
        (map on CPU, vmap elsewhere).
      seed: initialisation seed.
    """

    d_sae: int
    activation: str = "topk"
    k: int = 32
    l1_coeff: float = 5.0
    l1_warmup_steps: int | None = None
    l0_coeff: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5
    k_aux: int | None = None
    aux_coeff: float = 1.0 / 32
    dead_tokens: int = 10_000_000
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    lr_decay_frac: float = 0.0
    lr_decay: str = "linear"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 6.25e-10
    grad_clip: float = 0.0
    unit_norm_decoder: bool | None = None
    init_decoder_norm: float | None = None
    b_dec_init: str = "geometric_median"
    normalize_input: bool = True
    decode: str = "auto"
    batchtopk_beta: float = 0.999
    sweep_axis: str = "auto"
    seed: int = 0

    @property
    def uses_k(self) -> bool:
        return self.activation in ("topk", "batchtopk")

    @property
    def unit_norm(self) -> bool:
        return (
            self.activation != "relu"
            if self.unit_norm_decoder is None
            else bool(self.unit_norm_decoder)
        )

    def resolved_k_aux(self, d_in: int) -> int:
        if not self.uses_k:
            return 0
        k_aux = d_in // 2 if self.k_aux is None else int(self.k_aux)
        return min(max(k_aux, 0), self.d_sae)

    def validate(self, d_in: int | None = None) -> TrainConfig:
        """Raises `InputError` on a bad recipe (names the field and what was expected)."""
        checks.check_positive_int("TrainConfig.d_sae", self.d_sae)
        if self.activation not in sae_lib.ACTIVATIONS:
            raise checks.InputError(
                f"TrainConfig.activation: unknown {self.activation!r}; "
                f"expected one of {sae_lib.ACTIVATIONS}"
            )
        if self.uses_k:
            checks.check_positive_int(f"TrainConfig.k ({self.activation})", self.k)
            if self.k > self.d_sae:
                raise checks.InputError(f"TrainConfig.k={self.k} exceeds d_sae={self.d_sae}")
        for name in (
            "l1_coeff",
            "l0_coeff",
            "aux_coeff",
            "grad_clip",
            "lr_decay_frac",
            "lr_warmup_steps",
            "dead_tokens",
        ):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise checks.InputError(f"TrainConfig.{name} must be finite, got {value!r}")
            checks.check_non_negative(f"TrainConfig.{name}", value)
        for name in ("lr", "jumprelu_bandwidth", "jumprelu_init_threshold", "adam_eps"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise checks.InputError(f"TrainConfig.{name} must be > 0, got {value!r}")
        if self.lr_decay not in LR_DECAYS:
            raise checks.InputError(
                f"TrainConfig.lr_decay: unknown {self.lr_decay!r}; expected one of {LR_DECAYS}"
            )
        if not 0 <= self.lr_decay_frac <= 1:
            raise checks.InputError(
                f"TrainConfig.lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}"
            )
        if not 0 <= self.batchtopk_beta < 1:
            raise checks.InputError(
                f"TrainConfig.batchtopk_beta must be in [0, 1), got {self.batchtopk_beta}"
            )
        if self.k_aux is not None and self.k_aux < 0:
            raise checks.InputError(f"TrainConfig.k_aux must be >= 0, got {self.k_aux}")
        if self.init_decoder_norm is not None and not self.init_decoder_norm > 0:
            raise checks.InputError(
                f"TrainConfig.init_decoder_norm must be > 0, got {self.init_decoder_norm}"
            )
        if self.b_dec_init not in B_DEC_INITS:
            raise checks.InputError(
                f"TrainConfig.b_dec_init: unknown {self.b_dec_init!r}; "
                f"expected one of {B_DEC_INITS}"
            )
        if self.sweep_axis not in SWEEP_AXES:
            raise checks.InputError(
                f"TrainConfig.sweep_axis: unknown {self.sweep_axis!r}; expected one of {SWEEP_AXES}"
            )
        if self.decode not in DECODE_MODES:
            raise checks.InputError(
                f"TrainConfig.decode: unknown {self.decode!r}; expected one of {DECODE_MODES}"
            )
        if self.decode == "sparse" and self.activation != "topk":
            raise checks.InputError(
                f"TrainConfig.decode='sparse' needs activation 'topk', got {self.activation!r}"
            )
        if self.l1_warmup_steps is not None:
            checks.check_positive_int("TrainConfig.l1_warmup_steps", self.l1_warmup_steps, 0)
        checks.check_positive_int("TrainConfig.seed", self.seed, 0)
        if d_in is not None:
            checks.check_positive_int("d_in", d_in)
        return self

    def group_key(self) -> TrainConfig:
        """The config with `TUNABLE` fields blanked: equal keys share one program."""
        return dataclasses.replace(
            self, seed=0, k=0, l1_coeff=0.0, l0_coeff=0.0, aux_coeff=0.0, lr=1.0
        )

    def label(self) -> str:
        """Short unique-ish name, e.g. ``topk_F512_k5_s0``."""
        parts = [self.activation, f"F{self.d_sae}"]
        if self.uses_k:
            parts.append(f"k{self.k}")
        if self.activation == "relu":
            parts.append(f"l1{self.l1_coeff:g}")
        if self.activation == "jumprelu":
            parts.append(f"l0{self.l0_coeff:g}")
        parts.append(f"lr{self.lr:g}")
        parts.append(f"s{self.seed}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def group_configs(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped by `TrainConfig.group_key` (first-seen order)."""
    groups: dict[TrainConfig, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(cfg.group_key(), []).append(i)
    return list(groups.values())


# -- straight-through estimators (JumpReLU) ---------------------------------------------------


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu_ste(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """``z * H(z - theta)``; pseudo-derivative in theta ``-(theta / eps) K((z - theta) / eps)``
    (Rajamanoharan et al. 2024, eq. 11), exact derivative ``H(z - theta)`` in z."""
    return jnp.where(z > theta, z, 0.0)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu_ste(z, theta, bandwidth), (z, theta, bandwidth)


def _jumprelu_bwd(res, g):
    z, theta, eps = res
    dz = jnp.where(z > theta, g, 0.0)
    dtheta = -(theta / eps) * _rectangle((z - theta) / eps) * g
    dtheta = jnp.sum(dtheta.reshape((-1,) + theta.shape), axis=0)
    return dz, dtheta, None


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def heaviside_ste(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """``H(z - theta)``; pseudo-derivative in theta ``-(1 / eps) K((z - theta) / eps)``, none
    in z (Rajamanoharan et al. 2024, eq. 12): gradients of the L0 penalty reach only theta."""
    return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, bandwidth):
    return heaviside_ste(z, theta, bandwidth), (z, theta, bandwidth)


def _heaviside_bwd(res, g):
    z, theta, eps = res
    dtheta = -(1.0 / eps) * _rectangle((z - theta) / eps) * g
    dtheta = jnp.sum(dtheta.reshape((-1,) + theta.shape), axis=0)
    return jnp.zeros_like(z), dtheta, None


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)


# -- one sweep group: init, loss, step --------------------------------------------------------


class SweepProgram:
    """One jitted training program for a group of configs sharing everything but `TUNABLE`.

    Args:
      configs: the group (validated; equal `group_key`).
      d_in: input width.
      num_steps: planned steps (L1 warm-up, learning-rate decay).
      mesh: the device mesh.
      input_scale: the recorded input normalisation (1.0 = none).
    """

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        d_in: int,
        num_steps: int,
        mesh,
        input_scale: float = 1.0,
    ):
        if not configs:
            raise checks.InputError("SweepProgram: no configs")
        for cfg in configs:
            cfg.validate(d_in)
        keys = {c.group_key() for c in configs}
        if len(keys) != 1:
            raise checks.InputError(
                "SweepProgram: configs differ in more than the tunable "
                f"fields {TUNABLE}; use train_saes to run several programs"
            )
        self.configs = list(configs)
        self.base = configs[0]
        self.d_in = checks.check_positive_int("d_in", d_in)
        self.num_steps = checks.check_positive_int("num_steps", num_steps)
        self.mesh = mesh
        self.input_scale = float(input_scale)
        self.n = len(configs)
        base = self.base
        self.act = base.activation
        self.k_max = max(c.k for c in configs) if base.uses_k else 0
        self.k_aux = base.resolved_k_aux(d_in)
        self.use_aux = self.k_aux > 0 and any(c.aux_coeff > 0 for c in configs)
        # The native CPU kernels (engine.sparse_ops) on single-device CPU programs.
        self.native = sparse_ops.native_default(mesh)
        if base.decode == "auto":
            self.sparse = self.act == "topk" and sae_lib.prefer_sparse(
                base.d_sae, self.k_max, native=self.native
            )
        else:
            self.sparse = base.decode == "sparse"
        sweep_axis = base.sweep_axis
        if sweep_axis == "auto":
            platform = np.asarray(mesh.devices).flat[0].platform
            sweep_axis = "map" if platform == "cpu" else "vmap"
        self.sweep_axis = sweep_axis
        self.l1_warmup = (
            max(1, int(round(0.05 * num_steps)))
            if base.l1_warmup_steps is None
            else base.l1_warmup_steps
        )
        self.hyper = {
            "k": jnp.asarray([c.k if base.uses_k else 0 for c in configs], jnp.int32),
            "l1": jnp.asarray([c.l1_coeff for c in configs], jnp.float32),
            "l0": jnp.asarray([c.l0_coeff for c in configs], jnp.float32),
            "aux": jnp.asarray([c.aux_coeff for c in configs], jnp.float32),
            "lr": jnp.asarray([c.lr for c in configs], jnp.float32),
        }
        chain = []
        if base.grad_clip > 0:
            chain.append(optax.clip_by_global_norm(base.grad_clip))
        chain.append(optax.scale_by_adam(b1=base.adam_b1, b2=base.adam_b2, eps=base.adam_eps))
        self.tx = optax.chain(*chain)

    # -- initial state ----------------------------------------------------------------------

    def init_params_one(self, cfg: TrainConfig, b_dec: jax.Array) -> dict:
        """One SAE's trainable parameters (W_enc = W_dec^T, zero b_enc).

        The encoder is held as rows, ``W_enc_T = W_enc^T [d_sae, d_in]``: the sparse path
        gathers and scatter-adds encoder rows, and Adam's updates then read its gradient
        contiguously (with ``W_enc [d_in, d_sae]`` the transposes cost ~30 % of a step at
        16384 latents on CPU). `export_params` gives the `models.sae.SAE` layout.
        """
        key = jax.random.PRNGKey(cfg.seed)
        w_dec = jax.random.normal(key, (cfg.d_sae, self.d_in), jnp.float32)
        norm = cfg.init_decoder_norm
        if norm is None:
            norm = 0.1 if cfg.activation == "relu" and not cfg.unit_norm else 1.0
        w_dec = w_dec * (norm / jnp.linalg.norm(w_dec, axis=1, keepdims=True))
        params = {
            "W_enc_T": w_dec,
            "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32),
            "W_dec": w_dec,
            "b_dec": jnp.asarray(b_dec, jnp.float32),
        }
        if cfg.activation == "jumprelu":
            params["log_threshold"] = jnp.full(
                (cfg.d_sae,), np.log(cfg.jumprelu_init_threshold), jnp.float32
            )
        return params

    def b_dec_init(self, sample: np.ndarray) -> np.ndarray:
        """``b_dec`` from a normalised sample (geometric median, mean or zeros)."""
        mode = self.base.b_dec_init
        if mode == "zeros":
            return np.zeros((self.d_in,), np.float32)
        x = np.asarray(sample, np.float64) * self.input_scale
        if mode == "mean":
            return x.mean(axis=0).astype(np.float32)
        return sae_lib.geometric_median(x).astype(np.float32)

    def init_state(self, sample: np.ndarray) -> train_lib.TrainState:
        """The stacked initial state: params ``{"sae", "stats"}`` with a leading SAE axis."""
        b_dec = self.b_dec_init(sample)
        per = [self.init_params_one(c, b_dec) for c in self.configs]
        sae_params = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
        stats = {
            "since_fired": jnp.zeros((self.n, self.base.d_sae), jnp.int32),
            "batch_threshold": jnp.full((self.n,), -1.0, jnp.float32),
        }
        opt_state = jax.vmap(self.tx.init)(sae_params)
        rng = jnp.stack([jax.random.PRNGKey(c.seed) for c in self.configs])
        return train_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params={"sae": sae_params, "stats": stats},
            opt_state=opt_state,
            rng=rng,
        )

    # -- forward and loss of one SAE --------------------------------------------------------

    def _features(self, p: dict, hyper: dict, xc: jax.Array):
        """Returns ``(x_hat - b_dec, dense f or None, (values, indices) or None, pre)``.

        ``pre`` carries no gradient: JumpReLU's L0 term (its STE sends gradient only to theta)
        and AuxK's choice of dead latents use it.
        """
        base = self.base
        if self.act == "topk" and self.sparse:
            # Only the k chosen values carry gradient (sparse backward); the gradient-free
            # pre-activations are kept for AuxK's choice of dead latents.
            vals, idx, pre_ng = sae_lib.sparse_topk_select(
                p["W_enc_T"], p["b_enc"], xc, self.k_max, self.native
            )
            vals = vals * (jnp.arange(self.k_max) < hyper["k"])
            recon = sparse_ops.gather_combine(p["W_dec"], vals, idx, self.native)
            return recon, None, (vals, idx), pre_ng
        pre = xc @ p["W_enc_T"].T + p["b_enc"]
        if self.act == "relu":
            f = jax.nn.relu(pre)
        elif self.act == "topk":
            vals, idx = sparse_ops.top_k(jax.nn.relu(pre), self.k_max, self.native)
            vals = vals * (jnp.arange(self.k_max) < hyper["k"])
            f = sae_lib.scatter_rows(vals, idx, base.d_sae)
        elif self.act == "batchtopk":
            f = _batch_topk_masked(jax.nn.relu(pre), self.k_max, hyper["k"])
        else:
            theta = jnp.exp(p["log_threshold"])
            f = jumprelu_ste(pre, theta, base.jumprelu_bandwidth)
        return f @ p["W_dec"], f, None, jax.lax.stop_gradient(pre)

    def _aux_loss(self, p, xc, pre_ng, resid, dead):
        """Gao et al.'s AuxK: reconstruct the residual from the top-k_aux dead latents."""
        masked = jnp.where(dead, pre_ng, -jnp.inf)
        _, aidx = sparse_ops.top_k(masked, self.k_aux, self.native)
        gate = jnp.take(dead, aidx).astype(xc.dtype)
        if self.sparse:
            dots = sparse_ops.gather_dot(p["W_enc_T"], xc, aidx, self.native)
            avals = jax.nn.relu(dots + jnp.take(p["b_enc"], aidx)) * gate
            e_hat = sparse_ops.gather_combine(p["W_dec"], avals, aidx, self.native)
        else:
            pre = xc @ p["W_enc_T"].T + p["b_enc"]
            avals = jax.nn.relu(jnp.take_along_axis(pre, aidx, axis=-1)) * gate
            e_hat = sae_lib.scatter_rows(avals, aidx, self.base.d_sae) @ p["W_dec"]
        n_dead = jnp.sum(dead).astype(xc.dtype)
        scale = jnp.minimum(n_dead / self.k_aux, 1.0)
        return scale * jnp.mean(jnp.sum((e_hat - resid) ** 2, axis=-1))

    def main_loss_one(
        self, p: dict, hyper: dict, x: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict, dict, tuple]]:
        """One SAE's loss without AuxK on the normalised batch ``x``, its metrics and
        statistics, and what AuxK needs (``(pre_ng, resid)``, both gradient-free)."""
        base = self.base
        xc = x - p["b_dec"]
        recon, f, sparse, pre_ng = self._features(p, hyper, xc)
        x_hat = recon + p["b_dec"]
        err = x - x_hat
        sq = jnp.sum(err**2, axis=-1)
        recon_loss = jnp.mean(sq)
        loss = recon_loss
        sparsity = jnp.zeros((), x.dtype)
        if self.act == "relu":
            warm = jnp.minimum(1.0, (step + 1).astype(x.dtype) / self.l1_warmup)
            norms = jnp.linalg.norm(p["W_dec"], axis=-1)
            sparsity = hyper["l1"] * warm * jnp.mean(jnp.sum(f * norms, axis=-1))
        elif self.act == "jumprelu":
            theta = jnp.exp(p["log_threshold"])
            l0_ste = jnp.mean(
                jnp.sum(heaviside_ste(pre_ng, theta, base.jumprelu_bandwidth), axis=-1)
            )
            sparsity = hyper["l0"] * l0_ste
        loss = loss + sparsity
        # Statistics (no gradient): which features fired, how often, batchtopk's threshold.
        if sparse is not None:
            vals, idx = sparse
            on = (vals > 0).astype(jnp.int32)
            counts = jnp.zeros((base.d_sae,), jnp.int32).at[idx.reshape(-1)].add(on.reshape(-1))
            l0 = jnp.mean(jnp.sum(on, axis=-1).astype(x.dtype))
            min_pos = jnp.min(jnp.where(vals > 0, vals, jnp.inf))
        else:
            on = f > 0
            counts = jnp.sum(on, axis=0, dtype=jnp.int32)
            l0 = jnp.mean(jnp.sum(on, axis=-1).astype(x.dtype))
            min_pos = jnp.min(jnp.where(on, f, jnp.inf))
        rows = x.shape[0]
        centred = x - jnp.mean(x, axis=0)
        metrics = {
            "mse": recon_loss / x.shape[-1],
            "fvu": jnp.sum(sq) / jnp.maximum(jnp.sum(centred**2), 1e-30),
            "l0": l0,
            "sparsity_loss": sparsity,
            "aux_loss": jnp.zeros((), x.dtype),
            "density_mean": jnp.mean(counts.astype(x.dtype)) / rows,
            "density_max": jnp.max(counts).astype(x.dtype) / rows,
            "sae_loss": loss,
        }
        out = {"counts": jax.lax.stop_gradient(counts), "min_pos": jax.lax.stop_gradient(min_pos)}
        return loss, (metrics, out, (pre_ng, jax.lax.stop_gradient(err)))

    def aux_term(
        self, p: dict, stats: dict, hyper: dict, x: jax.Array, aux_in: tuple
    ) -> tuple[jax.Array, jax.Array]:
        """``(aux_coeff * AuxK, AuxK)`` of one SAE from `main_loss_one`'s ``aux_in``."""
        pre_ng, resid = aux_in
        dead = stats["since_fired"] >= self.base.dead_tokens
        aux = self._aux_loss(p, x - p["b_dec"], pre_ng, resid, dead)
        return hyper["aux"] * aux, aux

    def loss_one(
        self, p: dict, stats: dict, hyper: dict, x: jax.Array, step: jax.Array, any_dead: jax.Array
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        """One SAE's whole loss (`main_loss_one` + AuxK while ``any_dead``), metrics, stats.

        The reference the tests check; `step` takes the same two terms' gradients separately
        (AuxK's under a `jax.lax.cond` outside the differentiated function, which is the same
        gradient because AuxK's inputs from the main pass carry no gradient).
        """
        loss, (metrics, out, aux_in) = self.main_loss_one(p, hyper, x, step)
        if self.use_aux:
            term, aux = jax.lax.cond(
                any_dead,
                lambda: self.aux_term(p, stats, hyper, x, aux_in),
                lambda: (jnp.zeros((), x.dtype), jnp.zeros((), x.dtype)),
            )
            loss = loss + term
            metrics = dict(metrics, aux_loss=aux, sae_loss=loss)
        return loss, (metrics, out)

    # -- the step ---------------------------------------------------------------------------

    def _lr_factor(self, step: jax.Array) -> jax.Array:
        return lr_schedule(self.base, self.num_steps)(step)

    def _over_saes(self, fn: Callable, args: Any) -> Any:
        """``fn`` of each SAE's slice of ``args`` (leading SAE axis in and out)."""
        if self.n == 1:  # no SAE axis inside: XLA sees plain (fast) dots
            one = fn(jax.tree.map(lambda a: a[0], args))
            return jax.tree.map(lambda a: a[None], one)
        if self.sweep_axis == "vmap":
            return jax.vmap(fn)(args)
        return jax.lax.map(fn, args)

    def loss_and_grads(
        self, params: dict, stats: dict, hyper: dict, x: jax.Array, step: jax.Array
    ) -> tuple[dict, dict, dict]:
        """``(grads, metrics, out)`` of every SAE's `loss_one` on the normalised batch ``x``
        (leading SAE axis on params, stats, hyper, grads and metrics)."""
        any_dead = jnp.any(stats["since_fired"] >= self.base.dead_tokens)

        def total(sae_params):
            losses, aux = self._over_saes(
                lambda a: self.main_loss_one(a[0], a[1], x, step), (sae_params, hyper)
            )
            return jnp.sum(losses), aux

        (_, (metrics, out, aux_in)), grads = jax.value_and_grad(total, has_aux=True)(params)
        if self.use_aux:
            # AuxK runs only while some latent is dead. Its gradient is taken inside the cond
            # (a cond inside the differentiated loss made every step pay ~10 ms at d_sae
            # 1536, batch 1024 on CPU for the residuals of the untaken branch). Same gradient
            # as `loss_one`'s: AuxK's inputs from the main pass carry no gradient.
            def aux_one(a):
                p, s, h, ai = a
                (term, aux), g = jax.value_and_grad(
                    lambda pp: self.aux_term(pp, s, h, x, ai), has_aux=True
                )(p)
                return g, term, aux

            def no_aux():
                zero = jnp.zeros((self.n,), x.dtype)
                return jax.tree.map(jnp.zeros_like, params), zero, zero

            g, term, aux = jax.lax.cond(
                any_dead, lambda: self._over_saes(aux_one, (params, stats, hyper, aux_in)), no_aux
            )
            grads = jax.tree.map(jnp.add, grads, g)
            metrics = dict(metrics, aux_loss=aux, sae_loss=metrics["sae_loss"] + term)
        return grads, metrics, out

    def step(
        self, state: train_lib.TrainState, batch: jax.Array, hyper: dict | None = None
    ) -> tuple[train_lib.TrainState, dict]:
        """One optimisation step of every SAE of the group on one shared batch (un-jitted).

        ``hyper`` (default: this program's) holds the per-SAE `TUNABLE` values as ``[n]``
        arrays; passing it as an argument lets programs of the same shape share a compile.
        """
        base = self.base
        hyper = self.hyper if hyper is None else hyper
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.astype(jnp.float32) * self.input_scale
        params, stats = state.params["sae"], state.params["stats"]
        grads, metrics, out = self.loss_and_grads(params, stats, hyper, x, state.step)
        if base.unit_norm:
            grads = dict(grads)
            grads["W_dec"] = project_out_parallel(grads["W_dec"], params["W_dec"])
        updates, opt_state = jax.vmap(self.tx.update)(grads, state.opt_state, params)
        scale = -hyper["lr"] * self._lr_factor(state.step)
        updates = jax.tree.map(lambda u: u * scale.reshape((-1,) + (1,) * (u.ndim - 1)), updates)
        params = optax.apply_updates(params, updates)
        if base.unit_norm:
            params = dict(params)
            params["W_dec"] = normalise_rows(params["W_dec"])
        rows = x.shape[0]
        fired = out["counts"] > 0
        since = jnp.where(fired, 0, jnp.minimum(stats["since_fired"] + rows, _NEVER))
        thr = stats["batch_threshold"]
        if self.act == "batchtopk":
            mp = out["min_pos"]
            ema = base.batchtopk_beta * thr + (1 - base.batchtopk_beta) * mp
            thr = jnp.where(jnp.isfinite(mp), jnp.where(thr < 0, mp, ema), thr)
        new_stats = {"since_fired": since, "batch_threshold": thr}
        metrics = dict(metrics)
        metrics["dead_frac"] = jnp.mean((since >= base.dead_tokens).astype(jnp.float32), axis=-1)
        flat = {"loss": jnp.sum(metrics["sae_loss"])}
        for name, value in metrics.items():
            if name == "sae_loss":
                continue
            flat[name] = jnp.mean(value)
            if self.n > 1:
                for i in range(self.n):
                    flat[f"sae{i}/{name}"] = value[i]
        new_state = state.replace(
            step=state.step + 1, params={"sae": params, "stats": new_stats}, opt_state=opt_state
        )
        return new_state, flat

    def _spec(self) -> tuple:
        """Everything the compiled step depends on besides the `TUNABLE` values."""
        return (
            self.base.group_key(),
            self.n,
            self.d_in,
            self.num_steps,
            self.input_scale,
            self.k_max,
            self.use_aux,
            self.sparse,
            self.native,
            self.sweep_axis if self.n > 1 else None,
            self.mesh,
        )

    def step_fn(self) -> Callable[[train_lib.TrainState, jax.Array], Any]:
        """The jitted ``step(state, batch)`` for `engine.train.train` (state donated).

        Compiled steps are cached by `_spec` and batch structure, so separate programs of
        the same shape (e.g. one per seed) compile once.
        """
        repl = mesh_lib.replicated(self.mesh)
        hyper = jax.device_put(self.hyper, repl)

        def run(state, batch):
            key = self._spec() + (jax.tree.structure(batch),)
            fn = _STEP_CACHE.get(key)
            if fn is None:
                shard = jax.tree.map(lambda a: mesh_lib.data_sharding(self.mesh, np.ndim(a)), batch)
                fn = jax.jit(
                    self.step,
                    in_shardings=(repl, shard, repl),
                    out_shardings=(repl, repl),
                    donate_argnums=0,
                )
                if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
                    _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
                _STEP_CACHE[key] = fn
            return fn(state, batch, hyper)

        return run

    # -- export -----------------------------------------------------------------------------

    @staticmethod
    def export_params(params: dict) -> dict:
        """Training parameters (one SAE's or stacked) in the `models.sae.SAE` layout:
        ``W_enc_T [..., d_sae, d_in]`` becomes ``W_enc [..., d_in, d_sae]``."""
        out = {k: v for k, v in params.items() if k != "W_enc_T"}
        w = params["W_enc_T"]
        out["W_enc"] = (np if isinstance(w, np.ndarray) else jnp).swapaxes(w, -1, -2)
        return out

    def to_saes(
        self, state: train_lib.TrainState, metadata: dict | None = None
    ) -> list[sae_lib.SAE]:
        """One `SAE` per config, with its training recipe and step in the metadata."""
        host = jax.device_get(state.params)
        p, stats = host["sae"], host["stats"]
        step = int(jax.device_get(state.step))
        out = []
        for i, cfg in enumerate(self.configs):
            if cfg.activation == "jumprelu":
                threshold = np.exp(p["log_threshold"][i])
            elif cfg.activation == "batchtopk":
                threshold = np.full(
                    (cfg.d_sae,), max(float(stats["batch_threshold"][i]), 0.0), np.float32
                )
            else:
                threshold = None
            meta = dict(metadata or {})
            meta.update(
                training=json.dumps(cfg.to_dict(), sort_keys=True),
                trained_steps=step,
                architecture=cfg.activation,
            )
            config = sae_lib.SAEConfig(
                d_in=self.d_in,
                d_sae=cfg.d_sae,
                activation=cfg.activation,
                k=cfg.k if cfg.uses_k else 0,
                apply_b_dec_to_input=True,
                input_scale=self.input_scale,
            ).with_metadata(**meta)
            out.append(
                sae_lib.from_arrays(
                    config,
                    p["W_enc_T"][i].T,
                    p["b_enc"][i],
                    p["W_dec"][i],
                    p["b_dec"][i],
                    threshold,
                    name=f"trained SAE {cfg.label()}",
                )
            )
        return out


def lr_schedule(cfg: TrainConfig, num_steps: int) -> optax.Schedule:
    """The learning-rate multiplier of step ``s`` (0-based) as an optax schedule.

    ``min(warm-up, decay)``: the warm-up is ``optax.linear_schedule`` from ``1/w`` to 1 over
    ``w = lr_warmup_steps`` steps (``(s + 1) / w``, so step 0 already moves); the decay spans the
    final ``d = lr_decay_frac * num_steps`` steps, ``(num_steps - s) / d`` when linear
    (reaching ``1/d`` at the last step) and ``optax.cosine_decay_schedule`` (Loshchilov &
    Hutter 2017, arXiv 1608.03983) over the same steps when cosine. Taking the minimum keeps
    both meaningful when they overlap in a short run.
    """
    w = int(cfg.lr_warmup_steps)
    d = max(1.0, cfg.lr_decay_frac * num_steps) if cfg.lr_decay_frac > 0 else 0.0
    warm = optax.linear_schedule(1.0 / w, 1.0, max(w - 1, 1)) if w > 1 else None
    start = num_steps - d
    if d and cfg.lr_decay == "cosine":
        cos = optax.cosine_decay_schedule(1.0, max(int(round(d)), 1))
        decay = lambda s: cos(jnp.maximum(s - start, 0.0))  # noqa: E731
    elif d:
        decay = lambda s: jnp.clip((num_steps - s) / d, None, 1.0)  # noqa: E731
    else:
        decay = None

    def factor(step):
        s = jnp.asarray(step).astype(jnp.float32)
        out = jnp.ones((), jnp.float32)
        if warm is not None:
            out = jnp.minimum(out, warm(s))
        if decay is not None:
            out = jnp.minimum(out, decay(s))
        return out

    return factor


def _batch_topk_masked(acts: jax.Array, k_max: int, k: jax.Array) -> jax.Array:
    """BatchTopK with a traced k: the top ``k * rows`` entries of the batch (``k <= k_max``)."""
    rows = acts.shape[0]
    flat = acts.reshape(-1)
    kk = min(k_max * rows, flat.shape[0])
    values, indices = jax.lax.top_k(flat, kk)
    values = values * (jnp.arange(kk) < k * rows)
    return jnp.zeros_like(flat).at[indices].set(values).reshape(acts.shape)


def project_out_parallel(grad: jax.Array, w: jax.Array) -> jax.Array:
    """Removes from each row of ``grad`` its component along the (unit) row of ``w``
    (Gao et al.: keeps unit-norm decoder rows on the sphere to first order)."""
    unit = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    return grad - jnp.sum(grad * unit, axis=-1, keepdims=True) * unit


def normalise_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


# -- the public driver ------------------------------------------------------------------------


def _as_configs(configs) -> list[TrainConfig]:
    if isinstance(configs, TrainConfig):
        return [configs]
    configs = list(configs)
    if not configs or not all(isinstance(c, TrainConfig) for c in configs):
        raise checks.InputError(
            "train_saes configs: expected a TrainConfig or a non-empty list of TrainConfig"
        )
    return configs


def with_seeds(
    configs: TrainConfig | Sequence[TrainConfig], seeds: Sequence[int]
) -> list[TrainConfig]:
    """Every config once per seed (seed varies fastest)."""
    return [dataclasses.replace(c, seed=int(s)) for c in _as_configs(configs) for s in seeds]


def _check_acts(acts) -> np.ndarray:
    arr = np.asarray(acts)
    checks.check_rank("train_saes acts", arr, 2)
    if not np.issubdtype(arr.dtype, np.floating):
        raise checks.InputError(f"train_saes acts: expected a float array, got {arr.dtype}")
    checks.check_finite("train_saes acts", arr)
    if arr.shape[0] < 2:
        raise checks.InputError(f"train_saes acts: expected at least 2 rows, got {arr.shape[0]}")
    return arr


# What `train_saes` trains on: rows in memory, an activation source, or ``batch_fn(step)``.
TrainActs: TypeAlias = "np.ndarray | ActivationSource | Callable[[int], Any]"


def is_source(acts: object) -> TypeGuard[ActivationSource]:
    """True for an activation source (`models.activation_source`: has ``open_at``)."""
    return hasattr(acts, "open_at") and not isinstance(acts, np.ndarray)


def rows_per_epoch(acts: TrainActs) -> int | None:
    """Rows of one epoch of ``acts`` (array or source), None for a ``batch_fn``."""
    if is_source(acts):
        n = getattr(acts, "num_rows", None)
        return None if n is None else int(n)
    if callable(acts):
        return None
    return int(np.shape(acts)[0])


def steps_for_epochs(epochs: float, num_rows: int, batch_size: int) -> int:
    """Optimisation steps that cover ``epochs`` passes over ``num_rows`` rows (rounded up)."""
    if not (np.isfinite(epochs) and epochs > 0):
        raise checks.InputError(f"epochs must be > 0, got {epochs!r}")
    return max(1, int(np.ceil(float(epochs) * num_rows / batch_size)))


def source_stream(
    source: ActivationSource,
    batch_size: int,
    *,
    column: int = 1,
    shuffle_seed: int | None = 0,
    buffer_rows: int = 1 << 16,
    block_rows: int = 1024,
    name: str = "train_saes source",
) -> streaming.ChunkStream:
    """A repeating, resumable `ChunkStream` of ``[batch_size, d_in]`` training batches.

    ``source`` is an activation source (rows ``(token_ids, acts_1, ...)``; ``column`` picks the
    activations, 1 = the first hookpoint). Rows are shuffled within a bounded buffer of
    ``buffer_rows`` rows (`models.activation_source.shuffled`: block permutation for caches
    and arrays, windows of consecutive rows for live models) with a new permutation each
    epoch; ``shuffle_seed=None`` keeps the source's order. The cache is never loaded into
    memory: at most one buffer of rows is held, and the stream's position (rows handed out)
    is what `engine.train.train` checkpoints, so a resumed run continues mid-epoch exactly.
    """
    from models import activation_source as src_lib

    checks.check_positive_int("train_saes column", column)
    widths = tuple(getattr(source, "widths", ()))
    if widths and column > len(widths):
        raise checks.InputError(
            f"train_saes column={column}: the source has "
            f"{len(widths)} activation array(s) ({list(source.hookpoints)})"
        )
    if shuffle_seed is None:
        inner = source
        if isinstance(source, src_lib.RowSource):
            inner = copy.copy(source)  # a repeating view; the caller's source is unchanged
            inner.repeat = True
    else:
        inner = src_lib.shuffled(
            source, shuffle_seed, buffer_rows=buffer_rows, block_rows=block_rows, repeat=True
        )

    def open_at(start: int):
        n = rows_per_epoch(source)
        if shuffle_seed is None and n is not None and not isinstance(source, src_lib.RowSource):
            # A sequential source without shuffling: loop over epochs by re-opening it.
            epoch, r = divmod(start, n)
            while True:
                for block in source.open_at(r):
                    yield np.asarray(block[column])
                r = 0
        for block in inner.open_at(start):
            yield np.asarray(block[column])

    return streaming.ChunkStream(open_at, batch_size, check_finite=True, name=name)


def train_saes(
    acts: TrainActs,
    configs: TrainConfig | Sequence[TrainConfig],
    *,
    steps: int | None = None,
    batch_size: int,
    mesh: Mesh | None = None,
    workdir: str | None = None,
    data_seed: int = 0,
    init_sample: np.ndarray | None = None,
    log_every: int = 100,
    checkpoint_every: int = 1000,
    progress: bool = False,
    metadata: dict | None = None,
    on_log: Callable | None = None,
    save: bool = True,
    epochs: float | None = None,
    column: int = 1,
    shuffle_buffer: int = 1 << 16,
    shuffle_block: int = 1024,
) -> list[sae_lib.SAE]:
    """Trains one SAE per config (grouped into vmapped programs) and returns them in order.

    Args:
      acts: ``[rows, d_in]`` in-memory activations (sampled in shuffled epochs, order from
        ``data_seed``), ``batch_fn(step) -> [batch_size, d_in]`` (deterministic in step), or
        an activation source (`models.activation_source`: an activation cache's
        `CacheSource`, a live `LMSource`, ...) streamed with a bounded shuffle buffer
        (`source_stream`; never loaded into memory, resumable mid-epoch).
      configs: a `TrainConfig` or a list of them (see `with_seeds`).
      steps: optimisation steps per program (or give ``epochs``).
      batch_size: rows per step (divisible by the mesh ``data`` axis).
      mesh: device mesh (default: all devices on ``data``).
      workdir: when given, each program checkpoints under ``workdir/<group>/`` (metrics.jsonl,
        checkpoints/; rerunning resumes) and the SAEs are saved natively under
        ``workdir/saes/<label>/`` with a SAELens copy in ``workdir/saes/<label>/saelens/``
        (models/formats/saelens.py), unless ``save=False``.
      data_seed: data order for array sources (shared by all programs of this call).
      init_sample: rows for the input scale and b_dec init (default: up to 8192 rows of
        ``acts``, or batches 0.. of ``batch_fn``).
      log_every / checkpoint_every: loop intervals.
      progress: tqdm bars.
      metadata: provenance recorded in every SAE (source, hookpoint, data).
      on_log: ``on_log(group_index, step, metrics)`` after every flush.
      save: save the trained SAEs natively under ``workdir/saes`` (needs ``workdir``).
      epochs: passes over the data instead of ``steps`` (arrays and sources of known size).
        A run that sees less than one epoch logs a warning.
      column: for a source, which activation array of its rows to train on (1 = first).
      shuffle_buffer / shuffle_block: a source's shuffle buffer (rows held in memory) and the
        rows read together (see `source_stream`).

    Returns:
      ``list[SAE]`` aligned with ``configs``.
    """
    configs = _as_configs(configs)
    checks.check_positive_int("train_saes batch_size", batch_size)
    n_rows = rows_per_epoch(acts)
    if epochs is not None:
        if steps is not None:
            raise checks.InputError("train_saes: give steps or epochs, not both")
        if n_rows is None:
            raise checks.InputError(
                "train_saes epochs: the data has no known size (a batch_fn"
                " or a source without num_rows); give steps"
            )
        steps = steps_for_epochs(epochs, n_rows, batch_size)
    if steps is None:
        raise checks.InputError("train_saes: give steps or epochs")
    checks.check_positive_int("train_saes steps", steps)
    if n_rows is not None and steps * batch_size < n_rows:
        logging.warning(
            "train_saes: %d steps x %d rows = %.3g of one epoch of %d rows; the "
            "SAEs see less than one epoch of the data",
            steps,
            batch_size,
            steps * batch_size / n_rows,
            n_rows,
        )
    if mesh is None:
        mesh = mesh_lib.make_mesh()
    mesh_lib.check_divisible(mesh, batch_size, "train_saes batch_size")
    source = None
    if is_source(acts):
        source = acts
        if init_sample is None:
            blocks, have = [], 0
            for block in source_stream(
                source,
                batch_size,
                column=column,
                shuffle_seed=data_seed,
                buffer_rows=shuffle_buffer,
                block_rows=shuffle_block,
            ).__iter__():
                blocks.append(np.asarray(block.arrays[0], np.float32))
                have += blocks[-1].shape[0]
                if have >= (min(8192, n_rows) if n_rows else min(8192, 4 * batch_size)):
                    break
            init_sample = np.concatenate(blocks)[:8192]
        arr = batch_fn = None
    elif callable(acts):
        batch_fn = acts
        if init_sample is None:
            blocks, have = [], 0
            while have < min(8192, 4 * batch_size):
                blocks.append(np.asarray(batch_fn(len(blocks))))
                have += blocks[-1].shape[0]
            init_sample = np.concatenate(blocks)
        arr = None
    else:
        arr = _check_acts(acts)
        batch_fn = None
        if init_sample is None:
            rng = np.random.default_rng(data_seed)
            take = rng.permutation(arr.shape[0])[:8192]
            init_sample = arr[np.sort(take)]
    init_sample = _check_acts(init_sample)
    d_in = int(init_sample.shape[1])
    for cfg in configs:
        cfg.validate(d_in)
    if arr is not None and arr.shape[1] != d_in:
        raise checks.InputError(
            f"train_saes: acts width {arr.shape[1]} != init_sample width {d_in}"
        )
    scale_normalised = sae_lib.expected_norm_scale(init_sample)

    result: list[sae_lib.SAE | None] = [None] * len(configs)
    groups = group_configs(configs)
    for g, members in enumerate(groups):
        group = [configs[i] for i in members]
        scale = scale_normalised if group[0].normalize_input else 1.0
        program = SweepProgram(group, d_in, steps, mesh, input_scale=scale)
        state = program.init_state(init_sample)
        if source is not None:
            data = source_stream(
                source,
                batch_size,
                column=column,
                shuffle_seed=data_seed,
                buffer_rows=shuffle_buffer,
                block_rows=shuffle_block,
            )
        elif batch_fn is not None:
            data = _checked_batch_fn(batch_fn, batch_size, d_in)
        else:
            data = streaming.ChunkStream(
                arr,
                batch_size,
                repeat=True,
                shuffle_seed=data_seed,
                check_finite=False,
                name="train_saes acts",
            )
        gdir = None if workdir is None else os.path.join(workdir, group_name(g, group))
        if gdir is not None:
            metrics_io.write_json(  # process 0; makes the folder (orbax makes its own)
                os.path.join(gdir, "group.json"),
                {
                    "configs": [c.to_dict() for c in group],
                    "labels": [c.label() for c in group],
                    "input_scale": scale,
                    "d_in": d_in,
                    "steps": steps,
                    "batch_size": batch_size,
                    "sparse_topk": program.sparse,
                },
            )
        logging.info(
            "SAE program %d/%d: %d SAE(s) %s, sparse=%s",
            g + 1,
            len(groups),
            len(group),
            group_name(g, group),
            program.sparse,
        )
        loop = train_lib.LoopConfig(
            num_steps=steps,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        hook = None if on_log is None else (lambda s, m, g=g: on_log(g, s, m))
        state = train_lib.train(
            state, program.step_fn(), data, loop, workdir=gdir, mesh=mesh, on_log=hook
        )
        for i, sae in zip(members, program.to_saes(state, metadata)):
            result[i] = sae
    if workdir is not None and save:
        from models import sae_io_native
        from models.formats import saelens

        for label, sae in zip(unique_labels(configs), result):
            folder = os.path.join(workdir, "saes", label)
            sae_io_native.save_sae(folder, sae)  # all processes: orbax coordinates
            if mesh_lib.is_primary():  # plain files: process 0 only
                saelens.save_saelens(os.path.join(folder, SAELENS_DIR), sae)
    return result  # type: ignore[return-value]


def group_name(index: int, group: Sequence[TrainConfig]) -> str:
    """Directory name of a program: ``g<index>_<activation>_F<d_sae>``."""
    base = group[0]
    return f"g{index}_{base.activation}_F{base.d_sae}"


def unique_labels(configs: Sequence[TrainConfig]) -> list[str]:
    """`TrainConfig.label` of each config, suffixed ``-<i>`` where labels repeat."""
    labels = [c.label() for c in configs]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label if labels.count(label) == 1 else f"{label}-{n}")
    return out


def _checked_batch_fn(batch_fn, batch_size: int, d_in: int):
    """Wraps ``batch_fn`` with a shape check (on the first call) and returns arrays."""
    checked = []

    def fn(step):
        batch = batch_fn(step)
        if not checked:
            checks.check_shape("train_saes batch_fn(step)", batch, (batch_size, d_in))
            checks.check_finite("train_saes batch_fn(step)", np.asarray(batch))
            checked.append(True)
        return batch

    return fn

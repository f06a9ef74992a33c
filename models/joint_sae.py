"""Jointly trained cross-model SAEs: universal SAEs, crosscoders, alignment-penalised SAEs.

Three designs over M >= 2 models whose activations are row-aligned (the same tokens), each
model with its own width ``d_m``. Inputs are normalised per model to mean norm ``sqrt(d_m)``
(``input_scale_m``, as `models.sae_train`); every loss below is in that normalised space, and
``recon_m = mean_rows ||x^m - x_hat^m||^2``.

* ``universal`` (Thasarathan et al. 2025, "Universal Sparse Autoencoders", arXiv 2502.03714):
  a shared sparse code, an encoder ``(W_enc^m, b_enc^m)`` and a decoder ``(W_dec^m, b_dec^m)``
  per model. A step encodes ONE source model's activations,
  ``z = act((x^s - b_dec^s) W_enc^s + b_enc^s)``, and decodes into every model,
  ``x_hat^n = z W_dec^n + b_dec^n``; loss ``sum_n recon_n``. The source is sampled uniformly
  per step (``source="sample"``, the paper) or every model in turn inside the step
  (``source="all"``: the mean of the M source losses). Decoder norms are left free, so a
  latent that one model cannot use gets a small decoder there (the relative-norm statistic
  below applies).
* ``crosscoder`` (Lindsey et al. 2024, Anthropic "Sparse Crosscoders for Cross-Layer Features
  and Model Diffing"): one encoder over all models, ``f = act(sum_m x^m W_enc^m + b_enc)``, a
  decoder per model; loss ``sum_m recon_m + l1 * mean_rows sum_i f_i sum_m ||W_dec,i^m||``
  (relu; the L1 ramps in over the first 5 % of steps, decoder rows start at norm 0.1), or
  TopK / BatchTopK where the latents are chosen by ``f_i * sum_m ||W_dec,i^m||`` (the
  decoder-norm-weighted selection of the BatchTopK crosscoders of Minder et al. 2025,
  arXiv 2504.02922), with no sparsity term.
* ``aligned``: M ordinary TopK SAEs (unit-norm decoders, as `models.sae_train`) trained
  together with an alignment term pulling the same-index latents' activations together:
  ``sum_m recon_m + alpha * mean_pairs mean_rows ||z^m - z^n||^2``. ``alpha = 0`` is M
  independent SAEs (separate seeds per model); growing ``alpha`` traces how much sharing a
  loss can buy and at what reconstruction cost.

Activations: ``topk`` (k per row), ``batchtopk`` (Bussmann et al. 2024: ``k * rows`` per
batch during training; at inference a threshold calibrated after training as the mean over
batches of the smallest selected score, dictionary_learning's rule applied post hoc), ``relu``
(universal and crosscoder; L1 weighted by the summed decoder norms).

Per-model slices (`JointSAE.slice`) are ordinary `models.sae.SAE` objects, so every metric,
pairing and report of the project applies:

* universal / aligned: encoder m + decoder m. ``slice(m).encode(x^m)`` equals the joint model's
  code from source m and ``slice(m).decode(z)`` its reconstruction of model m: exact.
* crosscoder: decoder m plus the encoder block ``W_enc^m`` with the shared ``b_enc`` (no
  ``b_dec`` subtraction). ``slice(m).decode(f)`` is exact, but ``slice(m).encode(x^m)`` is
  only the part of the crosscoder's pre-activation that model m contributes: a crosscoder
  latent's activation depends on ALL models' activations, so the slice's code is a
  single-model approximation (the TopK slice also selects on unweighted pre-activations).

Native format (`save_joint` / `load_joint`): a directory with ``joint_config.json``
(``format: sae-universality-joint``, the design and training config, and per model its name,
width, input scale and which parts belong to it) and one ordinary native SAE directory per
model under ``models/<index>_<name>/`` (`models.sae_io_native`), whose metadata also records
the joint design and the model index. Any slice directory loads with
`models.sae_io_native.load_sae`; `load_joint` rebuilds the joint model from them (the
crosscoder's shared ``b_enc`` is stored in every slice and checked equal on load).

Latent scaling (Minder et al. 2025, arXiv 2504.02922, `latent_scaling`): for each latent j and
model n, the least-squares coefficient vector of its activation for (a) model n's error with
latent j's own contribution removed ("could j explain what n misses?") and (b) model n's
reconstruction without latent j ("do other latents already carry j in n?"), relative to
j's fitted contribution in its owner model; a latent that looks exclusive by decoder norms
but has a large ratio is a sparsity artifact.

AuxK (Gao et al. 2024, as `models.sae_train`; topk / batchtopk designs): dead-latent
counters (rows since each latent last fired; one row of counters per code: the shared code of
crosscoder / universal, each model's code for aligned) travel in the train state; a latent
is dead after ``dead_tokens`` rows without firing, and the loss adds ``aux_coeff * AuxK``:
the top ``k_aux`` pre-activations among dead latents reconstruct every decoded model's
residual (`aux_k_loss`). Universal's residuals are those of the source's decoding.

Training runs on `engine.train` (jitted step with donated state, data-parallel over the
mesh's ``data`` axis, orbax checkpoints, exact resume, NaN guard): `train_joint` for one
model, `train_joint_sweep` for a sweep: configs that differ only in `TUNABLE` fields (seed,
L1 / alignment / AuxK coefficients, lr) run as ONE program whose parameters are stacked on a
leading member axis and whose step maps over it (``lax.map`` on CPU, ``vmap`` elsewhere;
`JointConfig.sweep_axis`), every member on the same batches, as the SAE family's sweeps
(`models.sae_train`). A member equals the same config trained alone (tested).

Commands: ``python -m experiments.joint_sae --workdir=runs/joint_sae/toy`` (see that module).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine import checks, metrics_io, streaming
from engine import mesh as mesh_lib
from engine import train as train_lib
from models import sae as sae_lib
from models import sae_io_native, sae_train

if TYPE_CHECKING:
    from jax.sharding import Mesh

DESIGNS = ("universal", "crosscoder", "aligned")
JOINT_ACTIVATIONS = ("topk", "batchtopk", "relu")
SOURCES = ("sample", "all")
FORMAT = "sae-universality-joint"
VERSION = 1
CONFIG_FILE = "joint_config.json"
# Fields that may differ inside one sweep program (the rest shape the program). aux_coeff may
# vary among positive values (0 removes the AuxK term from the program).
TUNABLE = ("seed", "l1_coeff", "align_coeff", "aux_coeff", "lr")
_NEVER = np.iinfo(np.int32).max // 2  # saturation of the rows-since-fired counters
MODELS_DIR = "models"


@dataclasses.dataclass(frozen=True)
class JointConfig:
    """One joint model's recipe (hashable).

    Attributes:
      design: ``universal`` | ``crosscoder`` | ``aligned``.
      d_sae: latents (shared by all models; per SAE for ``aligned``).
      activation: ``topk`` | ``batchtopk`` | ``relu`` (relu: universal / crosscoder only).
      k: active latents per row (topk / batchtopk).
      l1_coeff: relu's L1 coefficient on ``f_i * sum_m ||W_dec,i^m||``.
      align_coeff: ``aligned``'s alpha (>= 0; 0 = independent SAEs).
      source: universal's source choice per step: ``sample`` | ``all``.
      lr: Adam learning rate.
      l1_warmup_frac: fraction of the run over which relu's L1 ramps in linearly.
      k_aux: AuxK latents (topk / batchtopk); None = ``max_m d_m // 2`` (Gao et al.: half
        the model width), capped at ``d_sae``; 0 disables AuxK.
      aux_coeff: AuxK coefficient (Gao et al.: 1/32; 0 disables AuxK).
      dead_tokens: a latent is dead after this many training rows without firing (Gao: 10M).
      sweep_axis: how one program runs a sweep's members (`train_joint_sweep`): ``vmap``
        (batched), ``map`` (`jax.lax.map`, one member after another inside the jitted step)
        or ``auto`` (map on CPU, where XLA's batched matmuls are slower, vmap elsewhere),
        as `models.sae_train.TrainConfig.sweep_axis`.
      seed: initialisation seed (model m of ``aligned`` uses ``seed + 1000 m``); the data
        order is separate (`train_joint`'s ``data_seed``).
    """

    design: str
    d_sae: int
    activation: str = "topk"
    k: int = 4
    l1_coeff: float = 1.0
    align_coeff: float = 0.0
    source: str = "sample"
    lr: float = 1e-3
    l1_warmup_frac: float = 0.05
    k_aux: int | None = None
    aux_coeff: float = 1.0 / 32
    dead_tokens: int = 10_000_000
    sweep_axis: str = "auto"
    seed: int = 0

    def validate(self) -> JointConfig:
        if self.design not in DESIGNS:
            raise checks.InputError(
                f"JointConfig.design: unknown {self.design!r}; expected one of {DESIGNS}"
            )
        checks.check_positive_int("JointConfig.d_sae", self.d_sae)
        if self.activation not in JOINT_ACTIVATIONS:
            raise checks.InputError(
                f"JointConfig.activation: unknown {self.activation!r}; "
                f"expected one of {JOINT_ACTIVATIONS}"
            )
        if self.design == "aligned" and self.activation == "relu":
            raise checks.InputError(
                "JointConfig: design 'aligned' needs activation 'topk' or "
                "'batchtopk' (unit-norm decoders), got 'relu'"
            )
        if self.activation != "relu":
            checks.check_positive_int(f"JointConfig.k ({self.activation})", self.k)
            if self.k > self.d_sae:
                raise checks.InputError(f"JointConfig.k={self.k} exceeds d_sae={self.d_sae}")
        for name in ("l1_coeff", "align_coeff", "aux_coeff"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise checks.InputError(
                    f"JointConfig.{name} must be finite and >= 0, got {value!r}"
                )
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise checks.InputError(f"JointConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.l1_warmup_frac <= 1:
            raise checks.InputError(
                f"JointConfig.l1_warmup_frac must be in [0, 1], got {self.l1_warmup_frac}"
            )
        if self.source not in SOURCES:
            raise checks.InputError(
                f"JointConfig.source: unknown {self.source!r}; expected one of {SOURCES}"
            )
        checks.check_positive_int("JointConfig.seed", self.seed, 0)
        checks.check_positive_int("JointConfig.dead_tokens", self.dead_tokens)
        if self.k_aux is not None:
            checks.check_positive_int("JointConfig.k_aux", self.k_aux, 0)
        if self.sweep_axis not in sae_train.SWEEP_AXES:
            raise checks.InputError(
                f"JointConfig.sweep_axis: unknown {self.sweep_axis!r}; "
                f"expected one of {sae_train.SWEEP_AXES}"
            )
        return self

    def resolved_k_aux(self, d_ins: Sequence[int]) -> int:
        """AuxK latents for models of widths ``d_ins`` (0: no AuxK term)."""
        if self.activation == "relu" or self.aux_coeff == 0:
            return 0
        k = max(d_ins) // 2 if self.k_aux is None else int(self.k_aux)
        return min(max(k, 0), self.d_sae)

    def group_key(self) -> JointConfig:
        """The config with `TUNABLE` fields blanked: equal keys train in one program."""
        return dataclasses.replace(
            self,
            seed=0,
            l1_coeff=0.0,
            align_coeff=0.0,
            aux_coeff=1.0 if self.aux_coeff > 0 else 0.0,
            lr=1.0,
        )

    @property
    def unit_norm(self) -> bool:
        """Only ``aligned`` keeps unit decoder rows: the joint designs' sharing signal is
        the relative decoder norm."""
        return self.design == "aligned"

    @property
    def shared_code(self) -> bool:
        """One code for all models (crosscoder); otherwise a code per model."""
        return self.design == "crosscoder"

    def label(self) -> str:
        parts = [self.design, self.activation, f"F{self.d_sae}"]
        if self.activation != "relu":
            parts.append(f"k{self.k}")
        else:
            parts.append(f"l1{self.l1_coeff:g}")
        if self.design == "aligned":
            parts.append(f"a{self.align_coeff:g}")
        if self.design == "universal":
            parts.append(self.source)
        parts.append(f"s{self.seed}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class JointSpec:
    """Static description of a trained joint model: recipe plus the models it spans."""

    config: JointConfig
    d_ins: tuple
    input_scales: tuple
    model_names: tuple

    @property
    def n_models(self) -> int:
        return len(self.d_ins)


@flax.struct.dataclass
class JointSAE:
    """Parameters (``params``: dict of per-model lists) plus the static `JointSpec`.

    ``params``: ``W_enc`` [M x [d_m, F]], ``b_enc`` [M x [F]] (crosscoder: [1 x [F]], shared),
    ``W_dec`` [M x [F, d_m]], ``b_dec`` [M x [d_m]]; ``threshold`` [F] (batchtopk's inference
    threshold on the selection score; zeros otherwise). All in the normalised space.
    """

    params: dict
    threshold: jax.Array
    spec: JointSpec = flax.struct.field(pytree_node=False)

    # -- forward (normalised space) --------------------------------------------------------

    def normalise(self, xs: Sequence) -> list:
        return [jnp.asarray(x, jnp.float32) * s for x, s in zip(xs, self.spec.input_scales)]

    def encode_from(self, source: int, xn: jax.Array) -> jax.Array:
        """Universal / aligned: model ``source``'s code from its normalised activations."""
        return encode_from(self.params, self.spec.config, source, xn, self.threshold)

    def encode_joint(self, xns: Sequence) -> jax.Array:
        """Crosscoder: the one code from every model's normalised activations."""
        return crosscoder_encode(self.params, self.spec.config, xns, self.threshold)

    def decode_to(self, target: int, z: jax.Array) -> jax.Array:
        return z @ self.params["W_dec"][target] + self.params["b_dec"][target]

    def decoder_norms(self) -> np.ndarray:
        """``[M, F]`` decoder row norms per model (normalised space)."""
        return np.stack(
            [np.linalg.norm(np.asarray(w, np.float64), axis=1) for w in self.params["W_dec"]]
        )

    # -- per-model SAEs --------------------------------------------------------------------

    def slice(self, m: int) -> sae_lib.SAE:
        """Model ``m``'s part as an ordinary `SAE` (see the module docstring for what it
        means per design)."""
        spec, cfg = self.spec, self.spec.config
        if not 0 <= m < spec.n_models:
            raise checks.InputError(
                f"JointSAE.slice: model index {m} out of range [0, {spec.n_models})"
            )
        b_enc = self.params["b_enc"][0 if cfg.shared_code else m]
        threshold = np.zeros((cfg.d_sae,), np.float32)
        if cfg.activation == "batchtopk":
            # Inference selects on score = pre * weight_i > thr, i.e. pre > thr / weight_i.
            weights = np.asarray(selection_weights(self.params, cfg), np.float64)
            threshold = (float(self.threshold[0]) / np.maximum(weights, 1e-12)).astype(np.float32)
        meta = {
            "joint_format": FORMAT,
            "joint_design": cfg.design,
            "joint_model_index": m,
            "joint_model_name": spec.model_names[m],
            "joint_n_models": spec.n_models,
            "joint_training": json.dumps(cfg.to_dict(), sort_keys=True),
        }
        config = sae_lib.SAEConfig(
            d_in=spec.d_ins[m],
            d_sae=cfg.d_sae,
            activation="relu" if cfg.activation == "relu" else cfg.activation,
            k=0 if cfg.activation == "relu" else cfg.k,
            apply_b_dec_to_input=not cfg.shared_code,
            input_scale=float(spec.input_scales[m]),
        ).with_metadata(**meta)
        return sae_lib.from_arrays(
            config,
            self.params["W_enc"][m],
            b_enc,
            self.params["W_dec"][m],
            self.params["b_dec"][m],
            threshold,
            name=f"joint slice {m} ({spec.model_names[m]})",
        )


# -- forward pieces (pure functions of params, shared by training and inference) -------------


def selection_weights(params: dict, cfg: JointConfig) -> jax.Array:
    """Per-latent weight of the TopK / BatchTopK selection: crosscoders select on
    ``f_i * sum_m ||W_dec,i^m||``; the other designs on ``f_i``."""
    if cfg.design != "crosscoder":
        return jnp.ones((cfg.d_sae,), jnp.float32)
    return jax.lax.stop_gradient(sum(jnp.linalg.norm(w, axis=-1) for w in params["W_dec"]))


def kth_largest(score: jax.Array, k: int) -> jax.Array:
    """``[..., 1]``: each row's k-th largest distinct value, by k masked row maxima.

    Why not `jax.lax.top_k`: XLA's SPMD partitioner all-gathers a row-sharded batch for
    top_k, and on the simulated multi-device CPU runtime that all-gather intermittently
    deadlocked (rendezvous timeout, abort) in long runs; row maxima partition locally.
    Equal to top_k's k-th value when the row's k largest values are distinct; with ties
    above it, ``score >= kth`` keeps the tied entries and more than k (measure zero for
    continuous scores; zero scores are dropped by the relu anyway).
    """
    s = jax.lax.stop_gradient(score)

    def body(_, prev):
        return jnp.max(jnp.where(s < prev, s, -jnp.inf), axis=-1, keepdims=True)

    return jax.lax.fori_loop(0, k, body, jnp.full(s.shape[:-1] + (1,), jnp.inf, s.dtype))


def activate(
    pre: jax.Array,
    cfg: JointConfig,
    weights: jax.Array,
    training: bool,
    threshold: jax.Array | None = None,
) -> jax.Array:
    """Sparse code from pre-activations: relu, TopK or BatchTopK on ``relu(pre) * weights``."""
    f = jax.nn.relu(pre)
    if cfg.activation == "relu":
        return f
    score = f * weights
    if cfg.activation == "topk":
        return jnp.where(score >= kth_largest(score, cfg.k), f, 0.0)
    if training:
        keep = sae_lib.batch_topk(score, cfg.k) > 0
    else:
        keep = score > (0.0 if threshold is None else threshold[0])
    return jnp.where(keep, f, 0.0)


def source_pre(params: dict, source: int, xn: jax.Array) -> jax.Array:
    """Universal / aligned pre-activations of model ``source``."""
    return (xn - params["b_dec"][source]) @ params["W_enc"][source] + params["b_enc"][source]


def crosscoder_pre(params: dict, xns: Sequence) -> jax.Array:
    """The crosscoder's pre-activations ``sum_m x^m W_enc^m + b_enc``."""
    return params["b_enc"][0] + sum(x @ w for x, w in zip(xns, params["W_enc"]))


def encode_from(
    params: dict,
    cfg: JointConfig,
    source: int,
    xn: jax.Array,
    threshold: jax.Array | None = None,
    training: bool = False,
) -> jax.Array:
    """Code of universal / aligned model ``source`` from its normalised activations."""
    return activate(
        source_pre(params, source, xn), cfg, selection_weights(params, cfg), training, threshold
    )


def crosscoder_encode(
    params: dict,
    cfg: JointConfig,
    xns: Sequence,
    threshold: jax.Array | None = None,
    training: bool = False,
) -> jax.Array:
    """``act(sum_m x^m W_enc^m + b_enc)`` (Lindsey et al. 2024)."""
    return activate(
        crosscoder_pre(params, xns), cfg, selection_weights(params, cfg), training, threshold
    )


def _recon(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((x - x_hat) ** 2, axis=-1))


def _fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    centred = x - jnp.mean(x, axis=0)
    return jnp.sum((x - x_hat) ** 2) / jnp.maximum(jnp.sum(centred**2), 1e-30)


def aux_k_loss(
    pre: jax.Array,
    dead: jax.Array,
    k_aux: int,
    resids: Sequence,
    decs: Sequence,
    unit_norm: bool = True,
) -> jax.Array:
    """Gao et al. (2024)'s AuxK on a joint code.

    Among the ``dead`` latents, each row's ``k_aux`` largest pre-activations (chosen without
    gradient) give ``a = relu(pre)`` on those latents; ``e_hat^m = a W_dec^m`` (no ``b_dec``)
    reconstructs each target's residual ``resids[m]`` (already stop-gradient), and the loss is
    ``min(n_dead / k_aux, 1) * sum_m mean_rows ||e_hat^m - resid^m||^2`` (SAELens' scale, as
    `models.sae_train`). The sum over targets mirrors the joint reconstruction loss. With
    free decoder norms (``unit_norm=False``: crosscoder, universal) each latent's summed
    decoder norm gets no AuxK gradient (`_scale_frozen`).
    """
    masked = jnp.where(dead, jax.lax.stop_gradient(pre), -jnp.inf)
    gate = dead & (masked >= kth_largest(masked, k_aux))
    a = jnp.where(gate, jax.nn.relu(pre), 0.0)
    scale = jnp.minimum(jnp.sum(dead).astype(pre.dtype) / k_aux, 1.0)
    if not unit_norm:
        decs = _scale_frozen(decs)
    return scale * sum(_recon(r, a @ w) for r, w in zip(resids, decs))


def _scale_frozen(decs: Sequence) -> list:
    """The decoders with each latent's summed norm ``n_i = sum_m ||W_dec,i^m||`` held
    constant in the gradient (same forward value): ``W_dec^m / n * stop_gradient(n)``.

    Why: with free decoder norms (crosscoder, universal) plain AuxK shrinks a dead latent's
    decoder (k_aux latents share a small residual), and the crosscoder's TopK selects on
    ``f_i * n_i``, so the latent stayed dead (measured on the toy: 4 % dead without AuxK,
    12-15 % with). Holding ``n_i`` fixed lets AuxK move the directions, the per-model norm
    split and the encoder, i.e. what makes the latent fire, as unit-norm SAEs do."""
    n = sum(jnp.linalg.norm(w, axis=-1) for w in decs)
    factor = (jax.lax.stop_gradient(n) / jnp.maximum(n, 1e-12))[:, None]
    return [w * factor for w in decs]


def _fired(z: jax.Array) -> jax.Array:
    return jnp.sum(z > 0, axis=0, dtype=jnp.int32)


def joint_loss(
    params: dict,
    xns: Sequence,
    cfg: JointConfig,
    rng: jax.Array,
    l1_scale: jax.Array | float = 1.0,
    *,
    hyper: dict | None = None,
    dead: jax.Array | None = None,
    any_dead: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """The design's loss on normalised, row-aligned batches ``xns`` (one per model).

    Returns ``(loss, metrics)`` with per-model ``fvu/m``, ``recon/m``, the code's ``l0``,
    ``aux_loss`` and ``_fired`` (``[C, F]`` int32: rows in which each latent fired, the
    input of the dead-latent counters; ``C`` = M codes for ``aligned``, 1 otherwise).
    ``l1_scale`` multiplies relu's L1 coefficient (the warm-up ramp). ``hyper``: traced
    per-member coefficients ``{"l1", "align", "aux"}`` replacing the config's (sweeps).
    ``dead``: ``[C, F]`` dead-latent mask; with it (topk / batchtopk, ``k_aux > 0``) the loss
    adds ``aux * AuxK`` per code (`aux_k_loss`); ``any_dead`` (default ``any(dead)``) skips
    the AuxK computation while nothing is dead.
    """
    M = len(xns)
    dec = params["W_dec"]
    bd = params["b_dec"]
    h = (
        {"l1": cfg.l1_coeff, "align": cfg.align_coeff, "aux": cfg.aux_coeff}
        if hyper is None
        else hyper
    )
    k_aux = cfg.resolved_k_aux([x.shape[-1] for x in xns]) if dead is not None else 0
    dtype = xns[0].dtype
    weights = selection_weights(params, cfg)

    def aux_term(pre, dead_row, resids, decs):
        if not k_aux:
            return jnp.zeros((), dtype)
        pred = jnp.any(dead) if any_dead is None else any_dead
        return jax.lax.cond(
            pred,
            lambda: aux_k_loss(pre, dead_row, k_aux, resids, decs, cfg.unit_norm),
            lambda: jnp.zeros((), dtype),
        )

    metrics = {}
    if cfg.design == "crosscoder":
        pre = crosscoder_pre(params, xns)
        z = activate(pre, cfg, weights, True)
        outs = [z @ dec[m] + bd[m] for m in range(M)]
        recons = [_recon(x, o) for x, o in zip(xns, outs)]
        loss = sum(recons)
        fvus = [_fvu(x, o) for x, o in zip(xns, outs)]
        l0 = jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32))
        aux = aux_term(
            pre,
            None if dead is None else dead[0],
            [jax.lax.stop_gradient(x - o) for x, o in zip(xns, outs)],
            dec,
        )
        fired = _fired(z)[None]
        codes = [z]
    elif cfg.design == "universal":

        def from_source(s):
            pre = source_pre(params, s, xns[s])
            z = activate(pre, cfg, weights, True)
            outs = [z @ dec[n] + bd[n] for n in range(M)]
            aux_s = aux_term(
                pre,
                None if dead is None else dead[0],
                [jax.lax.stop_gradient(x - o) for x, o in zip(xns, outs)],
                dec,
            )
            return (
                sum(_recon(x, o) for x, o in zip(xns, outs)),
                jnp.stack([_fvu(x, o) for x, o in zip(xns, outs)]),
                z,
                aux_s,
                _fired(z),
            )

        if cfg.source == "sample":
            s = jax.random.randint(rng, (), 0, M)
            loss, fvu_vec, z, aux, fired1 = jax.lax.switch(
                s, [lambda i=i: from_source(i) for i in range(M)]
            )
        else:
            per = [from_source(i) for i in range(M)]
            loss = sum(p[0] for p in per) / M
            fvu_vec = sum(p[1] for p in per) / M
            z = per[0][2]
            aux = sum(p[3] for p in per) / M
            fired1 = sum(p[4] for p in per)
        fired = fired1[None]
        recons = None
        fvus = [fvu_vec[m] for m in range(M)]
        l0 = jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32))
        codes = [z]
    else:  # aligned: M ordinary SAEs, each with its own dead latents
        pres = [source_pre(params, m, x) for m, x in enumerate(xns)]
        codes = [activate(pre, cfg, weights, True) for pre in pres]
        outs = [c @ dec[m] + bd[m] for m, c in enumerate(codes)]
        recons = [_recon(x, o) for x, o in zip(xns, outs)]
        fvus = [_fvu(x, o) for x, o in zip(xns, outs)]
        loss = sum(recons)
        pairs = [(a, b) for a in range(M) for b in range(a + 1, M)]
        align = sum(_recon(codes[a], codes[b]) for a, b in pairs) / len(pairs)
        loss = loss + h["align"] * align
        metrics["align"] = align
        aux = sum(
            aux_term(
                pres[m],
                None if dead is None else dead[m],
                [jax.lax.stop_gradient(xns[m] - outs[m])],
                [dec[m]],
            )
            for m in range(M)
        )
        fired = jnp.stack([_fired(c) for c in codes])
        l0 = jnp.mean(
            jnp.stack([jnp.mean(jnp.sum(c > 0, axis=-1).astype(jnp.float32)) for c in codes])
        )
    if cfg.activation == "relu":
        norms = sum(jnp.linalg.norm(w, axis=-1) for w in dec)
        sparsity = h["l1"] * l1_scale * jnp.mean(jnp.sum(codes[0] * norms, axis=-1))
        loss = loss + sparsity
        metrics["sparsity_loss"] = sparsity
    if k_aux:
        loss = loss + h["aux"] * aux
    metrics["aux_loss"] = aux
    for m in range(M):
        metrics[f"fvu/m{m}"] = fvus[m]
        if recons is not None:
            metrics[f"recon/m{m}"] = recons[m]
    metrics["l0"] = l0
    metrics["_fired"] = fired
    return loss, metrics


# -- initialisation and training ----------------------------------------------------------------


def init_params(cfg: JointConfig, d_ins: Sequence[int], b_decs: Sequence[np.ndarray]) -> dict:
    """Random decoder rows (norm 0.1 for relu, 1 otherwise; for the joint designs divided
    evenly so that the summed norm starts at that value), ``W_enc^m = W_dec^m.T``, zero
    ``b_enc``, ``b_dec^m`` from the data."""
    cfg.validate()
    M = len(d_ins)
    base = 0.1 if cfg.activation == "relu" else 1.0
    per_model = base if cfg.design == "aligned" else base / M
    W_enc, W_dec = [], []
    for m, d in enumerate(d_ins):
        key = jax.random.PRNGKey(cfg.seed + 1000 * m)
        w = jax.random.normal(key, (cfg.d_sae, d), jnp.float32)
        w = w * (per_model / jnp.linalg.norm(w, axis=1, keepdims=True))
        W_dec.append(w)
        # Encoders start as the transpose scaled to unit-norm columns: the code's scale does
        # not depend on the decoder's initial norm.
        W_enc.append(w.T / per_model)
    n_benc = 1 if cfg.shared_code else M
    return {
        "W_enc": W_enc,
        "b_enc": [jnp.zeros((cfg.d_sae,), jnp.float32)] * n_benc,
        "W_dec": W_dec,
        "b_dec": [jnp.asarray(b, jnp.float32) for b in b_decs],
    }


def check_aligned(xs: Sequence, name: str = "joint activations", min_rows: int = 2) -> list:
    """Row-aligned float matrices for >= 2 models (one-line errors otherwise)."""
    if not isinstance(xs, (list, tuple)) or len(xs) < 2:
        raise checks.InputError(
            f"{name}: expected a list of >= 2 models' activations, got "
            f"{type(xs).__name__} of length "
            f"{len(xs) if hasattr(xs, '__len__') else '?'}"
        )
    out = []
    for m, x in enumerate(xs):
        arr = checks.as_float_matrix(f"{name}[{m}]", x, min_rows=min_rows)
        checks.check_finite(f"{name}[{m}]", arr)
        if m:
            checks.check_rows_match(f"{name}[0]", out[0], f"{name}[{m}]", arr)
        out.append(arr)
    return out


def _project_and_normalise(cfg: JointConfig):
    if not cfg.unit_norm:
        return None, None

    def grad_transform(grads, params):
        grads = dict(grads)
        grads["W_dec"] = [
            sae_train.project_out_parallel(g, w) for g, w in zip(grads["W_dec"], params["W_dec"])
        ]
        return grads

    def post_update(params):
        params = dict(params)
        params["W_dec"] = [sae_train.normalise_rows(w) for w in params["W_dec"]]
        return params

    return grad_transform, post_update


def calibrate_threshold(
    params: dict, cfg: JointConfig, xns_batches: Iterable[Sequence[jax.Array]]
) -> np.ndarray:
    """BatchTopK's inference threshold: the mean over batches of the smallest selected
    score (dictionary_learning's rule, computed after training). ``[1]`` float32."""
    mins = []
    w = selection_weights(params, cfg)
    for xns in xns_batches:
        if cfg.design == "crosscoder":
            pres = [params["b_enc"][0] + sum(x @ we for x, we in zip(xns, params["W_enc"]))]
        else:
            pres = [
                (x - params["b_dec"][m]) @ params["W_enc"][m] + params["b_enc"][m]
                for m, x in enumerate(xns)
            ]
        for pre in pres:
            score = jax.nn.relu(pre) * w
            sel = sae_lib.batch_topk(score, cfg.k)
            pos = np.asarray(sel)[np.asarray(sel) > 0]
            if pos.size:
                mins.append(float(pos.min()))
    return np.asarray([np.mean(mins) if mins else 0.0], np.float32)


def _scale_by_member(factors: jax.Array) -> optax.GradientTransformation:
    """Multiplies each leaf's member ``i`` (leading axis) by ``factors[i]``: per-member
    learning rates of a stacked sweep (``scale_by_adam`` then this is ``optax.adam(lr_i)``)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(
            lambda u: u * factors.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates
        ), state

    return optax.GradientTransformation(init, update)


def group_joint_configs(configs: Sequence[JointConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped by `JointConfig.group_key` (first-seen order)."""
    groups: dict[JointConfig, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(cfg.group_key(), []).append(i)
    return list(groups.values())


def group_dir_name(index: int, group: Sequence[JointConfig]) -> str:
    base = group[0]
    return f"g{index}_{base.design}_{base.activation}_F{base.d_sae}"


class _WithRamp:
    """A stream plus the relu L1 ramp factor of the step each batch serves (a per-row column,
    sharded like the rows); resumable because the factor follows the stream position."""

    def __init__(self, stream: streaming.ChunkStream, batch_size: int, warm: float):
        self.stream, self.batch_size, self.warm = stream, batch_size, warm

    def seek(self, position):
        self.stream.seek(position)

    @property
    def position(self):
        return self.stream.position

    def __iter__(self):
        return self

    def __next__(self):
        chunk = next(self.stream)
        step = self.stream.position // self.batch_size - 1
        ramp = np.full((self.batch_size,), min(1.0, (step + 1) / self.warm), np.float32)
        return dataclasses.replace(chunk, arrays=tuple(chunk.arrays) + (ramp,))


def _sweep_loss_and_stats(
    group: Sequence[JointConfig], scales: tuple, d_ins: tuple, batch_size: int, sweep_axis: str
):
    """``loss_fn`` and ``stats_update`` of one stacked sweep program (`engine.train`).

    Every member sees the same batch; member ``i``'s randomness is
    ``fold_in(fold_in(rng, step), seed_i)``, so a member trained alone (a program of one)
    draws the same keys. ``lax.map`` / ``vmap`` over the members, or no axis for one.
    """
    base = group[0]
    n, M = len(group), len(d_ins)
    hyper = {
        "l1": jnp.asarray([c.l1_coeff for c in group], jnp.float32),
        "align": jnp.asarray([c.align_coeff for c in group], jnp.float32),
        "aux": jnp.asarray([c.aux_coeff for c in group], jnp.float32),
        "seed": jnp.asarray([c.seed for c in group], jnp.uint32),
    }
    use_aux = base.resolved_k_aux(d_ins) > 0

    def loss_fn(full, batch, key):
        acts = batch[:M]
        ramp = jnp.mean(batch[M]) if base.activation == "relu" else 1.0
        xns = [b.astype(jnp.float32) * s for b, s in zip(acts, scales)]
        since = full["stats"]["since_fired"]
        any_dead = jnp.any(since >= base.dead_tokens) if use_aux else None

        def member(args):
            p, h, since_i = args
            return joint_loss(
                p,
                xns,
                base,
                jax.random.fold_in(key, h["seed"]),
                ramp,
                hyper=h,
                dead=(since_i >= base.dead_tokens) if use_aux else None,
                any_dead=any_dead,
            )

        args = (full["params"], hyper, since)
        if n == 1:
            loss, metrics = member(jax.tree.map(lambda a: a[0], args))
            metrics["_fired"] = metrics["_fired"][None]
            return loss, metrics
        losses, metrics = (
            jax.vmap(member) if sweep_axis == "vmap" else lambda a: jax.lax.map(member, a)
        )(args)
        metrics["member_loss"] = losses
        return jnp.sum(losses), metrics

    def stats_update(stats, metrics):
        metrics = dict(metrics)
        fired = metrics.pop("_fired")
        since = jnp.where(fired > 0, 0, jnp.minimum(stats["since_fired"] + batch_size, _NEVER))
        dead = (since >= base.dead_tokens).astype(jnp.float32)
        frac = jnp.mean(dead.reshape(n, -1), axis=-1)
        metrics["dead_frac"] = frac[0] if n == 1 else frac
        return {"since_fired": since}, metrics

    return loss_fn, stats_update


def _train_group(
    xs: list,
    group: Sequence[JointConfig],
    *,
    scales: tuple,
    b_decs: list,
    names: tuple,
    steps: int,
    batch_size: int,
    mesh,
    gdir: str | None,
    data_seed: int,
    log_every: int,
    checkpoint_every: int,
    progress: bool,
) -> list[JointSAE]:
    """One program: the group's members stacked on a leading axis, one jitted step."""
    base = group[0]
    d_ins = tuple(int(x.shape[1]) for x in xs)
    n = len(group)
    sweep_axis = base.sweep_axis
    if sweep_axis == "auto":
        platform = np.asarray(mesh.devices).flat[0].platform
        sweep_axis = "map" if platform == "cpu" else "vmap"
    per = [init_params(c, d_ins, b_decs) for c in group]
    params = jax.tree.map(lambda *a: jnp.stack(a), *per)
    # optax.adam(lr) is scale_by_adam then scale(-lr): elementwise, so a stacked member's
    # moments are exactly those of a member trained alone.
    tx = optax.chain(
        optax.scale_by_adam(), _scale_by_member(-jnp.asarray([c.lr for c in group], jnp.float32))
    )
    n_codes = len(d_ins) if base.design == "aligned" else 1
    stats = {"since_fired": jnp.zeros((n, n_codes, base.d_sae), jnp.int32)}
    loss_fn, stats_update = _sweep_loss_and_stats(group, scales, d_ins, batch_size, sweep_axis)
    grad_transform, post_update = _project_and_normalise(base)
    step_fn = train_lib.make_train_step(
        loss_fn,
        tx,
        mesh,
        grad_transform=grad_transform,
        post_update=post_update,
        stats_update=stats_update,
    )
    state = train_lib.create_train_state(params, tx, jax.random.PRNGKey(0), stats=stats)
    stream = streaming.ChunkStream(
        tuple(xs),
        batch_size,
        repeat=True,
        shuffle_seed=data_seed,
        check_finite=False,
        name="train_joint xs",
    )
    data = stream
    if base.activation == "relu":
        data = _WithRamp(stream, batch_size, max(1.0, base.l1_warmup_frac * steps))
    if gdir is not None:
        os.makedirs(gdir, exist_ok=True)
        metrics_io.write_json(
            os.path.join(gdir, "joint_run.json"),
            {
                "configs": [c.to_dict() for c in group],
                "labels": [c.label() for c in group],
                "d_ins": list(d_ins),
                "input_scales": list(scales),
                "model_names": list(names),
                "steps": steps,
                "batch_size": batch_size,
                "data_seed": data_seed,
                "sweep_axis": sweep_axis,
            },
        )
    loop = train_lib.LoopConfig(
        num_steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, progress=progress
    )
    state = train_lib.train(state, step_fn, data, loop, workdir=gdir, mesh=mesh)
    host = jax.device_get(state.params)
    out = []
    for i, cfg in enumerate(group):
        p = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), host["params"])
        threshold = np.zeros((1,), np.float32)
        if cfg.activation == "batchtopk":
            idx = np.random.default_rng(data_seed + 1).permutation(xs[0].shape[0])
            batches = [
                [
                    jnp.asarray(x[idx[lo : lo + batch_size]], jnp.float32) * s
                    for x, s in zip(xs, scales)
                ]
                for lo in range(0, min(len(idx), 16 * batch_size) - batch_size + 1, batch_size)
            ]
            threshold = calibrate_threshold(p, cfg, batches)
        out.append(
            JointSAE(
                params=p,
                threshold=jnp.asarray(threshold),
                spec=JointSpec(config=cfg, d_ins=d_ins, input_scales=scales, model_names=names),
            )
        )
    return out


def _prepare(xs, configs, steps: int, batch_size: int, mesh, model_names, data_seed: int):
    """Checked inputs, mesh, model names, input scales and ``b_dec`` inits (from a sample
    drawn with ``data_seed``: the same for every program of a sweep)."""
    xs = check_aligned(xs, "train_joint xs")
    for cfg in configs:
        cfg.validate()
    checks.check_positive_int("train_joint steps", steps)
    checks.check_positive_int("train_joint batch_size", batch_size)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    mesh_lib.check_divisible(mesh, batch_size, "train_joint batch_size")
    names = tuple(model_names or [f"model{m}" for m in range(len(xs))])
    if len(names) != len(xs) or len(set(names)) != len(names):
        raise checks.InputError(
            f"train_joint model_names: need {len(xs)} distinct names, got {list(names)}"
        )
    rng = np.random.default_rng(data_seed)
    sample_rows = np.sort(rng.permutation(xs[0].shape[0])[:8192])
    scales = tuple(sae_lib.expected_norm_scale(x[sample_rows]) for x in xs)
    b_decs = [(x[sample_rows].astype(np.float64) * s).mean(axis=0) for x, s in zip(xs, scales)]
    return xs, mesh, names, scales, b_decs


def train_joint_sweep(
    xs: Sequence[np.ndarray],
    configs: Sequence[JointConfig],
    *,
    steps: int,
    batch_size: int,
    mesh: Mesh | None = None,
    workdir: str | None = None,
    data_seed: int = 0,
    model_names: Sequence[str] | None = None,
    log_every: int = 100,
    checkpoint_every: int = 500,
    progress: bool = False,
    _single_dir: bool = False,
) -> list[JointSAE]:
    """Trains one joint model per config, batched: configs that differ only in `TUNABLE`
    fields (seeds, coefficients, lr) run as ONE program whose step maps over the stacked
    members (``JointConfig.sweep_axis``), every member seeing the same batches (order from
    ``data_seed``), as `models.sae_train.train_saes` does for the SAE family; other
    differences (design, width, k...) are separate programs, run one after another. Each
    member equals the same config trained alone with the same ``data_seed``.

    With ``workdir``: program ``g`` checkpoints under ``workdir/g<g>_<design>_<act>_F<F>/``
    (metrics.jsonl, orbax checkpoints; a rerun resumes exactly) and member ``i`` is saved
    natively under ``workdir/<label>/joint`` (`save_joint`; labels made unique as
    `models.sae_train.unique_labels`). Returns the models aligned with ``configs``.
    ``_single_dir`` is `train_joint`'s layout: one program checkpointed under ``workdir``
    itself and its one member saved under ``workdir/joint``.
    """
    if (
        isinstance(configs, JointConfig)
        or not configs
        or not all(isinstance(c, JointConfig) for c in configs)
    ):
        raise checks.InputError(
            "train_joint_sweep configs: expected a non-empty list of JointConfig"
        )
    xs, mesh, names, scales, b_decs = _prepare(
        xs, configs, steps, batch_size, mesh, model_names, data_seed
    )
    result: list[JointSAE | None] = [None] * len(configs)
    groups = group_joint_configs(configs)
    labels = sae_train.unique_labels(configs)
    root = None if workdir is None else os.path.abspath(workdir)
    for g, members in enumerate(groups):
        group = [configs[i] for i in members]
        gdir = root if root is None or _single_dir else os.path.join(root, group_dir_name(g, group))
        trained = _train_group(
            xs,
            group,
            scales=scales,
            b_decs=b_decs,
            names=names,
            steps=steps,
            batch_size=batch_size,
            mesh=mesh,
            gdir=gdir,
            data_seed=data_seed,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        for i, joint in zip(members, trained):
            result[i] = joint
            if root is not None:
                save_joint(os.path.join(root, "" if _single_dir else labels[i], "joint"), joint)
    return result  # type: ignore[return-value]


def train_joint(
    xs: Sequence[np.ndarray],
    cfg: JointConfig,
    *,
    steps: int,
    batch_size: int,
    mesh: Mesh | None = None,
    workdir: str | None = None,
    data_seed: int = 0,
    model_names: Sequence[str] | None = None,
    log_every: int = 100,
    checkpoint_every: int = 500,
    progress: bool = False,
) -> JointSAE:
    """Trains one joint model on row-aligned activations ``xs`` (one ``[rows, d_m]`` each):
    a sweep program of one member (`train_joint_sweep`).

    Runs `engine.train.train` (data-parallel over the mesh's ``data`` axis; with ``workdir``
    it writes ``metrics.jsonl`` and orbax checkpoints there and a rerun resumes exactly) and,
    with ``workdir``, saves the result natively under ``workdir/joint`` (`save_joint`).
    """
    if not isinstance(cfg, JointConfig):
        raise checks.InputError(
            f"train_joint cfg: expected a JointConfig, got {type(cfg).__name__}"
        )
    return train_joint_sweep(
        xs,
        [cfg],
        steps=steps,
        batch_size=batch_size,
        mesh=mesh,
        workdir=workdir,
        data_seed=data_seed,
        model_names=model_names,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        progress=progress,
        _single_dir=True,
    )[0]


# -- native format -------------------------------------------------------------------------------


def _slice_dir(m: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{m}_{safe}"


def save_joint(path: str, joint: JointSAE) -> str:
    """Saves ``joint`` under ``path`` (see the module docstring); returns the absolute path."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(os.path.join(path, MODELS_DIR))
    spec, cfg = joint.spec, joint.spec.config
    models = []
    for m in range(spec.n_models):
        sub = _slice_dir(m, spec.model_names[m])
        sae_io_native.save_sae(os.path.join(path, MODELS_DIR, sub), joint.slice(m))
        models.append(
            {
                "index": m,
                "name": spec.model_names[m],
                "d_in": spec.d_ins[m],
                "input_scale": float(spec.input_scales[m]),
                "directory": f"{MODELS_DIR}/{sub}",
                "parts": {
                    "W_enc": f"encoder block of model {m}"
                    if cfg.shared_code
                    else f"encoder of model {m}",
                    "b_enc": "shared crosscoder encoder bias (copied into every slice)"
                    if cfg.shared_code
                    else f"encoder bias of model {m}",
                    "W_dec": f"decoder of model {m}",
                    "b_dec": f"decoder bias of model {m}",
                    "threshold": "batchtopk inference threshold / selection weight"
                    if cfg.activation == "batchtopk"
                    else "unused (zeros)",
                },
            }
        )
    # Written last: a directory without it is an interrupted save.
    metrics_io.write_json(
        os.path.join(path, CONFIG_FILE),
        {
            "format": FORMAT,
            "version": VERSION,
            "design": cfg.design,
            "config": cfg.to_dict(),
            "threshold": float(np.asarray(joint.threshold)[0]),
            "models": models,
            "slice_semantics": (
                "crosscoder slice m: decoder m + encoder block m with the shared "
                "b_enc; decode is exact, encode is a single-model approximation "
                "(the crosscoder's code depends on all models)"
            )
            if cfg.shared_code
            else "slice m: encoder m + decoder m; encode and decode exact",
        },
    )
    return path


def load_joint(path: str) -> JointSAE:
    """Loads a joint model saved by `save_joint` (one-line `InputError` on bad files)."""
    path = os.path.abspath(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise checks.InputError(
            f"load_joint: {path} has no {CONFIG_FILE} (not a joint SAE "
            "directory, or an interrupted save)"
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise checks.InputError(f"load_joint: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise checks.InputError(
            f"load_joint: {cfg_path} has format "
            f"{doc.get('format') if isinstance(doc, dict) else None!r}; "
            f"expected {FORMAT!r}"
        )
    if int(doc.get("version", -1)) > VERSION:
        raise checks.InputError(
            f"load_joint: {cfg_path} has version {doc.get('version')}; "
            f"this code reads up to {VERSION}"
        )
    try:
        cfg = JointConfig(**doc["config"]).validate()
        models = sorted(doc["models"], key=lambda e: int(e["index"]))
    except (KeyError, TypeError) as e:
        raise checks.InputError(f"load_joint: {cfg_path} has a bad config ({e})") from None
    saes = [sae_io_native.load_sae(os.path.join(path, e["directory"])) for e in models]
    for e, sae in zip(models, saes):
        if sae.config.d_sae != cfg.d_sae or sae.config.d_in != int(e["d_in"]):
            raise checks.InputError(
                f"load_joint: slice {e['directory']} has shape "
                f"({sae.config.d_in}, {sae.config.d_sae}), config expects "
                f"({e['d_in']}, {cfg.d_sae})"
            )
    if cfg.shared_code:
        for e, sae in zip(models[1:], saes[1:]):
            if not np.array_equal(np.asarray(sae.b_enc), np.asarray(saes[0].b_enc)):
                raise checks.InputError(
                    f"load_joint: slice {e['directory']} has a different "
                    "shared b_enc than slice 0 (files from different runs)"
                )
    params = {
        "W_enc": [s.W_enc for s in saes],
        "b_enc": [saes[0].b_enc] if cfg.shared_code else [s.b_enc for s in saes],
        "W_dec": [s.W_dec for s in saes],
        "b_dec": [s.b_dec for s in saes],
    }
    spec = JointSpec(
        config=cfg,
        d_ins=tuple(int(e["d_in"]) for e in models),
        input_scales=tuple(float(e["input_scale"]) for e in models),
        model_names=tuple(str(e["name"]) for e in models),
    )
    return JointSAE(
        params=params,
        threshold=jnp.asarray([float(doc.get("threshold", 0.0))], jnp.float32),
        spec=spec,
    )


# -- evaluation ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JointCodes:
    """Codes and reconstructions of a joint model on host rows (normalised space).

    ``codes[m]``: the code used for model m (crosscoder: the one code, the same array for
    every m; universal / aligned: model m's own encoder). ``recons[m]``: model m's
    reconstruction from ``codes[m]``. ``cross_fvu[s][t]``: FVU of model t reconstructed
    from source s's code (universal; the diagonal is the per-model FVU).
    """

    xns: list
    codes: list
    recons: list
    cross_fvu: np.ndarray | None


def run_codes(joint: JointSAE, xs: Sequence[np.ndarray], batch_size: int = 4096) -> JointCodes:
    """Encodes and reconstructs every model's rows (inference semantics)."""
    xs = check_aligned(xs, "run_codes xs", min_rows=1)
    spec, cfg = joint.spec, joint.spec.config
    M = spec.n_models
    if len(xs) != M:
        raise checks.InputError(
            f"run_codes: {len(xs)} models' activations for a joint model of {M}"
        )
    for m, x in enumerate(xs):
        if x.shape[1] != spec.d_ins[m]:
            raise checks.InputError(
                f"run_codes xs[{m}]: width {x.shape[1]}, joint model expects {spec.d_ins[m]}"
            )
    xns = [np.asarray(x, np.float64) * s for x, s in zip(xs, spec.input_scales)]
    codes = [[] for _ in range(M)]
    cross = [[[] for _ in range(M)] for _ in range(M)] if cfg.design == "universal" else None
    for lo in range(0, xs[0].shape[0], batch_size):
        b = [jnp.asarray(x[lo : lo + batch_size], jnp.float32) for x in xns]
        if cfg.shared_code:
            z = np.asarray(joint.encode_joint(b))
            for m in range(M):
                codes[m].append(z)
        else:
            for m in range(M):
                z = joint.encode_from(m, b[m])
                codes[m].append(np.asarray(z))
                if cross is not None:
                    for t in range(M):
                        cross[m][t].append(np.asarray(joint.decode_to(t, z)))
    codes = [np.concatenate(c).astype(np.float64) for c in codes]
    dec = [np.asarray(w, np.float64) for w in joint.params["W_dec"]]
    bdec = [np.asarray(b, np.float64) for b in joint.params["b_dec"]]
    recons = [codes[m] @ dec[m] + bdec[m] for m in range(M)]
    cross_fvu = None
    if cross is not None:
        cross_fvu = np.zeros((M, M))
        for s in range(M):
            for t in range(M):
                cross_fvu[s, t] = fvu(xns[t], np.concatenate(cross[s][t]))
    return JointCodes(xns=xns, codes=codes, recons=recons, cross_fvu=cross_fvu)


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of variance unexplained (float64)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    return float(np.sum((x - x_hat) ** 2) / max(np.sum(centred**2), 1e-300))


def relative_norms(joint: JointSAE) -> np.ndarray:
    """``[M, F]``: ``r_i^m = ||d_i^m|| / sum_n ||d_i^n||`` (Lindsey et al. 2024). For two
    models the standard statistic ``r_i = ||d_i^B|| / (||d_i^A|| + ||d_i^B||)`` is row 1:
    shared latents near 0.5, exclusive ones near 0 (only A) or 1 (only B)."""
    norms = joint.decoder_norms()
    return norms / np.maximum(norms.sum(axis=0, keepdims=True), 1e-300)


@dataclasses.dataclass(frozen=True)
class LatentScaling:
    """Minder et al. 2025's latent scaling, generalised to models of different widths.

    For latent j, owner model o (largest decoder norm) and another model n:
    ``beta_error[n, j] = ||w||`` of the least-squares fit (with intercept) of model n's
    error with j's own contribution added back, ``x^n - x_hat^n + f_j d_j^n ~ f_j w + c``;
    ``beta_recon[n, j]``: the same for model n's reconstruction without j,
    ``x_hat^n - f_j d_j^n``; ``beta_own[j]``: the fit of the owner's full reconstruction.
    ``nu_error = beta_error / beta_own`` and ``nu_recon = beta_recon / beta_own`` (rows: the
    models; the owner's own row is set to 1). A latent exclusive to o by decoder norms with a
    large ``nu`` in another model explains that model too: its exclusivity is a sparsity
    artifact (Minder et al.: "complete shrinkage" for nu_error, "latent decoupling" for
    nu_recon). Latents that never fire get NaN.
    """

    owner: np.ndarray
    beta_own: np.ndarray
    nu_error: np.ndarray
    nu_recon: np.ndarray


def latent_scaling(
    codes: Sequence[np.ndarray],
    xns: Sequence[np.ndarray],
    recons: Sequence[np.ndarray],
    W_decs: Sequence[np.ndarray],
) -> LatentScaling:
    """Latent scaling (see `LatentScaling`) from host arrays, float64.

    Args:
      codes: per model the ``[N, F]`` code used for it (crosscoder: the same array).
      xns / recons: per model ``[N, d_m]`` normalised activations and reconstructions.
      W_decs: per model ``[F, d_m]`` decoders.
    """
    M = len(xns)
    dec = [np.asarray(w, np.float64) for w in W_decs]
    norms = np.stack([np.linalg.norm(w, axis=1) for w in dec])
    owner = norms.argmax(axis=0)
    F = dec[0].shape[0]

    def fit(f: np.ndarray, target: np.ndarray, own_dec: np.ndarray, sign: float) -> np.ndarray:
        # target_j = target + sign * f_j d_j (per latent j); centred least squares, all j.
        fc = f - f.mean(axis=0)
        var = np.sum(fc**2, axis=0)
        cov = fc.T @ (target - target.mean(axis=0))  # [F, d]
        # cov(f_j, f_j d_j) = var_j d_j.
        w = cov / np.maximum(var, 1e-300)[:, None] + sign * own_dec
        out = np.linalg.norm(w, axis=1)
        return np.where(var > 0, out, np.nan)

    beta_err = np.zeros((M, F))
    beta_rec = np.zeros((M, F))
    beta_full = np.zeros((M, F))
    for n in range(M):
        f = np.asarray(codes[n], np.float64)
        x, xh = np.asarray(xns[n], np.float64), np.asarray(recons[n], np.float64)
        beta_err[n] = fit(f, x - xh, dec[n], +1.0)
        beta_rec[n] = fit(f, xh, dec[n], -1.0)
        beta_full[n] = fit(f, xh, dec[n], 0.0)
    cols = np.arange(F)
    beta_own = beta_full[owner, cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        nu_err = beta_err / beta_own
        nu_rec = beta_rec / beta_own
    nu_err[owner, cols] = np.where(np.isfinite(beta_own), 1.0, np.nan)
    nu_rec[owner, cols] = np.where(np.isfinite(beta_own), 1.0, np.nan)
    return LatentScaling(owner=owner, beta_own=beta_own, nu_error=nu_err, nu_recon=nu_rec)

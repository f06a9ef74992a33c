"""Toy models of superposition (Elhage et al. 2022), many instances in one jitted program.

The model (docs/references.md, "Toy models of superposition"): for one instance with ``W [m, n]``
(``n`` features squeezed into ``m`` hidden dimensions) and bias ``b [n]``::

    h  = W x                      # hidden activations [m]  (what an SAE would be trained on)
    x' = ReLU(W^T h + b)          # activation="relu"   (the paper's model)
    x' = W^T h + b                # activation="linear" (the baseline without superposition)
    L  = E_x sum_i I_i (x_i - x'_i)^2

Data: feature ``i`` is 0 with probability ``S_i`` (sparsity), else uniform on [0, 1].
Importance ``I`` and sparsity ``S`` are given per feature AND per instance.

Instances: every array carries a leading instance axis (``W [I, m, n]``, ``b [I, n]``,
importance / sparsity ``[I, n]``); the per-instance computation is written for one instance and
`jax.vmap`-ed, and the instance axis is sharded over the mesh ``data`` axis (instances never
interact, so no collective is needed). Each instance owns a seed: its initial ``W`` and every
batch it sees are functions of ``(seed, step)`` only, so training an instance inside a sweep of
1000 gives the same result as training it alone, on any number of devices, and a resumed run
continues bit-identically.

Training is a `jax.lax.scan` of the train step over ``log_every`` steps per jitted call (one
dispatch per log interval instead of per step: small toy models are otherwise dominated by
Python overhead), driven by the engine's one train loop (`engine.train.train` with
``steps_per_call``: its checkpoints, ``metrics.jsonl``, progress bar, exact resume and NaN
guard, with the instance axis split over the mesh). The optimiser is AdamW as in the original
notebook (lr 1e-3,
PyTorch defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01). AdamW is element-wise, so
stacking the instances' parameters in one optimiser state keeps them independent.

Fast data: `jax.random` (threefry, implemented in jnp ops) costs ~10 ns per value on CPU, which
would dominate a 1000-instance step. Each batch instead draws ONE uniform per feature from a
counter-based hash (two rounds of the ``lowbias32`` integer mixer, keyed by 64 bits drawn with
`jax.random` per instance and step): ``u < S`` means "off", and otherwise ``(u - S) / (1 - S)``
is exactly uniform on [0, 1) given "on", so one draw gives both the on/off decision and the
value with the paper's distribution. Tests check its moments, independence and on-rates.

Analysis (`feature_geometry`, float64 numpy on the host): ``W^T W``, feature norms ``||W_i||``,
superposition ``sum_{j != i} (W_i_hat . W_j)^2``, feature dimensionality
``D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2`` and dimensions per feature ``m / ||W||_F^2``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engine import checks
from engine import mesh as mesh_lib
from engine import train as train_lib

ACTIVATIONS = ("relu", "linear")

# ----------------------------------------------------------------------------------------------
# Configuration, parameters, per-instance settings


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Static description shared by every instance of one sweep (hashable).

    Attributes:
      n_features: n, the number of input features.
      n_hidden: m, the hidden width. ``m > n`` is allowed (no pressure to superpose; a
        valid baseline), ``m == n`` too.
      activation: ``"relu"`` (the paper's model) or ``"linear"`` (no ReLU on the output).
      batch_size: samples per instance per step (the paper: 1024).
      lr: AdamW learning rate (the paper: 1e-3).
      weight_decay: AdamW decoupled weight decay (PyTorch's default 0.01, used by the
        original notebook's ``torch.optim.AdamW``).
      b1, b2, eps: AdamW moments (PyTorch defaults).
    """

    n_features: int
    n_hidden: int
    activation: str = "relu"
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        checks.check_positive_int("ToyConfig.n_features", self.n_features)
        checks.check_positive_int("ToyConfig.n_hidden", self.n_hidden)
        checks.check_positive_int("ToyConfig.batch_size", self.batch_size)
        if self.activation not in ACTIVATIONS:
            raise checks.InputError(
                f"ToyConfig.activation: unknown {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        if self.batch_size * self.n_features >= 2**32:
            raise checks.InputError(
                f"ToyConfig: batch_size * n_features = "
                f"{self.batch_size * self.n_features} must be < 2**32 "
                "(32-bit sample counter)"
            )
        for name in ("lr", "b1", "b2", "eps"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise checks.InputError(
                    f"ToyConfig.{name} must be a positive finite number, got {v}"
                )
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise checks.InputError(f"ToyConfig.weight_decay must be >= 0, got {self.weight_decay}")

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with the PyTorch conventions of the original notebook."""
        return optax.adamw(
            self.lr, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay
        )


@flax.struct.dataclass
class ToyParams:
    """Parameters of ``I`` instances: ``W [I, m, n]`` (the paper's ``W [m, n]`` each), ``b [I, n]``.

    Column ``W[k, :, i]`` is the embedding of feature ``i`` in the hidden space of instance
    ``k``.
    """

    W: jax.Array
    b: jax.Array


@flax.struct.dataclass
class ToyInstances:
    """Per-instance settings, row ``k`` for instance ``k``.

    Attributes:
      importance: ``[I, n]`` positive loss weights ``I_i``.
      sparsity: ``[I, n]`` probability ``S_i`` in [0, 1) that feature ``i`` is zero.
      seed: ``[I]`` int32 seed of each instance (initial W and every batch derive from it).
    """

    importance: jax.Array
    sparsity: jax.Array
    seed: jax.Array

    @property
    def n_instances(self) -> int:
        return int(self.importance.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.importance.shape[1])


def _per_instance(name: str, value, n_instances: int | None, n: int) -> np.ndarray:
    """Broadcasts a scalar, ``[n]`` or ``[I, n]`` setting to ``[I, n]`` float64, with checks."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 2:
        raise checks.InputError(
            f"{name}: expected a scalar, [n_features={n}] or "
            f"[n_instances, {n}] array, got shape {arr.shape}"
        )
    if arr.ndim >= 1 and arr.shape[-1] != n:
        raise checks.InputError(
            f"{name}: expected {n} values per instance (one per feature), got shape {arr.shape}"
        )
    if arr.ndim == 2 and n_instances is not None and arr.shape[0] != n_instances:
        raise checks.InputError(
            f"{name}: expected {n_instances} rows (one per instance), got shape {arr.shape}"
        )
    checks.check_finite(name, arr)
    rows = n_instances if n_instances is not None else (arr.shape[0] if arr.ndim == 2 else 1)
    return np.broadcast_to(arr, (rows, n)).copy()


def make_instances(
    n_features: int,
    *,
    sparsity: Any = 0.0,
    importance: Any = 1.0,
    seeds: Sequence[int] | int | None = None,
    n_instances: int | None = None,
) -> ToyInstances:
    """Validated per-instance settings for a sweep.

    Args:
      n_features: n.
      sparsity: S in [0, 1): scalar, ``[n]`` or ``[I, n]``.
      importance: I > 0: scalar, ``[n]`` or ``[I, n]``.
      seeds: one int per instance (or one int: instances get ``seed, seed + 1, ...``).
        Default: ``0 .. I-1``.
      n_instances: I; inferred from the ``[I, n]`` arguments or ``seeds`` when omitted.

    Raises:
      InputError: wrong lengths, NaN/Inf, S outside [0, 1), importance <= 0.
    """
    n = checks.check_positive_int("make_instances n_features", n_features)
    if n_instances is None:
        for v in (sparsity, importance):
            if np.ndim(v) == 2:
                n_instances = int(np.shape(v)[0])
                break
    if n_instances is None and seeds is not None and np.ndim(seeds) == 1:
        n_instances = len(seeds)
    n_instances = (
        1
        if n_instances is None
        else checks.check_positive_int("make_instances n_instances", n_instances)
    )
    s = _per_instance("sparsity", sparsity, n_instances, n)
    imp = _per_instance("importance", importance, n_instances, n)
    if not np.all((s >= 0) & (s < 1)):
        bad = s[~((s >= 0) & (s < 1))][0]
        raise checks.InputError(
            f"sparsity must be in [0, 1) (probability a feature is zero; 1 "
            f"would give all-zero data), got {bad}"
        )
    if not np.all(imp > 0):
        raise checks.InputError(
            f"importance must be > 0 for every feature, got {imp[~(imp > 0)][0]}"
        )
    if seeds is None:
        seed_arr = np.arange(n_instances)
    elif np.ndim(seeds) == 0:
        seed_arr = int(seeds) + np.arange(n_instances)
    else:
        seed_arr = np.asarray(seeds)
        if seed_arr.shape != (n_instances,):
            raise checks.InputError(
                f"seeds: expected {n_instances} seeds (one per instance), "
                f"got shape {seed_arr.shape}"
            )
    if not np.issubdtype(seed_arr.dtype, np.integer):
        raise checks.InputError(f"seeds must be integers, got dtype {seed_arr.dtype}")
    if np.any(seed_arr < 0) or np.any(seed_arr >= 2**31):
        raise checks.InputError("seeds must be in [0, 2**31)")
    return ToyInstances(
        importance=jnp.asarray(imp, jnp.float32),
        sparsity=jnp.asarray(s, jnp.float32),
        seed=jnp.asarray(seed_arr, jnp.int32),
    )


def _take(tree: Any, index: np.ndarray) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


# ----------------------------------------------------------------------------------------------
# Data: one hashed uniform per feature


def _mix32(x: jax.Array) -> jax.Array:
    """``lowbias32`` (C. Wellons, hash-prospector): a bijective 32-bit mixer, bias ~0.17."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform [0, 1) float32 values with 24-bit resolution from a counter-based hash.

    Args:
      key: ``[2]`` uint32 words (fresh per call, e.g. drawn with `jax.random.bits`).
      shape: output shape; ``prod(shape) < 2**32``.

    The counter (flat index) is mixed with the first key word, hashed, mixed with the second
    and hashed again; for a fixed key this is a bijection of the counter (no repeats).
    """
    size = int(np.prod(shape))
    ctr = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = _mix32(_mix32(ctr ^ key[0]) ^ key[1])
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def sample_features(key: jax.Array, batch: int, sparsity: jax.Array) -> jax.Array:
    """Elhage et al. features for ONE instance: ``[batch, n]``, 0 w.p. ``S_i`` else U[0, 1).

    One uniform ``u`` per entry: off when ``u < S``; on, the value ``(u - S) / (1 - S)`` is
    uniform on [0, 1) (conditioning a uniform on ``u >= S``).

    Args:
      key: ``[2]`` uint32 words, see `hashed_uniform`.
      batch: rows.
      sparsity: ``[n]`` float32 S in [0, 1).
    """
    u = hashed_uniform(key, (batch, sparsity.shape[-1]))
    s = sparsity[None, :]
    return jnp.where(u >= s, (u - s) / (1.0 - s), 0.0)


def batch_key(data_key: jax.Array, step: jax.Array) -> jax.Array:
    """The ``[2]`` uint32 hash key of one instance's batch at ``step`` (threefry-derived)."""
    return jax.random.bits(jax.random.fold_in(data_key, step), (2,), jnp.uint32)


def instance_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(init_key, data_key)``, raw uint32 ``[2]`` keys, of one instance from its seed."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, data_key


def sample_batch(instances: ToyInstances, step: int, batch: int) -> jax.Array:
    """The exact batch ``[I, batch, n]`` the instances see at ``step`` (for checks and plots)."""

    def one(seed, s):
        return sample_features(batch_key(instance_keys(seed)[1], step), batch, s)

    return jax.vmap(one)(instances.seed, instances.sparsity)


# ----------------------------------------------------------------------------------------------
# Model, loss, initialisation (single instance; vmapped over the instance axis)


def forward(
    W: jax.Array, b: jax.Array, x: jax.Array, activation: str = "relu"
) -> tuple[jax.Array, jax.Array]:
    """One instance: ``(h [B, m], x' [B, n])`` for ``x [B, n]``, ``W [m, n]``, ``b [n]``."""
    h = x @ W.T
    out = h @ W + b
    if activation == "relu":
        out = jax.nn.relu(out)
    return h, out


def instance_loss(
    params: ToyParams, x: jax.Array, importance: jax.Array, activation: str = "relu"
) -> jax.Array:
    """One instance: ``mean_batch sum_i I_i (x_i - x'_i)^2`` (Elhage et al. eq. for L)."""
    _, out = forward(params.W, params.b, x, activation)
    return jnp.mean(jnp.sum(importance * jnp.square(x - out), axis=-1))


def init_instance(init_key: jax.Array, n_features: int, n_hidden: int) -> ToyParams:
    """Xavier-normal ``W [m, n]`` (std sqrt(2 / (m + n))), zero bias, for ONE instance.

    The fan of ONE instance's matrix is used, so an instance's start does not depend on how
    many instances share the sweep (PyTorch's ``xavier_normal_`` on the notebook's stacked
    ``[I, n, m]`` tensor would mix the instance count into the scale).
    """
    std = np.sqrt(2.0 / (n_features + n_hidden))
    W = std * jax.random.normal(init_key, (n_hidden, n_features), jnp.float32)
    return ToyParams(W=W, b=jnp.zeros((n_features,), jnp.float32))


def init_params(config: ToyConfig, instances: ToyInstances) -> ToyParams:
    """Initial parameters of every instance (each from its own seed)."""
    _check_instances(config, instances)
    return jax.vmap(
        lambda seed: init_instance(instance_keys(seed)[0], config.n_features, config.n_hidden)
    )(instances.seed)


def _check_instances(config: ToyConfig, instances: ToyInstances) -> None:
    if instances.n_features != config.n_features:
        raise checks.InputError(
            f"instances have {instances.n_features} features but "
            f"ToyConfig.n_features={config.n_features}"
        )


# ----------------------------------------------------------------------------------------------
# Training


def _step(
    config: ToyConfig,
    tx: optax.GradientTransformation,
    instances: ToyInstances,
    state: train_lib.TrainState,
) -> tuple[train_lib.TrainState, jax.Array]:
    """One AdamW step of every instance; returns the per-instance losses ``[I]``.

    ``state.rng`` holds the per-instance data keys ``[I, 2]``.
    """

    def one(params, data_key, importance, sparsity):
        x = sample_features(batch_key(data_key, state.step), config.batch_size, sparsity)
        return jax.value_and_grad(instance_loss)(params, x, importance, config.activation)

    loss, grads = jax.vmap(one)(state.params, state.rng, instances.importance, instances.sparsity)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def _shardings(mesh, tree: Any, n_instances: int) -> Any:
    """Instance-axis leaves split over ``data``; scalars (step, Adam count) replicated."""

    def spec(x):
        if np.ndim(x) >= 1 and np.shape(x)[0] == n_instances:
            return NamedSharding(mesh, P(mesh_lib.DATA, *([None] * (np.ndim(x) - 1))))
        return mesh_lib.replicated(mesh)

    return jax.tree.map(spec, tree)


@functools.lru_cache(maxsize=32)
def _chunk_fn(config: ToyConfig, mesh, n_steps: int, n_instances: int):
    """Jitted ``(state, instances) -> (state, mean loss [I] over the chunk's steps)``."""
    tx = config.optimizer()

    def run(state, instances):
        def body(carry, _):
            return _step(config, tx, instances, carry)

        state, losses = jax.lax.scan(body, state, None, length=n_steps)
        return state, jnp.mean(losses, axis=0)

    abstract_state = jax.eval_shape(
        lambda: _fresh_state(config, _dummy_instances(config, n_instances))
    )
    state_sh = _shardings(mesh, abstract_state, n_instances)
    inst_sh = _shardings(mesh, _dummy_instances(config, n_instances), n_instances)
    loss_sh = NamedSharding(mesh, P(mesh_lib.DATA))
    return jax.jit(
        run, in_shardings=(state_sh, inst_sh), out_shardings=(state_sh, loss_sh), donate_argnums=0
    )


@functools.lru_cache(maxsize=32)
def _init_fn(config: ToyConfig, mesh, n_instances: int):
    """Jitted ``instances -> fresh TrainState`` with the instance axis split over ``data``."""
    fresh = functools.partial(_fresh_state, config)
    abstract = jax.eval_shape(fresh, _dummy_instances(config, n_instances))
    return jax.jit(fresh, out_shardings=_shardings(mesh, abstract, n_instances))


def _dummy_instances(config: ToyConfig, n_instances: int) -> ToyInstances:
    shape = (n_instances, config.n_features)
    return ToyInstances(
        importance=jax.ShapeDtypeStruct(shape, jnp.float32),
        sparsity=jax.ShapeDtypeStruct(shape, jnp.float32),
        seed=jax.ShapeDtypeStruct((n_instances,), jnp.int32),
    )


def _fresh_state(config: ToyConfig, instances: ToyInstances) -> train_lib.TrainState:
    params = jax.vmap(
        lambda seed: init_instance(instance_keys(seed)[0], config.n_features, config.n_hidden)
    )(instances.seed)
    data_keys = jax.vmap(lambda seed: instance_keys(seed)[1])(instances.seed)
    return train_lib.create_train_state(params, config.optimizer(), data_keys)


def _pad_instances(instances: ToyInstances, multiple: int) -> tuple[ToyInstances, int]:
    """Repeats the last instance so the count divides the mesh data axis; returns real count."""
    count = instances.n_instances
    padded = -(-count // multiple) * multiple
    if padded == count:
        return instances, count
    index = np.minimum(np.arange(padded), count - 1)
    return _take(instances, index), count


class Sweep:
    """A compiled many-instance training program: state on the mesh, `advance` runs steps.

    The instance axis is split over the mesh ``data`` axis (padded with copies of the last
    instance to a multiple of its size; the copies are dropped from every output). `train`
    drives it with logging and checkpoints; benchmarks call `advance` directly.

    Args:
      config: the shared static settings.
      instances: per-instance settings (`make_instances`).
      mesh: engine mesh (default: every device on ``data``).
    """

    def __init__(self, config: ToyConfig, instances: ToyInstances, mesh=None):
        _check_instances(config, instances)
        self.config = config
        self.mesh = mesh_lib.make_mesh() if mesh is None else mesh
        padded, self.count = _pad_instances(instances, self.mesh.shape[mesh_lib.DATA])
        self.n_padded = padded.n_instances
        self.instances = jax.device_put(padded, _shardings(self.mesh, padded, self.n_padded))
        self.state: train_lib.TrainState = _init_fn(config, self.mesh, self.n_padded)(
            self.instances
        )

    @property
    def step(self) -> int:
        return int(self.state.step)

    def advance(self, n_steps: int) -> jax.Array:
        """Runs ``n_steps`` steps in one jitted scan; returns the padded ``[I']`` mean losses
        over them (on device, asynchronous; ``[:count]`` are the real instances)."""
        fn = _chunk_fn(self.config, self.mesh, int(n_steps), self.n_padded)
        self.state, mean_loss = fn(self.state, self.instances)
        return mean_loss

    def params(self) -> ToyParams:
        """Current parameters of the real instances as host numpy arrays."""
        return jax.tree.map(
            lambda x: np.asarray(x)[: self.count], mesh_lib.gather(self.state.params)
        )


@dataclasses.dataclass
class ToyResult:
    """What a sweep returns (host numpy, instance axis first, padding removed).

    Attributes:
      params: final `ToyParams` (``W [I, m, n]``, ``b [I, n]``) as numpy arrays.
      loss: ``[I]`` mean loss of each instance over the last log interval.
      history_steps: ``[L]`` steps at which losses were logged.
      history_loss: ``[L, I]`` mean loss per instance over each log interval.
      steps: total steps trained.
    """

    params: ToyParams
    loss: np.ndarray
    history_steps: np.ndarray
    history_loss: np.ndarray
    steps: int


def train(
    config: ToyConfig,
    instances: ToyInstances,
    *,
    steps: int,
    mesh: Mesh | None = None,
    workdir: str | None = None,
    log_every: int = 500,
    checkpoint_every: int | None = None,
    progress: bool = True,
    max_to_keep: int = 2,
) -> ToyResult:
    """Trains every instance for ``steps`` AdamW steps in one sharded, jitted program.

    Args:
      config: the shared static settings.
      instances: per-instance importance, sparsity and seeds (`make_instances`).
      steps: total steps (a resumed run continues up to it).
      mesh: engine mesh (default: every device on ``data``); instances are split over its
        ``data`` axis (see `Sweep`).
      workdir: writes ``metrics.jsonl`` (mean / min / max loss over instances per log
        interval) and ``checkpoints/`` there and resumes from the latest checkpoint. None: no I/O.
      log_every: steps per jitted scan call (and per metrics line / NaN check).
      checkpoint_every: save interval in steps (a multiple of ``log_every``; default: only at
        the end).
      progress: show a tqdm bar.

    Returns:
      A `ToyResult`.

    Raises:
      InputError: bad settings. engine.train.NonFiniteError: a loss became NaN/Inf.
    """
    _check_instances(config, instances)
    steps = checks.check_positive_int("train steps", steps)
    log_every = min(checks.check_positive_int("train log_every", log_every), steps)
    if checkpoint_every is not None:
        checkpoint_every = checks.check_positive_int("train checkpoint_every", checkpoint_every)
        if checkpoint_every % log_every:
            raise checks.InputError(
                f"checkpoint_every={checkpoint_every} must be a multiple of log_every={log_every}"
            )
    sweep = Sweep(config, instances, mesh)
    count = sweep.count
    hist_steps: list[int] = []
    hist_loss: list[np.ndarray] = []

    # The one train loop (`engine.train.train`): log_every steps per jitted scan call, the
    # instance axis split over the mesh, the loss history saved with each checkpoint.
    def step_fn(state, batch, n):
        del batch  # every instance samples its own data on device
        fn = _chunk_fn(config, sweep.mesh, int(n), sweep.n_padded)
        state, mean_loss = fn(state, sweep.instances)
        return state, {"loss": mean_loss[:count]}  # padded copies dropped

    def on_log(step, metrics):
        hist_steps.append(int(step))
        hist_loss.append(np.asarray(metrics["loss"], np.float64))

    def meta_fn():
        return {
            "n_instances": count,
            "history_steps": hist_steps,
            "history_loss": [r.tolist() for r in hist_loss],
        }

    def on_restore(meta):
        if int(meta.get("n_instances", count)) != count:
            raise checks.InputError(
                f"{workdir}: checkpoint holds {meta.get('n_instances')} "
                f"instances, this sweep has {count}"
            )
        hist_steps[:] = [int(s) for s in meta.get("history_steps", [])]
        hist_loss[:] = [np.asarray(r, np.float64) for r in meta.get("history_loss", [])]

    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
    loop = train_lib.LoopConfig(
        num_steps=steps,
        log_every=log_every,
        checkpoint_every=checkpoint_every or steps,
        max_to_keep=max_to_keep,
        progress=progress,
        progress_desc="toy",
        steps_per_call=log_every,
    )
    sweep.state = train_lib.train(
        sweep.state,
        step_fn,
        lambda step: None,
        loop,
        workdir=workdir,
        mesh=sweep.mesh,
        on_log=on_log,
        state_sharding=_shardings(sweep.mesh, sweep.state, sweep.n_padded),
        meta_fn=meta_fn,
        on_restore=on_restore,
    )
    history = np.asarray(hist_loss, np.float64).reshape(len(hist_loss), count)
    last = history[-1] if len(history) else np.full(count, np.nan)
    return ToyResult(
        params=sweep.params(),
        loss=last,
        history_steps=np.asarray(hist_steps, np.int64),
        history_loss=history,
        steps=sweep.step,
    )


# ----------------------------------------------------------------------------------------------
# Analysis (host, float64)


def feature_geometry(W: Any, represented_norm: float = 0.5) -> dict[str, np.ndarray]:
    """Per-feature geometry of ``W [I, m, n]`` (or one ``[m, n]``), float64.

    Returns a dict (arrays keep the instance axis when it was given):
      ``wtw [I, n, n]``: ``W^T W``.
      ``norms [I, n]``: ``||W_i||``.
      ``superposition [I, n]``: ``sum_{j != i} (W_i_hat . W_j)^2`` (0 for a zero column).
      ``dimensionality [I, n]``: ``D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2`` (0 for a zero
        column, the paper's convention for non-represented features).
      ``dims_per_feature [I]``: ``m / ||W||_F^2`` (the paper's D*).
      ``represented [I, n]``: ``||W_i|| > represented_norm``.
    """
    W = np.asarray(W, np.float64)
    single = W.ndim == 2
    if single:
        W = W[None]
    if W.ndim != 3:
        raise checks.InputError(f"feature_geometry: expected W [I, m, n] or [m, n], got {W.shape}")
    checks.check_finite("feature_geometry W", W)
    m = W.shape[1]
    wtw = np.einsum("kmi,kmj->kij", W, W)
    sq = np.einsum("kii->ki", wtw)
    norms = np.sqrt(sq)
    safe = np.where(norms > 0, norms, 1.0)
    proj = wtw / safe[:, :, None]  # (W_i_hat . W_j), row i
    proj_sq = np.square(proj)
    off = proj_sq * (1.0 - np.eye(W.shape[2]))  # j != i, summed without cancellation
    superposition = np.where(norms > 0, off.sum(axis=2), 0.0)
    total = superposition + sq  # sum_j (W_i_hat . W_j)^2
    dimensionality = np.where(norms > 0, sq / np.where(total > 0, total, 1.0), 0.0)
    frob = sq.sum(axis=1)
    out = {
        "wtw": wtw,
        "norms": norms,
        "superposition": superposition,
        "dimensionality": dimensionality,
        "dims_per_feature": np.where(frob > 0, m / np.where(frob > 0, frob, 1.0), np.inf),
        "represented": norms > represented_norm,
    }
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def feature_angles(W: Any, min_norm: float = 0.5) -> np.ndarray:
    """Gaps (degrees, sorted by angle, wrapping) between the represented features of a 2-D W.

    Args:
      W: ``[2, n]`` (one instance with m = 2).
      min_norm: columns shorter than this are ignored.

    Returns:
      ``[k]`` consecutive angular gaps summing to 360 (k = number of represented features).
    """
    W = np.asarray(W, np.float64)
    if W.ndim != 2 or W.shape[0] != 2:
        raise checks.InputError(f"feature_angles: expected W [2, n], got {W.shape}")
    keep = np.linalg.norm(W, axis=0) > min_norm
    theta = np.sort(np.degrees(np.arctan2(W[1, keep], W[0, keep])) % 360.0)
    if theta.size == 0:
        return theta
    return np.diff(np.append(theta, theta[0] + 360.0))


FEATURE_STATES = ("not_represented", "dedicated", "superposed")


def feature_state(
    W: Any, feature: int, represented_norm: float = 0.5, superposed: float = 0.5
) -> np.ndarray:
    """Classifies one feature of every instance for the phase diagram.

    ``not_represented`` (0): ``||W_i|| <= represented_norm``; ``superposed`` (2): represented
    and ``sum_{j != i} (W_i_hat . W_j)^2 > superposed`` (it shares its direction with other
    represented features); ``dedicated`` (1): represented and (nearly) orthogonal to the rest.

    Args:
      W: ``[I, m, n]`` or ``[m, n]``.
      feature: the feature index i.

    Returns:
      int codes ``[I]`` (or a scalar for one instance) indexing `FEATURE_STATES`.
    """
    geo = feature_geometry(W, represented_norm)
    n = geo["norms"].shape[-1]
    if not 0 <= feature < n:
        raise checks.InputError(f"feature_state: feature {feature} out of range [0, {n})")
    rep = geo["norms"][..., feature] > represented_norm
    sup = geo["superposition"][..., feature] > superposed
    return np.where(rep, np.where(sup, 2, 1), 0)

"""The one train loop: jitted, data-parallel, checkpointed, exactly resumable, NaN-guarded.

Sections of `train` (in order): restore or start -> loop { fetch batch -> jitted step ->
keep metrics on device -> every ``log_every``: flush (NaN/Inf guard, metrics.jsonl, progress)
-> every ``checkpoint_every``: flush then save (state + data position) } -> final save.

What a run needs to resume bit-identically is in the checkpoint: params, optimizer state, step,
rng key and the data stream position. The step function derives its randomness from
``fold_in(rng, step)`` so that it does not depend on how often the process was restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine import checkpoint as ckpt_lib
from engine import mesh as mesh_lib
from engine import metrics_io

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    if TYPE_CHECKING:  # flax.struct adds `replace` at run time; declared for the type checker

        def replace(self, **changes: Any) -> TrainState: ...


def create_train_state(
    params: Any, tx: optax.GradientTransformation, rng: jax.Array, stats: Any = None
) -> TrainState:
    """A fresh state at step 0. ``rng`` is a raw uint32 key (`jax.random.PRNGKey`).

    ``stats``: state carried from step to step that is not trained (e.g. dead-latent
    counters); the state's params are then ``{"params": params, "stats": stats}`` and the
    optimiser covers ``params`` only (see `make_train_step`'s ``stats_update``).
    """
    if stats is not None:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params={"params": params, "stats": stats},
            opt_state=tx.init(params),
            rng=rng,
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh,
    *,
    post_update: Callable[[Any], Any] | None = None,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    grad_transform: Callable[[Any, Any], Any] | None = None,
    stats_update: Callable[[Any, dict], tuple[Any, dict]] | None = None,
):
    """Builds ``step(state, batch) -> (state, metrics)``, jitted with donated state.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, metrics)``; metrics are scalars.
      tx: the optax optimiser.
      mesh: the device mesh; by default params are replicated and every batch leaf is split
        along its leading axis over ``data`` (XLA inserts the gradient all-reduce).
      post_update: applied to the params after each update (e.g. renormalise decoder rows).
      state_sharding / batch_sharding: explicit shardings overriding the defaults.
      grad_transform: ``grad_transform(grads, params) -> grads`` before the optimiser (e.g.
        remove the gradient component parallel to unit-norm decoder rows).
      stats_update: for states made with ``create_train_state(..., stats=...)``: the loss
        sees ``loss_fn({"params": params, "stats": stats}, batch, rng)`` and is
        differentiated in ``params`` only (grad_transform, the optimiser and post_update see
        ``params`` only); then ``stats_update(stats, metrics) -> (stats, metrics)`` computes
        the next stats from the loss's metrics (which may carry arrays for it, e.g. per-latent
        firing counts, that it removes before logging).
    """
    repl = mesh_lib.replicated(mesh)
    state_sharding = repl if state_sharding is None else state_sharding

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if stats_update is None:
            trainable, stats = state.params, None
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, batch, rng
            )
        else:
            trainable, stats = state.params["params"], state.params["stats"]
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: loss_fn({"params": p, "stats": stats}, batch, rng), has_aux=True
            )(trainable)
        if grad_transform is not None:
            grads = grad_transform(grads, trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = optax.apply_updates(trainable, updates)
        if post_update is not None:
            params = post_update(params)
        metrics = dict(metrics)
        if stats_update is not None:
            stats, metrics = stats_update(stats, metrics)
            params = {"params": params, "stats": stats}
            metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if batch_sharding is None:

        def batch_sharding_for(batch):
            return jax.tree.map(lambda x: mesh_lib.data_sharding(mesh, np.ndim(x)), batch)
    else:

        def batch_sharding_for(batch):
            return batch_sharding

    compiled = {}

    def run(state, batch):
        key = jax.tree.structure(batch)
        if key not in compiled:
            compiled[key] = jax.jit(
                step,
                in_shardings=(state_sharding, batch_sharding_for(batch)),
                out_shardings=(state_sharding, repl),
                donate_argnums=0,
            )
        return compiled[key](state, batch)

    return run


@dataclasses.dataclass
class LoopConfig:
    """How long to train and how often to log and save.

    Attributes:
      num_steps: total steps (a resumed run continues up to it).
      log_every / checkpoint_every: intervals in steps.
      max_to_keep: checkpoints kept.
      progress: tqdm bar (else absl log lines with rate and ETA).
      progress_desc: the bar's label.
      steps_per_call: > 1 when ``step_fn(state, batch, n)`` runs ``n`` steps in one call (a
        jitted ``lax.scan``, e.g. many toy-model instances whose data are generated on
        device); the loop cuts calls at log and checkpoint boundaries, so ``n <=
        steps_per_call``.
    """

    num_steps: int
    log_every: int = 100
    checkpoint_every: int = 1000
    max_to_keep: int = 2
    progress: bool = True
    progress_desc: str = "train"
    steps_per_call: int = 1


class NonFiniteError(FloatingPointError):
    """Raised by the NaN/Inf guard (names the step and the metric)."""


class _BatchSource:
    """Adapts a callable ``batch_fn(step)`` or a `ChunkStream` to ``next / position / seek``."""

    def __init__(self, data):
        self._fn = data if callable(data) and not hasattr(data, "seek") else None
        self._stream = None if self._fn is not None else data

    def next(self, step: int):
        if self._fn is not None:
            return self._fn(step)  # None: the step function makes its own data
        try:
            chunk = next(self._stream)
        except StopIteration:
            raise ValueError(
                f"training data stream ran out at step {step}; use a repeating "
                "stream (repeat=True) or fewer num_steps"
            ) from None
        if not chunk.mask.all():
            raise ValueError(
                f"training data stream ran out at step {step} (ragged final "
                "chunk); use repeat=True or drop_remainder=True"
            )
        return chunk.arrays

    @property
    def position(self) -> int:
        return 0 if self._stream is None else int(self._stream.position)

    def seek(self, position: int) -> None:
        if self._stream is not None:
            self._stream.seek(position)


def _summaries(name: str, value: np.ndarray) -> dict[str, float]:
    """Scalars written to metrics.jsonl: the value, or mean/min/max of a vector metric
    (one entry per toy-model instance or sweep member)."""
    if value.ndim == 0:
        return {name: float(value)}
    return {
        f"{name}_mean": float(value.mean()),
        f"{name}_min": float(value.min()),
        f"{name}_max": float(value.max()),
    }


def train(
    state: TrainState,
    step_fn,
    data,
    config: LoopConfig,
    *,
    workdir: str | None,
    mesh,
    on_log: Callable[[int, dict], None] | None = None,
    state_sharding: Any = None,
    meta_fn: Callable[[], dict] | None = None,
    on_restore: Callable[[dict], None] | None = None,
) -> TrainState:
    """Runs (or resumes) training to ``config.num_steps``.

    Args:
      state: the initial state (used as the restore template when a checkpoint exists).
      step_fn: from `make_train_step` (``step_fn(state, batch) -> (state, metrics)``), or with
        ``config.steps_per_call > 1`` ``step_fn(state, batch, n)`` running ``n`` steps.
        Metrics are scalars or vectors (one value per instance / sweep member); a vector is
        written to metrics.jsonl as ``<name>_mean/_min/_max``.
      data: ``batch_fn(step) -> batch`` (deterministic in the step; None when the step
        function makes its own data) or a `ChunkStream` of full chunks whose position is
        checkpointed.
      config: step counts and intervals.
      workdir: run directory; ``metrics.jsonl`` and ``checkpoints/`` go there. None: no I/O.
      mesh: the device mesh.
      on_log: called with ``(step, metrics)`` after each flush (vector metrics as arrays,
        averaged over the steps since the last flush).
      state_sharding: where the state lives (default: replicated on the mesh), e.g. an
        instance axis split over ``data``.
      meta_fn: extra JSON saved with every checkpoint (e.g. a loss history).
      on_restore: called with the restored checkpoint's meta before training resumes.

    Returns:
      The final state.

    Raises:
      NonFiniteError: when a metric (loss included) becomes NaN/Inf; nothing is saved after
        the last finite step.
    """
    source = _BatchSource(data)
    spc = int(config.steps_per_call)
    if spc < 1:
        raise ValueError(f"LoopConfig.steps_per_call must be >= 1, got {spc}")
    ckpt = writer = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.max_to_keep)
        writer = metrics_io.MetricWriter(os.path.join(workdir, "metrics.jsonl"))
    if state_sharding is None:
        state = mesh_lib.replicate(mesh, state, copy=True)
    else:
        state = jax.device_put(state, state_sharding)
    if ckpt is not None:
        restored = ckpt.restore(state)  # the newest intact checkpoint (damaged ones skipped)
        if restored is not None:
            _, state, meta = restored
            source.seek(int(meta.get("position", 0)))
            if on_restore is not None:
                on_restore(meta)
            logging.info(
                "resumed from step %d (data position %d)", int(state.step), source.position
            )
        # Lines logged after the restored step (or, starting from scratch, every line) belong
        # to a killed run whose state is lost: drop them so no step appears twice.
        assert writer is not None
        writer.truncate_after(int(state.step))
    start = int(state.step)

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.num_steps,
            initial=start,
            unit="step",
            desc=config.progress_desc,
            dynamic_ncols=True,
        )
    pending: list[tuple[int, int, dict]] = []
    t_last, step_last = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal t_last, step_last
        if not pending:
            return
        host = jax.device_get([m for _, _, m in pending])
        for (s, n, _), m in zip(pending, host):
            for name, value in m.items():
                v = np.asarray(value)
                if not np.all(np.isfinite(v)):
                    bad = ~np.isfinite(v.reshape(-1))
                    where = "" if v.ndim == 0 else f" (instance {int(np.argmax(bad))})"
                    steps = f"step {s}" if n == 1 else f"steps {s}..{s + n}"
                    shown = v if v.ndim == 0 else v.reshape(-1)[bad][0]
                    raise NonFiniteError(
                        f"non-finite {name}={shown}{where} at {steps}; last "
                        f"checkpoint is before it (run stopped)"
                    )
        weights = np.asarray([n for _, n, _ in pending], np.float64)
        avg = {
            k: np.tensordot(
                weights / weights.sum(), np.stack([np.asarray(m[k], np.float64) for m in host]), 1
            )
            for k in host[-1]
        }
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        pending.clear()
        row = {}
        for k, v in avg.items():
            row.update(_summaries(k, v))
        row["steps_per_sec"] = rate
        if writer is not None:
            writer.write(step, row)
        if on_log is not None:
            on_log(
                step,
                {
                    **{k: (float(v) if v.ndim == 0 else v) for k, v in avg.items()},
                    "steps_per_sec": rate,
                },
            )
        loss = float(np.mean(avg["loss"])) if "loss" in avg else float("nan")
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4g}")
        else:
            eta = (config.num_steps - step) / max(rate, 1e-9)
            logging.info(
                "step %d/%d loss %.5g (%.1f steps/s, ETA %.0fs)",
                step,
                config.num_steps,
                loss,
                rate,
                eta,
            )

    def save(step: int) -> None:
        assert ckpt is not None
        meta = {"position": source.position}
        if meta_fn is not None:
            meta.update(meta_fn())
        ckpt.save(step, state, meta)

    step = start
    while step < config.num_steps:
        n = 1
        if spc > 1:
            bounds = [spc, config.num_steps - step, config.log_every - step % config.log_every]
            if ckpt is not None:
                bounds.append(config.checkpoint_every - step % config.checkpoint_every)
            n = min(bounds)
        batch = source.next(step)
        if batch is not None:
            batch = mesh_lib.shard_batch(mesh, batch)
        state, metrics = step_fn(state, batch) if spc == 1 else step_fn(state, batch, n)
        pending.append((step, n, metrics))
        step += n
        if bar is not None:
            bar.update(n)
        if step % config.log_every == 0 or step == config.num_steps:
            flush(step)
        if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.num_steps):
            flush(step)
            save(step)
    flush(config.num_steps)
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    return state

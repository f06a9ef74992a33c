"""End-to-end demo of the engine core: train, checkpoint, resume, stream moments.

Trains a linear autoencoder on synthetic low-rank data with the engine's train loop
(data-parallel over the mesh, orbax checkpoints, exact resume), then streams the
``CrossMoments`` accumulator over (inputs, codes) and checks it against a float64 numpy
reference. Run (4 simulated CPU devices)::

    python -m experiments.demo --workdir=runs/demo --num_cpu_devices=4

Rerunning the same command resumes from the last checkpoint (or prints "nothing to do" when
finished); other settings (e.g. another ``--num_steps``) in the same workdir are refused before
any work: use a new workdir or ``--overwrite`` (experiments/common.py).
"""

from __future__ import annotations

import os

from experiments import common
from experiments.configs import demo as CONFIG  # noqa: N812  (the config module)


def make_data(seed: int, n_rows: int, d: int, rank: int):
    """Low-rank data plus small noise, with a large offset (exercises the centred merges)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_rows, rank))
    mix = rng.normal(size=(rank, d))
    x = z @ mix + 0.05 * rng.normal(size=(n_rows, d)) + 100.0
    return x.astype(np.float32)


def run_demo(
    run: common.Run,
    *,
    num_steps: int,
    batch_size: int,
    d: int,
    latent: int,
    n_rows: int,
    lr: float,
    log_every: int,
    checkpoint_every: int,
    seed: int,
    progress: bool = True,
) -> dict:
    """The demo's logic (importable for tests); returns the results dict."""
    import io

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from engine import accumulators, metrics_io, streaming, train

    # -- data and model ---------------------------------------------------------------------
    x = make_data(seed, n_rows, d, latent)
    offset = jnp.asarray(x.mean(axis=0))

    def encode(params, xb):
        return (xb - offset) @ params["enc"]

    def loss_fn(params, batch, rng):
        del rng
        (xb,) = batch
        recon = encode(params, xb) @ params["dec"] + offset
        mse = jnp.mean((xb - recon) ** 2)
        return mse, {"mse": mse}

    key = jax.random.PRNGKey(seed)
    k_enc, k_dec, k_state = jax.random.split(key, 3)
    params = {
        "enc": 0.1 * jax.random.normal(k_enc, (d, latent)),
        "dec": 0.1 * jax.random.normal(k_dec, (latent, d)),
    }
    tx = optax.adam(lr)
    state = train.create_train_state(params, tx, k_state)

    # -- train (resumes from run.workdir/checkpoints) ----------------------------------------
    stream = streaming.ChunkStream(
        (x,), batch_size, repeat=True, shuffle_seed=seed, name="demo data"
    )
    step_fn = train.make_train_step(loss_fn, tx, run.mesh)
    state = train.train(
        state,
        step_fn,
        stream,
        train.LoopConfig(
            num_steps=num_steps,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            progress=progress,
        ),
        workdir=run.workdir,
        mesh=run.mesh,
    )

    # -- stream moments of (inputs, codes) over all rows --------------------------------------
    codes = np.asarray(jax.jit(encode)(state.params, jnp.asarray(x)))
    acc = accumulators.CrossMoments(d, latent)
    moments = acc.finalize(
        accumulators.accumulate(
            acc, streaming.ChunkStream((x, codes), batch_size, name="demo moments"), run.mesh
        )
    )
    xd, cd = x.astype(np.float64), codes.astype(np.float64)
    ref_xy = (xd - xd.mean(0)).T @ (cd - cd.mean(0)) / len(xd)
    rel_err = float(np.max(np.abs(moments.cov_xy - ref_xy)) / np.max(np.abs(ref_xy)))
    total_var = float(np.trace(moments.cov_xx))
    recon = codes.astype(np.float64) @ np.asarray(state.params["dec"], np.float64) + xd.mean(0)
    fve = 1.0 - float(np.mean(np.sum((xd - recon) ** 2, 1))) / total_var
    results = {
        "final_step": int(state.step),
        "devices": int(run.mesh.size),
        "fraction_variance_explained": fve,
        "moments": {
            "count": moments.count,
            "trace_cov_x": total_var,
            "max_rel_err_cov_xy_vs_float64": rel_err,
        },
    }
    buf = io.BytesIO()
    np.savez(buf, **jax.device_get(state.params))
    if jax.process_index() == 0:
        metrics_io.write_bytes(run.path("params.npz"), buf.getvalue())
    _plot_loss(run)
    return results


def _plot_loss(run: common.Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine import metrics_io

    rows = metrics_io.read_jsonl(run.metrics_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy([r["step"] for r in rows], [r["mse"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction MSE")
    ax.set_title("demo: linear autoencoder")
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, "loss.png"), dpi=120)


def body(run, settings):
    results = run_demo(
        run,
        num_steps=settings.num_steps,
        batch_size=settings.batch_size,
        d=settings.d,
        latent=settings.latent,
        n_rows=settings.n_rows,
        lr=settings.lr,
        log_every=settings.log_every,
        checkpoint_every=settings.checkpoint_every,
        seed=settings.seed,
        progress=settings.progress,
    )
    run.write_results(results)
    print(
        f"demo: step {results['final_step']} on {results['devices']} device(s), variance "
        f"explained {results['fraction_variance_explained']:.4f}, moments vs float64 "
        f"rel. err {results['moments']['max_rel_err_cov_xy_vs_float64']:.2e}"
    )
    print(f"results: {run.path('results.json')}  plots: {run.plots_dir}")


if __name__ == "__main__":
    common.entry("demo", body, CONFIG)

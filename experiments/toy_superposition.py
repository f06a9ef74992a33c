"""Toy models of superposition (Elhage et al. 2022): the paper's three results, reproduced.

Three sweeps, each trained as ONE sharded many-instance program (`models.toy.train`), resumable
from ``DIR/sweeps/<name>/checkpoints``:

1. ``pentagon``: 5 features in 2 dims, importance 0.9^i, sparsity from dense to sparse: no
   superposition when dense (only the 2 most important features, orthogonal), antipodal
   pairs in between, a pentagon (five features at 72 degrees) at high sparsity.
   Plot ``plots/pentagon.png``: feature directions (columns of W), ``W^T W`` and bars of
   ``||W_i||`` coloured by the superposition measure, one column per sparsity.
2. ``dimensionality``: n -> m features with uniform importance over sparsities; dimensions per
   feature ``m / ||W||_F^2`` and each feature's dimensionality D_i against 1/(1-S), with the
   sticky fractions (1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3) marked. The paper uses n=400 -> m=30
   with 100 instances; the default here is a smaller n=100 -> m=10 (2-core CPU budget); run
   the paper's setting with ``--dim_features=400 --dim_hidden=30 --dim_points=100``.
   Plot ``plots/dimensionality.png``.
3. ``phase_linear`` / ``phase_relu``: one extra feature (n=2 -> m=1); feature 0 has
   importance 1, the extra feature 1 a relative importance r; both have density 1 - S. The
   extra feature is classified not represented / dedicated / superposed
   (`models.toy.feature_state`) over the (density, r) grid. Plot ``plots/phase_diagram.png``.

Where several seeds are trained per setting, figures show the lowest-loss seed (the paper
reports the best of several runs; toy models have local minima), and results.json holds every
instance. Run (paper training settings: AdamW lr 1e-3, batch 1024, 10k steps)::

    python -m experiments.toy_superposition --workdir=runs/toy_superposition/default

A quick smoke run: add ``--sweep_steps=1000 --sweep_lr=1e-2 --sweep_batch_size=256``. Rerunning the
same command
resumes each sweep from its checkpoint (a finished run says "nothing to do"); other settings in
the same workdir are refused before any work (`experiments/common.py`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from experiments import common
from experiments.configs import toy_superposition as CONFIG  # noqa: N812  (the config module)

STICKY = {"1": 1.0, "3/4": 0.75, "2/3": 2 / 3, "1/2": 0.5, "2/5": 0.4, "3/8": 0.375, "1/3": 1 / 3}


# ----------------------------------------------------------------------------------------------
# Sweeps


def _train_sweep(run: common.Run, name: str, config, sparsity, importance, seeds, settings: dict):
    from models import toy

    instances = toy.make_instances(
        config.n_features, sparsity=sparsity, importance=importance, seeds=seeds
    )
    logging.info(
        "sweep %s: %d instances of %d -> %d (%s)",
        name,
        instances.n_instances,
        config.n_features,
        config.n_hidden,
        config.activation,
    )
    log_every = min(settings["log_every"], settings["steps"])
    ckpt_every = max(log_every, settings["checkpoint_every"] // log_every * log_every)
    return toy.train(
        config,
        instances,
        steps=settings["steps"],
        mesh=run.mesh,
        workdir=run.path("sweeps", name),
        log_every=log_every,
        checkpoint_every=ckpt_every,
        progress=settings["progress"],
    )


def _best_seed(loss: np.ndarray, n_settings: int, n_seeds: int) -> np.ndarray:
    """Index of the lowest-loss instance of each setting (instances are setting-major)."""
    per = loss.reshape(n_settings, n_seeds)
    return np.arange(n_settings) * n_seeds + np.argmin(per, axis=1)


def pentagon_sweep(run: common.Run, settings: dict) -> dict:
    """5 features in 2 dims across sparsity (Elhage et al. 2022, the introduction figure)."""
    from models import toy

    n, m, n_seeds = 5, 2, settings["pentagon_seeds"]
    sparsities = np.asarray(settings["pentagon_sparsity"], np.float64)
    importance = 0.9 ** np.arange(n)
    config = toy.ToyConfig(n, m, batch_size=settings["batch_size"], lr=settings["lr"])
    s = np.repeat(sparsities, n_seeds)[:, None] * np.ones(n)
    seeds = np.arange(len(s))
    result = _train_sweep(run, "pentagon", config, s, importance, seeds, settings)
    geo = toy.feature_geometry(result.params.W)
    best = _best_seed(result.loss, len(sparsities), n_seeds)
    instances = []
    for k in range(len(s)):
        instances.append(
            {
                "sparsity": float(s[k, 0]),
                "seed": int(seeds[k]),
                "loss": float(result.loss[k]),
                "W": result.params.W[k],
                "b": result.params.b[k],
                "wtw": geo["wtw"][k],
                "norms": geo["norms"][k],
                "superposition": geo["superposition"][k],
                "dimensionality": geo["dimensionality"][k],
                "n_represented": int(geo["represented"][k].sum()),
                "angle_gaps_deg": toy.feature_angles(result.params.W[k]),
            }
        )
    out = {
        "n_features": n,
        "n_hidden": m,
        "importance": importance,
        "sparsity": sparsities,
        "best_instance": best,
        "instances": instances,
    }
    _plot_pentagon(run, out)
    return out


def dimensionality_sweep(run: common.Run, settings: dict) -> dict:
    """Dimensions per feature vs 1/(1-S), uniform importance (the paper's n=400 -> m=30)."""
    from models import toy

    n, m, n_seeds = settings["dim_features"], settings["dim_hidden"], settings["dim_seeds"]
    inv_density = np.geomspace(1.0, settings["dim_max_inverse_density"], settings["dim_points"])
    sparsities = 1.0 - 1.0 / inv_density
    config = toy.ToyConfig(n, m, batch_size=settings["batch_size"], lr=settings["lr"])
    s = np.repeat(sparsities, n_seeds)[:, None] * np.ones(n)
    result = _train_sweep(
        run, "dimensionality", config, s, 1.0, 10_000 + np.arange(len(s)), settings
    )
    geo = toy.feature_geometry(result.params.W)
    best = _best_seed(result.loss, len(sparsities), n_seeds)
    d_i = geo["dimensionality"][best]
    rep = geo["represented"][best]
    near = {}
    for label, value in STICKY.items():  # share of represented features at each fraction
        near[label] = float(np.mean(np.abs(d_i[rep] - value) < 0.02)) if rep.any() else 0.0
    out = {
        "n_features": n,
        "n_hidden": m,
        "inverse_density": inv_density,
        "sparsity": sparsities,
        "loss": result.loss,
        "best_instance": best,
        "dims_per_feature": geo["dims_per_feature"],
        "feature_dimensionality": d_i,
        "represented": rep,
        "share_of_features_near_sticky_fraction": near,
    }
    _plot_dimensionality(run, out)
    return out


def phase_sweep(run: common.Run, settings: dict) -> dict:
    """Phase diagram of one extra feature (n=2 -> m=1) for the linear and the ReLU model."""
    from models import toy

    k, n_seeds = settings["phase_points"], settings["seeds"]
    rel_importance = np.geomspace(0.1, 10.0, k)
    density = np.geomspace(0.01, 1.0, k)
    grid_r, grid_d = np.meshgrid(rel_importance, density, indexing="ij")  # [r, density]
    r_flat = np.repeat(grid_r.ravel(), n_seeds)
    s_flat = 1.0 - np.repeat(grid_d.ravel(), n_seeds)
    importance = np.stack([np.ones_like(r_flat), r_flat], axis=1)
    sparsity = np.stack([s_flat, s_flat], axis=1)
    out: dict[str, Any] = {
        "relative_importance": rel_importance,
        "density": density,
        "states": list(toy.FEATURE_STATES),
    }
    for activation in ("linear", "relu"):
        config = toy.ToyConfig(
            2, 1, activation=activation, batch_size=settings["batch_size"], lr=settings["lr"]
        )
        result = _train_sweep(
            run,
            f"phase_{activation}",
            config,
            sparsity,
            importance,
            20_000 + np.arange(len(r_flat)),
            settings,
        )
        best = _best_seed(result.loss, k * k, n_seeds)
        W = result.params.W[best]
        geo = toy.feature_geometry(W)
        out[activation] = {
            "state": toy.feature_state(W, 1).reshape(k, k),
            "norm_extra": geo["norms"][:, 1].reshape(k, k),
            "norm_first": geo["norms"][:, 0].reshape(k, k),
            "superposition_extra": geo["superposition"][:, 1].reshape(k, k),
            "loss": result.loss[best].reshape(k, k),
        }
    _plot_phase(run, out)
    return out


# ----------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_pentagon(run: common.Run, res: dict) -> None:
    plt = _plt()
    best = res["best_instance"]
    cols = len(best)
    fig, axes = plt.subplots(3, cols, figsize=(2.1 * cols, 6.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for c, k in enumerate(best):
        inst = res["instances"][k]
        W, n = inst["W"], res["n_features"]
        ax = axes[0, c]
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, ls=":", color="0.7"))
        for i in range(n):
            color = cmap(i / max(n - 1, 1))
            ax.plot([0, W[0, i]], [0, W[1, i]], color=color, lw=2)
            ax.scatter(W[0, i], W[1, i], color=color, s=14, zorder=3)
        ax.set_xlim(-1.4, 1.4)
        ax.set_ylim(-1.4, 1.4)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"1-S = {1 - inst['sparsity']:.2g}", fontsize=9)
        axes[1, c].imshow(inst["wtw"], cmap="RdBu_r", vmin=-1.2, vmax=1.2)
        axes[1, c].set_xticks([])
        axes[1, c].set_yticks([])
        ax = axes[2, c]
        sup = np.clip(inst["superposition"] / (inst["norms"] ** 2 + 1e-9), 0, 1)
        ax.barh(np.arange(n), inst["norms"], color=plt.get_cmap("plasma")(sup))
        ax.set_xlim(0, 1.3)
        ax.invert_yaxis()
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("columns of W")
    axes[1, 0].set_ylabel("W^T W")
    axes[2, 0].set_ylabel("||W_i|| (colour: superposition)")
    fig.suptitle("5 features in 2 dims (importance 0.9^i; colour = importance rank)")
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, "pentagon.png"), dpi=120)


def _plot_dimensionality(run: common.Run, res: dict) -> None:
    plt = _plt()
    x = res["inverse_density"]
    best = res["best_instance"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, value in STICKY.items():
        ax.axhline(value, color="0.85", lw=0.8, zorder=0)
        ax.text(x[-1] * 1.08, value, label, va="center", fontsize=8, color="0.4")
    d_i, rep = res["feature_dimensionality"], res["represented"]
    for j in range(len(x)):
        ys = d_i[j][rep[j]]
        ax.scatter(np.full(ys.shape, x[j]), ys, s=6, alpha=0.35, color="tab:blue", lw=0)
    ax.plot(x, res["dims_per_feature"][best], color="k", lw=1.5, label="m / ||W||_F^2")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("1 / (1 - S)")
    ax.set_ylabel("dimensions per feature")
    ax.set_title(
        f"feature dimensionality, {res['n_features']} -> {res['n_hidden']} "
        "(dots: D_i of represented features)"
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, os.path.join(run.plots_dir, "dimensionality.png"), dpi=120)


def _plot_phase(run: common.Run, res: dict) -> None:
    plt = _plt()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["0.85", "tab:blue", "tab:red"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), squeeze=False)
    r, d = res["relative_importance"], res["density"]
    for ax, activation in zip(axes[0], ("linear", "relu")):
        ax.pcolormesh(
            d, r, res[activation]["state"], cmap=cmap, vmin=-0.5, vmax=2.5, shading="nearest"
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("feature density 1 - S")
        ax.set_ylabel("relative importance of the extra feature")
        ax.set_title(f"{activation}: 2 features -> 1 dim")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("0.85", "tab:blue", "tab:red")]
    fig.legend(
        handles,
        ["not represented", "dedicated dimension", "superposition"],
        loc="lower center",
        ncol=3,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.save_figure(fig, os.path.join(run.plots_dir, "phase_diagram.png"), dpi=120)


# ----------------------------------------------------------------------------------------------
# Entry point


def run_toy_superposition(run: common.Run, settings: dict) -> dict:
    """Runs the selected sweeps (importable for tests); returns the results dict."""
    from engine import metrics_io

    sweeps = [s.strip() for s in settings["sweeps"].split(",") if s.strip()]
    unknown = set(sweeps) - {"pentagon", "dimensionality", "phase"}
    if unknown:
        raise ValueError(
            f"--sweeps: unknown {sorted(unknown)}; expected pentagon, dimensionality, phase"
        )
    results: dict[str, Any] = {
        "devices": int(run.mesh.size),
        "training": {
            k: settings[k]
            for k in ("steps", "batch_size", "lr", "seeds", "pentagon_seeds", "dim_seeds")
        },
    }
    if "pentagon" in sweeps:
        results["pentagon"] = pentagon_sweep(run, settings)
    if "dimensionality" in sweeps:
        results["dimensionality"] = dimensionality_sweep(run, settings)
    if "phase" in sweeps:
        results["phase_diagram"] = phase_sweep(run, settings)
    # One metrics.jsonl for the run: every sweep's lines, tagged with the sweep name.
    rows = []
    sweep_dir = run.path("sweeps")
    sweep = metrics_io.epath_of(sweep_dir)
    for name in sorted(p.name for p in sweep.iterdir()) if sweep.is_dir() else []:
        for row in metrics_io.read_jsonl(os.path.join(sweep_dir, name, "metrics.jsonl")):
            rows.append({"sweep": name, **row})
    import json

    metrics_io.write_text(run.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
    results["summary"] = _summary(results)
    return results


def _summary(results: dict) -> dict:
    """The few numbers a reader checks first."""
    out: dict[str, Any] = {}
    if "pentagon" in results:
        p = results["pentagon"]
        rows = []
        for k in p["best_instance"]:
            inst = p["instances"][k]
            rows.append(
                {
                    "sparsity": inst["sparsity"],
                    "n_represented": inst["n_represented"],
                    "angle_gaps_deg": inst["angle_gaps_deg"],
                    "norms": np.round(inst["norms"], 3),
                    "dimensionality": np.round(inst["dimensionality"], 3),
                }
            )
        out["pentagon"] = rows
    if "dimensionality" in results:
        d = results["dimensionality"]
        out["dimensionality_share_near_sticky"] = d["share_of_features_near_sticky_fraction"]
    if "phase_diagram" in results:
        ph = results["phase_diagram"]
        out["phase_state_counts"] = {
            a: {s: int(np.sum(ph[a]["state"] == i)) for i, s in enumerate(ph["states"])}
            for a in ("linear", "relu")
        }
    return out


def sweep_settings(settings) -> dict:
    """The dict `run_toy_superposition` takes, from the run's settings."""
    return {
        "steps": settings.sweep_steps,
        "batch_size": settings.sweep_batch_size,
        "lr": settings.sweep_lr,
        "seeds": settings.sweep_seeds,
        "pentagon_seeds": settings.pentagon_seeds,
        "log_every": settings.sweep_log_every,
        "checkpoint_every": settings.sweep_checkpoint_every,
        "pentagon_sparsity": [float(s) for s in settings.pentagon_sparsity],
        "dim_features": settings.dim_features,
        "dim_hidden": settings.dim_hidden,
        "dim_points": settings.dim_points,
        "dim_seeds": settings.dim_seeds,
        "dim_max_inverse_density": settings.dim_max_inverse_density,
        "phase_points": settings.phase_points,
        "sweeps": settings.sweeps,
        "progress": settings.progress,
    }


def body(run, settings):
    results = run_toy_superposition(run, sweep_settings(settings))
    run.write_results(results)
    for key, value in results["summary"].items():
        print(f"{key}: {value}")
    print(f"results: {run.path('results.json')}  plots: {run.plots_dir}")


if __name__ == "__main__":
    common.entry("toy_superposition", body, CONFIG)

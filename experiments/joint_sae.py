"""Jointly trained cross-model SAEs (issue 15): how much sharing can a loss buy, honestly?

For each design and coefficient (universal SAE, crosscoder L1 / TopK, alignment-penalised
SAEs with alpha; `models.joint_sae`) and for two independently trained SAEs
(`models.sae_train`), on the real pair AND on a floor pair, this reports reconstruction per
model (FVU, L0, dead), the shared / exclusive fractions (relative decoder-norm histogram;
activation correlations), the geometry of the shared latents with the universality
pipeline's metrics and random-pairing nulls, Minder et al.'s latent scaling check, and, on the
toy, precision / recall of the shared / exclusive calls against the known truth
(`experiments.pipeline.joint_metrics` documents every threshold). The summary states each
design's excess shared fraction over its floor.

Data:
* ``--source=toy`` (default, embedded, no downloads; a few minutes on 2 CPU cores): two sides
  from `models.dictionary_pair.make_partial_pair` (32 shared + 16 exclusive features per side
  in 32 dimensions); the floor is the same generator with nothing shared (the control).
* ``--source=caches``: aligned rows of two activation caches over the same tokens
  (`models.activation_cache.paired_source`: same tokenizer and token ids), ``--cache_a``,
  ``--cache_b``, ``--hookpoint_a/b``; the floor pair is A against ``--floor_cache_b``, a cache
  of a randomly initialised copy of model B harvested on the same text (required).

Commands::

    python -m experiments.joint_sae --workdir=runs/joint_sae/toy
    python -m experiments.joint_sae --workdir=runs/joint_sae/toy_sweep \\
        --seeds=0,1,2 --l1_coeffs=0.3,1,3 --align_coeffs=0.1,0.3,1,3,10 --steps=3000
    python -m experiments.joint_sae --workdir=runs/joint_sae/lm --source=caches \\
        --cache_a=runs/harvest/a --cache_b=runs/harvest/b --floor_cache_b=runs/harvest/b_rand \\
        --hookpoint_a=resid_post.3 --hookpoint_b=resid_post.3 --d_sae=4096 --k=32

Outputs: ``results.json``, a printed summary, ``plots/r_histogram_<design>.png`` (real vs floor)
and ``plots/tradeoff.png`` (shared fraction vs mean FVU per design and coefficient), and per
run ``runs/<pair>/<label>/`` (metrics.jsonl, orbax checkpoints, the joint model in the native
format under ``joint/``). Rerunning the same workdir resumes every training run.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import logging

from experiments import common
from experiments.configs import joint_sae as CONFIG  # noqa: N812  (the config module)


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    xs: tuple
    truth: object = None


def _fail(msg: str) -> None:
    print(f"joint_sae: {msg}", file=sys.stderr)
    sys.exit(2)


def load_pairs(settings) -> tuple[Pair, Pair, dict]:
    """The real pair and its floor pair (checked before any training)."""
    from models import dictionary_pair
    if settings.source == "toy":
        real = dictionary_pair.make_partial_pair(settings.toy_seed, n_tokens=settings.n_tokens)
        d = real.description
        floor = dictionary_pair.make_partial_pair(
            settings.toy_seed, n_shared=0, n_exclusive_a=d["n_shared"] + d["n_exclusive_a"],
            n_exclusive_b=d["n_shared"] + d["n_exclusive_b"], n_tokens=settings.n_tokens)
        return (Pair("real", (real.acts_a, real.acts_b), real),
                Pair("floor", (floor.acts_a, floor.acts_b), floor),
                {"real": real.description, "floor": floor.description})
    missing = [n for n in ("cache_a", "cache_b", "floor_cache_b", "hookpoint_a", "hookpoint_b")
               if not getattr(settings, n)]
    if missing:
        _fail(f"--source=caches needs --{', --'.join(missing)}")
    for n in ("cache_a", "cache_b", "floor_cache_b"):
        if not os.path.isdir(getattr(settings, n)):
            _fail(f"--{n}={getattr(settings, n)} is not a directory")
    from engine import checks
    from models import activation_cache as ac
    try:
        a, b, fb = (ac.ActivationCache(p) for p in (settings.cache_a, settings.cache_b,
                                                    settings.floor_cache_b))
        pairs = []
        for name, other in (("real", b), ("floor", fb)):
            src = ac.paired_source(a, settings.hookpoint_a, other, settings.hookpoint_b)
            rows = min(int(src.num_rows), settings.max_rows)
            _, xa, xb = src.read_rows(0, rows)
            pairs.append(Pair(name, (np.asarray(xa, np.float32), np.asarray(xb, np.float32))))
    except (checks.InputError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    return pairs[0], pairs[1], {"cache_a": settings.cache_a, "cache_b": settings.cache_b,
                                "floor_cache_b": settings.floor_cache_b}


def joint_configs(settings, seed: int) -> list:
    from models import joint_sae as js
    out = []
    F, k = settings.d_sae, settings.k
    for d in settings.designs:
        if d == "crosscoder_l1":
            out += [js.JointConfig("crosscoder", F, "relu", l1_coeff=float(c), lr=settings.lr,
                                   seed=seed) for c in settings.l1_coeffs]
        elif d == "crosscoder_topk":
            out.append(js.JointConfig("crosscoder", F, "topk", k=k + 1, lr=settings.lr, seed=seed))
        elif d == "universal":
            out.append(js.JointConfig("universal", F, "topk", k=k, lr=settings.lr, seed=seed))
        elif d == "aligned":
            out += [js.JointConfig("aligned", settings.d_sae_single, "topk", k=k,
                                   align_coeff=float(c), lr=settings.lr, seed=seed)
                    for c in settings.align_coeffs]
        elif d != "independent":
            _fail(f"--designs: unknown {d!r}; expected crosscoder_l1, crosscoder_topk, "
                  "universal, aligned, independent")
    for cfg in out:
        cfg.validate()
    return out


def run_pair(run, settings, pair: Pair, seed: int) -> list[dict]:
    from experiments.pipeline import joint_metrics as jm
    from models import joint_sae as js
    from models import sae_train
    results = []
    for cfg in joint_configs(settings, seed):
        wd = run.path("runs", pair.name, cfg.label())
        logging.info("training %s on %s", cfg.label(), pair.name)
        joint = js.train_joint(list(pair.xs), cfg, steps=settings.steps,
                               batch_size=settings.batch_size, mesh=run.mesh, workdir=wd,
                               data_seed=1000 + seed, model_names=("a", "b"),
                               progress=settings.progress)
        res = jm.analyze_joint(joint, pair.xs, run.mesh, truth=pair.truth,
                               num_permutations=settings.num_permutations, seed=seed,
                               metrics=tuple(settings.metrics))
        res.update(pair=pair.name, seed=seed)
        results.append(res)
    if "independent" in settings.designs:
        saes = []
        for side, x in enumerate(pair.xs):
            tcfg = sae_train.TrainConfig(d_sae=settings.d_sae_single, activation="topk",
                                         k=settings.k, lr=settings.lr, seed=2 * seed + side + 1)
            # Each SAE has its own seed and data order.
            saes.append(sae_train.train_saes(
                x, tcfg, steps=settings.steps, batch_size=settings.batch_size, mesh=run.mesh,
                workdir=run.path("runs", pair.name, f"independent_{'ab'[side]}_s{seed}"),
                data_seed=2000 + 2 * seed + side, progress=settings.progress)[0])
        res = jm.analyze_independent(saes[0], saes[1], pair.xs, run.mesh, truth=pair.truth,
                                     num_permutations=settings.num_permutations, seed=seed,
                                     metrics=tuple(settings.metrics))
        res.update(pair=pair.name, seed=seed)
        results.append(res)
    return results


def _primary_geometry(res: dict) -> dict | None:
    return res["sharing"][res["primary_criterion"]].get("geometry")


def summarise(real: list[dict], floor: list[dict]) -> list[dict]:
    """One row per design/coefficient/seed: real vs floor and the excess."""
    rows = []
    for r, f in zip(real, floor):
        assert r["label"] == f["label"]
        prim = r["primary_criterion"]
        row = {"label": r["label"], "design": r["design"], "seed": r["seed"],
               "criterion": prim, "fraction_shared": r["fraction_shared"],
               "floor_fraction_shared": f["fraction_shared"],
               "excess_over_floor": r["fraction_shared"] - f["fraction_shared"],
               "mean_fvu": r["reconstruction"]["mean_fvu"],
               "floor_mean_fvu": f["reconstruction"]["mean_fvu"],
               "l0": [p["l0"] for p in r["reconstruction"]["per_model"]],
               "dead": [p["dead_fraction"] for p in r["reconstruction"]["per_model"]]}
        truth = r["sharing"][prim].get("truth")
        if truth:
            row.update({k: truth.get(k) for k in (
                "shared_precision", "shared_recall", "shared_precision_frequent",
                "exclusive_a_recall", "exclusive_b_recall", "exclusive_a_called_shared",
                "exclusive_b_called_shared")})
        for name, res in (("geometry", r), ("floor_geometry", f)):
            g = _primary_geometry(res)
            if g and "metrics" in g:
                row[name] = {m: {"score": v["score"], "p": v["p"], "excess": v["excess"]}
                             for m, v in g["metrics"].items()}
                row[name]["n"] = g["n"]
            else:
                row[name] = g
        if "latent_scaling" in r:
            ls = r["latent_scaling"]
            row["latent_scaling_flagged"] = [ls["exclusive_a"]["n_flagged"],
                                             ls["exclusive_b"]["n_flagged"]]
            row["latent_scaling_exclusive"] = [ls["exclusive_a"]["n"], ls["exclusive_b"]["n"]]
            if "n_carrying_true_shared" in ls["exclusive_a"]:
                # Known truth: norm-exclusive latents that carry a truly shared feature (real
                # artifacts) and how many of them the check flags.
                row["latent_scaling_true_artifacts"] = [
                    ls[f"exclusive_{s}"].get("n_carrying_true_shared", 0) for s in "ab"]
                row["latent_scaling_flagged_true_artifacts"] = [
                    ls[f"exclusive_{s}"].get("n_flagged_carrying_true_shared", 0) for s in "ab"]
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_summary(rows: list[dict]) -> None:
    print(f"{'design / coefficient':44s} {'crit':22s} {'shared':>6s} {'floor':>6s} "
          f"{'excess':>6s} {'FVU':>6s} {'P_sh':>5s} {'P_fr':>5s} {'R_sh':>5s} {'exSh':>5s} "
          f"{'svcca':>6s} {'p':>5s} {'fl.svcca':>8s}")
    for r in rows:
        g, fg = r.get("geometry") or {}, r.get("floor_geometry") or {}
        sv = g.get("svcca", {}) if isinstance(g, dict) else {}
        fsv = fg.get("svcca", {}) if isinstance(fg, dict) else {}
        ex_sh = None
        if r.get("exclusive_a_called_shared") is not None:
            ex_sh = np.mean([v for v in (r.get("exclusive_a_called_shared"),
                                         r.get("exclusive_b_called_shared")) if v is not None])
        print(f"{r['label']:44s} {r['criterion']:22s} {r['fraction_shared']:6.2f} "
              f"{r['floor_fraction_shared']:6.2f} {r['excess_over_floor']:+6.2f} "
              f"{r['mean_fvu']:6.3f} {_fmt(r.get('shared_precision')):>5s} "
              f"{_fmt(r.get('shared_precision_frequent')):>5s} "
              f"{_fmt(r.get('shared_recall')):>5s} {_fmt(ex_sh):>5s} "
              f"{_fmt(sv.get('score')):>6s} {_fmt(sv.get('p')):>5s} "
              f"{_fmt(fsv.get('score')):>8s}")
    for r in rows:
        if "latent_scaling_flagged" in r:
            line = (f"latent scaling {r['label']}: flagged {r['latent_scaling_flagged']} of "
                    f"{r['latent_scaling_exclusive']} norm-exclusive latents (A, B)")
            if "latent_scaling_true_artifacts" in r:
                line += (f"; truly shared among them {r['latent_scaling_true_artifacts']}, "
                         f"of which flagged {r['latent_scaling_flagged_true_artifacts']}")
            print(line)
    print("shared: fraction of live latents called shared (criterion per design; thresholds in "
          "experiments/pipeline/joint_metrics.py); floor: the same on the nothing-shared pair; "
          "P_sh/R_sh: precision/recall of the shared call vs the known truth; exSh: fraction "
          "of latents carrying a truly exclusive feature that were called shared; P_fr: "
          "shared precision among latents firing on >= 1% of rows; svcca/p: "
          "geometry of the shared latents' decoder rows vs the random-pairing null.")


def plots(run, real: list[dict], floor: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for r, f in zip(real, floor):
        if "r_histogram" not in r:
            continue
        bins = np.asarray(r["r_histogram"]["bins"])
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for res, name, style in ((r, "real pair", "-"), (f, "floor pair", "--")):
            ax.stairs(res["r_histogram"]["counts"], bins, label=name, linestyle=style)
        for edge in (0.1, 0.3, 0.7, 0.9):
            ax.axvline(edge, color="grey", lw=0.5)
        ax.set_xlabel("r = |d_B| / (|d_A| + |d_B|)")
        ax.set_ylabel("live latents")
        ax.set_title(r["label"], fontsize=8)
        ax.legend(fontsize=7)
        path = os.path.join(run.plots_dir, f"r_histogram_{r['label']}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"crosscoder": "C0", "universal": "C1", "aligned": "C2", "independent": "C3"}
    for res_list, filled in ((real, True), (floor, False)):
        for res in res_list:
            c = colors[res["design"]]
            ax.scatter(res["reconstruction"]["mean_fvu"], res["fraction_shared"],
                       facecolors=c if filled else "none", edgecolors=c, s=36)
            if filled:
                ax.annotate(res["label"].replace("_F", "\nF"), (res["reconstruction"]["mean_fvu"],
                                                                res["fraction_shared"]),
                            fontsize=5)
    for d, c in colors.items():
        ax.scatter([], [], color=c, label=d)
    ax.set_xlabel("mean FVU over the two models")
    ax.set_ylabel("fraction of live latents shared (design's criterion)")
    ax.set_title("sharing vs reconstruction (filled: real pair, hollow: floor pair)", fontsize=8)
    ax.legend(fontsize=7)
    path = os.path.join(run.plots_dir, "tradeoff.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def body(run, settings) -> None:
    """The experiment behind `common.entry` (settings checked, workdir fingerprinted)."""
    try:
        seeds = [int(s) for s in settings.seeds]
        [float(c) for c in settings.l1_coeffs + settings.align_coeffs]
    except ValueError as e:
        _fail(f"--seeds / --l1_coeffs / --align_coeffs: {e}")
    for s in seeds:
        joint_configs(settings, s)
    from engine import checks, similarity
    for name in settings.metrics:
        try:
            similarity.get(name)
        except checks.InputError as e:
            _fail(f"--metrics: {e}")
    if settings.batch_size % run.mesh.shape["data"]:
        _fail(f"--batch_size={settings.batch_size} is not divisible by the mesh data axis "
              f"({run.mesh.shape['data']})")
    real_pair, floor_pair, data = load_pairs(settings)
    real, floor = [], []
    for seed in seeds:
        real += run_pair(run, settings, real_pair, seed)
        floor += run_pair(run, settings, floor_pair, seed)
    rows = summarise(real, floor)
    paths = plots(run, real, floor)
    from experiments.pipeline import joint_metrics as jm
    results = {"data": data, "summary": rows, "real": real, "floor": floor,
               "thresholds": {"shared_r": jm.SHARED_R, "exclusive_r": jm.EXCLUSIVE_R,
                              "shared_corr": jm.SHARED_CORR,
                              "exclusive_corr": jm.EXCLUSIVE_CORR,
                              "truth_min_cos": jm.TRUTH_MIN_COS, "artifact_nu": jm.ARTIFACT_NU},
               "plots": paths}
    run.write_results(results)
    print_summary(rows)
    print(f"results: {run.path('results.json')}  plots: {run.plots_dir}")
    logging.flush()


def _data(settings) -> dict:
    """Activation caches whose identity enters the run fingerprint."""
    if settings.source != "caches":
        return {}
    return {name: os.path.join(getattr(settings, name), "metadata.json")
            for name in ("cache_a", "cache_b", "floor_cache_b") if getattr(settings, name)}


if __name__ == "__main__":
    common.entry("joint_sae", body, CONFIG, data=_data)

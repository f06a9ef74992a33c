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
* ``--source=toy`` (default, embedded, no downloads): two sides from
  `models.dictionary_pair.make_partial_pair` (32 shared + 16 exclusive features per side in 32
  dimensions); the floor is the same generator with nothing shared (the control).
  ``--n_models=3`` (or more): `models.dictionary_pair.make_partial_sides`, features shared by
  all sides plus exclusive ones per side; the report adds per-model and per-model-pair tables.
* ``--source=caches``: aligned rows of two activation caches over the same tokens
  (`models.activation_cache.paired_source`: same tokenizer and token ids), ``--cache_a``,
  ``--cache_b``, ``--hookpoint_a/b``; the floor pair is A against ``--floor_cache_b``, a cache
  of a randomly initialised copy of model B harvested on the same text (required).

Sweeps: all seeds and coefficients of a design train as ONE stacked program
(`models.joint_sae.train_joint_sweep`: ``lax.map`` over the members on CPU, ``vmap`` on
accelerators); every member sees the same batches, seeds vary the initialisation. The TopK
joint designs and the independent SAEs use AuxK (``--aux_coeff``, ``--dead_tokens``; at the
default 10M dead tokens it never triggers on the toy).

Commands (the default is the CI-sized toy: 600 steps, 8192 rows, 100 null permutations)::

    python -m experiments.joint_sae --workdir=runs/joint_sae/toy
    python -m experiments.joint_sae --workdir=runs/joint_sae/toy3 --n_models=3
    python -m experiments.joint_sae --workdir=runs/joint_sae/toy_sweep \\
        --seeds=0,1,2 --l1_coeffs=0.3,1,3 --align_coeffs=0.1,0.3,1,3,10 --steps=3000 \\
        --n_tokens=16384 --num_permutations=200 --metrics=svcca,pwcca,cka,rsa_spearman
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
from absl import flags, logging

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags()
flags.DEFINE_enum("source", "toy", ["toy", "caches"], "Embedded toy pair or two LM caches.")
flags.DEFINE_string("cache_a", None, "Activation cache of model A (--source=caches).")
flags.DEFINE_string("cache_b", None, "Activation cache of model B (same tokens).")
flags.DEFINE_string("floor_cache_b", None, "Cache of a random-init copy of B (the floor).")
flags.DEFINE_string("hookpoint_a", None, "Hookpoint of cache A.")
flags.DEFINE_string("hookpoint_b", None, "Hookpoint of cache B (and of the floor cache).")
flags.DEFINE_integer("max_rows", 200_000, "Rows read from the caches (in memory).")
flags.DEFINE_integer("n_tokens", 8192, "Toy rows.")
flags.DEFINE_integer("toy_seed", 0, "Toy pair seed.")
flags.DEFINE_integer("n_models", 2, "Toy sides (models); > 2 uses "
                     "models.dictionary_pair.make_partial_sides (features shared by all sides).")
flags.DEFINE_integer("dead_tokens", 10_000_000, "Rows without firing before a latent of a "
                     "TopK/BatchTopK joint design is dead (its AuxK target).")
flags.DEFINE_float("aux_coeff", 1.0 / 32, "AuxK coefficient of the TopK joint designs (0: off).")
flags.DEFINE_integer("steps", 600, "Optimisation steps per run.")
flags.DEFINE_integer("batch_size", 256, "Rows per step.")
flags.DEFINE_integer("d_sae", 96, "Latents of the joint designs (crosscoder, universal).")
flags.DEFINE_integer("d_sae_single", 64, "Latents per SAE of aligned / independent SAEs.")
flags.DEFINE_integer("k", 3, "TopK k (crosscoder TopK uses k + 1: its one code serves both "
                     "models' features).")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_list("designs", ["crosscoder_l1", "crosscoder_topk", "universal", "aligned",
                              "independent"], "Which designs to run.")
flags.DEFINE_list("l1_coeffs", ["1", "3"], "Crosscoder L1 coefficients.")
flags.DEFINE_list("align_coeffs", ["1", "3", "10"], "Alignment coefficients alpha.")
flags.DEFINE_list("seeds", ["0"], "Initialisation seeds (each run also gets its data order).")
flags.DEFINE_integer("num_permutations", 100, "Random-pairing null size of the geometry.")
flags.DEFINE_list("metrics", ["svcca", "cka", "rsa_spearman"],
                  "Geometry metrics (engine.similarity registry names; the pipeline's full set "
                  "is svcca,pwcca,cka,rsa_spearman,procrustes,mutual_knn, each costs a compile "
                  "per pair count on CPU).")


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    xs: tuple
    truth: object = None


def _fail(msg: str) -> None:
    print(f"joint_sae: {msg}", file=sys.stderr)
    sys.exit(2)


def load_pairs() -> tuple[Pair, Pair, dict]:
    """The real pair (or group of ``--n_models`` sides) and its floor (checked before any
    training)."""
    from models import dictionary_pair
    if FLAGS.source == "toy" and FLAGS.n_models > 2:
        real = dictionary_pair.make_partial_sides(FLAGS.toy_seed, FLAGS.n_models,
                                                  n_tokens=FLAGS.n_tokens)
        d = real.description
        floor = dictionary_pair.make_partial_sides(
            FLAGS.toy_seed, FLAGS.n_models, n_shared=0,
            n_exclusive=d["n_shared"] + d["n_exclusive"], n_tokens=FLAGS.n_tokens)
        return (Pair("real", real.acts, real), Pair("floor", floor.acts, floor),
                {"real": real.description, "floor": floor.description})
    if FLAGS.source == "toy":
        real = dictionary_pair.make_partial_pair(FLAGS.toy_seed, n_tokens=FLAGS.n_tokens)
        d = real.description
        floor = dictionary_pair.make_partial_pair(
            FLAGS.toy_seed, n_shared=0, n_exclusive_a=d["n_shared"] + d["n_exclusive_a"],
            n_exclusive_b=d["n_shared"] + d["n_exclusive_b"], n_tokens=FLAGS.n_tokens)
        return (Pair("real", (real.acts_a, real.acts_b), real),
                Pair("floor", (floor.acts_a, floor.acts_b), floor),
                {"real": real.description, "floor": floor.description})
    missing = [n for n in ("cache_a", "cache_b", "floor_cache_b", "hookpoint_a", "hookpoint_b")
               if not getattr(FLAGS, n)]
    if missing:
        _fail(f"--source=caches needs --{', --'.join(missing)}")
    for n in ("cache_a", "cache_b", "floor_cache_b"):
        if not os.path.isdir(getattr(FLAGS, n)):
            _fail(f"--{n}={getattr(FLAGS, n)} is not a directory")
    from engine import checks
    from models import activation_cache as ac
    try:
        a, b, fb = (ac.ActivationCache(p) for p in (FLAGS.cache_a, FLAGS.cache_b,
                                                    FLAGS.floor_cache_b))
        pairs = []
        for name, other in (("real", b), ("floor", fb)):
            src = ac.paired_source(a, FLAGS.hookpoint_a, other, FLAGS.hookpoint_b)
            rows = min(int(src.num_rows), FLAGS.max_rows)
            _, xa, xb = src.read_rows(0, rows)
            pairs.append(Pair(name, (np.asarray(xa, np.float32), np.asarray(xb, np.float32))))
    except (checks.InputError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    return pairs[0], pairs[1], {"cache_a": FLAGS.cache_a, "cache_b": FLAGS.cache_b,
                                "floor_cache_b": FLAGS.floor_cache_b}


def joint_configs(seed: int) -> list:
    from models import joint_sae as js
    out = []
    F, k = FLAGS.d_sae, FLAGS.k
    aux = dict(aux_coeff=FLAGS.aux_coeff, dead_tokens=FLAGS.dead_tokens)
    for d in FLAGS.designs:
        if d == "crosscoder_l1":
            out += [js.JointConfig("crosscoder", F, "relu", l1_coeff=float(c), lr=FLAGS.lr,
                                   seed=seed) for c in FLAGS.l1_coeffs]
        elif d == "crosscoder_topk":
            out.append(js.JointConfig("crosscoder", F, "topk", k=k + 1, lr=FLAGS.lr, seed=seed,
                                      **aux))
        elif d == "universal":
            out.append(js.JointConfig("universal", F, "topk", k=k, lr=FLAGS.lr, seed=seed,
                                      **aux))
        elif d == "aligned":
            out += [js.JointConfig("aligned", FLAGS.d_sae_single, "topk", k=k,
                                   align_coeff=float(c), lr=FLAGS.lr, seed=seed, **aux)
                    for c in FLAGS.align_coeffs]
        elif d != "independent":
            _fail(f"--designs: unknown {d!r}; expected crosscoder_l1, crosscoder_topk, "
                  "universal, aligned, independent")
    for cfg in out:
        cfg.validate()
    return out


def run_pair(run, pair: Pair, seeds: list[int]) -> list[dict]:
    """Every design on one pair (group of models). All seeds and coefficients of a design
    train as ONE stacked program (`models.joint_sae.train_joint_sweep`; the independent SAEs
    of a model as one `models.sae_train.train_saes` program), each member on the same
    batches: seeds vary the initialisation only."""
    from experiments.pipeline import joint_metrics as jm
    from models import joint_sae as js
    from models import sae_train
    M = len(pair.xs)
    names = tuple("abcdefghijklmnopqrstuvwxyz"[:M]) if M <= 26 else None
    configs = [c for s in seeds for c in joint_configs(s)]
    results = []
    if configs:
        logging.info("training %d joint models on %s", len(configs), pair.name)
        joints = js.train_joint_sweep(list(pair.xs), configs, steps=FLAGS.steps,
                                      batch_size=FLAGS.batch_size, mesh=run.mesh,
                                      workdir=run.path("runs", pair.name), data_seed=1000,
                                      model_names=names, progress=FLAGS.progress)
        for cfg, joint in zip(configs, joints):
            res = jm.analyze_joint(joint, pair.xs, run.mesh, truth=pair.truth,
                                   num_permutations=FLAGS.num_permutations, seed=cfg.seed,
                                   metrics=tuple(FLAGS.metrics))
            res.update(pair=pair.name, seed=cfg.seed)
            results.append(res)
    if "independent" in FLAGS.designs:
        per_model = []
        for m, x in enumerate(pair.xs):
            # Each model's SAEs get their own seeds and data order.
            tcfgs = [sae_train.TrainConfig(d_sae=FLAGS.d_sae_single, activation="topk",
                                           k=FLAGS.k, lr=FLAGS.lr, seed=M * s + m + 1,
                                           aux_coeff=FLAGS.aux_coeff,
                                           dead_tokens=FLAGS.dead_tokens) for s in seeds]
            per_model.append(sae_train.train_saes(
                x, tcfgs, steps=FLAGS.steps, batch_size=FLAGS.batch_size, mesh=run.mesh,
                workdir=run.path("runs", pair.name, f"independent_{m}"),
                data_seed=2000 + m, progress=FLAGS.progress))
        for i, seed in enumerate(seeds):
            res = jm.analyze_independent([saes[i] for saes in per_model], pair.xs, run.mesh,
                                         truth=pair.truth,
                                         num_permutations=FLAGS.num_permutations, seed=seed,
                                         metrics=tuple(FLAGS.metrics))
            res.update(pair=pair.name, seed=seed)
            results.append(res)
    return results


def _primary_geometry(res: dict) -> dict | None:
    return res["sharing"][res["primary_criterion"]].get("geometry")


def _compact_geometry(g):
    if g and "metrics" in g:
        out = {m: {"score": v["score"], "p": v["p"], "excess": v["excess"]}
               for m, v in g["metrics"].items()}
        out["n"] = g["n"]
        return out
    return g


def _pair_rows(r: dict, f: dict) -> list[dict]:
    """Per model pair: shared fraction real vs floor, truth scores, geometry."""
    rows = []
    for pr, pf in zip(r["pairs"], f["pairs"]):
        prim = pr["primary_criterion"]
        row = {"models": pr["models"], "fraction_shared": pr["fraction_shared"],
               "floor_fraction_shared": pf["fraction_shared"],
               "excess_over_floor": pr["fraction_shared"] - pf["fraction_shared"],
               "n_exclusive": [pr["sharing"][prim]["n_exclusive_a"],
                               pr["sharing"][prim]["n_exclusive_b"]],
               "fraction_exclusive": pr["sharing"][prim]["fraction_exclusive"],
               "geometry": _compact_geometry(_primary_geometry(pr)),
               "floor_geometry": _compact_geometry(_primary_geometry(pf))}
        truth = pr["sharing"][prim].get("truth")
        if truth:
            row.update({k: truth.get(k) for k in ("shared_precision", "shared_recall",
                                                  "exclusive_a_called_shared",
                                                  "exclusive_b_called_shared")})
        rows.append(row)
    return rows


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
               "dead": [p["dead_fraction"] for p in r["reconstruction"]["per_model"]],
               "fvu": [p["fvu"] for p in r["reconstruction"]["per_model"]],
               "n_models": r["n_models"], "pairs": _pair_rows(r, f)}
        truth = r["sharing"][prim].get("truth")
        if truth:
            row.update({k: truth.get(k) for k in (
                "shared_precision", "shared_recall", "shared_precision_frequent",
                "exclusive_a_recall", "exclusive_b_recall", "exclusive_a_called_shared",
                "exclusive_b_called_shared")})
        for name, res in (("geometry", r), ("floor_geometry", f)):
            row[name] = _compact_geometry(_primary_geometry(res))
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
    if any(r["n_models"] > 2 for r in rows):
        print("per model (FVU / L0 / dead fraction):")
        for r in rows:
            per = "  ".join(f"m{m}: {fv:.3f}/{l0:.1f}/{dd:.2f}" for m, (fv, l0, dd) in
                            enumerate(zip(r["fvu"], r["l0"], r["dead"])))
            print(f"  {r['label']:42s} {per}")
        print("per model pair (shared real / floor / excess, exclusive fraction, P_sh, R_sh, "
              "svcca):")
        for r in rows:
            for p in r["pairs"]:
                g = p.get("geometry") or {}
                sv = g.get("svcca", {}) if isinstance(g, dict) else {}
                print(f"  {r['label']:42s} {p['models'][0]}-{p['models'][1]} "
                      f"{p['fraction_shared']:5.2f} {p['floor_fraction_shared']:5.2f} "
                      f"{p['excess_over_floor']:+5.2f} {p['fraction_exclusive']:5.2f} "
                      f"{_fmt(p.get('shared_precision')):>5s} "
                      f"{_fmt(p.get('shared_recall')):>5s} {_fmt(sv.get('score')):>5s}")
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
          "geometry of the shared latents' decoder rows vs the random-pairing null. With more "
          "than two models the table's shared/floor/excess are means over model pairs and "
          "P/R/svcca are for models 0-1; the per-pair table has every pair.")


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


def body(run, flags_) -> None:
    """The experiment behind `common.entry` (settings checked, workdir fingerprinted)."""
    del flags_   # the functions below read FLAGS
    try:
        seeds = [int(s) for s in FLAGS.seeds]
        [float(c) for c in FLAGS.l1_coeffs + FLAGS.align_coeffs]
    except ValueError as e:
        _fail(f"--seeds / --l1_coeffs / --align_coeffs: {e}")
    for s in seeds:
        joint_configs(s)
    from engine import checks, similarity
    for name in FLAGS.metrics:
        try:
            similarity.get(name)
        except checks.InputError as e:
            _fail(f"--metrics: {e}")
    if FLAGS.batch_size % run.mesh.shape["data"]:
        _fail(f"--batch_size={FLAGS.batch_size} is not divisible by the mesh data axis "
              f"({run.mesh.shape['data']})")
    real_pair, floor_pair, data = load_pairs()
    real = run_pair(run, real_pair, seeds)
    floor = run_pair(run, floor_pair, seeds)
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


def _metric_names():
    from engine import similarity
    return sorted(similarity.METRICS)


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Path(("cache_a", "cache_b", "floor_cache_b"), kind="dir", what="an activation cache"),
    common.Check(("source", "cache_a", "cache_b"), lambda v: v["source"] != "caches" or bool(
        v["cache_a"] and v["cache_b"] and v["floor_cache_b"]),
                 "--source=caches needs --cache_a, --cache_b and --floor_cache_b"),
    common.Num(("max_rows", "n_tokens", "steps", "batch_size", "d_sae", "d_sae_single", "k",
                "num_permutations", "dead_tokens"), lo=1, integer=True),
    common.Num(("n_models",), lo=2, integer=True),
    common.Check(("source", "n_models"), lambda v: v["source"] != "caches" or v["n_models"] == 2,
                 "--n_models > 2 is for --source=toy (the caches option pairs two models)"),
    common.Num(("lr",), lo=0.0, lo_open=True),
    common.Num(("aux_coeff",), lo=0.0),
    common.Num(("l1_coeffs", "align_coeffs"), lo=0.0),
    common.Num(("seeds", "toy_seed"), lo=0, integer=True),
)


def _data(flags_) -> dict:
    """Activation caches whose identity enters the run fingerprint."""
    if flags_.source != "caches":
        return {}
    return {name: os.path.join(getattr(flags_, name), "metadata.json")
            for name in ("cache_a", "cache_b", "floor_cache_b") if getattr(flags_, name)}


if __name__ == "__main__":
    common.entry("joint_sae", body, RULES, data=_data)

"""Jointly trained cross-model SAEs (issue 15): how much sharing can a loss buy, honestly?

For each design and coefficient (universal SAE, crosscoder L1 / TopK, alignment-penalised
SAEs with alpha; `models.joint_sae`) and for two independently trained SAEs
(`experiments.pipeline.saes.obtain`), on the real pair AND on a floor pair, this reports
reconstruction per model (FVU, L0, dead), the shared / exclusive fractions (relative
decoder-norm histogram; activation correlations), the geometry of the shared latents with the
universality pipeline's metrics and random-pairing nulls, Minder et al.'s latent scaling check,
and, on the toy, precision / recall of the shared / exclusive calls against the known truth
(`experiments.pipeline.joint_metrics` documents every threshold). The summary states each
design's excess shared fraction over its floor.

Data:
* ``--source=toy`` (default, embedded, no downloads): two sides from
  `models.dictionary_pair.make_partial_pair` (32 shared + 16 exclusive features per side in 32
  dimensions); the floor is the same generator with nothing shared (the control).
  ``--n_models=3`` (or more): `models.dictionary_pair.make_partial_sides`, features shared by
  all sides plus exclusive ones per side; the report adds per-model and per-model-pair tables.
* ``--source=caches``: aligned rows of two activation caches, ``--cache_a``, ``--cache_b``,
  ``--hookpoint_a/b``; the floor pair is A against ``--floor_cache_b``, a cache of a randomly
  initialised copy of model B (B's tokenizer) harvested on the same text and contexts
  (required). Caches made with the same tokenizer pair token by token
  (`models.activation_cache.paired_source`: same token ids). Caches made with different
  tokenizers pair through aligned units of text (`experiments.pipeline.aligned`, as in the
  universality pipeline): ``--model_a`` / ``--model_b`` (the models' local directories, for
  their tokenizers) and ``--text`` (the text both caches were harvested on) are then required;
  each side's contexts are rebuilt from the text and checked against its cache, the alignment
  (``--alignment``: auto = shared_boundaries, or words; ``--alignment_pooling``: last / mean /
  max) is stored under ``--alignment_dir`` (default ``WORKDIR/alignment/<unit>``), and A's,
  B's and the floor's cache rows are pooled into the same unit rows (the floor with B's side
  of the alignment). ``results.json`` records the alignment report (units, dropped units,
  coverage) under ``data.alignment``; ``--max_rows`` then counts units.

Sweeps: all seeds and coefficients of a design train as ONE stacked program
(`models.joint_sae.train_joint_sweep`: ``lax.map`` over the members on CPU, ``vmap`` on
accelerators); every member sees the same batches, seeds vary the initialisation. The
independent SAEs train one by one through the pipeline's train-or-load helper, each with its
own role-derived init seed and data order (`experiments.pipeline.saes.role_seeds`). The TopK
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
    python -m experiments.joint_sae --workdir=runs/joint_sae/lm_xtok --source=caches \\
        --cache_a=runs/harvest/a --cache_b=runs/harvest/c --floor_cache_b=runs/harvest/c_rand \\
        --hookpoint_a=resid_post.3 --hookpoint_b=resid_post.3 --model_a=weights/a \\
        --model_b=weights/c --text=data/text.jsonl --alignment_pooling=mean --d_sae=4096 --k=32

Outputs: ``results.json``, a printed summary, ``plots/r_histogram_<design>.png`` (real vs floor)
and ``plots/tradeoff.png`` (shared fraction vs mean FVU per design and coefficient), and per
run ``runs/<pair>/<label>/`` (metrics.jsonl, orbax checkpoints, the joint model in the native
format under ``joint/``), and per independent SAE ``saes/<pair>/<role>/``. Rerunning the
same workdir resumes every training run.
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


def load_pairs(settings, run) -> tuple[Pair, Pair, dict]:
    """The real pair (or group of ``--n_models`` sides) and its floor (checked before any
    training)."""
    from models import dictionary_pair

    if settings.source == "toy" and settings.n_models > 2:
        real = dictionary_pair.make_partial_sides(
            settings.toy_seed, settings.n_models, n_tokens=settings.n_tokens
        )
        d = real.description
        floor = dictionary_pair.make_partial_sides(
            settings.toy_seed,
            settings.n_models,
            n_shared=0,
            n_exclusive=d["n_shared"] + d["n_exclusive"],
            n_tokens=settings.n_tokens,
        )
        return (
            Pair("real", real.acts, real),
            Pair("floor", floor.acts, floor),
            {"real": real.description, "floor": floor.description},
        )
    if settings.source == "toy":
        real = dictionary_pair.make_partial_pair(settings.toy_seed, n_tokens=settings.n_tokens)
        d = real.description
        floor = dictionary_pair.make_partial_pair(
            settings.toy_seed,
            n_shared=0,
            n_exclusive_a=d["n_shared"] + d["n_exclusive_a"],
            n_exclusive_b=d["n_shared"] + d["n_exclusive_b"],
            n_tokens=settings.n_tokens,
        )
        return (
            Pair("real", (real.acts_a, real.acts_b), real),
            Pair("floor", (floor.acts_a, floor.acts_b), floor),
            {"real": real.description, "floor": floor.description},
        )
    missing = [
        n
        for n in ("cache_a", "cache_b", "floor_cache_b", "hookpoint_a", "hookpoint_b")
        if not getattr(settings, n)
    ]
    if missing:
        _fail(f"--source=caches needs --{', --'.join(missing)}")
    for n in ("cache_a", "cache_b", "floor_cache_b"):
        if not os.path.isdir(getattr(settings, n)):
            _fail(f"--{n}={getattr(settings, n)} is not a directory")
    from engine import checks
    from models import activation_cache as ac

    try:
        a, b, fb = (
            ac.ActivationCache(p)
            for p in (settings.cache_a, settings.cache_b, settings.floor_cache_b)
        )
        if _needs_alignment(settings, a, b):
            return _aligned_pairs(settings, run, a, b, fb)
        pairs = []
        for name, other in (("real", b), ("floor", fb)):
            src = ac.paired_source(a, settings.hookpoint_a, other, settings.hookpoint_b)
            rows = min(int(src.num_rows), settings.max_rows)
            _, xa, xb = src.read_rows(0, rows)
            pairs.append(Pair(name, (np.asarray(xa, np.float32), np.asarray(xb, np.float32))))
    except (checks.InputError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    return (
        pairs[0],
        pairs[1],
        {
            "cache_a": settings.cache_a,
            "cache_b": settings.cache_b,
            "floor_cache_b": settings.floor_cache_b,
            "alignment": {
                "unit": "tokens",
                "note": "identical tokenizers: rows are the same tokens",
            },
        },
    )


def _same_tokenizer(cache_a, cache_b) -> bool:
    """The caches' recorded tokenizers agree (the test `paired_source` applies)."""
    ta, tb = cache_a.tokenizer or {}, cache_b.tokenizer or {}
    return ta.get("vocab_sha256") == tb.get("vocab_sha256") and ta.get("special_ids") == tb.get(
        "special_ids"
    )


def _needs_alignment(settings, cache_a, cache_b) -> bool:
    """Rows pair through aligned units: different tokenizers, or a unit asked for explicitly."""
    if settings.alignment == "tokens":
        return False  # paired_source refuses different tokenizers with a one-line error
    return settings.alignment != "auto" or not _same_tokenizer(cache_a, cache_b)


def _tokenizer(path: str, cache, flag: str):
    """The tokenizer of a local model directory, checked against the one ``cache`` recorded."""
    from engine import checks
    from experiments.pipeline import sides
    from models import text

    tok = sides.tokenizer(flag, path)
    want = (cache.tokenizer or {}).get("vocab_sha256")
    if want and text.tokenizer_fingerprint(tok)["vocab_sha256"] != want:
        raise checks.InputError(
            f"{flag}={path}: its tokenizer is not the one {cache.path} was harvested with"
        )
    return tok


def _aligned_pairs(settings, run, cache_a, cache_b, floor_b) -> tuple[Pair, Pair, dict]:
    """Real and floor pairs on aligned units of two tokenizers (`experiments.pipeline.aligned`).

    Each side's cache rows (own tokens) are pooled into the alignment's unit rows; the floor
    cache of B (same tokenizer and text as B) is pooled with B's side of the same alignment.
    """
    import types

    from engine import checks
    from experiments.pipeline import aligned

    missing = [n for n in ("text", "model_a", "model_b") if not getattr(settings, n)]
    if missing:
        why = (
            f"--alignment={settings.alignment}"
            if _same_tokenizer(cache_a, cache_b)
            else "the caches were made with different tokenizers"
        )
        raise checks.InputError(
            f"{why} (rows pair through aligned units): --source=caches then needs "
            f"--{', --'.join(missing)}"
        )
    lm_a = types.SimpleNamespace(tokenizer=_tokenizer(settings.model_a, cache_a, "--model_a"))
    lm_b = types.SimpleNamespace(tokenizer=_tokenizer(settings.model_b, cache_b, "--model_b"))
    if (floor_b.tokenizer or {}).get("vocab_sha256") != (cache_b.tokenizer or {}).get(
        "vocab_sha256"
    ) or not np.array_equal(floor_b.token_ids(), cache_b.token_ids()):
        raise checks.InputError(
            f"--floor_cache_b={floor_b.path}: not harvested on --cache_b's tokens (the floor "
            "is a random-init copy of B run on the same text and contexts)"
        )
    view = aligned.prepare(run, settings, lm_a, lm_b, cache_paths=(cache_a.path, cache_b.path))
    if view is None:  # --alignment=auto with identical tokenizers never reaches here
        raise checks.InputError("--alignment=tokens: the caches' tokenizers differ")
    n = min(len(view.alignment), settings.max_rows)
    xa = view.pool("a", cache_a.read(settings.hookpoint_a)[1])[:n]
    xb = view.pool("b", cache_b.read(settings.hookpoint_b)[1])[:n]
    fb = view.pool("b", floor_b.read(settings.hookpoint_b)[1])[:n]
    data = {
        "cache_a": cache_a.path,
        "cache_b": cache_b.path,
        "floor_cache_b": floor_b.path,
        "alignment": {**aligned.describe(view), "rows_used": int(n)},
    }
    f32 = np.float32
    return (
        Pair("real", (np.asarray(xa, f32), np.asarray(xb, f32))),
        Pair("floor", (np.asarray(xa, f32), np.asarray(fb, f32))),
        data,
    )


def joint_configs(settings, seed: int) -> list:
    from models import joint_sae as js

    out = []
    F, k = settings.d_sae, settings.k
    aux = dict(aux_coeff=settings.aux_coeff, dead_tokens=settings.dead_tokens)
    for d in settings.designs:
        if d == "crosscoder_l1":
            out += [
                js.JointConfig(
                    "crosscoder", F, "relu", l1_coeff=float(c), lr=settings.lr, seed=seed
                )
                for c in settings.l1_coeffs
            ]
        elif d == "crosscoder_topk":
            out.append(
                js.JointConfig("crosscoder", F, "topk", k=k + 1, lr=settings.lr, seed=seed, **aux)
            )
        elif d == "universal":
            out.append(
                js.JointConfig("universal", F, "topk", k=k, lr=settings.lr, seed=seed, **aux)
            )
        elif d == "aligned":
            out += [
                js.JointConfig(
                    "aligned",
                    settings.d_sae_single,
                    "topk",
                    k=k,
                    align_coeff=float(c),
                    lr=settings.lr,
                    seed=seed,
                    **aux,
                )
                for c in settings.align_coeffs
            ]
        elif d != "independent":
            _fail(
                f"--designs: unknown {d!r}; expected crosscoder_l1, crosscoder_topk, "
                "universal, aligned, independent"
            )
    for cfg in out:
        cfg.validate()
    return out


def run_pair(run, settings, pair: Pair, seeds: list[int]) -> list[dict]:
    """Every design on one pair (group of models). All seeds and coefficients of a design
    train as ONE stacked program (`models.joint_sae.train_joint_sweep`), each member on the
    same batches: seeds vary the initialisation only. The independent SAEs come from
    `_independent_saes` (one per model and seed, each with its own seeds and data order)."""
    from experiments.pipeline import joint_metrics as jm
    from models import joint_sae as js

    M = len(pair.xs)
    names = tuple("abcdefghijklmnopqrstuvwxyz"[:M]) if M <= 26 else None
    configs = [c for s in seeds for c in joint_configs(settings, s)]
    results = []
    if configs:
        logging.info("training %d joint models on %s", len(configs), pair.name)
        joints = js.train_joint_sweep(
            list(pair.xs),
            configs,
            steps=settings.steps,
            batch_size=settings.batch_size,
            mesh=run.mesh,
            workdir=run.path("runs", pair.name),
            data_seed=1000,
            model_names=names,
            progress=settings.progress,
        )
        for cfg, joint in zip(configs, joints):
            res = jm.analyze_joint(
                joint,
                pair.xs,
                run.mesh,
                truth=pair.truth,
                num_permutations=settings.num_permutations,
                seed=cfg.seed,
                metrics=tuple(settings.metrics),
            )
            res.update(pair=pair.name, seed=cfg.seed)
            results.append(res)
    if "independent" in settings.designs:
        per_model = _independent_saes(run, settings, pair, seeds)
        for i, seed in enumerate(seeds):
            res = jm.analyze_independent(
                [side_saes[i].sae for side_saes in per_model],
                pair.xs,
                run.mesh,
                truth=pair.truth,
                num_permutations=settings.num_permutations,
                seed=seed,
                metrics=tuple(settings.metrics),
            )
            res.update(pair=pair.name, seed=seed)
            results.append(res)
    return results


def _independent_saes(run, settings, pair: Pair, seeds: list[int]) -> list[list]:
    """Per model, one SAE per seed through the pipeline's train-or-load helper
    (`saes.obtain`): each SAE has its own role-derived init seed and data order, trains
    resumably under ``WORKDIR/saes/<pair>/<role>`` and is loaded when finished."""
    from experiments.pipeline import saes
    from models import sae_train

    recipe = sae_train.TrainConfig(
        d_sae=settings.d_sae_single,
        activation="topk",
        k=settings.k,
        lr=settings.lr,
        aux_coeff=settings.aux_coeff,
        dead_tokens=settings.dead_tokens,
    )
    M = len(pair.xs)
    hookpoints = [settings.hookpoint_a] + [settings.hookpoint_b] * (M - 1)
    per_model = [
        [
            saes.obtain(
                saes.Role(
                    "abcdefghijklmnopqrstuvwxyz"[m] if M <= 26 else f"m{m}",
                    (hookpoints[m] if settings.source == "caches" else None) or "toy",
                    replicate=i,
                ),
                x,
                user_seed=seed,
                recipe=recipe,
                steps=settings.steps,
                batch_size=settings.batch_size,
                root=run.path("saes", pair.name),
                mesh=run.mesh,
                progress=settings.progress,
            )
            for i, seed in enumerate(seeds)
        ]
        for m, x in enumerate(pair.xs)
    ]
    saes.check_distinct_seeds([s for side in per_model for s in side])
    return per_model


def _primary_geometry(res: dict) -> dict | None:
    return res["sharing"][res["primary_criterion"]].get("geometry")


def _compact_geometry(g):
    if g and "metrics" in g:
        out = {
            m: {"score": v["score"], "p": v["p"], "excess": v["excess"]}
            for m, v in g["metrics"].items()
        }
        out["n"] = g["n"]
        return out
    return g


def _pair_rows(r: dict, f: dict) -> list[dict]:
    """Per model pair: shared fraction real vs floor, truth scores, geometry."""
    rows = []
    for pr, pf in zip(r["pairs"], f["pairs"]):
        prim = pr["primary_criterion"]
        row = {
            "models": pr["models"],
            "fraction_shared": pr["fraction_shared"],
            "floor_fraction_shared": pf["fraction_shared"],
            "excess_over_floor": pr["fraction_shared"] - pf["fraction_shared"],
            "n_exclusive": [
                pr["sharing"][prim]["n_exclusive_a"],
                pr["sharing"][prim]["n_exclusive_b"],
            ],
            "fraction_exclusive": pr["sharing"][prim]["fraction_exclusive"],
            "geometry": _compact_geometry(_primary_geometry(pr)),
            "floor_geometry": _compact_geometry(_primary_geometry(pf)),
        }
        truth = pr["sharing"][prim].get("truth")
        if truth:
            row.update(
                {
                    k: truth.get(k)
                    for k in (
                        "shared_precision",
                        "shared_recall",
                        "exclusive_a_called_shared",
                        "exclusive_b_called_shared",
                    )
                }
            )
        rows.append(row)
    return rows


def summarise(real: list[dict], floor: list[dict]) -> list[dict]:
    """One row per design/coefficient/seed: real vs floor and the excess."""
    rows = []
    for r, f in zip(real, floor):
        assert r["label"] == f["label"]
        prim = r["primary_criterion"]
        row = {
            "label": r["label"],
            "design": r["design"],
            "seed": r["seed"],
            "criterion": prim,
            "fraction_shared": r["fraction_shared"],
            "floor_fraction_shared": f["fraction_shared"],
            "excess_over_floor": r["fraction_shared"] - f["fraction_shared"],
            "mean_fvu": r["reconstruction"]["mean_fvu"],
            "floor_mean_fvu": f["reconstruction"]["mean_fvu"],
            "l0": [p["l0"] for p in r["reconstruction"]["per_model"]],
            "dead": [p["dead_fraction"] for p in r["reconstruction"]["per_model"]],
            "fvu": [p["fvu"] for p in r["reconstruction"]["per_model"]],
            "n_models": r["n_models"],
            "pairs": _pair_rows(r, f),
        }
        truth = r["sharing"][prim].get("truth")
        if truth:
            row.update(
                {
                    k: truth.get(k)
                    for k in (
                        "shared_precision",
                        "shared_recall",
                        "shared_precision_frequent",
                        "exclusive_a_recall",
                        "exclusive_b_recall",
                        "exclusive_a_called_shared",
                        "exclusive_b_called_shared",
                    )
                }
            )
        for name, res in (("geometry", r), ("floor_geometry", f)):
            row[name] = _compact_geometry(_primary_geometry(res))
        if "latent_scaling" in r:
            ls = r["latent_scaling"]
            row["latent_scaling_flagged"] = [
                ls["exclusive_a"]["n_flagged"],
                ls["exclusive_b"]["n_flagged"],
            ]
            row["latent_scaling_exclusive"] = [ls["exclusive_a"]["n"], ls["exclusive_b"]["n"]]
            if "n_carrying_true_shared" in ls["exclusive_a"]:
                # Known truth: norm-exclusive latents that carry a truly shared feature (real
                # artifacts) and how many of them the check flags.
                row["latent_scaling_true_artifacts"] = [
                    ls[f"exclusive_{s}"].get("n_carrying_true_shared", 0) for s in "ab"
                ]
                row["latent_scaling_flagged_true_artifacts"] = [
                    ls[f"exclusive_{s}"].get("n_flagged_carrying_true_shared", 0) for s in "ab"
                ]
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_summary(rows: list[dict]) -> None:
    print(
        f"{'design / coefficient':44s} {'crit':22s} {'shared':>6s} {'floor':>6s} "
        f"{'excess':>6s} {'FVU':>6s} {'P_sh':>5s} {'P_fr':>5s} {'R_sh':>5s} {'exSh':>5s} "
        f"{'svcca':>6s} {'p':>5s} {'fl.svcca':>8s}"
    )
    for r in rows:
        g, fg = r.get("geometry") or {}, r.get("floor_geometry") or {}
        sv = g.get("svcca", {}) if isinstance(g, dict) else {}
        fsv = fg.get("svcca", {}) if isinstance(fg, dict) else {}
        ex_sh = None
        if r.get("exclusive_a_called_shared") is not None:
            ex_sh = np.mean(
                [
                    v
                    for v in (
                        r.get("exclusive_a_called_shared"),
                        r.get("exclusive_b_called_shared"),
                    )
                    if v is not None
                ]
            )
        print(
            f"{r['label']:44s} {r['criterion']:22s} {r['fraction_shared']:6.2f} "
            f"{r['floor_fraction_shared']:6.2f} {r['excess_over_floor']:+6.2f} "
            f"{r['mean_fvu']:6.3f} {_fmt(r.get('shared_precision')):>5s} "
            f"{_fmt(r.get('shared_precision_frequent')):>5s} "
            f"{_fmt(r.get('shared_recall')):>5s} {_fmt(ex_sh):>5s} "
            f"{_fmt(sv.get('score')):>6s} {_fmt(sv.get('p')):>5s} "
            f"{_fmt(fsv.get('score')):>8s}"
        )
    if any(r["n_models"] > 2 for r in rows):
        print("per model (FVU / L0 / dead fraction):")
        for r in rows:
            per = "  ".join(
                f"m{m}: {fv:.3f}/{l0:.1f}/{dd:.2f}"
                for m, (fv, l0, dd) in enumerate(zip(r["fvu"], r["l0"], r["dead"]))
            )
            print(f"  {r['label']:42s} {per}")
        print(
            "per model pair (shared real / floor / excess, exclusive fraction, P_sh, R_sh, svcca):"
        )
        for r in rows:
            for p in r["pairs"]:
                g = p.get("geometry") or {}
                sv = g.get("svcca", {}) if isinstance(g, dict) else {}
                print(
                    f"  {r['label']:42s} {p['models'][0]}-{p['models'][1]} "
                    f"{p['fraction_shared']:5.2f} {p['floor_fraction_shared']:5.2f} "
                    f"{p['excess_over_floor']:+5.2f} {p['fraction_exclusive']:5.2f} "
                    f"{_fmt(p.get('shared_precision')):>5s} "
                    f"{_fmt(p.get('shared_recall')):>5s} {_fmt(sv.get('score')):>5s}"
                )
    for r in rows:
        if "latent_scaling_flagged" in r:
            line = (
                f"latent scaling {r['label']}: flagged {r['latent_scaling_flagged']} of "
                f"{r['latent_scaling_exclusive']} norm-exclusive latents (A, B)"
            )
            if "latent_scaling_true_artifacts" in r:
                line += (
                    f"; truly shared among them {r['latent_scaling_true_artifacts']}, "
                    f"of which flagged {r['latent_scaling_flagged_true_artifacts']}"
                )
            print(line)
    print(
        "shared: fraction of live latents called shared (criterion per design; thresholds in "
        "experiments/pipeline/joint_metrics.py); floor: the same on the nothing-shared pair; "
        "P_sh/R_sh: precision/recall of the shared call vs the known truth; exSh: fraction "
        "of latents carrying a truly exclusive feature that were called shared; P_fr: "
        "shared precision among latents firing on >= 1% of rows; svcca/p: "
        "geometry of the shared latents' decoder rows vs the random-pairing null. With more "
        "than two models the table's shared/floor/excess are means over model pairs and "
        "P/R/svcca are for models 0-1; the per-pair table has every pair."
    )


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
        common.save_figure(fig, path, dpi=110)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"crosscoder": "C0", "universal": "C1", "aligned": "C2", "independent": "C3"}
    for res_list, filled in ((real, True), (floor, False)):
        for res in res_list:
            c = colors[res["design"]]
            ax.scatter(
                res["reconstruction"]["mean_fvu"],
                res["fraction_shared"],
                facecolors=c if filled else "none",
                edgecolors=c,
                s=36,
            )
            if filled:
                ax.annotate(
                    res["label"].replace("_F", "\nF"),
                    (res["reconstruction"]["mean_fvu"], res["fraction_shared"]),
                    fontsize=5,
                )
    for d, c in colors.items():
        ax.scatter([], [], color=c, label=d)
    ax.set_xlabel("mean FVU over the two models")
    ax.set_ylabel("fraction of live latents shared (design's criterion)")
    ax.set_title("sharing vs reconstruction (filled: real pair, hollow: floor pair)", fontsize=8)
    ax.legend(fontsize=7)
    path = os.path.join(run.plots_dir, "tradeoff.png")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
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
        _fail(
            f"--batch_size={settings.batch_size} is not divisible by the mesh data axis "
            f"({run.mesh.shape['data']})"
        )
    real_pair, floor_pair, data = load_pairs(settings, run)
    real = run_pair(run, settings, real_pair, seeds)
    floor = run_pair(run, settings, floor_pair, seeds)
    rows = summarise(real, floor)
    paths = plots(run, real, floor)
    from experiments.pipeline import joint_metrics as jm

    results = {
        "data": data,
        "summary": rows,
        "real": real,
        "floor": floor,
        "thresholds": {
            "shared_r": jm.SHARED_R,
            "exclusive_r": jm.EXCLUSIVE_R,
            "shared_corr": jm.SHARED_CORR,
            "exclusive_corr": jm.EXCLUSIVE_CORR,
            "truth_min_cos": jm.TRUTH_MIN_COS,
            "artifact_nu": jm.ARTIFACT_NU,
        },
        "plots": paths,
    }
    run.write_results(results)
    print_summary(rows)
    print(f"results: {run.path('results.json')}  plots: {run.plots_dir}")
    logging.flush()


def _data(settings) -> dict:
    """Activation caches whose identity enters the run fingerprint."""
    if settings.source != "caches":
        return {}
    return {
        name: os.path.join(getattr(settings, name), "metadata.json")
        for name in ("cache_a", "cache_b", "floor_cache_b")
        if getattr(settings, name)
    }


if __name__ == "__main__":
    common.entry("joint_sae", body, CONFIG, data=_data)

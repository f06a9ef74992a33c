"""Planted toy path of `experiments.feature_geometry` (models/planted.py): variants, acceptance.

Moved out of the entry point (issue 11). Each variant builds a planted pair, gets each model's
dictionary (ground truth or a TopK SAE trained through `experiments.pipeline.saes.obtain`, the
one train-or-load helper), analyses both (`concept_geometry.analyse_model`), compares them
(`engine.circular.compare_geometry`, `engine.group_geometry.group_distance_rsa`) and writes
its plots (`geometry_plots`).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from experiments.pipeline import concept_geometry, geometry_plots

VARIANTS = {
    "planted": dict(planted=True, shared=True),
    "unplanted": dict(planted=False, shared=False),
    "shared_random": dict(planted=False, shared=True),
}


def sae_dictionaries(run, pair, variant: str, cfg: dict) -> list:
    """SAEs (``--sae_activation``) on both models' activations: ``[(W_dec, codes)] * 2``.

    Trained (or loaded when finished) by `experiments.pipeline.saes.obtain`, so each side's
    SAE has its own role-derived init seed and data order, like every pipeline's SAEs.
    """
    import jax.numpy as jnp

    from experiments.pipeline import saes
    from models import sae_train

    width = cfg["sae_width"] or 2 * pair.n_features
    recipe = sae_train.TrainConfig(
        d_sae=width,
        activation=cfg["sae_activation"],
        k=cfg["sae_k"],
        l1_coeff=cfg["sae_l1_coeff"],
        lr=cfg["sae_lr"],
        dead_tokens=cfg["sae_dead_tokens"],
    )
    out = []
    for side, acts in (("a", pair.acts_a), ("b", pair.acts_b)):
        got = saes.obtain(
            saes.Role(side, "toy"),
            acts,
            user_seed=cfg["seed"],
            recipe=recipe,
            steps=cfg["sae_steps"],
            batch_size=cfg["sae_batch"],
            root=run.path("saes", variant),
            mesh=run.mesh,
            progress=cfg["progress"],
            metadata={"source": f"planted {variant} model {side}"},
        )
        sae = got.sae
        codes = np.concatenate(
            [
                np.asarray(sae.encode(jnp.asarray(acts[i : i + 4096])))
                for i in range(0, acts.shape[0], 4096)
            ]
        )
        out.append((np.asarray(sae.W_dec, np.float64), codes.astype(np.float32)))
    return out


def run_variant(run, variant: str, cfg: dict) -> dict:
    """Runs the whole analysis on one data variant and writes its plots."""
    from engine import checks, circular, group_geometry
    from models import planted

    if variant not in VARIANTS:
        raise checks.InputError(f"variant: unknown {variant!r}; expected one of {sorted(VARIANTS)}")
    pair = planted.make_planted_pair(
        cfg["seed"],
        d=cfg["d"],
        concept=cfg["concept"],
        n_groups=cfg["n_groups"],
        group_size=cfg["group_size"],
        n_other=cfg["n_other"],
        n_tokens=cfg["n_tokens"],
        noise=cfg["noise"],
        circle_offset=cfg["circle_offset"],
        concept_min_magnitude=cfg["concept_magnitude"],
        circle_unique=cfg["circle_unique"],
        **VARIANTS[variant],
    )
    item_tokens = pair.concept_token_ids()
    if cfg["dictionary"] == "truth":
        dicts = [
            (pair.atoms_a.astype(np.float64), pair.codes),
            (pair.atoms_b.astype(np.float64), pair.codes),
        ]
    else:
        dicts = sae_dictionaries(run, pair, variant, cfg)
    res = {"description": pair.description, "dictionary": cfg["dictionary"]}
    details = {}
    for side, (W, codes) in zip("ab", dicts):
        truth = pair.atoms_a if side == "a" else pair.atoms_b
        # How well the dictionary holds each ground-truth concept direction (1.0 for truth).
        Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        tn = truth[pair.concept_features].astype(np.float64)
        res[f"item_recovery_{side}"] = np.max(
            tn / np.linalg.norm(tn, axis=1, keepdims=True) @ Wn.T, axis=1
        ).tolist()
        logging.info("%s: model %s", variant, side)
        res[f"model_{side}"], details[side] = concept_geometry.analyse_model(
            run,
            W,
            codes,
            pair.token_ids,
            item_tokens,
            pair.period,
            dict(cfg, vocab_size=len(pair.vocab)),
            f"{variant} model {side}",
        )

    # Across models: items that have a feature in both.
    ia, ib = details["a"]["items"], details["b"]["items"]
    both = np.flatnonzero((ia >= 0) & (ib >= 0))
    res["items_in_both"] = int(both.size)
    if both.size >= 4:
        res["cross_model"] = circular.compare_geometry(
            dicts[0][0][ia[both]],
            dicts[1][0][ib[both]],
            num_permutations=cfg["n_null"],
            seed=cfg["seed"],
        ).to_json()
    else:
        res["cross_model"] = None

    # Relative distances of concept groups (features named by a group's words).
    groups_a, groups_b, skipped = {}, {}, {}
    for gname, gfeats in pair.groups.items():
        words = pair.feature_tokens[gfeats]
        fa = np.flatnonzero(np.isin(details["a"]["top_token"], words))
        fb = np.flatnonzero(np.isin(details["b"]["top_token"], words))
        if fa.size == 0 or fb.size == 0:
            skipped[gname] = f"no features in model {'A' if fa.size == 0 else 'B'}"
            continue
        groups_a[gname], groups_b[gname] = dicts[0][0][fa], dicts[1][0][fb]
    res["group_distances"] = None
    gres = None
    if len(groups_a) >= 3:
        gres = group_geometry.group_distance_rsa(
            groups_a, groups_b, num_permutations=cfg["n_null"], seed=cfg["seed"]
        )
        res["group_distances"] = gres.to_json()
    res["groups_skipped"] = skipped

    res["acceptance"] = acceptance(res, variant, cfg["alpha"])
    if cfg.get("plots", True):
        geometry_plots.plot_circles(run, variant, pair, details, cfg)
        geometry_plots.plot_cluster_sizes(run, variant, details)
        geometry_plots.plot_scores(run, variant, res)
    return res


def acceptance(res: dict, variant: str, alpha: float) -> dict:
    """The issue's acceptance checks for this variant (True = passed)."""

    def p(x, *keys):
        for k in keys:
            x = None if x is None else x.get(k)
        return 1.0 if x is None else float(x)

    found = [res[f"model_{s}"]["family"]["found"] for s in "ab"]
    circ_p = [p(res[f"model_{s}"], "circularity", "p") for s in "ab"]
    circ_s = [p(res[f"model_{s}"], "circularity", "score") for s in "ab"]
    ord_p = p(res, "cross_model", "ordering_agreement", "p")
    rsa_p = p(res, "cross_model", "rsa", "p")
    out = {
        "family_found": found,
        "circularity_p": circ_p,
        "circularity_score": circ_s,
        "ordering_p": ord_p,
        "rsa_p": rsa_p,
        "alpha": alpha,
    }
    if variant == "planted":
        out["passed"] = bool(
            all(found) and max(circ_p) < alpha and min(circ_s) > 0.9 and ord_p < alpha
        )
        out["expect"] = (
            "family found in both, circularity high (> 0.9) with p < alpha in "
            "both, cross-model ordering p < alpha"
        )
    elif variant == "unplanted":
        out["passed"] = bool(not any(found) and min(circ_p) >= alpha and ord_p >= alpha)
        out["expect"] = "no family, circularity and cross-model ordering not significant"
    else:
        out["passed"] = bool(not any(found) and min(circ_p) >= alpha and rsa_p < alpha)
        out["expect"] = (
            "no circular family, circularity not significant, but the shared "
            "geometry is (RSA p < alpha)"
        )
    return out


def run_feature_geometry(run, **cfg) -> dict:
    """The experiment's logic (importable for tests); returns the results dict."""
    from engine import metrics_io

    writer = metrics_io.MetricWriter(run.metrics_path)
    writer.truncate_after(-1)
    results = {"variants": {}}
    for step, variant in enumerate(cfg["variants"]):
        res = run_variant(run, variant, cfg)
        results["variants"][variant] = res
        acc = res["acceptance"]
        writer.write(
            step,
            {
                "variant": variant,
                "passed": acc["passed"],
                "family_found_a": acc["family_found"][0],
                "family_found_b": acc["family_found"][1],
                "circularity_a": acc["circularity_score"][0],
                "circularity_b": acc["circularity_score"][1],
                "circularity_p_a": acc["circularity_p"][0],
                "circularity_p_b": acc["circularity_p"][1],
                "ordering_p": acc["ordering_p"],
                "rsa_p": acc["rsa_p"],
            },
        )
        logging.info("%s: acceptance %s", variant, acc)
    results["all_passed"] = all(v["acceptance"]["passed"] for v in results["variants"].values())
    return results

"""Orchestration of the universality pipeline: presets -> comparisons -> reference points ->
results.json, printed summary and plots. `experiments/universality.py` is its thin entry."""

from __future__ import annotations

import dataclasses
import os
import platform

import numpy as np

from engine import checks
from experiments.pipeline import compare, filters, report, toy_preset
from experiments.pipeline.stepcache import StepCache
from models import text as text_lib

USER_ERRORS = (compare.PipelineError, checks.InputError, text_lib.TokenizerMismatchError,
               FileNotFoundError)


def compare_config(flags_) -> compare.CompareConfig:
    return compare.CompareConfig(
        pairing=flags_.pairing,
        filters=filters.FilterConfig(
            drop_dead=flags_.filter_dead, non_concept=flags_.filter_non_concept,
            max_bad_fraction=flags_.max_bad_fraction,
            require_shared_token=flags_.require_shared_token, one_to_one=flags_.one_to_one,
            threshold=None if flags_.threshold < 0 else flags_.threshold),
        metrics=tuple(flags_.metrics), num_permutations=flags_.num_permutations,
        top_n=flags_.top_n, min_pairs=flags_.min_pairs, seed=flags_.seed,
        memory_budget=(int(flags_.memory_budget * (1 << 30))
                       if getattr(flags_, "memory_budget", 0) > 0 else None))


def reference_points(by_kind: dict) -> dict:
    """Each metric's cross score placed between floor and ceiling (raw and excess)."""
    cross, floor, ceiling = by_kind.get("cross"), by_kind.get("floor"), by_kind.get("ceiling")
    if not cross or not cross.get("metrics"):
        return {}
    out = {}
    for metric, r in cross["metrics"].items():
        entry = {"cross": r["score"], "cross_excess": r["excess"]}
        for name, comp in (("floor", floor), ("ceiling", ceiling)):
            m = (comp or {}).get("metrics", {}).get(metric)
            if m:
                entry[name] = m["score"]
                entry[f"{name}_excess"] = m["excess"]
        for key, suffix in (("fraction_floor_to_ceiling", ""),
                            ("fraction_floor_to_ceiling_excess", "_excess")):
            lo, hi = entry.get("floor" + suffix), entry.get("ceiling" + suffix)
            if lo is not None and hi is not None and abs(hi - lo) > 1e-12:
                entry[key] = (entry["cross" + suffix] - lo) / (hi - lo)
        out[metric] = entry
    return out


def _versions() -> dict:
    import jax
    import flax
    import optax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__}


def run_toy(run, flags_, cfg: compare.CompareConfig, cache: StepCache) -> dict:
    settings = toy_preset.ToySettings(
        seed=flags_.seed, n_features=flags_.toy_n_features, d_a=flags_.toy_d, d_b=flags_.toy_d,
        n_tokens=flags_.toy_n_tokens, perturbation=flags_.toy_perturbation,
        d_sae=flags_.toy_n_features, steps=flags_.toy_steps)
    built = toy_preset.build(settings, run.workdir, run.mesh, progress=flags_.progress)
    vocab = built["pairs"]["cross"].vocab
    token_ids = built["pairs"]["cross"].token_ids

    def token_text(rows):
        return [vocab[int(token_ids[r])] for r in rows]

    comps = []
    for spec in toy_preset.comparisons(built):
        comps.append(compare.run_comparison(
            spec["name"], toy_preset.stream_factory(spec["acts_a"], spec["acts_b"],
                                                     flags_.chunk_size),
            spec["sae_a"], spec["sae_b"], token_text, run.mesh, cfg, cache,
            ckpt_root=run.path("checkpoints"), truth=spec["truth"], progress=flags_.progress,
            labels={"kind": spec["kind"], "label": spec["label"]},
            features_dir=run.path("features")))
    return {"preset": "toy", "toy": dataclasses.asdict(settings),
            "data": {k: p.description for k, p in built["pairs"].items()},
            "comparisons": comps}


def main(run, flags_) -> dict:
    cfg = compare_config(flags_)
    cache = StepCache(run.path("steps"))
    if flags_.preset == "toy":
        results = run_toy(run, flags_, cfg, cache)
    else:
        from experiments.pipeline import lm_preset
        results = lm_preset.run_lm(run, flags_, cfg, cache)
    comps = results["comparisons"]
    by_kind = {c.get("kind"): c for c in comps}
    results["reference_points"] = reference_points(by_kind)
    results["summary"] = [report.verdict(c) for c in comps]
    results["config"] = {"compare": dataclasses.asdict(cfg)}
    results["versions"] = _versions()
    if "cross" in by_kind and by_kind["cross"]["n_pairs"] == 0:
        run.write_results(results)
        raise compare.PipelineError(
            "no pair survived the filters for the main comparison (see results.json "
            "'filters' counts); lower --threshold or relax --filter_non_concept")
    _plots(run, results)
    run.write_results(results)
    print(report.summary_table(comps))
    rp = results["reference_points"]
    if rp:
        print("reference points (excess over null: floor -> cross -> ceiling):")
        for metric, e in rp.items():
            frac = e.get("fraction_floor_to_ceiling_excess")
            print(f"   {metric:<12} {e.get('floor_excess', float('nan')):7.3f} -> "
                  f"{e['cross_excess']:7.3f} -> {e.get('ceiling_excess', float('nan')):7.3f}"
                  + (f"   ({frac:.0%} of the way)" if frac is not None else ""))
    print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}")
    return results


def _plots(run, results: dict) -> None:
    comps = results["comparisons"]
    for c in comps:
        if not c.get("metrics") and c.get("metrics_before_threshold"):
            c = {**c, "name": f"{c['name']} (before threshold)",
                 "metrics": c["metrics_before_threshold"]}
        report.plot_nulls(c, os.path.join(run.plots_dir,
                                          f"null_{c['name'].split()[0]}.png"))
    report.plot_matched_correlations(comps, os.path.join(run.plots_dir,
                                                         "matched_correlations.png"))
    report.plot_reference_bars(comps, os.path.join(run.plots_dir, "reference_bars.png"))
    if "grid" in results:
        report.plot_layer_heatmaps(results["grid"], run.plots_dir)

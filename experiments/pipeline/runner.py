"""Orchestration of the universality pipeline: presets -> comparisons -> reference points ->
results.json, printed summary and plots. `experiments/universality.py` is its thin entry."""

from __future__ import annotations

import dataclasses
import os
import platform

import numpy as np

from engine import checks
from experiments.pipeline import compare, filters, references, report, toy_preset
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
        top_n=flags_.top_n, min_pairs=flags_.min_pairs, seed=flags_.seed)


def ref_settings(flags_) -> references.RefSettings:
    """Replicates, ceilings and floor of the run (validated before any work)."""
    return references.RefSettings(
        replicates=flags_.replicates, replicate_data=flags_.replicate_data,
        ceiling_sides=tuple(flags_.ceiling_sides),
        floor=getattr(flags_, "random_init_floor", True),
        floor_at=getattr(flags_, "floor_at", "b"), permutations=flags_.replicate_permutations,
    ).validate()


def reference_points(cells: list[dict]) -> dict:
    """Each metric's cross score placed between floor and ceiling, for the first cell.

    Every cell's own reference points are in ``results["cells"]`` (`references.summarise`);
    this is the main cell's, kept at the top level of results.json for a quick look.
    """
    return cells[0]["metrics"] if cells else {}


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
    refs = ref_settings(flags_)
    conditions = tuple(references.parse_sweep(flags_.sweep))
    built = toy_preset.build(settings, run.workdir, run.mesh, progress=flags_.progress,
                             refs=refs, conditions=conditions)
    vocab = built["pairs"]["cross"].vocab
    token_ids = built["pairs"]["cross"].token_ids

    def token_text(rows):
        return [vocab[int(token_ids[r])] for r in rows]

    comps = references.run_specs(built["specs"], run, flags_, cfg, cache, token_text,
                      features_dir=run.path("features"))
    return {"preset": "toy", "toy": dataclasses.asdict(settings),
            "references": dataclasses.asdict(refs),
            "data": {k: p.description for k, p in built["pairs"].items()},
            "saes": built["saes"], "comparisons": comps}


def main(run, flags_) -> dict:
    cfg = compare_config(flags_)
    ref_settings(flags_)                      # bad replicate / ceiling / sweep flags: fail now
    references.parse_sweep(flags_.sweep)
    cache = StepCache(run.path("steps"))
    if flags_.preset == "toy":
        results = run_toy(run, flags_, cfg, cache)
    else:
        from experiments.pipeline import lm_preset
        results = lm_preset.run_lm(run, flags_, cfg, cache)
    comps = results["comparisons"]
    cells = references.summarise(comps, permutations=flags_.replicate_permutations,
                                 seed=flags_.seed)
    results["cells"] = cells
    results["reference_points"] = reference_points(cells)
    if flags_.sweep:
        results["sweep"] = {"flag": flags_.sweep, "table": references.sweep_table(cells)}
    by_kind = {}
    for c in comps:
        by_kind.setdefault(c.get("kind"), c)
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
    if cells:
        print("reference points per cell (excess over null: floor -> cross -> ceiling):")
        print(references.format_table(cells))
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
    for i, cell in enumerate(results.get("cells", [])):
        report.plot_replicates(cell, os.path.join(run.plots_dir, f"replicates_{i}.png"))
    if "sweep" in results:
        report.plot_sweep(results["cells"], os.path.join(run.plots_dir, "sweep.png"))

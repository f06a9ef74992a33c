"""Orchestration of the universality pipeline: presets -> comparisons -> reference points ->
results.json, printed summary and plots. `experiments/universality.py` is its thin entry."""

from __future__ import annotations

import dataclasses
import os
import platform

import numpy as np
from absl import logging

from engine import checks
from engine import mesh as mesh_lib
from experiments.pipeline import compare, filters, html_report, references, report, toy_preset
from experiments.pipeline import results as results_lib
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


def ref_settings(flags_) -> references.RefSettings:
    """Replicates, ceilings and floor of the run (validated before any work)."""
    return references.RefSettings(
        replicates=flags_.replicates, replicate_data=flags_.replicate_data,
        ceiling_sides=tuple(flags_.ceiling_sides),
        floor=getattr(flags_, "random_init_floor", True),
        floor_at=getattr(flags_, "floor_at", "b"), permutations=flags_.replicate_permutations,
    ).validate()


def _versions() -> dict:
    import flax
    import jax
    import optax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__}


def run_toy(run, flags_, cfg: compare.CompareConfig, cache: StepCache) -> dict:
    settings = toy_preset.ToySettings(
        seed=flags_.seed, n_features=flags_.toy_n_features, d_a=flags_.toy_d, d_b=flags_.toy_d,
        n_tokens=flags_.toy_n_tokens, perturbation=flags_.toy_perturbation,
        d_sae=flags_.toy_n_features, steps=flags_.toy_steps)
    _stage(run, "toy data and SAEs (train or load)")
    refs = ref_settings(flags_)
    conditions = tuple(references.parse_sweep(flags_.sweep))
    built = toy_preset.build(settings, run.workdir, run.mesh, progress=flags_.progress,
                             refs=refs, conditions=conditions)
    vocab = built["pairs"]["cross"].vocab
    token_ids = built["pairs"]["cross"].token_ids

    def token_text(rows):
        return [vocab[int(token_ids[r])] for r in rows]

    if hasattr(run, "plan_stages"):   # two stages per comparison, then the results
        run.plan_stages(2 * len(built["specs"]) + 1)
    comps = references.run_specs(built["specs"], run, flags_, cfg, cache, token_text,
                                 features_dir=run.path("features"),
                                 stage=getattr(run, "stage", None))
    return {"preset": "toy", "toy": dataclasses.asdict(settings),
            "references": dataclasses.asdict(refs),
            "data": {k: p.description for k, p in built["pairs"].items()},
            "saes": built["saes"], "comparisons": comps}


def _stage(run, label: str) -> None:
    if hasattr(run, "stage"):
        run.stage(label)


def expected_stages(flags_) -> int:
    """Stage lines the run will print: set-up, two per comparison (feature pass, metrics),
    results. A later count that grows (e.g. more reference comparisons) just raises N."""
    refs_per_cell = len(flags_.ceiling_sides) + bool(getattr(flags_, "random_init_floor", True))
    if flags_.preset == "toy":       # cross, ceilings, floor, control (corrected once planned)
        return 1 + 2 * (2 + refs_per_cell) + 1
    from experiments.pipeline import lm_preset
    if flags_.lm_setup == "custom":
        hps = (flags_.hookpoints_a, flags_.hookpoints_b)
        has_saes_a = bool(flags_.saes_a)
    else:
        setup = lm_preset.SETUPS[flags_.lm_setup]
        hps = (setup["hookpoints_a"], setup["hookpoints_b"])
        has_saes_a = True
    comps = len(hps[0]) * len(hps[1]) + (not has_saes_a) + bool(flags_.random_init_floor)
    return 1 + 2 * comps + 1


def main(run, flags_) -> dict:
    cfg = compare_config(flags_)
    ref_settings(flags_)                      # bad replicate / ceiling / sweep flags: fail now
    references.parse_sweep(flags_.sweep)
    cache = StepCache(run.path("steps"))
    if hasattr(run, "stages_total"):
        run.stages_total = expected_stages(flags_)
    if flags_.preset == "toy":
        results = run_toy(run, flags_, cfg, cache)
    else:
        from experiments.pipeline import lm_preset
        _stage(run, "language models: load, activations, SAEs (train or load)")
        results = lm_preset.run_lm(run, flags_, cfg, cache)
    _stage(run, "results.json, summary and plots")
    comps = results.pop("comparisons")
    cells = references.summarise(comps, permutations=flags_.replicate_permutations,
                                 seed=flags_.seed)
    if flags_.sweep:
        results["sweep"] = {"flag": flags_.sweep, "table": references.sweep_table(cells)}
    grid = results.pop("grid", None)
    results["config"] = {"compare": dataclasses.asdict(cfg)}
    results["versions"] = _versions()
    typed = results_lib.RunResults(
        comparisons=tuple(comps), cells=tuple(cells),
        summary=tuple(report.verdict(c) for c in comps),
        grid=None if grid is None else results_lib.LayerGrid.from_json(grid), extra=results)
    main_cross = next((c for c in comps if c.kind == "cross"), None)
    no_pairs = main_cross is not None and main_cross.n_pairs == 0
    # results.json first: a plot can never lose a finished run.
    out = typed.to_json()
    run.write_results(out)
    primary = mesh_lib.is_primary()     # several processes: process 0 alone writes
    if not no_pairs and primary:
        plot_errors = _plots(run, typed)
        if plot_errors:
            out["plot_errors"] = plot_errors
            run.write_results(out)
    # The browser also shows a run whose main comparison kept no pair (why, per feature).
    report_path = html_report.write_report(run.workdir) if primary else "(process 0)"
    if no_pairs:
        raise compare.PipelineError(
            "no pair survived the filters for the main comparison (see results.json "
            "'filters' counts, or the report's Features tab); lower --threshold or relax "
            "--filter_non_concept")
    print(report.summary_table(comps))
    if cells:
        print("reference points per cell (excess over null: floor -> cross -> ceiling):")
        print(references.format_table(cells))
    from experiments.pipeline import importance as importance_lib
    for line in (importance_lib.splice_lines(results.get("splice", []))
                 + importance_lib.importance_lines(results.get("importance", {}))):
        print(line)
    print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}\n"
          f"report:  {report_path}")
    return out


def _plots(run, results: results_lib.RunResults) -> list[str]:
    """Draws every plot; returns one line per plot that failed (logged, not fatal)."""
    comps = results.comparisons
    jobs: list[tuple] = []
    for c in comps:
        if not c.metrics and c.metrics_before_threshold:
            jobs.append((report.plot_nulls, (f"{c.name} (before threshold)",
                                             c.metrics_before_threshold)))
        else:
            jobs.append((report.plot_nulls, (c.name, c.metrics)))
        jobs[-1] += (os.path.join(run.plots_dir, f"null_{c.name.split()[0]}.png"),)
    jobs.append((report.plot_matched_correlations, (comps,),
                 os.path.join(run.plots_dir, "matched_correlations.png")))
    jobs.append((report.plot_reference_bars, (comps,),
                 os.path.join(run.plots_dir, "reference_bars.png")))
    if results.grid is not None:
        jobs.append((report.plot_layer_heatmaps, (results.grid,), run.plots_dir))
    for i, cell in enumerate(results.cells):
        jobs.append((report.plot_replicates, (cell,),
                     os.path.join(run.plots_dir, f"replicates_{i}.png")))
    if "sweep" in results.extra:
        jobs.append((report.plot_sweep, (results.cells,),
                     os.path.join(run.plots_dir, "sweep.png")))
    errors = []
    for fn, args, path in jobs:
        try:
            fn(*args, path)
        except Exception as e:  # noqa: BLE001 -- a plot must not lose the run's results
            errors.append(f"{fn.__name__} -> {path}: {type(e).__name__}: {e}")
            logging.error("plot failed (results.json is written): %s", errors[-1])
    return errors

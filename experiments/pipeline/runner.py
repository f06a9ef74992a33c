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

USER_ERRORS = (
    compare.PipelineError,
    checks.InputError,
    text_lib.TokenizerMismatchError,
    FileNotFoundError,
)


def compare_config(settings) -> compare.CompareConfig:
    return compare.CompareConfig(
        pairing=settings.pairing,
        filters=filters.FilterConfig(
            drop_dead=settings.filter_dead,
            non_concept=settings.filter_non_concept,
            max_bad_fraction=settings.max_bad_fraction,
            require_shared_token=settings.require_shared_token,
            one_to_one=settings.one_to_one,
            threshold=None if settings.threshold < 0 else settings.threshold,
        ),
        metrics=tuple(settings.metrics),
        num_permutations=settings.num_permutations,
        top_n=settings.top_n,
        min_pairs=settings.min_pairs,
        seed=settings.seed,
        memory_budget=(
            int(settings.memory_budget * (1 << 30)) if settings.memory_budget > 0 else None
        ),
    )


def ref_settings(settings) -> references.RefSettings:
    """Replicates, ceilings and floor of the run (validated before any work)."""
    return references.RefSettings(
        replicates=settings.replicates,
        replicate_data=settings.replicate_data,
        ceiling_sides=tuple(settings.ceiling_sides),
        floor=settings.random_init_floor,
        floor_at=settings.floor_at,
        permutations=settings.replicate_permutations,
    ).validate()


def _versions() -> dict:
    import flax
    import jax
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


def run_toy(run, settings, cfg: compare.CompareConfig, cache: StepCache) -> dict:
    toy = toy_preset.ToySettings(
        seed=settings.seed,
        n_features=settings.toy_n_features,
        d_a=settings.toy_d,
        d_b=settings.toy_d,
        n_tokens=settings.toy_n_tokens,
        perturbation=settings.toy_perturbation,
        d_sae=settings.toy_n_features,
        steps=settings.toy_steps,
    )
    _stage(run, "toy data and SAEs (train or load)")
    refs = ref_settings(settings)
    conditions = tuple(references.parse_sweep(settings.sweep))
    built = toy_preset.build(
        toy, run.workdir, run.mesh, progress=settings.progress, refs=refs, conditions=conditions
    )
    vocab = built["pairs"]["cross"].vocab
    token_ids = built["pairs"]["cross"].token_ids

    def token_text(rows):
        return [vocab[int(token_ids[r])] for r in rows]

    if hasattr(run, "plan_stages"):  # two stages per comparison, then the results
        run.plan_stages(2 * len(built["specs"]) + 1)
    comps = references.run_specs(
        built["specs"],
        run,
        cfg,
        cache,
        token_text,
        chunk_size=settings.chunk_size,
        progress=settings.progress,
        features_dir=run.path("features"),
        stage=getattr(run, "stage", None),
    )
    return {
        "preset": "toy",
        "toy": dataclasses.asdict(toy),
        "references": dataclasses.asdict(refs),
        "data": {k: p.description for k, p in built["pairs"].items()},
        "saes": built["saes"],
        "comparisons": comps,
    }


def _stage(run, label: str) -> None:
    if hasattr(run, "stage"):
        run.stage(label)


def expected_stages(settings) -> int:
    """Stage lines the run will print: set-up, two per comparison (feature pass, metrics),
    results. A later count that grows (e.g. more reference comparisons) just raises N."""
    refs_per_cell = len(settings.ceiling_sides) + bool(settings.random_init_floor)
    if settings.preset == "toy":  # cross, ceilings, floor, control (corrected once planned)
        return 1 + 2 * (2 + refs_per_cell) + 1
    from experiments.pipeline import lm_preset

    if settings.lm_setup == "custom":
        hps = (settings.hookpoints_a, settings.hookpoints_b)
        has_saes_a = bool(settings.saes_a)
    else:
        setup = lm_preset.SETUPS[settings.lm_setup]
        hps = (setup["hookpoints_a"], setup["hookpoints_b"])
        has_saes_a = True
    comps = len(hps[0]) * len(hps[1]) + (not has_saes_a) + bool(settings.random_init_floor)
    return 1 + 2 * comps + 1


def main(run, settings) -> dict:
    cfg = compare_config(settings)
    ref_settings(settings)  # bad replicate / ceiling / sweep flags: fail now
    references.parse_sweep(settings.sweep)
    cache = StepCache(run.path("steps"))
    if hasattr(run, "stages_total"):
        run.stages_total = expected_stages(settings)
    if settings.preset == "toy":
        results = run_toy(run, settings, cfg, cache)
    else:
        from experiments.pipeline import lm_preset

        _stage(run, "language models: load, activations, SAEs (train or load)")
        results = lm_preset.run_lm(run, settings, cfg, cache)
    _stage(run, "results.json, summary and plots")
    comps = results.pop("comparisons")
    cells = references.summarise(
        comps, permutations=settings.replicate_permutations, seed=settings.seed
    )
    if settings.sweep:
        results["sweep"] = {"flag": settings.sweep, "table": references.sweep_table(cells)}
    grid = results.pop("grid", None)
    results["config"] = {"compare": dataclasses.asdict(cfg)}
    results["versions"] = _versions()
    typed = results_lib.RunResults(
        comparisons=tuple(comps),
        cells=tuple(cells),
        summary=tuple(report.verdict(c) for c in comps),
        grid=None if grid is None else results_lib.LayerGrid.from_json(grid),
        extra=results,
    )
    main_cross = next((c for c in comps if c.kind == "cross"), None)
    no_pairs = main_cross is not None and main_cross.n_pairs == 0
    # results.json first: a plot can never lose a finished run.
    out = typed.to_json()
    run.write_results(out)
    primary = mesh_lib.is_primary()  # several processes: process 0 alone writes
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
            "--filter_non_concept"
        )
    print(report.summary_table(comps))
    if cells:
        print("reference points per cell (excess over null: floor -> cross -> ceiling):")
        print(references.format_table(cells))
    from experiments.pipeline import importance as importance_lib

    for line in importance_lib.splice_lines(
        results.get("splice", [])
    ) + importance_lib.importance_lines(results.get("importance", {})):
        print(line)
    print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}\nreport:  {report_path}")
    return out


def _plots(run, results: results_lib.RunResults) -> list[str]:
    """Draws every plot; returns one line per plot that failed (logged, not fatal)."""
    comps = results.comparisons
    jobs: list[tuple] = []
    for c in comps:
        if not c.metrics and c.metrics_before_threshold:
            jobs.append(
                (report.plot_nulls, (f"{c.name} (before threshold)", c.metrics_before_threshold))
            )
        else:
            jobs.append((report.plot_nulls, (c.name, c.metrics)))
        jobs[-1] += (os.path.join(run.plots_dir, f"null_{c.name.split()[0]}.png"),)
    jobs.append(
        (
            report.plot_matched_correlations,
            (comps,),
            os.path.join(run.plots_dir, "matched_correlations.png"),
        )
    )
    jobs.append(
        (report.plot_reference_bars, (comps,), os.path.join(run.plots_dir, "reference_bars.png"))
    )
    if results.grid is not None:
        jobs.append((report.plot_layer_heatmaps, (results.grid,), run.plots_dir))
    for i, cell in enumerate(results.cells):
        jobs.append(
            (report.plot_replicates, (cell,), os.path.join(run.plots_dir, f"replicates_{i}.png"))
        )
    if "sweep" in results.extra:
        jobs.append((report.plot_sweep, (results.cells,), os.path.join(run.plots_dir, "sweep.png")))
    errors = []
    for fn, args, path in jobs:
        try:
            fn(*args, path)
        except Exception as e:  # noqa: BLE001 -- a plot must not lose the run's results
            errors.append(f"{fn.__name__} -> {path}: {type(e).__name__}: {e}")
            logging.error("plot failed (results.json is written): %s", errors[-1])
    return errors

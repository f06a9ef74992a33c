"""Concept geometry across two models: clusters, circular families, group distances.

Two presets share the engine's primitives (engine/clustering.py, engine/circular.py,
engine/pca.py, engine/group_geometry.py, engine/nulls.py); the library code lives in
``experiments/pipeline/`` (``geometry_toy``, ``geometry_lm``, ``concept_family``,
``concept_geometry``, ``geometry_plots``); this entry point only parses settings and composes.

The toy preset (default, ``experiments/configs/feature_geometry.py``; models/planted.py, issue
8): a planted circular family (days of the week on a circle) in two "models" related by a random
rotation, an unplanted control and a shared-random control. Each model's dictionary is the
ground truth (``--dictionary=truth``) or an SAE (``--sae_activation``, TopK by default) trained
through `experiments.pipeline.saes.obtain` (``--dictionary=sae``; it needs the days to have
directions of their own beside the circle, ``--circle_unique`` 0.5 by default: at 0 SAEs
compose the days from a few shared latents, WORKSPACE.md); features are named by their top
token, the decoder rows clustered (Engels et al. cosine graph, spectral), circularity of the
family's decoder vectors and reconstructions scored with exact permutation nulls, and the two
models compared (RSA, angular ordering, group distances)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry
    python -m experiments.feature_geometry --workdir=runs/feature_geometry_sae --dictionary=sae

The language-model preset (``--config=experiments/configs/feature_geometry_lm.py``, issue 17):
two local transformers models and their SAEs (loaded with ``--sae_a/--sae_b`` in any supported
format, or trained here through the universality pipeline's planner), activations from forward
passes over ``--text`` or from activation caches (``--cache_a/--cache_b``). Concept families
(``--families``: weekdays, months, or any keyword group) are the features whose activation
concentrates on the concept's tokens, on the corpus and on templated prompts
(`experiments/pipeline/concept_family.py` states the rule; its thresholds ``--family_tau``,
``--family_min_hits`` are written to results.json), with the Engels et al. clusters as the
unsupervised alternative; circularity of the family's decoder rows and of the reconstructions of
the concept tokens' activations; the cross-model comparison (RSA of within-family cosines,
angular-order agreement) and group distances (``--group_concepts``, any number >= 3) with
permutation nulls; all of it again on the ``--topic`` documents. The default models are a tiny
planted pair built offline in the workdir (models/planted_lm.py: weekday and month tokens on
circles in the embedding table; ``--nolm_planted`` for the control)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry/lm_planted \\
        --config=experiments/configs/feature_geometry_lm.py
    python -m experiments.feature_geometry --workdir=runs/feature_geometry/pythia \\
        --config=experiments/configs/feature_geometry_lm.py \\
        --model_a=weights/pythia-70m --model_b=weights/pythia-160m \\
        --hookpoint_a=resid_post.3 --hookpoint_b=resid_post.5 \\
        --sae_a=weights/sae-pythia-70m-32k --sae_b=weights/sae-pythia-160m-32k \\
        --text=corpus.jsonl --max_contexts=4096 --context_length=128

Outputs: ``config.json``, ``metrics.jsonl``, ``results.json``; toy: per variant clustering,
family, circularity, cross-model comparison, group distances and acceptance checks, plots
``circle_<variant>.png``, ``cluster_sizes_<variant>.png``, ``scores_vs_null_<variant>.png``;
lm: ``full_corpus`` and ``topic_control`` (per family and model: corpus / template selections,
features per item, clusters, circularity; cross-model; group distances), ``summary``, plots
``circle_<family>.png`` (both models side by side, score and p) and ``group_distances.png``
(both matrices, RSA and null). Rerunning the same command resumes or says "nothing to do".
"""

from __future__ import annotations

from experiments import common
from experiments.configs import feature_geometry as CONFIG  # noqa: N812  (the config module)

CONFIG_KEYS = (
    "variants",
    "concept",
    "seed",
    "d",
    "n_tokens",
    "n_groups",
    "group_size",
    "n_other",
    "noise",
    "circle_offset",
    "circle_unique",
    "concept_magnitude",
    "dictionary",
    "sae_width",
    "sae_activation",
    "sae_k",
    "sae_l1_coeff",
    "sae_steps",
    "sae_batch",
    "sae_lr",
    "sae_dead_tokens",
    "graph_k",
    "graph_threshold",
    "min_size",
    "max_size",
    "spectral_clusters",
    "family_recall",
    "n_null",
    "alpha",
    "chunk_size",
    "min_token_count",
    "plot_tokens",
    "plots",
    "progress",
)
LM_KEYS = (
    "seed",
    "sae_width",
    "sae_k",
    "sae_steps",
    "sae_batch",
    "sae_lr",
    "sae_dead_tokens",
    "graph_k",
    "graph_threshold",
    "min_size",
    "max_size",
    "spectral_clusters",
    "n_null",
    "alpha",
    "chunk_size",
    "plots",
    "progress",
    "model_a",
    "model_b",
    "lm_planted",
    "lm_shared",
    "hookpoint_a",
    "hookpoint_b",
    "sae_a",
    "sae_b",
    "cache_a",
    "cache_b",
    "text",
    "max_documents",
    "max_contexts",
    "context_length",
    "lm_batch_size",
    "sae_expansion",
    "families",
    "group_concepts",
    "concepts_file",
    "topic",
    "templates",
    "family_tau",
    "family_min_hits",
    "spectral_max_features",
)


def _data(settings) -> dict:
    if settings.preset != "lm":
        return {}
    return {
        k: getattr(settings, k) for k in ("sae_a", "sae_b", "cache_a", "cache_b", "concepts_file")
    } | {
        "model_a": None if settings.model_a in ("planted", "tiny") else settings.model_a,
        "model_b": None if settings.model_b in ("planted", "tiny") else settings.model_b,
        "text": None if settings.text in ("sample", "planted") else settings.text,
    }


def _errors():
    from experiments.pipeline import concepts, geometry_lm
    from models import text

    return (
        geometry_lm.GeometryError,
        concepts.ConceptError,
        text.TokenizerMismatchError,
        FileNotFoundError,
    )


def body(run, settings):
    if settings.preset == "lm":
        from experiments.pipeline import geometry_lm

        cfg = {k: getattr(settings, k) for k in LM_KEYS}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        results = geometry_lm.run_lm(run, cfg)
        run.write_results(results)
        print("\n".join(geometry_lm.summary_lines(results)))
        print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}")
        return
    from experiments.pipeline import geometry_toy

    cfg = {k: getattr(settings, "width" if k == "d" else k) for k in CONFIG_KEYS}
    cfg["variants"] = list(cfg["variants"])
    results = geometry_toy.run_feature_geometry(run, **cfg)
    run.write_results(results)
    print(f"feature_geometry: all acceptance checks passed = {results['all_passed']}")


if __name__ == "__main__":
    common.entry("feature_geometry", body, CONFIG, data=_data, errors=_errors)

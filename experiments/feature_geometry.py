"""Concept geometry across two models: clusters, circular families, group distances.

Two presets share the engine's primitives (engine/clustering.py, engine/circular.py,
engine/pca.py, engine/group_geometry.py, engine/nulls.py); the library code lives in
``experiments/pipeline/`` (``geometry_toy``, ``geometry_lm``, ``concept_family``,
``concept_geometry``, ``geometry_plots``); this entry point only parses settings and composes.

``--preset=toy`` (default; models/planted.py, issue 8): a planted circular family (days of the
week on a circle) in two "models" related by a random rotation, an unplanted control and a
shared-random control. Each model's dictionary is the ground truth (``--dictionary=truth``) or a
TopK SAE trained through `experiments.pipeline.saes.obtain` (``--dictionary=sae``); features are
named by their top token, the decoder rows clustered (Engels et al. cosine graph, spectral),
circularity of the family's decoder vectors and reconstructions scored with exact permutation
nulls, and the two models compared (RSA, angular ordering, group distances)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry
    python -m experiments.feature_geometry --workdir=runs/feature_geometry_sae \\
        --dictionary=sae --sae_steps=3000

``--preset=lm`` (issue 17): two local transformers models and their SAEs (loaded with
``--sae_a/--sae_b`` in any supported format, or trained here through the universality
pipeline's planner), activations from forward passes over ``--text`` or from activation caches
(``--cache_a/--cache_b``). Concept families (``--families``: weekdays, months, or any keyword
group) are the features whose activation concentrates on the concept's tokens, on the corpus
and on templated prompts (`experiments/pipeline/concept_family.py` states the rule; its
thresholds ``--family_tau``, ``--family_min_hits`` are written to results.json), with the
Engels et al. clusters as the unsupervised alternative; circularity of the family's decoder rows
and of the reconstructions of the concept tokens' activations; the cross-model comparison (RSA
of within-family cosines, angular-order agreement) and group distances (``--group_concepts``,
any number >= 3) with permutation nulls; all of it again on the ``--topic`` documents. The
default models are a tiny planted pair built offline in the workdir (models/planted_lm.py:
weekday and month tokens on circles in the embedding table; ``--nolm_planted`` for the
control)::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry/lm_planted --preset=lm
    python -m experiments.feature_geometry --workdir=runs/feature_geometry/pythia --preset=lm \\
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

from absl import flags

from experiments import common
from experiments.pipeline.geometry_toy import VARIANTS

FLAGS = flags.FLAGS
common.define_common_flags()
flags.adopt_module_key_flags(common)   # --help lists the common flags too
flags.DEFINE_enum("preset", "toy", ["toy", "lm"], "toy: planted dictionaries "
                  "(models/planted.py); lm: transformers models and their SAEs.")
flags.DEFINE_list("variants", ["planted", "unplanted"],
                  "Data variants: planted (circle, shared by rotation), unplanted (random "
                  "concept directions, independent models), shared_random (random concept "
                  "directions, shared by rotation: geometry agrees but is not circular).")
flags.DEFINE_string("concept", "days", "Concept family: days (7 items) or months (12).")
flags.DEFINE_integer("seed", 0, "Seed of the data (and SAE initialisation).")
flags.DEFINE_integer("width", 64, "Width of the toy models' activations.")
flags.DEFINE_integer("n_tokens", 8192, "Tokens (rows).")
flags.DEFINE_integer("n_groups", 6, "Planted non-circular concept groups.")
flags.DEFINE_integer("group_size", 4, "Features per planted group.")
flags.DEFINE_integer("n_other", 64, "Independent random features.")
flags.DEFINE_float("noise", 0.01, "Activation noise std.")
flags.DEFINE_float("circle_offset", 0.8,
                   "Lift of the planted circle off the origin (cosine of the items to their "
                   "shared direction; 0.8 makes neighbouring days cos 0.86, opposite 0.32).")
flags.DEFINE_enum("dictionary", "truth", ["truth", "sae"],
                  "truth: ground-truth atoms and codes; sae: train a TopK SAE per model.")
flags.DEFINE_integer("sae_width", 0, "SAE features (0: 2 x the planted feature count).")
flags.DEFINE_integer("sae_k", 4, "TopK k of the SAEs.")
flags.DEFINE_integer("sae_steps", 3000, "SAE training steps.")
flags.DEFINE_integer("sae_batch", 256, "SAE batch size.")
flags.DEFINE_float("sae_lr", 3e-3, "SAE learning rate.")
flags.DEFINE_integer("sae_dead_tokens", 25600,
                     "Tokens without firing before a latent counts as dead (AuxK revives it).")
flags.DEFINE_integer("graph_k", 2, "Cosine graph: neighbours per feature (Engels et al.: 2).")
flags.DEFINE_float("graph_threshold", 0.5, "Cosine graph: edge threshold (Engels: 0.5).")
flags.DEFINE_integer("min_size", 2, "Smallest reported cluster.")
flags.DEFINE_integer("max_size", 0, "Largest reported cluster (0: no limit).")
flags.DEFINE_integer("spectral_clusters", 0,
                     "Spectral clustering clusters (0: live features // 8).")
flags.DEFINE_float("family_recall", 0.8,
                   "The family is found when one cluster holds this fraction of the items.")
flags.DEFINE_integer("n_null", 1000, "Random permutations when exact enumeration is too big.")
flags.DEFINE_float("alpha", 0.01, "Significance level of the acceptance checks.")
flags.DEFINE_integer("chunk_size", 1024, "Rows per streamed chunk.")
flags.DEFINE_integer("min_token_count", 5,
                     "A token names a feature only if it occurs at least this often.")
flags.DEFINE_integer("plot_tokens", 1500, "Reconstructed tokens drawn in the circle plot.")
flags.DEFINE_bool("plots", True, "Write the plots.")
# Language-model preset (--preset=lm).
flags.DEFINE_string("model_a", "planted", "Model A: local transformers directory, or "
                    "'planted' (tiny pair with planted circles built in the workdir) or 'tiny'.")
flags.DEFINE_string("model_b", "planted", "Model B (see --model_a).")
flags.DEFINE_bool("lm_planted", True, "Planted pair: weekdays and months on circles (False: "
                  "random directions, the control).")
flags.DEFINE_bool("lm_shared", True, "Planted pair: B's embedding table is A's rotated (False: "
                  "independent geometry).")
flags.DEFINE_string("hookpoint_a", "resid_pre.0", "Hookpoint of model A.")
flags.DEFINE_string("hookpoint_b", None, "Hookpoint of model B (default: --hookpoint_a).")
flags.DEFINE_string("sae_a", None, "SAE of model A (any supported format, or a directory with "
                    "one sub-directory per hookpoint); default: train here.")
flags.DEFINE_string("sae_b", None, "SAE of model B (see --sae_a).")
flags.DEFINE_string("cache_a", None, "Activation cache of model A (experiments.harvest); "
                    "default: forward passes over --text.")
flags.DEFINE_string("cache_b", None, "Activation cache of model B.")
flags.DEFINE_string("text", "planted", "Text: .txt/.jsonl file or folder, 'sample', or "
                    "'planted' (the planted pair's corpus).")
flags.DEFINE_integer("max_documents", 0, "Read at most this many documents (0: all).")
flags.DEFINE_integer("max_contexts", 400, "Contexts used (0: all).")
flags.DEFINE_integer("context_length", 32, "Tokens per context.")
flags.DEFINE_integer("lm_batch_size", 16, "Contexts per forward pass.")
flags.DEFINE_integer("sae_expansion", 4, "Trained SAEs: d_sae = expansion x d_model when "
                     "--sae_width=0.")
flags.DEFINE_list("families", ["Days of week", "Months"], "Concept families (cyclic: Days of "
                  "week, Months; or any keyword group, then without circularity).")
flags.DEFINE_list("group_concepts", ["Days of week", "Months", "Food", "Numbers", "Nature",
                                     "People/Roles", "Emotions"],
                  "Concept groups of the group-distance comparison (>= 3).")
flags.DEFINE_string("concepts_file", None, "User keyword lists: JSON {group: [words]} or text "
                    "lines 'Group: word, word' (experiments/pipeline/concepts.py).")
flags.DEFINE_string("topic", "Food", "Topic of the topic-restricted control corpus.")
flags.DEFINE_bool("templates", True, "Also measure families on templated prompts.")
flags.DEFINE_float("family_tau", 0.5, "Family rule: share of a feature's activation mass on "
                   "the concept's tokens.")
flags.DEFINE_integer("family_min_hits", 3, "Family rule: item tokens the feature fires on.")
flags.DEFINE_integer("spectral_max_features", 4096, "Spectral clustering only up to this many "
                     "live features (dense affinity).")

CONFIG_KEYS = ("variants", "concept", "seed", "d", "n_tokens", "n_groups", "group_size",
               "n_other", "noise", "circle_offset", "dictionary", "sae_width", "sae_k",
               "sae_steps", "sae_batch", "sae_lr", "sae_dead_tokens", "graph_k",
               "graph_threshold", "min_size", "max_size", "spectral_clusters", "family_recall",
               "n_null", "alpha", "chunk_size", "min_token_count", "plot_tokens", "plots",
               "progress")
LM_KEYS = ("seed", "sae_width", "sae_k", "sae_steps", "sae_batch", "sae_lr", "sae_dead_tokens",
           "graph_k", "graph_threshold", "min_size", "max_size", "spectral_clusters", "n_null",
           "alpha", "chunk_size", "plots", "progress", "model_a", "model_b", "lm_planted",
           "lm_shared", "hookpoint_a", "hookpoint_b", "sae_a", "sae_b", "cache_a", "cache_b",
           "text", "max_documents", "max_contexts", "context_length", "lm_batch_size",
           "sae_expansion", "families", "group_concepts", "concepts_file", "topic", "templates",
           "family_tau", "family_min_hits", "spectral_max_features")


def _groups(values):
    """Resolves --families / --group_concepts / --topic as the run will (raises on a bad one)."""
    from experiments.pipeline import concept_family, concepts
    groups = concepts.resolve_groups(values["group_concepts"] or None, values["concepts_file"])
    for name in list(values["families"]) + [values["topic"]]:
        concept_family.make_concept(name, groups)


RULES = (
    common.Choice(("variants",), tuple(VARIANTS), nonempty=True),
    common.Choice(("concept",), ("days", "months")),
    common.Num(("width", "n_tokens", "group_size", "sae_k", "sae_steps", "sae_batch",
                "sae_dead_tokens", "graph_k", "n_null", "chunk_size", "min_token_count"), lo=1,
               integer=True),
    common.Num(("seed", "n_groups", "n_other", "sae_width", "max_size", "spectral_clusters",
                "plot_tokens"), lo=0, integer=True),
    common.Num(("min_size",), lo=1, integer=True),
    common.Num(("noise",), lo=0.0),
    common.Num(("circle_offset",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(("sae_lr",), lo=0.0, lo_open=True),
    common.Num(("graph_threshold",), lo=-1.0, hi=1.0),
    common.Num(("family_recall",), lo=0.0, hi=1.0, lo_open=True),
    common.Num(("alpha",), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    common.Check(("max_size", "min_size"), lambda v: not v["max_size"] or
                 v["max_size"] >= v["min_size"],
                 "--max_size={max_size}: expected 0 (no limit) or >= --min_size={min_size}"),
    common.Check(("sae_k", "sae_width"), lambda v: not v["sae_width"] or
                 v["sae_k"] <= v["sae_width"],
                 "--sae_k={sae_k}: expected <= --sae_width={sae_width}"),
    common.Num(("max_documents", "max_contexts"), lo=0, integer=True),
    common.Num(("context_length",), lo=4, integer=True),
    common.Num(("lm_batch_size", "sae_expansion", "family_min_hits", "spectral_max_features"),
               lo=1, integer=True),
    common.Num(("family_tau",), lo=0.0, hi=1.0, lo_open=True),
    common.Path(("model_a", "model_b"), kind="dir", special=("planted", "tiny"),
                what="a local transformers directory, 'planted' or 'tiny'"),
    common.Path(("sae_a", "sae_b", "cache_a", "cache_b"), kind="any"),
    common.Path(("text",), kind="any", special=("sample", "planted"), prefixes=("hf:",)),
    common.Path(("concepts_file",), kind="file"),
    common.Hookpoints(("hookpoint_a", "hookpoint_b")),
    common.Check(("families",), lambda v: len(v["families"]) >= 1,
                 "--families: expected at least one concept"),
    common.Check(("group_concepts", "concepts_file"), lambda v: not v["group_concepts"] or
                 len(v["group_concepts"]) >= 3,
                 "--group_concepts: expected at least 3 groups (3 distances) or none"),
    common.Probe(("families", "group_concepts", "concepts_file", "topic"), _groups),
)


def _data(flags_) -> dict:
    if flags_.preset != "lm":
        return {}
    return {k: getattr(flags_, k) for k in ("sae_a", "sae_b", "cache_a", "cache_b",
                                            "concepts_file")} | {
        "model_a": None if flags_.model_a in ("planted", "tiny") else flags_.model_a,
        "model_b": None if flags_.model_b in ("planted", "tiny") else flags_.model_b,
        "text": None if flags_.text in ("sample", "planted") else flags_.text}


def _errors():
    from experiments.pipeline import concepts, geometry_lm
    from models import text
    return (geometry_lm.GeometryError, concepts.ConceptError, text.TokenizerMismatchError,
            FileNotFoundError)


def body(run, flags_):
    if flags_.preset == "lm":
        from experiments.pipeline import geometry_lm
        results = geometry_lm.run_lm(run, {k: flags_[k].value for k in LM_KEYS})
        run.write_results(results)
        print("\n".join(geometry_lm.summary_lines(results)))
        print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}")
        return
    from experiments.pipeline import geometry_toy
    cfg = {k: flags_["width" if k == "d" else k].value for k in CONFIG_KEYS}
    results = geometry_toy.run_feature_geometry(run, **cfg)
    run.write_results(results)
    print(f"feature_geometry: all acceptance checks passed = {results['all_passed']}")


if __name__ == "__main__":
    common.entry("feature_geometry", body, RULES, data=_data, errors=_errors)

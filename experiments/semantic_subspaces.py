"""Semantic subspaces: do two models arrange the features of a concept group alike? (issue 8)

Concept groups (Time, Calendar, Months, Days of week, Emotions, Countries, Nature,
People/Roles, Biology, Food, Numbers, or user lists) collect the SAE features whose top
activating tokens are keywords (experiments/pipeline/concepts.py documents the matching rule).
Per group: one-to-one best pairs inside the group by activation correlation, SVCCA / CKA / RSA /
mutual kNN on the paired decoder rows with 1000-shuffle nulls, and two baselines: random
feature subsets of the same size from the whole SAE, and the same group against an SAE of a
random-init model. Control: the same analysis on a one-topic subset of the text (``--topic``,
default Food: the documents that mention a food word) vs the full text.

Embedded default (offline toy: planted groups, Days/Food/Numbers/Emotions shared across the two
models, Countries/Nature/People not; the ground-truth dictionaries as SAEs, or
``--toy_dictionary=sae`` to train TopK SAEs on the fly)::

    python -m experiments.semantic_subspaces --workdir=runs/semantic_subspaces/toy

Two local transformers models on the shipped text sample (tiny random models built under the
workdir when --model_a/--model_b are not given; SAEs loaded with --sae_a/--sae_b, else trained
here through the universality pipeline's train-or-load helper, `experiments.pipeline.saes.obtain`,
each with its own role-derived seed; activations from forward passes, or from two activation
caches of the same contexts with --cache_a/--cache_b)::

    python -m experiments.semantic_subspaces --workdir=runs/semantic_subspaces/lm --preset=lm \\
        [--model_a=DIR --model_b=DIR --hookpoint_a=resid_post.1 --sae_a=PATH --sae_b=PATH \\
         --cache_a=CACHE_A --cache_b=CACHE_B]

Outputs: config.json, metrics.jsonl, results.json (per group: feature counts, pairs, skip
reason, scores with null mean / p / z / excess, random-subset and random-init baselines, topic
control differences), plots/groups_vs_null.png. Rerunning the same command resumes (or says
"nothing to do"); other settings in the same workdir are refused (`experiments/common.py`).
"""

from __future__ import annotations

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags()
flags.adopt_module_key_flags(common)   # --help lists the common flags too
flags.DEFINE_enum("preset", "toy", ["toy", "lm"], "toy: planted groups; lm: language models.")
flags.DEFINE_list("concepts", [], "Built-in groups to analyse (default: all, or only the "
                  "file's groups when --concepts_file is given).")
flags.DEFINE_string("concepts_file", None, "User keyword lists: JSON {group: [words]} or text "
                    "lines 'Group: word, word'.")
flags.DEFINE_string("topic", "Food", "Topic of the topic-restricted control.")
flags.DEFINE_list("metrics", ["svcca", "cka", "rsa_spearman", "mutual_knn"], "Metrics.")
flags.DEFINE_integer("num_permutations", 1000, "Shuffle-null size per metric and group.")
flags.DEFINE_integer("min_pairs", 3, "Groups with fewer pairs are skipped (>= 3).")
flags.DEFINE_float("threshold", -1.0, "Keep group pairs with correlation >= this (<0: all).")
flags.DEFINE_integer("member_top_n", 5, "Top activating tokens that decide membership.")
flags.DEFINE_integer("random_draws", 20, "Random-subset baseline draws per group.")
flags.DEFINE_integer("knn_k", 5, "Mutual kNN k (capped at pairs - 1).")
flags.DEFINE_float("alpha", 0.01, "Significance level reported.")
flags.DEFINE_integer("chunk_size", 1024, "Tokens per streamed chunk.")
flags.DEFINE_integer("seed", 0, "Seed (data, SAEs, permutations).")
# SAEs trained on the fly.
flags.DEFINE_integer("sae_width", 0, "SAE features (0: toy feature count; lm: 4 x d_model).")
flags.DEFINE_integer("sae_k", 4, "TopK k.")
flags.DEFINE_integer("sae_steps", 2000, "SAE training steps.")
flags.DEFINE_integer("sae_batch", 256, "SAE batch size.")
flags.DEFINE_float("sae_lr", 3e-3, "SAE learning rate.")
# Toy preset.
flags.DEFINE_enum("toy_dictionary", "truth", ["truth", "sae"],
                  "truth: the ground-truth dictionary as the SAE (default: the planted groups "
                  "are recovered exactly); sae: train TopK SAEs (days merge, fewer pairs).")
flags.DEFINE_integer("toy_d", 64, "Toy: activation width.")
flags.DEFINE_integer("toy_n_tokens", 16384, "Toy: tokens.")
flags.DEFINE_integer("toy_group_size", 12, "Toy: features per planted group.")
# Language-model preset.
flags.DEFINE_string("model_a", None, "Model A: local transformers directory.")
flags.DEFINE_string("model_b", None, "Model B: local transformers directory.")
flags.DEFINE_string("hookpoint_a", "resid_post.1", "Hookpoint of model A.")
flags.DEFINE_string("hookpoint_b", None, "Hookpoint of model B (default: hookpoint_a).")
flags.DEFINE_string("sae_a", None, "SAE of model A (any supported format; default: train).")
flags.DEFINE_string("sae_b", None, "SAE of model B (any supported format; default: train).")
flags.DEFINE_string("cache_a", None, "Activation cache of model A (experiments.harvest); with "
                    "--cache_b (same contexts) activations are read instead of computed.")
flags.DEFINE_string("cache_b", None, "Activation cache of model B (see --cache_a).")
flags.DEFINE_string("text", "sample", "Text source (models/text.py; default: shipped sample).")
flags.DEFINE_integer("max_documents", 0, "Read at most this many documents (0: all).")
flags.DEFINE_integer("max_contexts", 400, "Contexts used (0: all).")
flags.DEFINE_integer("context_length", 64, "Tokens per context.")
flags.DEFINE_integer("lm_train_steps", 200, "Training steps of the default tiny model pair.")


def _metric_names():
    from engine import similarity
    return sorted(similarity.METRICS)


def _groups(values):
    """Resolves --concepts / --concepts_file / --topic as the run will (raises on a bad one)."""
    from experiments.pipeline import concepts
    groups = concepts.resolve_groups(values["concepts"] or None, values["concepts_file"])
    if values["topic"] not in groups:
        try:
            concepts.canonical_name(values["topic"])
        except concepts.ConceptError:
            raise concepts.ConceptError(f"--topic {values['topic']!r}: not a built-in group "
                                        "nor one of the selected groups") from None


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Num(("num_permutations", "member_top_n", "random_draws", "knn_k", "chunk_size",
                "sae_k", "sae_steps", "sae_batch", "toy_d", "toy_n_tokens", "toy_group_size"),
               lo=1, integer=True),
    common.Num(("min_pairs",), lo=3, integer=True),
    common.Num(("threshold",), hi=1.0, what="a correlation; negative: all pairs"),
    common.Num(("alpha",), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    common.Num(("sae_lr",), lo=0.0, lo_open=True),
    common.Num(("seed", "sae_width", "max_documents", "max_contexts", "lm_train_steps"), lo=0,
               integer=True),
    common.Num(("context_length",), lo=2, integer=True),
    common.Check(("sae_k", "sae_width"), lambda v: not v["sae_width"] or
                 v["sae_k"] <= v["sae_width"],
                 "--sae_k={sae_k}: expected <= --sae_width={sae_width}"),
    common.Check(("model_a", "model_b"), lambda v: bool(v["model_a"]) == bool(v["model_b"]),
                 "give both --model_a and --model_b (or neither for the tiny pair)"),
    common.Path(("concepts_file",), kind="file"),
    common.Path(("model_a", "model_b"), kind="dir", what="a local transformers directory"),
    common.Path(("sae_a", "sae_b", "cache_a", "cache_b"), kind="any"),
    common.Check(("cache_a", "cache_b"), lambda v: bool(v["cache_a"]) == bool(v["cache_b"]),
                 "give both --cache_a and --cache_b (or neither)"),
    common.Path(("text",), kind="any", special=("sample",), prefixes=("hf:",)),
    common.Hookpoints(("hookpoint_a", "hookpoint_b")),
    common.Probe(("concepts", "concepts_file", "topic"), _groups),
)


def _data(flags_) -> dict:
    return {"concepts_file": flags_.concepts_file, "sae_a": flags_.sae_a, "sae_b": flags_.sae_b,
            "cache_a": flags_.cache_a, "cache_b": flags_.cache_b,
            **({"model_a": flags_.model_a, "model_b": flags_.model_b,
                "text": None if flags_.text == "sample" else flags_.text}
               if flags_.preset == "lm" else {})}


def _errors():
    from experiments.pipeline import subspace_runner
    from models import text
    return (subspace_runner.SubspaceError, text.TokenizerMismatchError)


def body(run, flags_):
    from experiments.pipeline import subspace_runner
    subspace_runner.main(run, flags_)


if __name__ == "__main__":
    common.entry("semantic_subspaces", body, RULES, data=_data, errors=_errors)

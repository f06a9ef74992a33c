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
workdir when --model_a/--model_b are not given; SAEs trained on the fly unless --sae_a/--sae_b)::

    python -m experiments.semantic_subspaces --workdir=runs/semantic_subspaces/lm --preset=lm \\
        [--model_a=DIR --model_b=DIR --hookpoint_a=resid_post.1 --sae_a=PATH --sae_b=PATH]

Outputs: config.json, metrics.jsonl, results.json (per group: feature counts, pairs, skip
reason, scores with null mean / p / z / excess, random-subset and random-init baselines, topic
control differences), plots/groups_vs_null.png. Rerunning the same workdir resumes.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags()
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
flags.DEFINE_string("text", "sample", "Text source (models/text.py; default: shipped sample).")
flags.DEFINE_integer("max_documents", 0, "Read at most this many documents (0: all).")
flags.DEFINE_integer("max_contexts", 400, "Contexts used (0: all).")
flags.DEFINE_integer("context_length", 64, "Tokens per context.")
flags.DEFINE_integer("lm_train_steps", 200, "Training steps of the default tiny model pair.")


def main(argv):
    del argv
    run = common.start(FLAGS)
    from experiments.pipeline import subspace_runner
    from models import text
    from engine import checks
    try:
        subspace_runner.main(run, FLAGS)
    except (subspace_runner.SubspaceError, checks.InputError, text.TokenizerMismatchError,
            FileNotFoundError) as e:
        print(f"semantic_subspaces: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

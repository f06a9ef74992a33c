"""The universality pipeline (the main job): pair SAE features of two models and compare.

For two sides (activations of two models on the same tokens, an SAE per side): feature
activations and statistics, activation-correlation pairing, filters, metrics on the paired
decoder rows with random-pairing nulls, a ceiling (same side, other SAE seed and data order)
and a floor (an SAE of a randomly initialised model), results.json, a printed summary and
plots. Embedded default (no downloads)::

    python -m experiments.universality --workdir=runs/universality/toy

Language models from local directories (layer grid: every hookpoint of A against every
hookpoint of B; SAEs loaded from any supported format, or trained on the fly)::

    python -m experiments.universality --workdir=runs/universality/lm --preset=lm \\
        --model_a=/models/pythia-70m --model_b=/models/pythia-160m \\
        --hookpoints_a=resid_post.2,resid_post.3 --hookpoints_b=resid_post.3,resid_post.5 \\
        --saes_a=/saes/pythia-70m --saes_b=/saes/pythia-160m --text=/data/text.jsonl

Rerunning with the same workdir resumes after the last finished step.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags()
flags.DEFINE_enum("preset", "toy", ["toy", "lm"], "toy: embedded default; lm: language models "
                  "from local paths (see --model_a/--model_b).")
# Pairing, filters, metrics.
flags.DEFINE_enum("pairing", "correlation", ["correlation", "decoder"], "Pairing method.")
flags.DEFINE_integer("num_permutations", 1000, "Random-pairing null size per metric.")
flags.DEFINE_list("metrics", ["svcca", "pwcca", "cka", "rsa_spearman", "procrustes",
                              "mutual_knn"], "Metrics on the paired decoder rows.")
flags.DEFINE_float("threshold", 0.1, "Keep pairs whose score is >= this (negative: off).")
flags.DEFINE_bool("filter_dead", True, "Drop dead / constant features.")
flags.DEFINE_bool("filter_non_concept", True, "Drop features whose top tokens are dominated "
                  "by punctuation, whitespace or special tokens.")
flags.DEFINE_float("max_bad_fraction", 0.5, "Non-concept: largest tolerated share of bad "
                   "top tokens (0 = Lan et al.'s strict rule).")
flags.DEFINE_bool("require_shared_token", False, "Non-concept: the two features' top tokens "
                  "must intersect (Lan et al.).")
flags.DEFINE_bool("one_to_one", True, "Keep only each feature's best pair.")
flags.DEFINE_integer("top_n", 10, "Top-activating tokens kept per feature.")
flags.DEFINE_integer("min_pairs", 3, "Fewest pairs for which metrics are computed.")
flags.DEFINE_integer("chunk_size", 1024, "Tokens per streamed chunk.")
flags.DEFINE_float("memory_budget", 0.0, "GiB the feature pass may use (0: half the machine's "
                   "memory); above it the feature-by-feature correlation is tiled.")
flags.DEFINE_integer("seed", 0, "Seed (data, SAEs, permutations).")
# Toy preset.
flags.DEFINE_integer("toy_n_tokens", 20_000, "Toy: tokens.")
flags.DEFINE_integer("toy_n_features", 96, "Toy: ground-truth features.")
flags.DEFINE_integer("toy_d", 32, "Toy: hidden width of both sides.")
flags.DEFINE_integer("toy_steps", 1500, "Toy: SAE training steps.")
flags.DEFINE_float("toy_perturbation", 0.15, "Toy: how far B's geometry is from A's image.")
# Language-model preset (flags defined in experiments/pipeline/lm_preset.py).
from experiments.pipeline import lm_preset  # noqa: E402,F401  (defines its flags)


def main(argv):
    del argv
    run = common.start(FLAGS)
    from experiments.pipeline import runner
    try:
        runner.main(run, FLAGS)
    except runner.USER_ERRORS as e:
        print(f"universality: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

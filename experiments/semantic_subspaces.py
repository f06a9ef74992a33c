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

    python -m experiments.semantic_subspaces \\
        --config=experiments/configs/semantic_subspaces_lm.py \\
        --workdir=runs/semantic_subspaces/lm \\
        [--model_a=DIR --model_b=DIR --hookpoint_a=resid_post.1 --sae_a=PATH --sae_b=PATH \\
         --cache_a=CACHE_A --cache_b=CACHE_B]

Outputs: config.json, metrics.jsonl, results.json (per group: feature counts, pairs, skip
reason, scores with null mean / p / z / excess, random-subset and random-init baselines, topic
control differences), plots/groups_vs_null.png. Rerunning the same command resumes (or says
"nothing to do"); other settings in the same workdir are refused (`experiments/common.py`).
"""

from __future__ import annotations

from experiments import common
from experiments.configs import semantic_subspaces as CONFIG  # noqa: N812  (the config module)


def _data(settings) -> dict:
    return {
        "concepts_file": settings.concepts_file,
        "sae_a": settings.sae_a,
        "sae_b": settings.sae_b,
        "cache_a": settings.cache_a,
        "cache_b": settings.cache_b,
        **(
            {
                "model_a": settings.model_a,
                "model_b": settings.model_b,
                "text": None if settings.text == "sample" else settings.text,
            }
            if settings.preset == "lm"
            else {}
        ),
    }


def _errors():
    from experiments.pipeline import subspace_runner
    from models import text

    return (subspace_runner.SubspaceError, text.TokenizerMismatchError)


def body(run, settings):
    from experiments.pipeline import subspace_runner

    subspace_runner.main(run, settings)


if __name__ == "__main__":
    common.entry("semantic_subspaces", body, CONFIG, data=_data, errors=_errors)

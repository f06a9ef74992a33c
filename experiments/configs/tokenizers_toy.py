"""Settings of experiments/tokenizers_toy.py: word-level known truth across two tokenizers
(aligned units vs same-tokenizer pairing).

Every field is a flag of ``python -m experiments.tokenizers_toy`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F("tokenizer_a", "bpe", "Side A tokenizer.", choices=("bpe", "wordpiece", "unigram")),
    F("tokenizer_b", "wordpiece", "Side B tokenizer.", choices=("bpe", "wordpiece", "unigram")),
    F("vocab_size", 500, "Vocabulary of both tokenizers."),
    F("max_documents", 12, "Documents (chapters) of the shipped sample."),
    F("context_length", 64, "Tokens per context."),
    F("n_features", 48, "Ground-truth features."),
    F("d", 24, "Activation width of each side."),
    F("k_word", 2, "Features active per word type."),
    F("noise", 0.05, "Gaussian noise per dimension."),
    F(
        "jitter",
        0.8,
        "Per-occurrence magnitude spread of a word's features (shared by both "
        "sides; 0: every occurrence carries the type's code).",
    ),
    F("causal", True, "Scale a word's code by the share of the word read so far."),
    F(
        "units",
        ("shared_boundaries:last", "words:last", "words:mean"),
        "Alignment units to test, unit:pooling.",
    ),
    F("sae_steps", 1200, "SAE training steps."),
    F("sae_k", 3, "TopK k of the SAEs."),
    F("sae_batch_size", 256, "Rows per SAE step."),
    F("num_permutations", 200, "Random-pairing null size per metric."),
    F("metrics", ("svcca", "cka", "rsa_spearman", "mutual_knn"), "Metrics."),
    F("threshold", 0.1, "Correlation threshold of kept pairs."),
    F("chunk_size", 512, "Rows per streamed chunk."),
    F("seed", 0, "Seed."),
)


def _metric_names():
    from engine import similarity

    return sorted(similarity.METRICS)


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Num(("threshold",), hi=1.0, what="a correlation"),
    common.Num(("noise", "jitter"), lo=0.0),
    common.Num(
        (
            "vocab_size",
            "max_documents",
            "context_length",
            "n_features",
            "d",
            "k_word",
            "sae_steps",
            "sae_k",
            "sae_batch_size",
            "num_permutations",
            "chunk_size",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("seed",), lo=0, integer=True),
)


def get_config():
    """The defaults::

    python -m experiments.tokenizers_toy --workdir=runs/tokenizers_toy
    """
    return common.config_dict(FIELDS)

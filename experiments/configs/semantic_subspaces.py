"""Settings of experiments/semantic_subspaces.py: do two models arrange the features of a
concept group alike? The offline toy preset; language models: semantic_subspaces_lm.py.

Every field is a flag of ``python -m experiments.semantic_subspaces`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F(
        "preset",
        "toy",
        "toy: planted groups; lm: language models (set by the config file: "
        "experiments/configs/semantic_subspaces_lm.py).",
        choices=("toy", "lm"),
        flag=False,
    ),
    F(
        "concepts",
        (),
        "Built-in groups to analyse (default: all keyword lists of concepts.BUILTIN, or only "
        "the file's groups when --concepts_file is given; by name also Arabic food and the "
        "scripts Arabic / Cyrillic / Greek / Hebrew / Devanagari / CJK script).",
    ),
    F(
        "concepts_file",
        None,
        "User keyword lists: JSON {group: [words]} or text lines 'Group: word, word'.",
        type=str,
    ),
    F("topic", "Food", "Topic of the topic-restricted control."),
    F("metrics", ("svcca", "cka", "rsa_spearman", "mutual_knn"), "Metrics."),
    F("num_permutations", 1000, "Shuffle-null size per metric and group."),
    F("min_pairs", 3, "Groups with fewer pairs are skipped (>= 3)."),
    F("threshold", -1.0, "Keep group pairs with correlation >= this (<0: all)."),
    F("member_top_n", 5, "Top activating tokens that decide membership."),
    F("random_draws", 20, "Random-subset baseline draws per group."),
    F("knn_k", 5, "Mutual kNN k (capped at pairs - 1)."),
    F("alpha", 0.01, "Significance level reported."),
    F("chunk_size", 1024, "Tokens per streamed chunk."),
    F("seed", 0, "Seed (data, SAEs, permutations)."),
    F("sae_width", 0, "SAE features (0: toy feature count; lm: 4 x d_model)."),
    F("sae_k", 4, "TopK k."),
    F("sae_steps", 2000, "SAE training steps."),
    F("sae_batch", 256, "SAE batch size."),
    F("sae_lr", 0.003, "SAE learning rate."),
    F(
        "toy_dictionary",
        "truth",
        "truth: the ground-truth dictionary as the SAE (default: the "
        "planted groups are recovered exactly); sae: train TopK SAEs (days merge, fewer pairs).",
        choices=("truth", "sae"),
    ),
    F("toy_d", 64, "Toy: activation width."),
    F("toy_n_tokens", 16384, "Toy: tokens."),
    F("toy_group_size", 12, "Toy: features per planted group."),
    F("model_a", None, "Model A: local transformers directory.", type=str),
    F("model_b", None, "Model B: local transformers directory.", type=str),
    F("hookpoint_a", "resid_post.1", "Hookpoint of model A."),
    F("hookpoint_b", None, "Hookpoint of model B (default: hookpoint_a).", type=str),
    F("sae_a", None, "SAE of model A (any supported format; default: train).", type=str),
    F("sae_b", None, "SAE of model B (any supported format; default: train).", type=str),
    F(
        "cache_a",
        None,
        "Activation cache of model A (experiments.harvest); with --cache_b "
        "(same contexts) activations are read instead of computed.",
        type=str,
    ),
    F("cache_b", None, "Activation cache of model B (see --cache_a).", type=str),
    F("text", "sample", "Text source (models/text.py; default: shipped sample)."),
    F("max_documents", 0, "Read at most this many documents (0: all)."),
    F("max_contexts", 400, "Contexts used (0: all)."),
    F("context_length", 64, "Tokens per context."),
    F("lm_train_steps", 200, "Training steps of the default tiny model pair."),
)


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
            raise concepts.ConceptError(
                f"--topic {values['topic']!r}: not a built-in group nor one of the selected groups"
            ) from None


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Num(
        (
            "num_permutations",
            "member_top_n",
            "random_draws",
            "knn_k",
            "chunk_size",
            "sae_k",
            "sae_steps",
            "sae_batch",
            "toy_d",
            "toy_n_tokens",
            "toy_group_size",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("min_pairs",), lo=3, integer=True),
    common.Num(("threshold",), hi=1.0, what="a correlation; negative: all pairs"),
    common.Num(("alpha",), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    common.Num(("sae_lr",), lo=0.0, lo_open=True),
    common.Num(
        ("seed", "sae_width", "max_documents", "max_contexts", "lm_train_steps"), lo=0, integer=True
    ),
    common.Num(("context_length",), lo=2, integer=True),
    common.Check(
        ("sae_k", "sae_width"),
        lambda v: not v["sae_width"] or v["sae_k"] <= v["sae_width"],
        "--sae_k={sae_k}: expected <= --sae_width={sae_width}",
    ),
    common.Check(
        ("model_a", "model_b"),
        lambda v: bool(v["model_a"]) == bool(v["model_b"]),
        "give both --model_a and --model_b (or neither for the tiny pair)",
    ),
    common.Path(("concepts_file",), kind="file"),
    common.Path(("model_a", "model_b"), kind="dir", what="a local transformers directory"),
    common.Path(("sae_a", "sae_b", "cache_a", "cache_b"), kind="any"),
    common.Check(
        ("cache_a", "cache_b"),
        lambda v: bool(v["cache_a"]) == bool(v["cache_b"]),
        "give both --cache_a and --cache_b (or neither)",
    ),
    common.Path(("text",), kind="any", special=("sample",), prefixes=("hf:",)),
    common.Hookpoints(("hookpoint_a", "hookpoint_b")),
    common.Probe(("concepts", "concepts_file", "topic"), _groups),
)


def get_config():
    """The defaults::

    python -m experiments.semantic_subspaces --workdir=runs/semantic_subspaces/toy
    """
    return common.config_dict(FIELDS)

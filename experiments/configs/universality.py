"""Settings of the universality pipeline (experiments/universality.py): the embedded toy
preset. Language models: ``universality_lm.py``; published setups: ``universality_pythia.py``,
``universality_gemma.py`` (files next to this one, selected with ``--config=``).

Every field is a flag of ``python -m experiments.universality`` (``--metrics=svcca,cka``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F(
        "preset",
        "toy",
        "toy: embedded default; lm: language models from local paths (set by "
        "the config file: experiments/configs/universality_lm.py).",
        choices=("toy", "lm"),
        flag=False,
    ),
    # Pairing, filters, metrics.
    F(
        "pairing",
        "correlation",
        "Pairing rule, a name in the registry of "
        "experiments/pipeline/pairing.py (built in: correlation, decoder).",
    ),
    F("num_permutations", 1000, "Random-pairing null size per metric."),
    F(
        "metrics",
        ("svcca", "pwcca", "cka", "rsa_spearman", "procrustes", "mutual_knn"),
        "Metrics on the paired decoder rows.",
    ),
    F("threshold", 0.1, "Keep pairs whose score is >= this (negative: off)."),
    F("filter_dead", True, "Drop dead / constant features."),
    F(
        "filter_non_concept",
        True,
        "Drop features whose top tokens are dominated by punctuation, "
        "whitespace or special tokens.",
    ),
    F(
        "max_bad_fraction",
        0.5,
        "Non-concept: largest tolerated share of bad top tokens (0 = Lan et al.'s strict rule).",
    ),
    F(
        "require_shared_token",
        False,
        "Non-concept: the two features' top tokens must intersect (Lan et al.).",
    ),
    F("one_to_one", True, "Keep only each feature's best pair."),
    F("top_n", 10, "Top-activating tokens kept per feature."),
    F("min_pairs", 3, "Fewest pairs for which metrics are computed."),
    F("chunk_size", 1024, "Tokens per streamed chunk."),
    F(
        "memory_budget",
        0.0,
        "GiB the feature pass may use (0: half the machine's memory); above "
        "it the feature-by-feature correlation is tiled.",
    ),
    F("seed", 0, "Seed (data, SAEs, permutations)."),
    # Toy preset.
    F("toy_n_tokens", 20000, "Toy: tokens."),
    F("toy_n_features", 96, "Toy: ground-truth features."),
    F("toy_d", 32, "Toy: hidden width of both sides."),
    F("toy_steps", 1500, "Toy: SAE training steps."),
    F("toy_perturbation", 0.15, "Toy: how far B's geometry is from A's image."),
    # Reference points, replicates, sweeps (experiments/pipeline/references.py).
    F(
        "replicates",
        1,
        "SAEs per side (distinct seeds and data orders): all cross pairs and all "
        "within-side pairs are compared, and the cross score is reported as a distribution beside "
        "the within-side (seed) one.",
    ),
    F(
        "replicate_data",
        "order",
        "How replicates differ besides their init seed: 'order' (own "
        "data order) or 'subset' (disjoint folds of the rows, one per replicate).",
        choices=("order", "subset"),
    ),
    F(
        "ceiling_sides",
        ("a", "b"),
        "Sides that get a seed-vs-seed ceiling (a second SAE when --replicates=1).",
    ),
    F(
        "sweep",
        None,
        "Conditions sweep NAME=v1,v2,... with NAME one of d_sae, expansion, k, "
        "l1_coeff, subset: every value gets its own SAEs, null, ceiling and floor (table in "
        "results.json 'sweep', plot plots/sweep.png).",
        type=str,
    ),
    F(
        "replicate_permutations",
        2000,
        "Permutations of the cross < within test (all splits when fewer).",
    ),
    # Spliced metrics and importance (experiments/pipeline/importance.py).
    F(
        "splice_eval",
        True,
        "lm preset: CE loss recovered / KL / delta loss of every SAE spliced "
        "into its model (models/splice.py).",
    ),
    F("splice_contexts", 64, "Contexts used for the spliced metrics and the importance pass."),
    F(
        "importance",
        False,
        "lm preset: per-feature importance and the importance-restricted / "
        "weighted / decile comparisons (experiments/pipeline/importance.py).",
    ),
    F(
        "importance_score",
        "attribution",
        "Per-feature importance used by the comparisons: mean "
        "|attribution| per token, the direct-logit-effect norm (causal models), or the mean "
        "activation (a baseline that ignores the model's use of the feature).",
        choices=("attribution", "dle", "activation"),
    ),
    F(
        "importance_top_k",
        0,
        "Top-k most important features per side for the restricted "
        "comparison (0: a quarter of the paired features).",
    ),
    F("importance_bins", 10, "Importance bins (deciles) for the headline plot."),
    F(
        "importance_metrics",
        ("cka", "rsa_pearson"),
        "Metrics of the importance comparisons (weighted runs skip those without row weights).",
    ),
    F("importance_permutations", 200, "Random-pairing null size of the importance comparisons."),
    F("importance_top_m", 10, "Both-fire table: features per predicted token."),
    F("importance_classes", 64, "Both-fire table: most frequent predicted tokens used as classes."),
    F("importance_shuffles", 1000, "Both-fire table: shuffled pairings."),
    # Language models (experiments/pipeline/lm_preset.py, aligned.py).
    F(
        "alignment",
        "auto",
        "How rows of two models are paired: identical tokens (same "
        "tokenizer), shared token boundaries, or words (models/alignment.py). auto: tokens when "
        "the tokenizers are identical, else shared_boundaries.",
        choices=("auto", "tokens", "shared_boundaries", "words"),
    ),
    F(
        "alignment_pooling",
        "last",
        "Row of a unit on each side: its last (closing) token, or the mean / max over its tokens.",
        choices=("last", "mean", "max"),
    ),
    F(
        "alignment_dir",
        None,
        "Where the alignment is stored / reused (default WORKDIR/alignment/<unit>).",
        type=str,
    ),
    F(
        "model_a",
        "tiny",
        "Model A: local transformers directory, or 'tiny' (a tiny random model "
        "pair built in the workdir, offline).",
    ),
    F("model_b", "tiny", "Model B (see --model_a)."),
    F(
        "lm_setup",
        "custom",
        "Published setup whose weights are looked up under --weights_dir "
        "(set by the config file: experiments/configs/universality_pythia.py, "
        "universality_gemma.py).",
        choices=("custom", "pythia", "gemma"),
        flag=False,
    ),
    F(
        "weights_dir",
        "weights",
        "Root of local weights of a published setup "
        "(universality_pythia.py, universality_gemma.py).",
    ),
    F("hookpoints_a", ("resid_post.0", "resid_post.1"), "Hookpoints of model A."),
    F("hookpoints_b", ("resid_post.0", "resid_post.1"), "Hookpoints of model B."),
    F(
        "saes_a",
        None,
        "SAEs of A (one sub-directory per hookpoint); default: train on the fly.",
        type=str,
    ),
    F("saes_b", None, "SAEs of B (see --saes_a).", type=str),
    *common.text_fields(
        "Text: one or more .txt/.jsonl(.gz) files or folders of them (comma-separated, read in "
        "order), or 'sample' (the shipped public-domain English sample)."
    ),
    F("context_length", 64, "Tokens per context."),
    F("max_contexts", 256, "Contexts read from the text."),
    F("lm_batch_size", 16, "Contexts per forward pass."),
    F("sae_expansion", 4, "On-the-fly SAEs: d_sae = expansion * d_model."),
    F("sae_k", 16, "On-the-fly SAEs: TopK k."),
    F("sae_steps", 1000, "On-the-fly SAEs: training steps."),
    F("sae_batch_size", 512, "On-the-fly SAEs: rows per step."),
    F(
        "random_init_floor",
        True,
        "Compute a floor per cell from a random-init copy of a model (see --floor_at).",
    ),
    F(
        "floor_at",
        "b",
        "Floor of cell (A.ha, B.hb): A's SAE against an SAE of a random-init copy "
        "of B at hb ('b') or of A at ha ('a').",
        choices=("a", "b"),
    ),
    F(
        "saes_a_ceiling",
        None,
        "Second published seed of --saes_a (same layout): the ceiling of "
        "side A; default: an SAE of the same architecture, width and sparsity trained here.",
        type=str,
    ),
    F(
        "saes_b_ceiling",
        None,
        "Second published seed of --saes_b (see --saes_a_ceiling).",
        type=str,
    ),
    F(
        "trio",
        False,
        "Classic trio at model A's first hookpoint L: seed ceiling, adjacent layer "
        "(L+1, or L-1 at the last layer) and random-init floor at L; sets model B = model A, "
        "--floor_at=a, --ceiling_sides=a.",
    ),
    F(
        "cache_a",
        None,
        "Activation cache of model A (experiments.harvest); with --cache_b, "
        "activations are read from the caches instead of running the models (the models are still "
        "used for token strings and the floor).",
        type=str,
    ),
    F("cache_b", None, "Activation cache of model B (see --cache_a).", type=str),
    F(
        "lm_activations",
        "auto",
        "Where activations live: 'memory' (arrays, small runs), "
        "'stream' (activation caches on disk: harvested into WORKDIR/activations/ unless "
        "--cache_a/b are given, read chunk by chunk by SAE training and the feature pass), "
        "'auto': stream when --cache_a/--cache_b are given or when the activations would take "
        "more than a quarter of the memory budget (see experiments/pipeline/lm_preset.py).",
        choices=("auto", "memory", "stream"),
    ),
    F(
        "lm_exclude_special",
        False,
        "Leave special tokens (BOS/EOS/PAD/CLS/SEP) out of SAE "
        "training and of the paired rows of every comparison.",
    ),
)


def _metric_names():
    from engine import similarity

    return sorted(similarity.METRICS)


def _check_references(values) -> None:
    """Replicate, ceiling and sweep settings (`references.RefSettings.validate`,
    `references.parse_sweep`), refused before the workdir is touched."""
    from experiments.pipeline import references

    references.RefSettings(
        replicates=int(values["replicates"]),
        replicate_data=values["replicate_data"],
        ceiling_sides=tuple(values["ceiling_sides"]),
        floor=bool(values.get("random_init_floor", True)),
        floor_at=values.get("floor_at", "b"),
        permutations=int(values["replicate_permutations"]),
    ).validate()
    references.parse_sweep(values["sweep"])


def _check_text(values) -> None:
    """Every --text source holds text (an empty file or folder fails here, not after the
    models are loaded)."""
    from models import text

    for src in values["text"] or ():
        try:
            text.check_sources([src])
        except ValueError as e:
            raise ValueError(f"--text={src}: {e}") from None


def _pairing_names():
    from experiments.pipeline import pairing

    return tuple(pairing.names())


RULES = (
    common.Choice(("pairing",), _pairing_names),
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Num(("threshold",), hi=1.0, what="a correlation; negative: no threshold"),
    common.Num(("max_bad_fraction",), lo=0.0, hi=1.0),
    common.Num(
        (
            "num_permutations",
            "top_n",
            "chunk_size",
            "toy_n_tokens",
            "toy_n_features",
            "toy_d",
            "toy_steps",
            "context_length",
            "max_contexts",
            "lm_batch_size",
            "sae_expansion",
            "sae_k",
            "sae_steps",
            "sae_batch_size",
            "replicates",
            "replicate_permutations",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("min_pairs",), lo=3, integer=True, what="the metrics need 3 pairs"),
    common.Num(("seed",), lo=0, integer=True),
    common.Num(("toy_perturbation",), lo=0.0),
    common.Check(
        ("toy_n_features",),
        lambda v: v["toy_n_features"] >= 4,
        "--toy_n_features={toy_n_features}: the toy SAEs have TopK k=4 and d_sae = "
        "toy_n_features; expected >= 4",
    ),
    common.Check(
        ("toy_n_tokens",),
        lambda v: v["preset"] != "toy" or v["toy_n_tokens"] >= 256,
        "--toy_n_tokens={toy_n_tokens}: expected >= 256 (one SAE batch)",
    ),
    common.Check(
        ("cache_a", "cache_b"),
        lambda v: bool(v["cache_a"]) == bool(v["cache_b"]),
        "--cache_a and --cache_b must be given together",
    ),
    common.Path(
        ("model_a", "model_b"),
        kind="dir",
        special=("tiny",),
        what="a local transformers directory, or 'tiny'",
    ),
    common.Path(("saes_a", "saes_b", "saes_a_ceiling", "saes_b_ceiling"), kind="any"),
    common.Path(("cache_a", "cache_b"), kind="dir", what="an activation cache"),
    common.Check(("text",), lambda v: bool(v["text"]), "--text: expected at least one source"),
    common.Path(("text",), kind="any", special=("sample",)),
    common.Probe(("text",), _check_text),
    common.Hookpoints(("hookpoints_a", "hookpoints_b")),
    common.Check(
        ("saes_a_ceiling", "saes_a"),
        lambda v: not v["saes_a_ceiling"] or bool(v["saes_a"]),
        "--saes_a_ceiling needs --saes_a (the published SAEs it is a second seed of)",
    ),
    common.Check(
        ("saes_b_ceiling", "saes_b"),
        lambda v: not v["saes_b_ceiling"] or bool(v["saes_b"]),
        "--saes_b_ceiling needs --saes_b (the published SAEs it is a second seed of)",
    ),
    common.Check(
        ("saes_a", "saes_b", "replicates", "sweep"),
        lambda v: (
            v["preset"] != "lm"
            or not (v["saes_a"] or v["saes_b"])
            or (v["replicates"] <= 1 and not v["sweep"])
        ),
        "loaded SAEs (--saes_a/--saes_b) cannot be replicated or swept; --replicates "
        "> 1 and --sweep need SAEs trained here",
    ),
    common.Probe(("replicates", "replicate_data", "ceiling_sides", "sweep"), _check_references),
)


def get_config():
    """The toy preset (two planted-feature sides, no downloads)::

    python -m experiments.universality --workdir=runs/universality/toy
    """
    return common.config_dict(FIELDS)

"""Settings of experiments/feature_geometry.py: concept geometry of SAE features (the planted
circle of days / months and its controls).

Every field is a flag of ``python -m experiments.feature_geometry`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F(
        "preset",
        "toy",
        "toy: planted dictionaries (models/planted.py); lm: transformers models "
        "and their SAEs (set by a config file: experiments/configs/feature_geometry_lm.py).",
        choices=("toy", "lm"),
        flag=False,
    ),
    F(
        "variants",
        ("planted", "unplanted"),
        "Data variants: planted (circle, shared by "
        "rotation), unplanted (random concept directions, independent models), shared_random "
        "(random concept directions, shared by rotation: geometry agrees but is not circular).",
    ),
    F("concept", "days", "Concept family: days (7 items) or months (12)."),
    F("seed", 0, "Seed of the data (and SAE initialisation)."),
    F("width", 64, "Width of the toy models' activations."),
    F("n_tokens", 8192, "Tokens (rows)."),
    F("n_groups", 6, "Planted non-circular concept groups."),
    F("group_size", 4, "Features per planted group."),
    F("n_other", 64, "Independent random features."),
    F("noise", 0.01, "Activation noise std."),
    F(
        "circle_offset",
        0.8,
        "Lift of the planted circle off the origin (cosine of the items to "
        "their shared direction; 0.8 makes neighbouring days cos 0.86, opposite 0.32).",
    ),
    F(
        "circle_unique",
        0.5,
        "Weight s of each planted item's own direction, orthogonal to the circle's 3-D span "
        "(item = sqrt(1 - s^2) circle point + s own). At 0 the items span only 3 dims and SAEs "
        "compose every day from 3-5 shared latents, so the SAE path's acceptance fails "
        "(WORKSPACE.md); 0.5 gives neighbouring days cos 0.65 and one SAE latent per day.",
    ),
    F(
        "concept_magnitude",
        0.5,
        "Smallest magnitude of a planted concept item (uniform on [this, 1]); above the "
        "neighbouring items' cosine an SAE encoder can tell a weak item from its strong "
        "neighbour (the SAE path's acceptance needs it: WORKSPACE.md).",
    ),
    F(
        "dictionary",
        "truth",
        "truth: ground-truth atoms and codes; sae: train an SAE per model (--sae_activation).",
        choices=("truth", "sae"),
    ),
    F("sae_width", 0, "SAE features (0: 2 x the planted feature count)."),
    F(
        "sae_activation",
        "topk",
        "SAE architecture (models/sae_train.py): topk, batchtopk, relu (L1 penalty) or jumprelu.",
        choices=("topk", "batchtopk", "relu", "jumprelu"),
    ),
    F("sae_k", 4, "TopK k of the SAEs (topk, batchtopk)."),
    F("sae_l1_coeff", 5.0, "L1 coefficient of relu SAEs."),
    F("sae_steps", 3000, "SAE training steps."),
    F("sae_batch", 256, "SAE batch size."),
    F("sae_lr", 0.003, "SAE learning rate."),
    F(
        "sae_dead_tokens",
        25600,
        "Tokens without firing before a latent counts as dead (AuxK revives it).",
    ),
    F("graph_k", 2, "Cosine graph: neighbours per feature (Engels et al.: 2)."),
    F("graph_threshold", 0.5, "Cosine graph: edge threshold (Engels: 0.5)."),
    F("min_size", 2, "Smallest reported cluster."),
    F("max_size", 0, "Largest reported cluster (0: no limit)."),
    F("spectral_clusters", 0, "Spectral clustering clusters (0: live features // 8)."),
    F(
        "family_recall",
        0.8,
        "The family is found when one cluster holds this fraction of the items.",
    ),
    F("n_null", 1000, "Random permutations when exact enumeration is too big."),
    F("alpha", 0.01, "Significance level of the acceptance checks."),
    F("chunk_size", 1024, "Rows per streamed chunk."),
    F("min_token_count", 5, "A token names a feature only if it occurs at least this often."),
    F("plot_tokens", 1500, "Reconstructed tokens drawn in the circle plot."),
    F("plots", True, "Write the plots."),
    # Language-model preset (experiments/configs/feature_geometry_lm.py).
    F(
        "model_a",
        "planted",
        "Model A: local transformers directory, or 'planted' (tiny pair with planted circles "
        "built in the workdir) or 'tiny'.",
    ),
    F("model_b", "planted", "Model B (see --model_a)."),
    F(
        "lm_planted",
        True,
        "Planted pair: weekdays and months on circles (False: random directions, the control).",
    ),
    F(
        "lm_shared",
        True,
        "Planted pair: B's embedding table is A's rotated (False: independent geometry).",
    ),
    F("hookpoint_a", "resid_pre.0", "Hookpoint of model A."),
    F("hookpoint_b", None, "Hookpoint of model B (default: --hookpoint_a).", type=str),
    F(
        "sae_a",
        None,
        "SAE of model A (any supported format, or a directory with one sub-directory per "
        "hookpoint); default: train here.",
        type=str,
    ),
    F("sae_b", None, "SAE of model B (see --sae_a).", type=str),
    F(
        "cache_a",
        None,
        "Activation cache of model A (experiments.harvest); default: forward passes over --text.",
        type=str,
    ),
    F("cache_b", None, "Activation cache of model B.", type=str),
    F(
        "text",
        "planted",
        "Text: .txt/.jsonl file or folder, 'sample', or 'planted' (the planted pair's corpus).",
    ),
    F("max_documents", 0, "Read at most this many documents (0: all)."),
    F("max_contexts", 400, "Contexts used (0: all)."),
    F("context_length", 32, "Tokens per context."),
    F("lm_batch_size", 16, "Contexts per forward pass."),
    F("sae_expansion", 4, "Trained SAEs: d_sae = expansion x d_model when --sae_width=0."),
    F(
        "families",
        ("Days of week", "Months"),
        "Concept families (cyclic: Days of week, Months; or any built-in keyword or script "
        "group, e.g. Numbers, Food, Arabic food, Arabic / Cyrillic / Greek script, or a "
        "--concepts_file group, then without circularity).",
    ),
    F(
        "group_concepts",
        ("Days of week", "Months", "Food", "Numbers", "Nature", "People/Roles", "Emotions"),
        "Concept groups of the group-distance comparison (>= 3): built-in keyword lists "
        "(experiments/pipeline/concepts.py BUILTIN, NAMED), scripts by Unicode block (Arabic, "
        "Cyrillic, Greek, Hebrew, Devanagari, CJK script) or --concepts_file groups.",
    ),
    F(
        "concepts_file",
        None,
        "User keyword lists: JSON {group: [words]} or text lines 'Group: word, word' "
        "(experiments/pipeline/concepts.py).",
        type=str,
    ),
    F("topic", "Food", "Topic of the topic-restricted control corpus."),
    F("templates", True, "Also measure families on templated prompts."),
    F(
        "family_tau",
        0.5,
        "Family rule: share of a feature's activation mass on the concept's tokens.",
    ),
    F("family_min_hits", 3, "Family rule: item tokens the feature fires on."),
    F(
        "spectral_max_features",
        4096,
        "Spectral clustering only up to this many live features (dense affinity).",
    ),
)


def _variants() -> tuple[str, ...]:
    """The variants experiments/feature_geometry.py knows (read when checking)."""
    from experiments.pipeline import geometry_toy

    return tuple(geometry_toy.VARIANTS)


def _groups(values):
    """Resolves --families / --group_concepts / --topic as the run will (raises on a bad one)."""
    from experiments.pipeline import concept_family, concepts

    groups = concepts.resolve_groups(values["group_concepts"] or None, values["concepts_file"])
    for name in list(values["families"]) + [values["topic"]]:
        concept_family.make_concept(name, groups)


RULES = (
    common.Choice(("variants",), _variants, nonempty=True),
    common.Choice(("concept",), ("days", "months")),
    common.Num(
        (
            "width",
            "n_tokens",
            "group_size",
            "sae_k",
            "sae_steps",
            "sae_batch",
            "sae_dead_tokens",
            "graph_k",
            "n_null",
            "chunk_size",
            "min_token_count",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(
        (
            "seed",
            "n_groups",
            "n_other",
            "sae_width",
            "max_size",
            "spectral_clusters",
            "plot_tokens",
        ),
        lo=0,
        integer=True,
    ),
    common.Num(("min_size",), lo=1, integer=True),
    common.Num(("noise",), lo=0.0),
    common.Num(("circle_offset",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(("concept_magnitude",), lo=0.0, hi=1.0, lo_open=True),
    common.Num(("circle_unique",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(("sae_l1_coeff",), lo=0.0),
    common.Num(("sae_lr",), lo=0.0, lo_open=True),
    common.Num(("graph_threshold",), lo=-1.0, hi=1.0),
    common.Num(("family_recall",), lo=0.0, hi=1.0, lo_open=True),
    common.Num(("alpha",), lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    common.Check(
        ("max_size", "min_size"),
        lambda v: not v["max_size"] or v["max_size"] >= v["min_size"],
        "--max_size={max_size}: expected 0 (no limit) or >= --min_size={min_size}",
    ),
    common.Check(
        ("sae_k", "sae_width"),
        lambda v: not v["sae_width"] or v["sae_k"] <= v["sae_width"],
        "--sae_k={sae_k}: expected <= --sae_width={sae_width}",
    ),
    common.Num(("max_documents", "max_contexts"), lo=0, integer=True),
    common.Num(("context_length",), lo=4, integer=True),
    common.Num(
        ("lm_batch_size", "sae_expansion", "family_min_hits", "spectral_max_features"),
        lo=1,
        integer=True,
    ),
    common.Num(("family_tau",), lo=0.0, hi=1.0, lo_open=True),
    common.Path(
        ("model_a", "model_b"),
        kind="dir",
        special=("planted", "tiny"),
        what="a local transformers directory, 'planted' or 'tiny'",
    ),
    common.Path(("sae_a", "sae_b", "cache_a", "cache_b"), kind="any"),
    common.Path(("text",), kind="any", special=("sample", "planted"), prefixes=("hf:",)),
    common.Path(("concepts_file",), kind="file"),
    common.Hookpoints(("hookpoint_a", "hookpoint_b")),
    common.Check(
        ("families",),
        lambda v: len(v["families"]) >= 1,
        "--families: expected at least one concept",
    ),
    common.Check(
        ("group_concepts", "concepts_file"),
        lambda v: not v["group_concepts"] or len(v["group_concepts"]) >= 3,
        "--group_concepts: expected at least 3 groups (3 distances) or none",
    ),
    common.Probe(("families", "group_concepts", "concepts_file", "topic"), _groups),
)


def get_config():
    """The defaults::

    python -m experiments.feature_geometry --workdir=runs/feature_geometry
    """
    return common.config_dict(FIELDS)

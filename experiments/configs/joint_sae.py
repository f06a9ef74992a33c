"""Settings of experiments/joint_sae.py: joint SAEs (crosscoder, universal, aligned) against
independent SAEs on a pair of models.

Every field is a flag of ``python -m experiments.joint_sae`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F("source", "toy", "Embedded toy pair or two LM caches.", choices=("toy", "caches")),
    F("cache_a", None, "Activation cache of model A (--source=caches).", type=str),
    F("cache_b", None, "Activation cache of model B (same tokens).", type=str),
    F("floor_cache_b", None, "Cache of a random-init copy of B (the floor).", type=str),
    F("hookpoint_a", None, "Hookpoint of cache A.", type=str),
    F("hookpoint_b", None, "Hookpoint of cache B (and of the floor cache).", type=str),
    # Caches of models with different tokenizers pair through aligned units
    # (experiments/pipeline/aligned.py; names and meaning as in configs/universality.py).
    F(
        "alignment",
        "auto",
        "How rows of the two caches are paired: identical tokens (same tokenizer), shared token "
        "boundaries, or words (models/alignment.py). auto: tokens when the caches' tokenizers "
        "are identical, else shared_boundaries.",
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
        None,
        "Model A's local transformers directory (its tokenizer; needed when the caches' "
        "tokenizers differ).",
        type=str,
    ),
    F("model_b", None, "Model B's local transformers directory (see --model_a).", type=str),
    F(
        "text",
        None,
        "Text the caches were harvested on: a .txt/.jsonl file or folder, or 'sample' (the "
        "shipped sample); needed when the caches' tokenizers differ.",
        type=str,
    ),
    F("max_rows", 200000, "Rows (tokens or aligned units) used from the caches (in memory)."),
    F("n_tokens", 8192, "Toy rows."),
    F("toy_seed", 0, "Toy pair seed."),
    F(
        "n_models",
        2,
        "Toy sides (models); > 2 uses models.dictionary_pair.make_partial_sides "
        "(features shared by all sides).",
    ),
    F(
        "dead_tokens",
        10_000_000,
        "Rows without firing before a latent of a TopK/BatchTopK "
        "joint design is dead (its AuxK target).",
    ),
    F("aux_coeff", 1.0 / 32, "AuxK coefficient of the TopK joint designs (0: off)."),
    F("steps", 600, "Optimisation steps per run."),
    F("batch_size", 256, "Rows per step."),
    F("d_sae", 96, "Latents of the joint designs (crosscoder, universal)."),
    F("d_sae_single", 64, "Latents per SAE of aligned / independent SAEs."),
    F("k", 3, "TopK k (crosscoder TopK uses k + 1: its one code serves both models' features)."),
    F("lr", 0.001, "Adam learning rate."),
    F(
        "designs",
        ("crosscoder_l1", "crosscoder_topk", "universal", "aligned", "independent"),
        "Which designs to run.",
    ),
    F("l1_coeffs", ("1", "3"), "Crosscoder L1 coefficients."),
    F("align_coeffs", ("1", "3", "10"), "Alignment coefficients alpha."),
    F("seeds", ("0",), "Initialisation seeds (each run also gets its data order)."),
    F("num_permutations", 100, "Random-pairing null size of the geometry."),
    F(
        "metrics",
        ("svcca", "cka", "rsa_spearman"),
        "Geometry metrics (engine.similarity registry "
        "names; the pipeline's full set is svcca,pwcca,cka,rsa_spearman,procrustes,mutual_knn, "
        "each costs a compile per pair count on CPU).",
    ),
)


def _metric_names():
    from engine import similarity

    return sorted(similarity.METRICS)


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Path(("cache_a", "cache_b", "floor_cache_b"), kind="dir", what="an activation cache"),
    common.Path(("model_a", "model_b"), kind="dir", what="a local transformers directory"),
    common.Path(("text",), kind="any", special=("sample",)),
    common.Check(
        ("source", "cache_a", "cache_b"),
        lambda v: (
            v["source"] != "caches" or bool(v["cache_a"] and v["cache_b"] and v["floor_cache_b"])
        ),
        "--source=caches needs --cache_a, --cache_b and --floor_cache_b",
    ),
    common.Num(
        (
            "max_rows",
            "n_tokens",
            "steps",
            "batch_size",
            "d_sae",
            "d_sae_single",
            "k",
            "num_permutations",
            "dead_tokens",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("n_models",), lo=2, integer=True),
    common.Check(
        ("source", "n_models"),
        lambda v: v["source"] != "caches" or v["n_models"] == 2,
        "--n_models > 2 is for --source=toy (the caches option pairs two models)",
    ),
    common.Num(("lr",), lo=0.0, lo_open=True),
    common.Num(("aux_coeff",), lo=0.0),
    common.Num(("l1_coeffs", "align_coeffs"), lo=0.0),
    common.Num(("seeds", "toy_seed"), lo=0, integer=True),
)


def get_config():
    """The defaults::

    python -m experiments.joint_sae --workdir=runs/joint_sae/toy
    """
    return common.config_dict(FIELDS)

"""Settings of experiments/train_sae.py: train SAEs (one or a sweep) on synthetic
ground-truth data, a .npy array, an activation cache or a live model.

Every field is a flag of ``python -m experiments.train_sae`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F(
        "source",
        "synthetic",
        "Training data: synthetic, an in-memory .npy, an activation cache "
        "(experiments.harvest; streamed, never loaded) or a live model (streamed).",
        choices=("synthetic", "npy", "cache", "lm"),
    ),
    F("npy_path", None, "2-D float .npy array [rows, d_in] (--source=npy).", type=str),
    F("cache_path", None, "Activation cache directory (--source=cache).", type=str),
    F(
        "hookpoint",
        None,
        "Hookpoint to train on (--source=cache: default the cache's first; "
        "--source=lm: required, e.g. resid_post.3).",
        type=str,
    ),
    F("model_path", None, "Local transformers model directory (--source=lm).", type=str),
    F(
        "lm_text",
        ("sample",),
        "Text for --source=lm (models/text.py sources; with "
        "--lm_text_weights each entry is one corpus).",
    ),
    F("lm_text_weights", (), "Interleave the --lm_text corpora in this ratio."),
    F(
        "lm_txt_split",
        "line",
        "How .txt files split into documents (--source=lm).",
        choices=("file", "paragraph", "line"),
    ),
    F("lm_pack", True, "Pack short documents into shared contexts (--source=lm)."),
    F("lm_context_length", 128, "Tokens per context (--source=lm)."),
    F("lm_max_contexts", 1024, "Contexts read from --lm_text (--source=lm)."),
    F("lm_forward_batch", 8, "Contexts per forward pass (--source=lm)."),
    F(
        "exclude_special",
        False,
        "Leave special tokens (BOS/EOS/PAD/CLS/SEP) out of training (--source=cache|lm).",
    ),
    F(
        "epochs",
        0.0,
        "Passes over the data (overrides --steps when > 0; npy/cache/lm). A run "
        "covering less than one epoch logs a warning.",
    ),
    F(
        "shuffle_buffer",
        65536,
        "Rows held in the shuffle buffer when streaming (--source=cache|lm).",
    ),
    F("shuffle_block", 1024, "Consecutive rows read together by the shuffle."),
    F("eval_frac", 0.1, "Fraction of .npy rows held out for evaluation."),
    F("n_true", 512, "Synthetic: number of ground-truth features."),
    F("d", 128, "Synthetic: ambient dimension."),
    F("k_true", 5.0, "Synthetic: mean number of active true features per row."),
    F("correlation", 0.0, "Synthetic: latent correlation within blocks."),
    F("n_blocks", 1, "Synthetic: correlation blocks."),
    F("dict_seed", 1, "Synthetic: dictionary seed."),
    F("activation", ("topk",), "relu | topk | batchtopk | jumprelu (list)."),
    F("d_sae", (), "SAE widths (list of ints)."),
    F(
        "d_sae_mult",
        (),
        "Widths as multiples of n_true (synthetic) or d_in (with neither flag: "
        "one width, 1 x n_true or d_in).",
    ),
    F("k", ("5",), "k for topk / batchtopk (list)."),
    F("l1_coeff", ("1.0",), "L1 coefficients for relu (list)."),
    F("l0_coeff", ("1.0",), "L0 coefficients for jumprelu (list)."),
    F("seeds", ("0",), "Initialisation seeds (list)."),
    F("data_seed", 0, "Data order / synthetic sample stream."),
    F("steps", 1000, "Optimisation steps per program."),
    F("batch_size", 1024, "Rows per step."),
    F("lr", 0.001, "Adam learning rate."),
    F("lr_decay_frac", 0.3, "Learning-rate decay to 0 over this final fraction."),
    F("lr_warmup_steps", 0, "Linear learning-rate warm-up steps."),
    F("lr_decay", "linear", "Shape of the decay.", choices=("linear", "cosine")),
    F("dead_tokens", 1000000, "Tokens without firing before a latent is dead."),
    F("k_aux", -1, "AuxK latents (-1: d_in // 2; 0: off)."),
    F("decode", "auto", "TopK decoder path.", choices=("auto", "sparse", "dense")),
    F(
        "b_dec_init",
        "geometric_median",
        "b_dec initialisation.",
        choices=("geometric_median", "mean", "zeros"),
    ),
    F("eval_rows", 16384, "Held-out rows for evaluation (synthetic: fresh)."),
    F(
        "eval_on_train",
        False,
        "npy: when fewer than MIN_EVAL_ROWS rows would be held out, "
        "measure the metrics on training rows instead of refusing (recorded in results.json).",
    ),
    F("match_threshold", 0.7, "Decoder cosine for a seed-vs-seed match."),
    F("log_every", 100, "Steps between metrics lines."),
    F("checkpoint_every", 500, "Steps between checkpoints."),
)


def _npy_width(path: str) -> int:
    """d_in of a .npy file from its header (no data read; a garbage, pickled or non-.npy file
    is one line naming it)."""
    from models import activation_cache

    shape, _, _ = activation_cache.npy_header(path, "--npy_path")
    if len(shape) != 2:
        raise common.ConfigError(
            f"--npy_path={path}: expected a 2-D array [rows, d_in], got shape {tuple(shape)}"
        )
    return int(shape[1])


def widths_of(values) -> list[int]:
    """The SAE widths the run will train (as `run_train_sae` computes them). With a cache or a
    live model, d_in is known only once the source opens: widths from --d_sae_mult (and the
    1 x d_in default) are left out here."""
    if values["source"] == "synthetic":
        unit = values["n_true"]
    elif values["source"] == "npy":
        unit = _npy_width(values["npy_path"])
    else:
        return [int(w) for w in values["d_sae"]]
    widths = [int(w) for w in values["d_sae"]] + [
        int(round(float(m) * unit)) for m in values["d_sae_mult"]
    ]
    return widths or [unit]


def _k_fits(values) -> None:
    widths = widths_of(values)
    if not widths:  # a cache / live model without --d_sae: checked once d_in is known
        return
    if min(widths) < 1:
        raise common.ConfigError(f"SAE width {min(widths)}: expected >= 1 (--d_sae_mult too small)")
    if not set(values["activation"]) & {"topk", "batchtopk"}:
        return
    k = max(int(x) for x in values["k"])
    if k > min(widths):
        raise common.ConfigError(
            f"--k={k}: expected <= the smallest SAE width (d_sae {min(widths)})"
        )


RULES = (
    common.Choice(("activation",), ("relu", "topk", "batchtopk", "jumprelu"), nonempty=True),
    common.Check(
        ("npy_path",),
        lambda v: v["source"] != "npy" or bool(v["npy_path"]),
        "--npy_path is required with --source=npy",
    ),
    common.Path(("npy_path",), kind="file"),
    common.Check(
        ("cache_path",),
        lambda v: v["source"] != "cache" or bool(v["cache_path"]),
        "--cache_path is required with --source=cache",
    ),
    common.Check(
        ("model_path", "hookpoint"),
        lambda v: v["source"] != "lm" or bool(v["model_path"] and v["hookpoint"]),
        "--model_path and --hookpoint are required with --source=lm",
    ),
    common.Path(("cache_path", "model_path"), kind="dir"),
    common.Path(("lm_text",), kind="any", special=("sample",)),
    common.Num(("epochs",), lo=0.0),
    common.Num(
        (
            "lm_context_length",
            "lm_max_contexts",
            "lm_forward_batch",
            "shuffle_buffer",
            "shuffle_block",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("lr_warmup_steps",), lo=0, integer=True),
    common.Num(("eval_frac",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(
        (
            "n_true",
            "d",
            "n_blocks",
            "steps",
            "batch_size",
            "dead_tokens",
            "eval_rows",
            "log_every",
            "checkpoint_every",
            "d_sae",
            "k",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("dict_seed", "data_seed", "seeds"), lo=0, integer=True),
    common.Num(("k_true",), lo=0.0, lo_open=True),
    common.Num(("correlation",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(("d_sae_mult", "lr"), lo=0.0, lo_open=True),
    common.Num(("l1_coeff", "l0_coeff"), lo=0.0),
    common.Num(("lr_decay_frac",), lo=0.0, hi=1.0),
    common.Num(("k_aux",), lo=-1, integer=True, what="-1: d_in // 2; 0: off"),
    common.Num(("match_threshold",), lo=-1.0, hi=1.0),
    common.Check(
        ("k_true", "n_true"),
        lambda v: v["source"] != "synthetic" or v["k_true"] <= v["n_true"],
        "--k_true={k_true}: expected <= --n_true={n_true}",
    ),
    common.Probe(("k", "d_sae", "d_sae_mult"), _k_fits),
)


def get_config():
    """The defaults::

    python -m experiments.train_sae --workdir=runs/sae_gt --source=synthetic
    """
    return common.config_dict(FIELDS)

"""Settings of experiments/importance.py: faithfulness and per-feature importance of one SAE at
one hookpoint of a language model.

Every field is a flag of ``python -m experiments.importance`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F("model", "tiny", "Local model directory, or 'tiny' (built offline)."),
    F(
        "tiny_arch",
        "gpt_neox",
        "Architecture of the tiny model.",
        choices=("gpt_neox", "gpt2", "llama", "bert", "gemma2"),
    ),
    F("tiny_train_steps", 300, "Training steps of the tiny model on the shipped sample."),
    F(
        "hookpoint",
        "resid_post.0",
        "Hookpoint (resid_post.L, resid_pre.L, attn_out.L, "
        "mlp_out.L, or SAELens / sparsify names).",
    ),
    F(
        "sae",
        "train",
        "SAE directory (any supported format), or 'train' (a TopK SAE trained "
        "here on the hookpoint's activations).",
    ),
    F("text", "sample", "A .txt/.jsonl file or folder, or 'sample'."),
    F("context_length", 64, "Tokens per context."),
    F("max_contexts", 128, "Contexts read from the text."),
    F("batch_size", 8, "Contexts per forward pass."),
    F("sae_expansion", 4, "Trained SAE: d_sae / d_model."),
    F("sae_k", 8, "Trained SAE: TopK k."),
    F("sae_steps", 600, "Trained SAE: steps."),
    F("n_classes", 64, "Predicted-token classes (most frequent)."),
    F("n_ablate", 16, "Features in the exact-ablation sample."),
    F("ablate_contexts", 32, "Contexts of the ablation."),
    F("top_n", 10, "Tokens listed per feature."),
    F("seed", 0, "Seed (tiny model, SAE, masking, ablation sample)."),
)


RULES = (
    common.Path(
        ("model",), kind="dir", special=("tiny",), what="a local transformers directory, or 'tiny'"
    ),
    common.Path(("sae",), kind="any", special=("train",)),
    common.Path(("text",), kind="any", special=("sample",)),
    common.Num(
        (
            "tiny_train_steps",
            "context_length",
            "max_contexts",
            "batch_size",
            "sae_expansion",
            "sae_k",
            "sae_steps",
            "n_classes",
            "n_ablate",
            "ablate_contexts",
            "top_n",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("seed",), lo=0, integer=True),
)


def get_config():
    """The defaults::

    python -m experiments.importance --workdir=runs/importance/tiny
    """
    return common.config_dict(FIELDS)

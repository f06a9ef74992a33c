"""Semantic subspaces on two local transformers models (default: a tiny random pair built
under the workdir; SAEs trained on the fly unless --sae_a/--sae_b)."""

from experiments.configs import semantic_subspaces as base


def get_config():
    """Two language models on the shipped text sample::

        python -m experiments.semantic_subspaces \\
            --config=experiments/configs/semantic_subspaces_lm.py \\
            --workdir=runs/semantic_subspaces/lm
    """
    c = base.get_config()
    c.preset = "lm"
    return c

"""Universality on language models from local paths (default: a tiny random transformers
pair built in the workdir, offline); the models, hookpoints, SAEs and text are flags."""

from experiments.configs import universality as base


def get_config():
    """Layer grid on a tiny random transformers pair (offline)::

        python -m experiments.universality --config=experiments/configs/universality_lm.py \\
            --workdir=runs/universality/tiny

    Your models and SAEs::

        python -m experiments.universality --config=experiments/configs/universality_lm.py \\
            --workdir=runs/universality/lm --model_a=/models/pythia-70m \\
            --model_b=/models/pythia-160m --hookpoints_a=resid_post.2,resid_post.3 \\
            --hookpoints_b=resid_post.3,resid_post.5 --saes_a=/saes/pythia-70m \\
            --saes_b=/saes/pythia-160m --text=/data/text.jsonl
    """
    c = base.get_config()
    c.preset = "lm"
    return c

"""Concept geometry on language models and their SAEs (default: a tiny transformers pair with
planted weekday / month circles, built in the workdir, offline); models, hookpoints, SAEs,
caches and text are flags."""

from experiments.configs import feature_geometry as base


def get_config():
    """The planted tiny pair (offline)::

        python -m experiments.feature_geometry \\
            --config=experiments/configs/feature_geometry_lm.py --workdir=runs/geometry/planted

    Your models (and SAEs, or trained here)::

        python -m experiments.feature_geometry \\
            --config=experiments/configs/feature_geometry_lm.py --workdir=runs/geometry/lm \\
            --model_a=/models/pythia-70m --model_b=/models/pythia-160m \\
            --hookpoint_a=resid_post.3 --hookpoint_b=resid_post.5 --text=/data/text.jsonl
    """
    c = base.get_config()
    c.preset = "lm"
    return c

"""Settings of experiments/toy_superposition.py: toy models of superposition (Elhage et al.):
the pentagon, dimensionality and phase-diagram sweeps.

Every field is a flag of ``python -m experiments.toy_superposition`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F("sweep_steps", 10000, "AdamW steps per sweep (the paper: 10k)."),
    F("sweep_batch_size", 1024, "Samples per instance per step (the paper: 1024)."),
    F("sweep_lr", 0.001, "AdamW learning rate (the paper: 1e-3)."),
    F("sweep_seeds", 3, "Seeds per phase-diagram point (figures show the lowest-loss one)."),
    F(
        "pentagon_seeds",
        6,
        "Seeds per sparsity of the 5 -> 2 sweep (local minima such as a "
        "square are common; the lowest-loss seed is shown).",
    ),
    F("sweep_log_every", 500, "Steps per jitted scan call / metrics line."),
    F("sweep_checkpoint_every", 2500, "Checkpoint interval in steps."),
    F(
        "pentagon_sparsity",
        ("0", "0.5", "0.7", "0.8", "0.85", "0.9", "0.95", "0.98"),
        "Sparsities of the 5 -> 2 sweep.",
    ),
    F("dim_features", 100, "n of the dimensionality sweep (paper: 400)."),
    F("dim_hidden", 10, "m of the dimensionality sweep (paper: 30)."),
    F("dim_points", 24, "Sparsity values of the dimensionality sweep."),
    F("dim_seeds", 1, "Seeds per sparsity of the dimensionality sweep."),
    F("dim_max_inverse_density", 100.0, "Largest 1/(1-S) of that sweep."),
    F("phase_points", 10, "Grid points per axis of the phase diagram."),
    F("sweeps", "pentagon,dimensionality,phase", "Which sweeps to run."),
)


RULES = (
    common.Num(
        (
            "sweep_steps",
            "sweep_batch_size",
            "sweep_seeds",
            "pentagon_seeds",
            "sweep_log_every",
            "sweep_checkpoint_every",
            "dim_features",
            "dim_hidden",
            "dim_seeds",
            "phase_points",
        ),
        lo=1,
        integer=True,
    ),
    common.Num(("dim_points",), lo=2, integer=True),
    common.Num(("sweep_lr",), lo=0.0, lo_open=True),
    common.Num(("pentagon_sparsity",), lo=0.0, hi=1.0, hi_open=True),
    common.Num(("dim_max_inverse_density",), lo=1.0, lo_open=True),
    common.Check(
        ("dim_hidden", "dim_features"),
        lambda v: v["dim_hidden"] < v["dim_features"],
        "--dim_hidden={dim_hidden}: expected < --dim_features={dim_features} "
        "(superposition needs fewer dimensions than features)",
    ),
    common.Choice(
        ("sweeps",), ("pentagon", "dimensionality", "phase"), split_commas=True, nonempty=True
    ),
)


def get_config():
    """The defaults::

    python -m experiments.toy_superposition --workdir=runs/toy_superposition/default
    """
    return common.config_dict(FIELDS)

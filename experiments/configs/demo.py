"""Settings of experiments/demo.py: a linear autoencoder trained with the engine's train loop
(checkpoints, resume, sharding).

Every field is a flag of ``python -m experiments.demo`` (``--name=value``
overrides the config's value); ``RULES`` are checked on the resolved settings before any work.
"""

from __future__ import annotations

from experiments import common
from experiments.common import Field as F

FIELDS = (
    F("num_steps", 400, "Training steps."),
    F("batch_size", 256, "Rows per step (divisible by the mesh data axis)."),
    F("d", 16, "Input width."),
    F("latent", 4, "Autoencoder bottleneck (and true rank of the data)."),
    F("n_rows", 8192, "Rows of synthetic data."),
    F("lr", 0.01, "Adam learning rate."),
    F("log_every", 50, "Steps between metrics.jsonl lines."),
    F("checkpoint_every", 100, "Steps between checkpoints."),
    F("seed", 0, "Seed for data and initialisation."),
)


RULES = (
    common.Num(
        ("num_steps", "batch_size", "d", "latent", "n_rows", "log_every", "checkpoint_every"),
        lo=1,
        integer=True,
    ),
    common.Num(("seed",), lo=0, integer=True),
    common.Num(("lr",), lo=0.0, lo_open=True),
    common.Check(
        ("latent", "d"), lambda v: v["latent"] <= v["d"], "--latent={latent}: expected <= --d={d}"
    ),
    common.Check(
        ("batch_size", "n_rows"),
        lambda v: v["batch_size"] <= v["n_rows"],
        "--batch_size={batch_size}: expected <= --n_rows={n_rows}",
    ),
)


def get_config():
    """The defaults::

    python -m experiments.demo --workdir=runs/demo --num_cpu_devices=4
    """
    return common.config_dict(FIELDS)

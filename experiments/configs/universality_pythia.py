"""Published setup: Pythia-70m vs Pythia-160m with EleutherAI sparsify SAEs, weights under
``--weights_dir`` (see WORKSPACE.md, 'Published setups'; `lm_preset.SETUPS`)."""

from experiments.configs import universality_lm as lm


def get_config():
    """Pythia-70m vs Pythia-160m::

        python -m experiments.universality --config=experiments/configs/universality_pythia.py \\
            --workdir=runs/universality/pythia --weights_dir=weights
    """
    c = lm.get_config()
    c.lm_setup = "pythia"
    return c

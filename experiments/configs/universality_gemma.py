"""Published setup: Gemma-1-2B vs Gemma-2-2B with SAELens / Gemma Scope SAEs, weights under
``--weights_dir`` (see WORKSPACE.md, 'Published setups'; `lm_preset.SETUPS`)."""

from experiments.configs import universality_lm as lm


def get_config():
    """Gemma-1-2B vs Gemma-2-2B::

        python -m experiments.universality --config=experiments/configs/universality_gemma.py \\
            --workdir=runs/universality/gemma --weights_dir=weights
    """
    c = lm.get_config()
    c.lm_setup = "gemma"
    return c

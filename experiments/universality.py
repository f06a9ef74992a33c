"""The universality pipeline (the main job): pair SAE features of two models and compare.

For two sides (activations of two models on the same tokens, an SAE per side): feature
activations and statistics, activation-correlation pairing, filters, metrics on the paired
decoder rows with random-pairing nulls, a ceiling (same side, other SAE seed and data order)
and a floor (an SAE of a randomly initialised model), results.json, a printed summary and
plots. Embedded default (no downloads)::

    python -m experiments.universality --workdir=runs/universality/toy

Language models from local directories (layer grid: every hookpoint of A against every
hookpoint of B; SAEs loaded from any supported format, or trained on the fly)::

    python -m experiments.universality --config=experiments/configs/universality_lm.py \\
        --workdir=runs/universality/lm \\
        --model_a=/models/pythia-70m --model_b=/models/pythia-160m \\
        --hookpoints_a=resid_post.2,resid_post.3 --hookpoints_b=resid_post.3,resid_post.5 \\
        --saes_a=/saes/pythia-70m --saes_b=/saes/pythia-160m --text=/data/text.jsonl

Models with different tokenizers (GPT-2 vs Pythia, Llama-2 vs Llama-3) are compared on aligned
units of the text: ``--alignment=shared_boundaries`` (the default when the tokenizers differ),
``--alignment=words --alignment_pooling=last|mean|max``, or ``tokens`` (identical tokenizers;
see models/alignment.py and experiments/pipeline/aligned.py)::

    python -m experiments.universality --config=experiments/configs/universality_lm.py \\
        --workdir=runs/universality/gpt2_pythia \\
        --model_a=weights/gpt2 --model_b=weights/pythia-160m --alignment=shared_boundaries

Settings are data (experiments/configs/universality.py: every field is a flag, e.g.
``--metrics=svcca,cka``); presets are config files chosen with ``--config=``:
``universality_lm.py`` (language models), ``universality_pythia.py`` and
``universality_gemma.py`` (published setups; weights under ``--weights_dir``)::

    python -m experiments.universality --config=experiments/configs/universality_pythia.py \
        --workdir=runs/universality/pythia --weights_dir=weights

Reference points for every cell (`experiments/pipeline/references.py`): a seed-vs-seed ceiling
per side and hookpoint and a random-init floor per cell; the "fraction of the way" from floor
to ceiling is printed only when the two are separated by more than twice their spread. Every
SAE's seed and data order derive from its role (side, hookpoint, kind, replicate, condition)
and are recorded in results.json ``saes``. Several SAEs per side and conditions sweeps::

    python -m experiments.universality --workdir=runs/universality/rep3 --replicates=3
    python -m experiments.universality --workdir=runs/universality/sweep_k --sweep=k=2,4,8

The classic trio (seed ceiling, adjacent layer, random-init floor at the same layer)::

    python -m experiments.universality --config=experiments/configs/universality_lm.py \\
        --workdir=runs/trio --trio \\
        --model_a=/models/pythia-70m --hookpoints_a=resid_post.3

Rerunning the same command resumes after the last finished step, or prints "nothing to do:
results from <time>" when the run finished. Other settings (or other data files, or other
code) in the same workdir are refused before any work, naming the differing keys: use a new
workdir or ``--overwrite``. ``--dry_run`` checks the settings and says what a run would do.
Progress: stage lines on stdout (``[4/12] ceiling_a: feature pass ...``) and labelled tqdm bars.
Every run ends by writing ``WORKDIR/report/index.html``, a static paired-feature browser
(`experiments.pipeline.html_report`), rebuilt from an existing workdir by::

    python -m experiments.report --workdir=WORKDIR
"""

from __future__ import annotations

import os

from experiments import common
from experiments.configs import universality as CONFIG  # noqa: N812  (the config module)


def _data(settings) -> dict:
    """Data whose identity enters the run fingerprint (language-model preset)."""
    from experiments.pipeline import lm_preset

    if settings.preset != "lm":
        return {}
    out = {
        **{f"text.{i}": t for i, t in enumerate(settings.text) if t != "sample"},
        "saes_a": settings.saes_a,
        "saes_b": settings.saes_b,
        "saes_a_ceiling": settings.saes_a_ceiling,
        "saes_b_ceiling": settings.saes_b_ceiling,
    }
    for side in ("a", "b"):
        cache = getattr(settings, f"cache_{side}")
        if cache:
            out[f"cache_{side}"] = os.path.join(cache, "metadata.json")
            out[f"cache_{side}_progress"] = os.path.join(cache, "progress.json")
    if settings.lm_setup == "custom":
        for side in ("a", "b"):
            path = getattr(settings, f"model_{side}")
            out[f"model_{side}"] = None if path == "tiny" else path
    else:
        setup = lm_preset.SETUPS[settings.lm_setup]
        for key in ("model_a", "model_b", "saes_a", "saes_b"):
            out[key] = os.path.join(settings.weights_dir, setup[key])
    return out


def _record(settings) -> dict:
    """What a published setup resolves to (recorded in config.json: what was used)."""
    from experiments.pipeline import lm_preset

    if settings.preset != "lm" or settings.lm_setup == "custom":
        return {}
    setup = dict(lm_preset.SETUPS[settings.lm_setup])
    for key in ("model_a", "model_b", "saes_a", "saes_b"):
        setup[key] = os.path.join(settings.weights_dir, setup[key])
    return {"lm_setup_resolved": setup}


def _errors():
    from experiments.pipeline import runner

    return runner.USER_ERRORS


def body(run, settings):
    from experiments.pipeline import runner

    runner.main(run, settings)


if __name__ == "__main__":
    common.entry("universality", body, CONFIG, data=_data, record=_record, errors=_errors)

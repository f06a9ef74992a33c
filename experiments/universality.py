"""The universality pipeline (the main job): pair SAE features of two models and compare.

For two sides (activations of two models on the same tokens, an SAE per side): feature
activations and statistics, activation-correlation pairing, filters, metrics on the paired
decoder rows with random-pairing nulls, a ceiling (same side, other SAE seed and data order)
and a floor (an SAE of a randomly initialised model), results.json, a printed summary and
plots. Embedded default (no downloads)::

    python -m experiments.universality --workdir=runs/universality/toy

Language models from local directories (layer grid: every hookpoint of A against every
hookpoint of B; SAEs loaded from any supported format, or trained on the fly)::

    python -m experiments.universality --workdir=runs/universality/lm --preset=lm \\
        --model_a=/models/pythia-70m --model_b=/models/pythia-160m \\
        --hookpoints_a=resid_post.2,resid_post.3 --hookpoints_b=resid_post.3,resid_post.5 \\
        --saes_a=/saes/pythia-70m --saes_b=/saes/pythia-160m --text=/data/text.jsonl

Models with different tokenizers (GPT-2 vs Pythia, Llama-2 vs Llama-3) are compared on aligned
units of the text: ``--alignment=shared_boundaries`` (the default when the tokenizers differ),
``--alignment=words --alignment_pooling=last|mean|max``, or ``tokens`` (identical tokenizers;
see models/alignment.py and experiments/pipeline/aligned.py)::

    python -m experiments.universality --workdir=runs/universality/gpt2_pythia --preset=lm \\
        --model_a=weights/gpt2 --model_b=weights/pythia-160m --alignment=shared_boundaries

Reference points for every cell (`experiments/pipeline/references.py`): a seed-vs-seed ceiling
per side and hookpoint and a random-init floor per cell; the "fraction of the way" from floor
to ceiling is printed only when the two are separated by more than twice their spread. Every
SAE's seed and data order derive from its role (side, hookpoint, kind, replicate, condition)
and are recorded in results.json ``saes``. Several SAEs per side and conditions sweeps::

    python -m experiments.universality --workdir=runs/universality/rep3 --replicates=3
    python -m experiments.universality --workdir=runs/universality/sweep_k --sweep=k=2,4,8

The classic trio (seed ceiling, adjacent layer, random-init floor at the same layer)::

    python -m experiments.universality --workdir=runs/trio --preset=lm --trio \\
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

from absl import flags

from experiments import common
from experiments.pipeline import pairing

FLAGS = flags.FLAGS
common.define_common_flags()
flags.adopt_module_key_flags(common)   # --help lists the common flags too
flags.DEFINE_enum("preset", "toy", ["toy", "lm"], "toy: embedded default; lm: language models "
                  "from local paths (see --model_a/--model_b).")
# Pairing, filters, metrics.
flags.DEFINE_enum("pairing", "correlation", pairing.names(),
                  "Pairing rule (the registry in experiments/pipeline/pairing.py).")
flags.DEFINE_integer("num_permutations", 1000, "Random-pairing null size per metric.")
flags.DEFINE_list("metrics", ["svcca", "pwcca", "cka", "rsa_spearman", "procrustes",
                              "mutual_knn"], "Metrics on the paired decoder rows.")
flags.DEFINE_float("threshold", 0.1, "Keep pairs whose score is >= this (negative: off).")
flags.DEFINE_bool("filter_dead", True, "Drop dead / constant features.")
flags.DEFINE_bool("filter_non_concept", True, "Drop features whose top tokens are dominated "
                  "by punctuation, whitespace or special tokens.")
flags.DEFINE_float("max_bad_fraction", 0.5, "Non-concept: largest tolerated share of bad "
                   "top tokens (0 = Lan et al.'s strict rule).")
flags.DEFINE_bool("require_shared_token", False, "Non-concept: the two features' top tokens "
                  "must intersect (Lan et al.).")
flags.DEFINE_bool("one_to_one", True, "Keep only each feature's best pair.")
flags.DEFINE_integer("top_n", 10, "Top-activating tokens kept per feature.")
flags.DEFINE_integer("min_pairs", 3, "Fewest pairs for which metrics are computed.")
flags.DEFINE_integer("chunk_size", 1024, "Tokens per streamed chunk.")
flags.DEFINE_float("memory_budget", 0.0, "GiB the feature pass may use (0: half the machine's "
                   "memory); above it the feature-by-feature correlation is tiled.")
flags.DEFINE_integer("seed", 0, "Seed (data, SAEs, permutations).")
# Toy preset.
flags.DEFINE_integer("toy_n_tokens", 20_000, "Toy: tokens.")
flags.DEFINE_integer("toy_n_features", 96, "Toy: ground-truth features.")
flags.DEFINE_integer("toy_d", 32, "Toy: hidden width of both sides.")
flags.DEFINE_integer("toy_steps", 1500, "Toy: SAE training steps.")
flags.DEFINE_float("toy_perturbation", 0.15, "Toy: how far B's geometry is from A's image.")
# Reference points, replicates, sweeps (experiments/pipeline/references.py).
flags.DEFINE_integer("replicates", 1, "SAEs per side (distinct seeds and data orders): all "
                     "cross pairs and all within-side pairs are compared, and the cross score "
                     "is reported as a distribution beside the within-side (seed) one.")
flags.DEFINE_enum("replicate_data", "order", ["order", "subset"], "How replicates differ "
                  "besides their init seed: 'order' (own data order) or 'subset' (disjoint "
                  "folds of the rows, one per replicate).")
flags.DEFINE_list("ceiling_sides", ["a", "b"], "Sides that get a seed-vs-seed ceiling (a "
                  "second SAE when --replicates=1).")
flags.DEFINE_string("sweep", None, "Conditions sweep NAME=v1,v2,... with NAME one of d_sae, "
                    "expansion, k, l1_coeff, subset: every value gets its own SAEs, null, "
                    "ceiling and floor (table in results.json 'sweep', plot plots/sweep.png).")
flags.DEFINE_integer("replicate_permutations", 2000, "Permutations of the cross < within "
                     "test (all splits when fewer).")
# Language-model preset (flags defined in experiments/pipeline/lm_preset.py).
from experiments.pipeline import importance as importance_flags  # noqa: E402  (its flags)
from experiments.pipeline import lm_preset  # noqa: E402,F401  (defines its flags)

flags.adopt_module_key_flags(lm_preset)   # listed by --help
flags.adopt_module_key_flags(importance_flags)


def _metric_names():
    from engine import similarity
    return sorted(similarity.METRICS)


RULES = (
    common.Choice(("metrics",), _metric_names, nonempty=True),
    common.Num(("threshold",), hi=1.0, what="a correlation; negative: no threshold"),
    common.Num(("max_bad_fraction",), lo=0.0, hi=1.0),
    common.Num(("num_permutations", "top_n", "chunk_size", "toy_n_tokens", "toy_n_features",
                "toy_d", "toy_steps", "context_length", "max_contexts", "lm_batch_size",
                "sae_expansion", "sae_k", "sae_steps", "sae_batch_size", "replicates",
                "replicate_permutations"), lo=1, integer=True),
    common.Num(("min_pairs",), lo=3, integer=True, what="the metrics need 3 pairs"),
    common.Num(("seed",), lo=0, integer=True),
    common.Num(("toy_perturbation",), lo=0.0),
    common.Check(("toy_n_features",), lambda v: v["toy_n_features"] >= 4,
                 "--toy_n_features={toy_n_features}: the toy SAEs have TopK k=4 and d_sae = "
                 "toy_n_features; expected >= 4"),
    common.Check(("toy_n_tokens",), lambda v: v["preset"] != "toy" or v["toy_n_tokens"] >= 256,
                 "--toy_n_tokens={toy_n_tokens}: expected >= 256 (one SAE batch)"),
    common.Check(("cache_a", "cache_b"), lambda v: bool(v["cache_a"]) == bool(v["cache_b"]),
                 "--cache_a and --cache_b must be given together"),
    common.Path(("model_a", "model_b"), kind="dir", special=("tiny",),
                what="a local transformers directory, or 'tiny'"),
    common.Path(("saes_a", "saes_b", "saes_a_ceiling", "saes_b_ceiling"), kind="any"),
    common.Path(("cache_a", "cache_b"), kind="dir", what="an activation cache"),
    common.Path(("text",), kind="any", special=("sample",)),
    common.Hookpoints(("hookpoints_a", "hookpoints_b")),
    common.Check(("saes_a_ceiling", "saes_a"), lambda v: not v["saes_a_ceiling"] or
                 bool(v["saes_a"]), "--saes_a_ceiling needs --saes_a (the published SAEs it "
                 "is a second seed of)"),
    common.Check(("saes_b_ceiling", "saes_b"), lambda v: not v["saes_b_ceiling"] or
                 bool(v["saes_b"]), "--saes_b_ceiling needs --saes_b (the published SAEs it "
                 "is a second seed of)"),
    common.Check(("saes_a", "saes_b", "replicates", "sweep"), lambda v: v["preset"] != "lm" or
                 not (v["saes_a"] or v["saes_b"]) or (v["replicates"] <= 1 and not v["sweep"]),
                 "loaded SAEs (--saes_a/--saes_b) cannot be replicated or swept; --replicates "
                 "> 1 and --sweep need SAEs trained here"),
    common.Probe(("replicates", "replicate_data", "ceiling_sides", "sweep"),
                 lambda v: _check_references(v)),
)


def _check_references(values) -> None:
    """Replicate, ceiling and sweep settings (`references.RefSettings.validate`,
    `references.parse_sweep`), refused before the workdir is touched."""
    from experiments.pipeline import references
    references.RefSettings(
        replicates=int(values["replicates"]), replicate_data=values["replicate_data"],
        ceiling_sides=tuple(values["ceiling_sides"]),
        floor=bool(values.get("random_init_floor", True)),
        floor_at=values.get("floor_at", "b"),
        permutations=int(values["replicate_permutations"])).validate()
    references.parse_sweep(values["sweep"])


def _data(flags_) -> dict:
    """Data whose identity enters the run fingerprint (language-model preset)."""
    if flags_.preset != "lm":
        return {}
    out = {"text": None if flags_.text == "sample" else flags_.text,
           "saes_a": flags_.saes_a, "saes_b": flags_.saes_b,
           "saes_a_ceiling": flags_.saes_a_ceiling, "saes_b_ceiling": flags_.saes_b_ceiling}
    for side in ("a", "b"):
        cache = getattr(flags_, f"cache_{side}")
        if cache:
            out[f"cache_{side}"] = os.path.join(cache, "metadata.json")
            out[f"cache_{side}_progress"] = os.path.join(cache, "progress.json")
    if flags_.lm_setup == "custom":
        for side in ("a", "b"):
            path = getattr(flags_, f"model_{side}")
            out[f"model_{side}"] = None if path == "tiny" else path
    else:
        setup = lm_preset.SETUPS[flags_.lm_setup]
        for key in ("model_a", "model_b", "saes_a", "saes_b"):
            out[key] = os.path.join(flags_.weights_dir, setup[key])
    return out


def _config(flags_) -> dict:
    """What a published --lm_setup resolves to (recorded in config.json: what was used)."""
    if flags_.preset != "lm" or flags_.lm_setup == "custom":
        return {}
    setup = dict(lm_preset.SETUPS[flags_.lm_setup])
    for key in ("model_a", "model_b", "saes_a", "saes_b"):
        setup[key] = os.path.join(flags_.weights_dir, setup[key])
    return {"lm_setup_resolved": setup}


def _errors():
    from experiments.pipeline import runner
    return runner.USER_ERRORS


def body(run, flags_):
    from experiments.pipeline import runner
    runner.main(run, flags_)


if __name__ == "__main__":
    common.entry("universality", body, RULES, data=_data, config=_config, errors=_errors)

"""Language-model sides of the universality pipeline, with the layer grid.

Two transformers models over the same text, every requested hookpoint of A against every
requested hookpoint of B. Each model's forward runs once per batch for all
its hookpoints (`models.lm.LanguageModel.run` stops at the deepest requested block); the
activations of real (non-padding) tokens are kept in memory and saved in the step cache, so a
rerun does not recompute them. Models with different tokenizers are compared on aligned units
of text (``--alignment``, `experiments.pipeline.aligned`). SAEs come from ``--saes_a`` /
``--saes_b`` (any supported format, one sub-directory per hookpoint) or are trained on the fly
(TopK), always on each model's own tokens.

Reference points, for the first cell (A's first hookpoint vs B's first hookpoint):
ceiling = a second SAE of A's first hookpoint (other seed and data order; trained here);
floor = an SAE of a randomly initialised copy of model B (same architecture) at B's first
hookpoint, compared with A.

Published setups (run when the weights are on disk: see WORKSPACE.md):

* ``--preset=lm --lm_setup=pythia``: Pythia-70m vs Pythia-160m with EleutherAI sparsify SAEs
  (``WEIGHTS/pythia-70m``, ``WEIGHTS/pythia-160m``, ``WEIGHTS/sae-pythia-70m-32k``,
  ``WEIGHTS/sae-pythia-160m-32k``).
* ``--preset=lm --lm_setup=gemma``: Gemma-1-2B vs Gemma-2-2B with SAELens / Gemma Scope SAEs
  (``WEIGHTS/gemma-2b``, ``WEIGHTS/gemma-2-2b``, ``WEIGHTS/saes-gemma-2b``,
  ``WEIGHTS/gemma-scope-2b-pt-res``).
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from engine import streaming
from experiments.pipeline import aligned, compare, features
from experiments.pipeline import saes as saes_lib

flags.DEFINE_string("model_a", "tiny", "Model A: local transformers directory, or 'tiny' (a "
                    "tiny random model pair built in the workdir, offline).")
flags.DEFINE_string("model_b", "tiny", "Model B (see --model_a).")
flags.DEFINE_enum("lm_setup", "custom", ["custom", "pythia", "gemma"],
                  "Published setup whose weights are looked up under --weights_dir.")
flags.DEFINE_string("weights_dir", "weights", "Root of local weights for --lm_setup.")
flags.DEFINE_list("hookpoints_a", ["resid_post.0", "resid_post.1"], "Hookpoints of model A.")
flags.DEFINE_list("hookpoints_b", ["resid_post.0", "resid_post.1"], "Hookpoints of model B.")
flags.DEFINE_string("saes_a", None, "SAEs of A (one sub-directory per hookpoint); default: "
                    "train on the fly.")
flags.DEFINE_string("saes_b", None, "SAEs of B (see --saes_a).")
flags.DEFINE_string("text", "sample", "Text: a .txt/.jsonl file or folder, or 'sample' (the "
                    "shipped public-domain English sample).")
flags.DEFINE_integer("context_length", 64, "Tokens per context.")
flags.DEFINE_integer("max_contexts", 256, "Contexts read from the text.")
flags.DEFINE_integer("lm_batch_size", 16, "Contexts per forward pass.")
flags.DEFINE_integer("sae_expansion", 4, "On-the-fly SAEs: d_sae = expansion * d_model.")
flags.DEFINE_integer("sae_k", 16, "On-the-fly SAEs: TopK k.")
flags.DEFINE_integer("sae_steps", 1000, "On-the-fly SAEs: training steps.")
flags.DEFINE_integer("sae_batch_size", 512, "On-the-fly SAEs: rows per step.")
flags.DEFINE_bool("random_init_floor", True, "Compute the floor from a random-init copy of B.")
flags.DEFINE_string("cache_a", None, "Activation cache of model A (experiments.harvest); with "
                    "--cache_b, activations are read from the caches instead of running the "
                    "models (the models are still used for token strings and the floor).")
flags.DEFINE_string("cache_b", None, "Activation cache of model B (see --cache_a).")

SETUPS = {
    "pythia": {"model_a": "pythia-70m", "model_b": "pythia-160m",
               "saes_a": "sae-pythia-70m-32k", "saes_b": "sae-pythia-160m-32k",
               "hookpoints_a": ["resid_post.3"], "hookpoints_b": ["resid_post.5"]},
    "gemma": {"model_a": "gemma-2b", "model_b": "gemma-2-2b", "saes_a": "saes-gemma-2b",
              "saes_b": "gemma-scope-2b-pt-res", "hookpoints_a": ["resid_post.12"],
              "hookpoints_b": ["resid_post.12"]},
}


def _resolve(flags_) -> dict:
    if flags_.lm_setup == "custom":
        return {k: getattr(flags_, k) for k in ("model_a", "model_b", "saes_a", "saes_b",
                                                 "hookpoints_a", "hookpoints_b")}
    setup = dict(SETUPS[flags_.lm_setup])
    missing = []
    for key in ("model_a", "model_b", "saes_a", "saes_b"):
        setup[key] = os.path.join(flags_.weights_dir, setup[key])
        if not os.path.isdir(setup[key]):
            missing.append(setup[key])
    if missing:
        raise compare.PipelineError(
            f"--lm_setup={flags_.lm_setup}: weights absent: {', '.join(missing)}; download them "
            f"into --weights_dir={flags_.weights_dir} (see WORKSPACE.md, 'Published setups')")
    return setup


def _load_models(run, setup: dict, seed: int):
    from models import lm
    from models import lm_tiny
    paths = [setup["model_a"], setup["model_b"]]
    if "tiny" in paths:
        pair = lm_tiny.make_tiny_model_pair(run.path("tiny_models"), seeds=(seed, seed + 1))
        paths = [pair.path_a if paths[0] == "tiny" else paths[0],
                 pair.path_b if paths[1] == "tiny" else paths[1]]
    for flag, path in zip(("--model_a", "--model_b"), paths):
        if not os.path.isdir(path):
            raise compare.PipelineError(f"{flag}={path}: no such local model directory (this "
                                        "pipeline never downloads weights at run time)")
    with lm.quiet_transformers():
        return [lm.LanguageModel.load(p) for p in paths], paths


def _harvest(lm_model, contexts, hookpoints, batch_size) -> dict:
    out = lm_model.run(contexts, hookpoints, batch_size=batch_size)
    keep = out.mask.reshape(-1)
    res = {f"acts/{k}": v.reshape(-1, v.shape[-1])[keep].astype(np.float32)
           for k, v in out.acts.items()}
    res["token_ids"] = out.token_ids.reshape(-1)[keep].astype(np.int32)
    res["special"] = out.special.reshape(-1)[keep]
    return res


def _read_caches(flags_, setup) -> tuple[dict, dict, list[str], list[str], object]:
    """Activations of both sides from two activation caches over the same contexts."""
    from models import activation_cache, text as text_lib
    if not (flags_.cache_a and flags_.cache_b):
        raise compare.PipelineError("--cache_a and --cache_b must be given together")
    caches = [activation_cache.ActivationCache(p) for p in (flags_.cache_a, flags_.cache_b)]
    hps = [c.check_hookpoints(setup[k]) for c, k in zip(caches, ("hookpoints_a",
                                                                  "hookpoints_b"))]
    sides = []
    for c, names in zip(caches, hps):
        side = {}
        for hp in names:
            ids, acts = c.read(hp)
            side[f"acts/{hp}"] = np.asarray(acts, np.float32)
            side["token_ids"] = np.asarray(ids, np.int32)
        sides.append(side)
    ids = caches[0].token_ids()
    contexts = text_lib.Contexts(token_ids=ids, mask=caches[0].mask(),
                                 doc_index=np.zeros(len(ids), np.int64))
    return sides[0], sides[1], hps[0], hps[1], contexts


def run_lm(run, flags_, cfg: compare.CompareConfig, cache) -> dict:
    from models import lm
    from models import sae_train
    from models import text as text_lib

    setup = _resolve(flags_)
    (lm_a, lm_b), paths = _load_models(run, setup, flags_.seed)
    # Different tokenizers: each model reads its own contexts; rows pair through the text.
    view = aligned.prepare(run, flags_, lm_a, lm_b, cache_paths=(
        (flags_.cache_a, flags_.cache_b) if flags_.cache_a and flags_.cache_b else None))
    if view is None:
        text_lib.check_same_tokenizer(lm_a.tokenizer, lm_b.tokenizer)
    if flags_.cache_a or flags_.cache_b:
        acts_a, acts_b, hps_a, hps_b, contexts = _read_caches(flags_, setup)
        contexts_b = contexts if view is None else view.contexts_b
    else:
        hps_a = [h.name for h in lm_a.parse(setup["hookpoints_a"])]
        hps_b = [h.name for h in lm_b.parse(setup["hookpoints_b"])]
        docs = text_lib.read_documents(flags_.text)
        contexts = text_lib.make_contexts(docs, lm_a.tokenizer, flags_.context_length,
                                          max_contexts=flags_.max_contexts) if (
            view is None) else view.contexts_a
        contexts_b = contexts if view is None else view.contexts_b
        acts_a = cache.get("lm_acts_a", lambda: _harvest(lm_a, contexts, hps_a,
                                                         flags_.lm_batch_size))
        acts_b = cache.get("lm_acts_b", lambda: _harvest(lm_b, contexts_b, hps_b,
                                                         flags_.lm_batch_size))
    if view is None and not np.array_equal(acts_a["token_ids"], acts_b["token_ids"]):
        raise compare.PipelineError("models A and B saw different tokens; the tokenizers or "
                                    "contexts disagree")
    token_ids = acts_a["token_ids"]
    strings = lm_a.tokenizer.convert_ids_to_tokens(np.unique(token_ids).tolist())
    vocab = dict(zip(np.unique(token_ids).tolist(), strings))

    def token_text(rows):
        return [str(vocab[int(token_ids[r])]) for r in rows]

    def context_text(row, before=8):
        lo = max(0, row - before)
        return lm_a.tokenizer.decode(token_ids[lo:row].tolist()) + " [[" + \
            lm_a.tokenizer.decode([int(token_ids[row])]) + "]]"

    if view is not None:  # rows are aligned units: their text stands for token strings
        token_text, context_text = view.token_text, view.context_text
    pool_a, pool_b = aligned.poolers(view)
    extra = {"context_text": context_text, "features_dir": run.path("features")}

    def sae_config(d_model, seed):
        return sae_train.TrainConfig(d_sae=flags_.sae_expansion * d_model, activation="topk",
                                     k=min(flags_.sae_k, flags_.sae_expansion * d_model),
                                     lr=1e-3, seed=seed)

    def side_sae(side, hp, acts, seed=flags_.seed, root=None, tag=""):
        if root:
            sae = saes_lib.load_for_hookpoint(root, hp, 1 if tag else len(
                hps_a if side == "a" else hps_b))
        else:
            sae = saes_lib.train_or_load(
                acts, sae_config(acts.shape[1], seed), steps=flags_.sae_steps,
                batch_size=flags_.sae_batch_size, data_seed=seed,
                directory=run.path("saes", f"{side}{tag}", hp), mesh=run.mesh,
                progress=flags_.progress, metadata={"model": paths[0 if side == "a" else 1],
                                                    "hookpoint": hp})
        features.check_widths(sae, acts.shape[1], f"SAE of model {side.upper()} at {hp}")
        return sae

    saes_a = {hp: side_sae("a", hp, acts_a[f"acts/{hp}"], root=setup["saes_a"]) for hp in hps_a}
    saes_b = {hp: side_sae("b", hp, acts_b[f"acts/{hp}"], root=setup["saes_b"]) for hp in hps_b}

    def stream_factory(xa, xb):
        rows = np.arange(xa.shape[0], dtype=np.int32)
        return lambda: streaming.ChunkStream((rows, xa, xb), flags_.chunk_size, name="tokens")

    comps = []
    cells = {m: np.full((len(hps_a), len(hps_b)), np.nan) for m in cfg.metrics}
    for i, ha in enumerate(hps_a):
        for j, hb in enumerate(hps_b):
            name = f"A.{ha}~B.{hb}"
            comp = compare.run_comparison(
                name, stream_factory(pool_a(acts_a[f"acts/{ha}"]),
                                     pool_b(acts_b[f"acts/{hb}"])), saes_a[ha],
                saes_b[hb], token_text, run.mesh, cfg, cache, ckpt_root=run.path("checkpoints"),
                progress=flags_.progress,
                labels={"kind": "cross" if (i, j) == (0, 0) else "grid", "hookpoint_a": ha,
                        "hookpoint_b": hb, "label": f"A {ha} vs B {hb}"}, **extra)
            aligned.after_comparison(view, comp, run, saes_a[ha], saes_b[hb],
                                     acts_a[f"acts/{ha}"], acts_b[f"acts/{hb}"], flags_)
            for metric, r in comp.get("metrics", {}).items():
                cells[metric][i, j] = r["excess"]
            comps.append(comp)

    # Reference points on the first cell.
    ha, hb = hps_a[0], hps_b[0]
    xa = acts_a[f"acts/{ha}"]
    if not setup["saes_a"]:
        ceiling_sae = side_sae("a", ha, xa, seed=flags_.seed + 1, tag="_ceiling")
        comps.append(compare.run_comparison(
            "ceiling", stream_factory(pool_a(xa), pool_a(xa)), saes_a[ha], ceiling_sae,
            token_text, run.mesh, cfg, cache, ckpt_root=run.path("checkpoints"),
            progress=flags_.progress,
            labels={"kind": "ceiling", "label": f"A {ha} vs A {ha}, other SAE seed"}, **extra))
    if flags_.random_init_floor:
        def floor_acts():
            rnd = lm.random_init_copy(lm_b, seed=flags_.seed + 1000)
            return _harvest(rnd, contexts_b, [hb], flags_.lm_batch_size)
        xr = cache.get("lm_acts_floor", floor_acts)[f"acts/{hb}"]
        floor_sae = saes_lib.train_or_load(
            xr, sae_config(xr.shape[1], flags_.seed), steps=flags_.sae_steps,
            batch_size=flags_.sae_batch_size, data_seed=flags_.seed,
            directory=run.path("saes", "floor", hb), mesh=run.mesh, progress=flags_.progress,
            metadata={"model": f"random-init copy of {paths[1]}", "hookpoint": hb})
        comps.append(compare.run_comparison(
            "floor", stream_factory(pool_a(xa), pool_b(xr)), saes_a[ha], floor_sae, token_text,
            run.mesh, cfg, cache, ckpt_root=run.path("checkpoints"), progress=flags_.progress,
            labels={"kind": "floor", "label": f"A {ha} vs random-init B {hb}"}, **extra))
    return {"preset": "lm", "models": {"a": paths[0], "b": paths[1]},
            "hookpoints": {"a": hps_a, "b": hps_b}, "tokens": int(len(token_ids)),
            "activations": ("caches " + f"{flags_.cache_a}, {flags_.cache_b}"
                            if flags_.cache_a else "forward passes in this run"),
            "contexts": len(contexts), "text": flags_.text,
            "alignment": aligned.describe(view),
            "grid": {"layers_a": hps_a, "layers_b": hps_b,
                     "cells": {m: v.tolist() for m, v in cells.items()}},
            "comparisons": comps}

"""Language-model sides of the universality pipeline, with the layer grid.

Two transformers models over the same text, every requested hookpoint of A against every
requested hookpoint of B. Each model's forward runs once per batch for all
its hookpoints (`models.lm.LanguageModel.run` stops at the deepest requested block); the
activations of real (non-padding) tokens are kept in memory and saved in the step cache, so a
rerun does not recompute them. Models with different tokenizers are compared on aligned units
of text (``--alignment``, `experiments.pipeline.aligned`). SAEs come from ``--saes_a`` /
``--saes_b`` (any supported format, one sub-directory per hookpoint) or are trained on the fly
(TopK), always on each model's own tokens.

Reference points for EVERY cell (`experiments.pipeline.references`): a seed-vs-seed ceiling of
each side at each hookpoint (a second SAE of the same recipe, or, for loaded SAEs, of the same
architecture, width and sparsity trained here, or a second published seed given with
``--saes_a_ceiling`` / ``--saes_b_ceiling``), and a floor per cell: A's SAE against an SAE of
the same architecture and width as B's, trained on a randomly initialised copy of model B at
B's hookpoint (``--floor_at=a``: of model A at A's hookpoint). Every SAE has its own seed and
data order derived from its role (`experiments.pipeline.saes.role_seeds`), recorded in
results.json ``saes``. ``--replicates=N`` trains N SAEs per side; ``--sweep=k=8,16,32`` runs
every condition with its own null, ceiling and floor.

The classic trio in one command (``--trio``): seed ceiling, adjacent layer and random-init
floor at the same layer, for model A at its first hookpoint L::

    python -m experiments.universality --config=experiments/configs/universality_lm.py \
        --workdir=runs/trio --trio --model_a=/models/pythia-70m --hookpoints_a=resid_post.3

compares A.L with a second seed of A.L (ceiling), with A.(L+1) (L-1 at the last layer;
the adjacent layer), and with a random-init copy of A at L (floor); the adjacent layer's SAE
is loaded from ``--saes_a`` when given, else trained here like A.L's.

Where the activations live (``--lm_activations``): ``memory`` keeps every hookpoint's
``[tokens, d]`` float32 array in RAM (and in the step cache), fine for small runs; ``stream``
writes them once to activation caches (`models.activation_cache`, under
``WORKDIR/activations/{a,b,floor_a,floor_b}``, resumable; or reads ``--cache_a/--cache_b``)
and never holds them: SAEs train from the cache through a bounded shuffle buffer
(`saes.obtain` with `models.activation_cache.CachedActs`), and each comparison's feature
pass reads both caches chunk by chunk (`features.cache_pair_stream`, tiled under
``--memory_budget``). ``auto`` (default) streams when caches are given, or when the
activations of both sides and the floor, ``4 * tokens * sum(d over hookpoints)`` bytes with
``tokens = max_contexts * context_length``, exceed a quarter of the memory budget
(``--memory_budget``, default half the machine's RAM). In both modes SAEs are trained through
the same shuffled source (`models.activation_source.ShuffledSource`), so the same settings
give the same SAEs and the same comparisons in memory and streamed (tests/test_lm_stream.py).
Models with different tokenizers pool rows over aligned units in memory: memory mode only.

Published setups (run when the weights are on disk: see WORKSPACE.md):

* ``--config=experiments/configs/universality_pythia.py``: Pythia-70m vs Pythia-160m with
  EleutherAI sparsify SAEs (``WEIGHTS/pythia-70m``, ``WEIGHTS/pythia-160m``,
  ``WEIGHTS/sae-pythia-70m-32k``, ``WEIGHTS/sae-pythia-160m-32k``).
* ``--config=experiments/configs/universality_gemma.py``: Gemma-1-2B vs Gemma-2-2B with
  SAELens / Gemma Scope SAEs (``WEIGHTS/gemma-2b``, ``WEIGHTS/gemma-2-2b``,
  ``WEIGHTS/saes-gemma-2b``, ``WEIGHTS/gemma-scope-2b-pt-res``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import common
from experiments.pipeline import importance as importance_lib

# Imported on first use (importing this module stays light).
streaming = common.lazy_module("engine.streaming")
aligned = common.lazy_module("experiments.pipeline.aligned")
compare = common.lazy_module("experiments.pipeline.compare")
feature_pages = common.lazy_module("experiments.pipeline.feature_pages")
features = common.lazy_module("experiments.pipeline.features")
references = common.lazy_module("experiments.pipeline.references")
saes_lib = common.lazy_module("experiments.pipeline.saes")
sides_lib = common.lazy_module("experiments.pipeline.sides")

SETUPS = {
    "pythia": {
        "model_a": "pythia-70m",
        "model_b": "pythia-160m",
        "saes_a": "sae-pythia-70m-32k",
        "saes_b": "sae-pythia-160m-32k",
        "hookpoints_a": ["resid_post.3"],
        "hookpoints_b": ["resid_post.5"],
    },
    "gemma": {
        "model_a": "gemma-2b",
        "model_b": "gemma-2-2b",
        "saes_a": "saes-gemma-2b",
        "saes_b": "gemma-scope-2b-pt-res",
        "hookpoints_a": ["resid_post.12"],
        "hookpoints_b": ["resid_post.12"],
    },
}


def _resolve(settings) -> dict:
    keys = ("model_a", "model_b", "saes_a", "saes_b", "hookpoints_a", "hookpoints_b")
    if settings.lm_setup == "custom":
        setup = {k: getattr(settings, k) for k in keys}
    else:
        setup = dict(SETUPS[settings.lm_setup])
        missing = []
        for key in ("model_a", "model_b", "saes_a", "saes_b"):
            setup[key] = os.path.join(settings.weights_dir, setup[key])
            if not os.path.isdir(setup[key]):
                missing.append(setup[key])
        if missing:
            raise compare.PipelineError(
                f"published setup {settings.lm_setup} (experiments/configs/universality_"
                f"{settings.lm_setup}.py): weights absent: {', '.join(missing)}; download "
                f"them into --weights_dir={settings.weights_dir} (see WORKSPACE.md, 'Published "
                "setups')"
            )
    setup["saes_a_ceiling"] = settings.saes_a_ceiling
    setup["saes_b_ceiling"] = settings.saes_b_ceiling
    for flag in ("saes_a", "saes_b", "saes_a_ceiling", "saes_b_ceiling"):
        if setup[flag] and not os.path.exists(setup[flag]):
            raise compare.PipelineError(f"--{flag}={setup[flag]}: no such file or directory")
    if settings.trio:
        if settings.cache_a or settings.cache_b:
            raise compare.PipelineError("--trio runs model A itself; drop --cache_a/--cache_b")
        setup["model_b"] = setup["model_a"]
        setup["saes_b"] = setup["saes_a"]
        setup["saes_b_ceiling"] = None
        setup["hookpoints_a"] = list(setup["hookpoints_a"])[:1]
    for side in ("a", "b"):
        if setup[f"saes_{side}_ceiling"] and not setup[f"saes_{side}"]:
            raise compare.PipelineError(
                f"--saes_{side}_ceiling needs --saes_{side} (the "
                "published SAEs it is a second seed of)"
            )
        if setup[f"saes_{side}"] and (settings.replicates > 1 or settings.sweep):
            raise compare.PipelineError(
                f"--saes_{side}: loaded SAEs cannot be replicated or "
                "swept; --replicates > 1 and --sweep need SAEs trained "
                "here"
            )
    return setup


def ref_settings(settings):
    """`references.RefSettings` of the run (--trio forces the floor at A and A's ceiling)."""
    from experiments.pipeline import runner

    refs = runner.ref_settings(settings)
    if settings.trio:
        refs = dataclasses.replace(refs, floor_at="a", ceiling_sides=("a",))
    return refs


def _trio_hookpoints(lm_model, setup: dict) -> None:
    """Sets B's hookpoint to the layer adjacent to A's first one (same kind)."""
    from models import lm

    hp = lm.parse_hookpoint(setup["hookpoints_a"][0], lm_model.n_layers)
    if lm_model.n_layers < 2:
        raise compare.PipelineError("--trio needs a model with at least 2 layers")
    layer = hp.layer + 1 if hp.layer + 1 < lm_model.n_layers else hp.layer - 1
    setup["hookpoints_b"] = [lm.Hookpoint(layer, hp.kind).name]


def _unembedding(lm_model, path: str) -> np.ndarray | None:
    """``[vocab, d_model]`` unembedding W_U of a local model (None when not found).

    The base model (no head) is what `models.lm` loads: a tied head is the input embedding;
    an untied one (e.g. GPT-NeoX ``embed_out``, ``lm_head``) is read from the safetensors.
    """
    cfg = lm_model.model.config
    if getattr(cfg, "tie_word_embeddings", False):
        return lm_model.model.get_input_embeddings().weight.detach().float().cpu().numpy()
    import glob

    from safetensors import safe_open

    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, "np") as st:
            for key in st.keys():
                if key.endswith(("embed_out.weight", "lm_head.weight")):
                    return np.asarray(st.get_tensor(key), np.float32)
    return None


def _harvest(lm_model, contexts, hookpoints, batch_size) -> dict:
    out = lm_model.run(contexts, hookpoints, batch_size=batch_size)
    keep = out.mask.reshape(-1)
    res = {
        f"acts/{k}": v.reshape(-1, v.shape[-1])[keep].astype(np.float32)
        for k, v in out.acts.items()
    }
    res["token_ids"] = out.token_ids.reshape(-1)[keep].astype(np.int32)
    res["special"] = out.special.reshape(-1)[keep]
    return res


def _read_caches(settings, setup) -> tuple[dict, dict, list[str], list[str], object]:
    """Activations of both sides from two activation caches over the same contexts."""
    from models import activation_cache
    from models import text as text_lib

    if not (settings.cache_a and settings.cache_b):
        raise compare.PipelineError("--cache_a and --cache_b must be given together")
    caches = [activation_cache.ActivationCache(p) for p in (settings.cache_a, settings.cache_b)]
    hps = [c.check_hookpoints(setup[k]) for c, k in zip(caches, ("hookpoints_a", "hookpoints_b"))]
    sides = []
    for c, names in zip(caches, hps):
        side = {}
        for hp in names:
            ids, acts = c.read(hp)
            side[f"acts/{hp}"] = np.asarray(acts, np.float32)
            side["token_ids"] = np.asarray(ids, np.int32)
        sides.append(side)
    ids = caches[0].token_ids()
    contexts = text_lib.Contexts(
        token_ids=ids, mask=caches[0].mask(), doc_index=np.zeros(len(ids), np.int64)
    )
    return sides[0], sides[1], hps[0], hps[1], contexts


def read_text(settings):
    """The documents of --text: files, folders of .txt/.jsonl files, or the sample, read in
    the order given (--txt_split, --text_field say how a file splits into documents)."""
    from models import text as text_lib

    # joint_sae's settings (which share the aligned-units path) have neither knob: the
    # defaults of `read_documents` apply there
    return text_lib.read_documents(
        settings.text,
        text_field=getattr(settings, "text_field", "text"),
        txt_split=getattr(settings, "txt_split", "file"),
    )


def _text_used(settings, caches) -> object:
    """The text the activations came from: the caches' recorded text when they were given
    (not the --text default), else --text."""
    if settings.cache_a:
        from models import activation_cache

        found = caches or [
            activation_cache.ActivationCache(p) for p in (settings.cache_a, settings.cache_b)
        ]
        return {"caches": [c.metadata.get("text") for c in found]}
    return settings.text


def _load_side(root: str | None, hps: list[str], acts: dict, side: str) -> dict | None:
    """hookpoint -> (path, SAE) of published SAEs under ``root`` (width-checked)."""
    if not root:
        return None
    out = {}
    for hp in hps:
        sae = saes_lib.load_for_hookpoint(root, hp, len(hps))
        features.check_widths(
            sae, acts[f"acts/{hp}"].shape[1], f"SAE of model {side.upper()} at {hp} ({root})"
        )
        out[hp] = (root, sae)
    return out


IN_MEMORY_FRACTION = 4  # auto mode streams above budget / IN_MEMORY_FRACTION of activations


def activation_bytes(tokens: int, widths: list[int]) -> int:
    """float32 bytes of ``tokens`` rows at hookpoints of the given widths, plus the floor's
    copy of the widest side (the random-init model's activations at one side's hookpoints)."""
    return 4 * int(tokens) * (sum(widths) + max(widths, default=0))


def stream_mode(settings, view, widths: list[int], memory_budget: int | None, mesh) -> bool:
    """True when the run streams its activations from caches (the rule of the docstring)."""
    from engine import mesh as mesh_lib

    mode = settings.lm_activations
    if view is not None:
        if mode == "stream":
            raise compare.PipelineError(
                "--lm_activations=stream: models with different tokenizers pair rows through "
                "aligned units pooled in memory; use --lm_activations=memory or auto"
            )
        return False
    if mode != "auto":
        return mode == "stream"
    if settings.cache_a or settings.cache_b:
        return True
    budget = memory_budget or mesh_lib.default_memory_budget(mesh)
    tokens = settings.max_contexts * settings.context_length
    return activation_bytes(tokens, widths) > budget // IN_MEMORY_FRACTION


def _row_token_ids(cache, exclude_special: bool) -> np.ndarray:
    """Token ids of a cache's rows (unmasked tokens, context after context), as its
    `CacheSource` yields them."""
    ids = cache.token_ids()
    keep = cache.mask()
    if exclude_special:
        keep = keep & ~np.isin(ids, cache.special_ids)
    return ids[keep].astype(np.int32)


def _cached_side(cache, hps: list[str], exclude_special: bool) -> dict:
    from models import activation_cache

    side = {
        f"acts/{hp}": activation_cache.CachedActs(cache, hp, exclude_special=exclude_special)
        for hp in hps
    }
    side["token_ids"] = _row_token_ids(cache, exclude_special)
    return side


def _harvest_cache(run, name: str, lm_model, contexts, hps: list[str], settings):
    """Activations of ``hps`` harvested into ``WORKDIR/activations/<name>`` (resumable)."""
    from models import activation_cache

    return activation_cache.harvest(
        lm_model,
        contexts,
        hps,
        run.path("activations", name),
        batch_size=settings.lm_batch_size,
        progress=settings.progress,
        text_info={
            "text": settings.text,
            "context_length": settings.context_length,
            "max_contexts": settings.max_contexts,
        },
    )


def _drop_special(side: dict, exclude: bool) -> dict:
    """In-memory rows without special tokens (``--lm_exclude_special``)."""
    if not exclude:
        return side
    keep = ~np.asarray(side["special"], bool)
    return {
        k: (v[keep] if k.startswith("acts/") or k in ("token_ids", "special") else v)
        for k, v in side.items()
    }


def run_lm(run, settings, cfg: compare.CompareConfig, cache) -> dict:
    from models import lm, sae_train
    from models import text as text_lib

    setup = _resolve(settings)
    refs = ref_settings(settings)
    conditions = references.parse_sweep(settings.sweep)
    (side_a, side_b), _ = sides_lib.open_pair(
        run,
        setup["model_a"],
        setup["model_b"],
        seed=settings.seed,
        sources=("cache", "cache") if settings.cache_a or settings.cache_b else ("live", "live"),
    )
    lm_a, lm_b = side_a.model, side_b.model
    paths = [side_a.path, side_b.path]
    if settings.trio:
        _trio_hookpoints(lm_a, setup)
    # Different tokenizers: each model reads its own contexts; rows pair through the text.
    view = aligned.prepare(
        run,
        settings,
        lm_a,
        lm_b,
        cache_paths=(
            (settings.cache_a, settings.cache_b) if settings.cache_a and settings.cache_b else None
        ),
    )
    if view is None:
        text_lib.check_same_tokenizer(lm_a.tokenizer, lm_b.tokenizer)
    exclude = bool(settings.lm_exclude_special)
    streaming_run = stream_mode(
        settings,
        view,
        [lm_a.d_model] * len(setup["hookpoints_a"]) + [lm_b.d_model] * len(setup["hookpoints_b"]),
        cfg.memory_budget,
        run.mesh,
    )
    caches_ab = None
    if streaming_run and (settings.cache_a or settings.cache_b):
        from models import activation_cache

        if not (settings.cache_a and settings.cache_b):
            raise compare.PipelineError("--cache_a and --cache_b must be given together")
        caches_ab = [
            activation_cache.ActivationCache(p) for p in (settings.cache_a, settings.cache_b)
        ]
        hps_a = caches_ab[0].check_hookpoints(setup["hookpoints_a"])
        hps_b = caches_ab[1].check_hookpoints(setup["hookpoints_b"])
        contexts = text_lib.Contexts(
            token_ids=caches_ab[0].token_ids(),
            mask=caches_ab[0].mask(),
            doc_index=np.zeros(caches_ab[0].num_contexts, np.int64),
        )
        contexts_b = contexts
        acts_a = _cached_side(caches_ab[0], hps_a, exclude)
        acts_b = _cached_side(caches_ab[1], hps_b, exclude)
    elif settings.cache_a or settings.cache_b:
        acts_a, acts_b, hps_a, hps_b, contexts = _read_caches(settings, setup)
        contexts_b = contexts if view is None else view.contexts_b
    elif streaming_run:
        hps_a = [h.name for h in lm_a.parse(setup["hookpoints_a"])]
        hps_b = [h.name for h in lm_b.parse(setup["hookpoints_b"])]
        docs = read_text(settings)
        contexts = text_lib.make_contexts(
            docs, lm_a.tokenizer, settings.context_length, max_contexts=settings.max_contexts
        )
        contexts_b = contexts
        if lm_b is lm_a:  # one forward pass for both sides' hookpoints
            c = _harvest_cache(
                run, "a", lm_a, contexts, list(dict.fromkeys(hps_a + hps_b)), settings
            )
            caches_ab = [c, c]
        else:
            caches_ab = [
                _harvest_cache(run, "a", lm_a, contexts, hps_a, settings),
                _harvest_cache(run, "b", lm_b, contexts, hps_b, settings),
            ]
        acts_a = _cached_side(caches_ab[0], hps_a, exclude)
        acts_b = _cached_side(caches_ab[1], hps_b, exclude)
    else:
        hps_a = [h.name for h in lm_a.parse(setup["hookpoints_a"])]
        hps_b = [h.name for h in lm_b.parse(setup["hookpoints_b"])]
        docs = read_text(settings)
        contexts = (
            text_lib.make_contexts(
                docs, lm_a.tokenizer, settings.context_length, max_contexts=settings.max_contexts
            )
            if (view is None)
            else view.contexts_a
        )
        contexts_b = contexts if view is None else view.contexts_b
        if lm_b is lm_a:  # one forward pass for both sides' hookpoints
            union = list(dict.fromkeys(hps_a + hps_b))
            acts_a = acts_b = cache.get(
                "lm_acts_a." + "+".join(union),
                lambda: _harvest(lm_a, contexts, union, settings.lm_batch_size),
            )
        else:
            acts_a = cache.get(
                "lm_acts_a." + "+".join(hps_a),
                lambda: _harvest(lm_a, contexts, hps_a, settings.lm_batch_size),
            )
            acts_b = cache.get(
                "lm_acts_b." + "+".join(hps_b),
                lambda: _harvest(lm_b, contexts_b, hps_b, settings.lm_batch_size),
            )
    if not streaming_run:
        if exclude and "special" not in acts_a:
            raise compare.PipelineError(
                "--lm_exclude_special with --lm_activations=memory "
                "and caches: use --lm_activations=stream"
            )
        acts_a = _drop_special(acts_a, exclude)
        acts_b = acts_a if acts_b is acts_a else _drop_special(acts_b, exclude)
    if view is None and not np.array_equal(acts_a["token_ids"], acts_b["token_ids"]):
        raise compare.PipelineError(
            "models A and B saw different tokens; the tokenizers or contexts disagree"
        )
    token_ids = acts_a["token_ids"]
    strings = lm_a.tokenizer.convert_ids_to_tokens(np.unique(token_ids).tolist())
    vocab = dict(zip(np.unique(token_ids).tolist(), strings))

    def token_text(rows):
        return [str(vocab[int(token_ids[r])]) for r in rows]

    def context_text(row, before=8):
        lo = max(0, row - before)
        return (
            lm_a.tokenizer.decode(token_ids[lo:row].tolist())
            + " [["
            + lm_a.tokenizer.decode([int(token_ids[row])])
            + "]]"
        )

    if view is not None:  # rows are aligned units: their text stands for token strings
        token_text, context_text = view.token_text, view.context_text
    pool_a, pool_b = aligned.poolers(view)
    n_vocab = len(lm_a.tokenizer)
    segments = np.repeat(np.arange(len(contexts.mask)), np.asarray(contexts.mask).sum(1))
    if view is not None or len(segments) != len(token_ids):
        segments = None  # rows are not the flattened contexts: show single rows
    # Promoted tokens per side; a random-init copy's unembedding says nothing, and with other
    # tokenizers B's unembedding indexes another vocabulary: none shown for them.
    unembed = {
        "a": _unembedding(lm_a, paths[0]),
        "b": _unembedding(lm_b, paths[1]) if view is None else None,
    }
    pages = feature_pages.PageSource(
        token_text=token_text,
        segments=segments,
        unembed_a=unembed["a"],
        unembed_b=unembed["b"],
        vocab=[str(t) for t in lm_a.tokenizer.convert_ids_to_tokens(list(range(n_vocab)))],
    )

    def pages_for(spec):
        return dataclasses.replace(
            pages,
            unembed_a=unembed.get(spec.sae_a.role.side),
            unembed_b=unembed.get(spec.sae_b.role.side),
        )

    extra = {
        "context_text": context_text,
        "features_dir": run.path("features"),
        "stage": getattr(run, "stage", None),
    }

    def recipe(side, hp, d_in):
        d_sae = settings.sae_expansion * d_in
        return sae_train.TrainConfig(
            d_sae=d_sae, activation="topk", k=min(settings.sae_k, d_sae), lr=1e-3
        )

    models = {"a": (lm_a, paths[0]), "b": (lm_b, paths[1])}
    training = references.Training(
        recipe=recipe,
        steps=settings.sae_steps,
        batch_size=settings.sae_batch_size,
        root=run.path("saes"),
        mesh=run.mesh,
        user_seed=settings.seed,
        progress=settings.progress,
        source_training=True,
        metadata=lambda side, hp: {
            "model": (
                f"random-init copy of {models[side[0]][1]}"
                if "random" in side
                else models[side[0]][1]
            ),
            "hookpoint": hp,
        },
    )
    side_a = references.SideSpec(
        "a",
        {hp: acts_a[f"acts/{hp}"] for hp in hps_a},
        loaded=_load_side(setup["saes_a"], hps_a, acts_a, "a"),
        loaded_ceiling=_load_side(setup["saes_a_ceiling"], hps_a, acts_a, "a"),
        description=paths[0],
    )
    side_b = references.SideSpec(
        "b",
        {hp: acts_b[f"acts/{hp}"] for hp in hps_b},
        loaded=_load_side(setup["saes_b"], hps_b, acts_b, "b"),
        loaded_ceiling=_load_side(setup["saes_b_ceiling"], hps_b, acts_b, "b"),
        description=paths[1],
    )
    floor_hps = {"a": hps_a, "b": hps_b}

    def random_model(side):  # the random-init copy behind side's floor (deterministic)
        return lm.random_init_copy(
            models[side][0], seed=settings.seed + (1000 if side == "b" else 2000)
        )

    floor_caches: dict = {}

    def floor_acts(side, hp):
        if streaming_run:
            if side not in floor_caches:
                rnd = random_model(side)
                floor_caches[side] = _harvest_cache(
                    run,
                    f"floor_{side}",
                    rnd,
                    contexts if side == "a" else contexts_b,
                    floor_hps[side],
                    settings,
                )
            return _cached_side(floor_caches[side], [hp], exclude)[f"acts/{hp}"]

        def harvest():
            rnd = random_model(side)
            return _harvest(
                rnd,
                contexts if side == "a" else contexts_b,
                floor_hps[side],
                settings.lm_batch_size,
            )

        return _drop_special(
            cache.get(f"lm_acts_floor_{side}." + "+".join(floor_hps[side]), harvest), exclude
        )[f"acts/{hp}"]

    planner = references.Planner(refs, training, multi_cell=len(hps_a) * len(hps_b) > 1)
    for cond in conditions:
        for ha in hps_a:
            for hb in hps_b:
                planner.cell(
                    side_a, ha, side_b, hb, cond, floor_acts=floor_acts if refs.floor else None
                )
    specs = planner.specs()
    if hasattr(run, "plan_stages"):  # two stages per comparison, then the results
        run.plan_stages(2 * len(specs) + 1)
    pool = {"a": pool_a, "b": pool_b}  # own-token rows -> the comparison's rows, per model
    comps = references.run_specs(
        specs,
        run,
        cfg,
        cache,
        token_text,
        chunk_size=settings.chunk_size,
        progress=settings.progress,
        pages_for=pages_for,
        pool_for=lambda role_side: pool[role_side[0]],
        **extra,
    )
    comps = [
        aligned.after_comparison(
            view, comp, run, spec.sae_a.sae, spec.sae_b.sae, spec.acts_a, spec.acts_b, settings
        )
        if spec.kind == "cross"
        else comp  # per own token next to per aligned unit
        for spec, comp in zip(specs, comps)
    ]
    cells = {m: np.full((len(hps_a), len(hps_b)), np.nan) for m in cfg.metrics}
    base = conditions[0].label
    for i, ha in enumerate(hps_a):
        for j, hb in enumerate(hps_b):
            for metric in cfg.metrics:
                vals = [
                    c.metrics[metric].excess
                    for c in comps
                    if c.kind == "cross"
                    and c.labels.hookpoint_a == ha
                    and c.labels.hookpoint_b == hb
                    and c.labels.condition == base
                    and metric in c.metrics
                    and c.metrics[metric].informative
                ]
                if vals:
                    cells[metric][i, j] = float(np.mean(vals))
    # The SAEs of the base condition by role, for the spliced metrics and importance.
    by_role = {}
    for spec in specs:
        for s in (spec.sae_a, spec.sae_b):
            if s.role.condition == base and s.role.replicate == 0:
                by_role.setdefault((s.role.side, s.role.kind, s.role.hookpoint), s.sae)
    ceil_a = [
        (hp, sae) for (side, kind, hp), sae in by_role.items() if side == "a" and kind == "ceiling"
    ]
    floor_b = [
        (hp, sae)
        for (side, kind, hp), sae in by_role.items()
        if side.endswith("random") and kind == "floor"
    ]
    extras = importance_lib.lm_extras(
        run,
        settings,
        paths=paths,
        contexts=contexts,
        saes_a={hp: by_role[("a", "main", hp)] for hp in hps_a if ("a", "main", hp) in by_role},
        saes_b={hp: by_role[("b", "main", hp)] for hp in hps_b if ("b", "main", hp) in by_role},
        comps=comps,
        ceiling=ceil_a[0] if ceil_a else None,
        floor=floor_b[0] if floor_b else None,
        cache=cache,
        contexts_b=contexts_b,
        every_sae=[(s.role, s.sae) for spec in specs for s in (spec.sae_a, spec.sae_b)],
        random_model=random_model,
    )
    return {
        **extras,
        "preset": "lm",
        "models": {"a": paths[0], "b": paths[1]},
        "hookpoints": {"a": hps_a, "b": hps_b},
        "tokens": int(len(token_ids)),
        "activations": (
            "caches " + f"{settings.cache_a}, {settings.cache_b}"
            if settings.cache_a
            else "forward passes in this run"
        ),
        "activation_mode": {
            "mode": "stream" if streaming_run else "memory",
            "setting": settings.lm_activations,
            "exclude_special": exclude,
            "caches": (
                [c.path for c in caches_ab] + [c.path for c in floor_caches.values()]
                if caches_ab
                else None
            ),
        },
        "contexts": len(contexts),
        "text": _text_used(settings, caches_ab),
        "trio": bool(settings.trio),
        "references": dataclasses.asdict(refs),
        "saes": planner.sae_records(),
        "alignment": aligned.describe(view),
        "grid": {
            "layers_a": hps_a,
            "layers_b": hps_b,
            "cells": {m: v.tolist() for m, v in cells.items()},
        },
        "comparisons": comps,
    }

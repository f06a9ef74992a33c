"""Orchestration of the semantic-subspace experiment (`experiments/semantic_subspaces.py`).

One preset gives three sides on the same tokens (model A, model B, a random-init model), an
SAE per side and the token strings and documents of the rows; then:

1. ``main``: A vs B on all tokens (`subspaces.analyse_groups`: membership, in-group pairing,
   metrics with shuffle nulls, random-subset baseline);
2. ``random_init``: A vs the random-init model's SAE on the same tokens (same groups);
3. ``topic``: A vs B on the one-topic subset (rows of the documents that contain a keyword of
   the topic group, e.g. Food), compared with ``main`` group by group.

Presets: ``toy`` (`subspaces_toy`: planted groups, some shared; SAEs trained on the fly or the
ground-truth dictionary) and ``lm`` (two local transformers models, tiny ones built under the
workdir by default, on the shipped text sample; SAEs loaded or trained on the fly).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from engine import checks, streaming
from experiments.pipeline import compare, concepts, subspaces, subspaces_toy
from experiments.pipeline.stepcache import StepCache
from models import sae as sae_lib


class SubspaceError(compare.PipelineError):
    """A condition the user must fix (printed as one line)."""


@dataclasses.dataclass
class Sides:
    """What every preset hands to `analyse`: three sides on the same rows (tokens)."""

    acts_a: np.ndarray
    acts_b: np.ndarray
    acts_r: np.ndarray
    sae_a: sae_lib.SAE
    sae_b: sae_lib.SAE
    sae_r: sae_lib.SAE
    tokens: list  # token string of every row
    doc_ids: np.ndarray  # document (passage) of every row
    description: dict


def topic_rows(doc_ids: np.ndarray, tokens: Sequence[str], keywords: frozenset) -> np.ndarray:
    """Rows of the documents in which some token matches the topic keywords."""
    hit = np.fromiter(
        (concepts.token_matches(t, keywords) for t in tokens), bool, count=len(tokens)
    )
    docs = np.unique(np.asarray(doc_ids)[hit])
    return np.isin(doc_ids, docs)


# -- SAEs ------------------------------------------------------------------------------------


def obtain_sae(
    acts: np.ndarray,
    side: str,
    hookpoint: str,
    settings,
    run,
    *,
    d_sae: int,
    description: dict,
    loaded: tuple[str, sae_lib.SAE] | None = None,
):
    """The SAE of one side through the pipeline's one train-or-load helper (`saes.obtain`).

    Each side's SAE gets its own role-derived init seed and data order (`saes.role_seeds`;
    one shared seed made unrelated SAEs look alike), trains resumably under
    ``workdir/saes/<role>``, and a finished one whose recipe matches is loaded.
    """
    from experiments.pipeline import saes
    from models import sae_train

    recipe = sae_train.TrainConfig(
        d_sae=d_sae, activation="topk", k=min(settings.sae_k, d_sae), lr=settings.sae_lr
    )
    path, sae = loaded if loaded else (None, None)
    return saes.obtain(
        saes.Role(side, hookpoint),
        acts,
        user_seed=settings.seed,
        recipe=recipe,
        loaded=path,
        loaded_sae=sae,
        steps=settings.sae_steps,
        batch_size=settings.sae_batch,
        root=run.path("saes"),
        mesh=run.mesh,
        progress=settings.progress,
        metadata=description,
    )


def toy_sides(run, settings) -> Sides:
    toy = subspaces_toy.make_concept_toy(
        settings.seed,
        d=settings.toy_d,
        n_tokens=settings.toy_n_tokens,
        group_size=settings.toy_group_size,
    )
    if settings.toy_dictionary == "truth":
        saes = [
            subspaces_toy.truth_sae(a, k=settings.sae_k, name=n)
            for a, n in ((toy.atoms_a, "A"), (toy.atoms_b, "B"), (toy.atoms_r, "random init"))
        ]
    else:
        d_sae = settings.sae_width or toy.codes.shape[1]
        saes = [
            obtain_sae(
                acts, name, "toy", settings, run, d_sae=d_sae, description={"source": f"toy {name}"}
            ).sae
            for acts, name in ((toy.acts_a, "a"), (toy.acts_b, "b"), (toy.acts_r, "b~random"))
        ]
    tokens = [toy.vocab[int(t)] for t in toy.token_ids]
    return Sides(
        toy.acts_a,
        toy.acts_b,
        toy.acts_r,
        *saes,
        tokens=tokens,
        doc_ids=toy.doc_ids,
        description={
            "preset": "toy",
            "dictionary": settings.toy_dictionary,
            **toy.description,
            "planted_groups": {g: v.tolist() for g, v in toy.groups.items()},
        },
    )


def lm_sides(run, settings) -> Sides:
    from experiments.pipeline import sides
    from models import lm as lm_lib
    from models import text

    if bool(settings.model_a) != bool(settings.model_b):
        raise SubspaceError("give both --model_a and --model_b (or neither for the tiny pair)")
    caches = (settings.cache_a, settings.cache_b)
    (side_a, side_b), _ = sides.open_pair(
        run,
        settings.model_a or "tiny",
        settings.model_b or "tiny",
        seed=settings.seed,
        hookpoints=([settings.hookpoint_a], [settings.hookpoint_b or settings.hookpoint_a]),
        sources=("cache", "cache") if any(caches) else ("live", "live"),
        tokenizer_for="the groups",
        tiny_train_steps=settings.lm_train_steps,
    )
    lm_a, lm_b = side_a.model, side_b.model
    hp_a, hp_b = side_a.hookpoint, side_b.hookpoint
    if any(caches):
        contexts, acts_a, acts_b = _read_caches(caches, hp_a, hp_b, lm_a)
        text.check_same_tokenizer(lm_a.tokenizer, lm_b.tokenizer)
        source = {"caches": list(caches)}
    else:
        docs = list(
            text.read_documents(settings.text, max_documents=settings.max_documents or None)
        )
        text.check_same_tokenizer(lm_a.tokenizer, lm_b.tokenizer, docs)
        contexts = text.make_contexts(
            docs,
            lm_a.tokenizer,
            settings.context_length,
            max_contexts=settings.max_contexts or None,
        )
        source = text.describe_source(settings.text)
    lm_r = lm_lib.random_init_copy(lm_b, seed=settings.seed + 1000)
    keep = contexts.mask & ~lm_a.special_mask(contexts.token_ids)

    def acts(lm, hp):
        out = lm.run(contexts, [hp], batch_size=16)
        return np.asarray(out.acts[lm.parse(hp)[0].name], np.float32)[keep]

    if not any(caches):
        acts_a, acts_b = acts(lm_a, hp_a), acts(lm_b, hp_b)
    acts_r = acts(lm_r, hp_b)  # the random-init copy runs live either way
    ids = contexts.token_ids[keep]
    tokens = lm_a.tokenizer.convert_ids_to_tokens(ids.tolist())
    doc_ids = np.broadcast_to(np.arange(len(contexts))[:, None], keep.shape)[keep]

    def sae_for(given, acts_x, name, hp):
        loaded = None
        if given:
            from experiments.pipeline import features, saes

            sae = saes.load_for_hookpoint(given, hp, 1)
            features.check_widths(sae, acts_x.shape[1], f"SAE {given!r} at {hp}")
            loaded = (given, sae)
        return obtain_sae(
            acts_x,
            name,
            hp,
            settings,
            run,
            d_sae=settings.sae_width or 4 * acts_x.shape[1],
            loaded=loaded,
            description={"source": name, "hookpoint": hp},
        ).sae

    saes = (
        sae_for(settings.sae_a, acts_a, "a", hp_a),
        sae_for(settings.sae_b, acts_b, "b", hp_b),
        sae_for(None, acts_r, "b~random", hp_b),
    )
    return Sides(
        acts_a,
        acts_b,
        acts_r,
        *saes,
        tokens=list(tokens),
        doc_ids=doc_ids,
        description={
            "preset": "lm",
            "model_a": lm_a.describe()["name"],
            "model_b": lm_b.describe()["name"],
            "random_init": lm_r.name,
            "hookpoint_a": hp_a,
            "hookpoint_b": hp_b,
            "text": source,
            "contexts": len(contexts),
            "context_length": contexts.context_length,
            "tokens": int(keep.sum()),
        },
    )


def _read_caches(caches, hp_a: str, hp_b: str, lm_a):
    """Contexts and both sides' activations (real, non-special tokens) from two caches of the
    same contexts (`experiments.harvest` of model A and of model B over one text)."""
    from models import activation_cache, text

    if not all(caches):
        raise SubspaceError("--cache_a and --cache_b must be given together")
    ca, cb = (activation_cache.ActivationCache(c) for c in caches)
    ids = ca.token_ids()
    if not np.array_equal(ids, cb.token_ids()) or not np.array_equal(ca.mask(), cb.mask()):
        raise SubspaceError(
            f"caches {caches[0]} and {caches[1]} hold different tokens; "
            "harvest both models over the same contexts"
        )
    contexts = text.Contexts(
        np.asarray(ids), np.asarray(ca.mask()), np.arange(len(ids), dtype=np.int64)
    )  # a context = a document
    real = ~lm_a.special_mask(contexts.token_ids)[contexts.mask]
    out = []
    for cache, hp in ((ca, hp_a), (cb, hp_b)):
        (name,) = cache.check_hookpoints([hp])
        _, x = cache.read(name)
        out.append(np.asarray(x, np.float32)[real])
    return contexts, out[0], out[1]


# -- analysis --------------------------------------------------------------------------------


def _stream(acts_a: np.ndarray, acts_b: np.ndarray, chunk: int) -> Callable[[], object]:
    rows = np.arange(acts_a.shape[0], dtype=np.int32)
    return lambda: streaming.ChunkStream((rows, acts_a, acts_b), chunk, name="tokens")


def analyse(
    sides: Sides,
    groups: dict,
    topic: str,
    topic_words: frozenset,
    cfg: subspaces.SubspaceConfig,
    mesh,
    cache: StepCache,
    *,
    ckpt_root: str,
    chunk_size: int = 1024,
    progress: bool = False,
) -> dict:
    """Main, random-init and topic-restricted analyses, combined (module docstring)."""
    tokens = sides.tokens

    def one(name, acts_a, acts_b, sae_b, rows, c):
        tok = [tokens[r] for r in rows] if rows is not None else tokens
        step = subspaces.feature_step(
            name,
            _stream(acts_a, acts_b, chunk_size),
            sides.sae_a,
            sae_b,
            mesh,
            c,
            cache,
            ckpt_root=ckpt_root,
            progress=progress,
        )
        return subspaces.analyse_groups(
            name,
            step,
            sides.sae_a,
            sae_b,
            lambda r: [tok[int(i)] for i in r],
            groups,
            c,
            mesh,
            cache,
            progress=progress,
        )

    main = one("main", sides.acts_a, sides.acts_b, sides.sae_b, None, cfg)
    no_draws = dataclasses.replace(cfg, random_draws=0)
    ri = one("random_init", sides.acts_a, sides.acts_r, sides.sae_r, None, no_draws)
    subspaces.attach_baseline(main, ri)
    sel = topic_rows(sides.doc_ids, tokens, topic_words)
    idx = np.flatnonzero(sel)
    if idx.size < 2:
        main["topic_control"] = {
            "topic": topic,
            "tokens_topic": int(idx.size),
            "note": "no document of the text mentions the topic",
        }
    else:
        t = one(
            f"topic_{concepts._name_key(topic)}",
            sides.acts_a[idx],
            sides.acts_b[idx],
            sides.sae_b,
            idx,
            no_draws,
        )
        subspaces.attach_topic_control(main, t, topic)
        main["topic_control"]["documents_topic"] = int(np.unique(sides.doc_ids[idx]).size)
        main["topic_control"]["documents_full"] = int(np.unique(sides.doc_ids).size)
    return main


def summary_lines(result: dict, alpha: float) -> list[str]:
    lines = [
        f"{'group':<14} {'nA':>4} {'nB':>4} {'pairs':>5}  status / metric: score "
        "(null, p) [random subsets, random init]"
    ]
    for g, e in result["groups"].items():
        head = f"{g:<14} {e['n_features_a']:>4} {e['n_features_b']:>4} {e['n_pairs']:>5}  "
        if e["status"] != "scored":
            lines.append(head + f"skipped: {e['skip_reason']}")
            continue
        parts = []
        for m, r in e["metrics"].items():
            rs = e.get("random_subsets", {}).get("metrics", {}).get(m, {}).get("mean")
            ri = ((e.get("random_init") or {}).get("metrics") or {}).get(m, {}).get("score")
            star = "*" if r.get("p", 1) < alpha else ""
            parts.append(
                f"{m} {r['score']:.3f}{star} ({r.get('null_mean', float('nan')):.3f}, "
                f"p={r.get('p', float('nan')):.3g}) [{_f(rs)}, {_f(ri)}]"
            )
        lines.append(head + "; ".join(parts))
    return lines


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(run, settings) -> dict:
    groups = concepts.resolve_groups(settings.concepts or None, settings.concepts_file)
    topic_groups = dict(groups)
    topic_name = settings.topic
    if topic_name not in topic_groups:
        try:
            topic_name = concepts.canonical_name(topic_name)
            topic_groups[topic_name] = concepts.builtin_group(topic_name)
        except concepts.ConceptError:
            raise concepts.ConceptError(
                f"--topic {settings.topic!r}: not a built-in group nor one of the selected groups"
            ) from None
    cfg = subspaces.SubspaceConfig(
        metrics=tuple(settings.metrics),
        num_permutations=settings.num_permutations,
        min_pairs=settings.min_pairs,
        threshold=None if settings.threshold < 0 else settings.threshold,
        member_top_n=settings.member_top_n,
        random_draws=settings.random_draws,
        knn_k=settings.knn_k,
        seed=settings.seed,
    )
    checks.check_positive_int("min_pairs", cfg.min_pairs, minimum=3)
    sides = toy_sides(run, settings) if settings.preset == "toy" else lm_sides(run, settings)
    cache = StepCache(run.path("steps"))
    result = analyse(
        sides,
        groups,
        topic_name,
        topic_groups[topic_name],
        cfg,
        run.mesh,
        cache,
        ckpt_root=run.path("checkpoints"),
        chunk_size=settings.chunk_size,
        progress=settings.progress,
    )
    alpha = settings.alpha
    result.update(
        {
            "preset": settings.preset,
            "data": sides.description,
            "config": dataclasses.asdict(cfg),
            "alpha": alpha,
            "keywords": {g: concepts.describe_group(w) for g, w in groups.items()},
            "matching_rule": "case-insensitive; whitespace and sub-word markers (Ġ ▁ Ċ, leading "
            "##) stripped; whole-token equality; a feature joins a group when "
            f"one of its top {cfg.member_top_n} activating tokens matches",
            "significant": {m: subspaces.significant_groups(result, m, alpha) for m in cfg.metrics},
            "skipped": {
                g: e["skip_reason"] for g, e in result["groups"].items() if e["status"] != "scored"
            },
        }
    )
    subspaces.plot_groups(result, os.path.join(run.plots_dir, "groups_vs_null.png"))
    run.write_results(result)
    from engine import metrics_io

    metrics_io.MetricWriter(run.metrics_path).write(
        0,
        {
            "scored": result["counts"]["scored"],
            "skipped": result["counts"]["skipped"],
            **{f"significant_{m}": len(v) for m, v in result["significant"].items()},
        },
    )
    print("\n".join(summary_lines(result, alpha)))
    print(f"results: {run.path('results.json')}\nplots:   {run.plots_dir}")
    if result["counts"]["scored"] == 0:
        raise SubspaceError(
            "no concept group could be scored (see 'skipped' in "
            "results.json); add keywords with --concepts_file or lower "
            "--min_pairs"
        )
    return result

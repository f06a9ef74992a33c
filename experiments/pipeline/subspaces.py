"""Semantic subspaces: do two SAEs arrange the features of one concept group alike?

Lan et al.'s semantic-subspace analysis (docs/references.md, "Concept features and
geometry") on the universality pipeline's feature pass (`experiments.pipeline.features`):

1. membership: each SAE's features join concept groups by their top-activating tokens
   (`experiments.pipeline.concepts`; dead / constant features never join);
2. pairing INSIDE a group: every group feature of A proposes its most correlated group feature
   of B and vice versa (from the pass's activation-correlation matrix; when the matrix was too
   big to keep, the global best matches that fall inside the group), then one-to-one keeping
   the best pair (`filters.one_to_one_best`, not Lan et al.'s first-met pair) and an optional
   correlation threshold;
3. groups with fewer than ``min_pairs`` pairs are skipped (Lan et al.: <= 2 pairs) and the
   reason is recorded;
4. metrics on the paired decoder rows (SVCCA / CKA / RSA / mutual kNN by default) with
   random-pairing nulls (`engine.similarity.evaluate`, p = (1 + #null >= obs) / (1 + R));
5. baseline "random subsets": the same metrics on random sets of the same number of pairs
   drawn from the whole SAE pair's one-to-one pairing (several draws; distribution of scores
   and the fraction of draws at or above the group's score). Same n, so the same chance level:
   a group is special only when it beats these draws, not just its null;
6. baseline "random init" (`attach_baseline`): the same group in A vs an SAE of a randomly
   initialised model (null-like by construction);
7. topic control (`attach_topic_control`): the whole analysis on a one-topic subset of the
   tokens vs the full tokens; differences reported per group and metric.

Everything returned is JSON-ready.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engine import similarity
from experiments import common
from experiments.pipeline import compare, concepts, filters, pairing
from experiments.pipeline.stepcache import StepCache
from models import sae as sae_lib

DEFAULT_METRICS = ("svcca", "cka", "rsa_spearman", "mutual_knn")


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
    """Settings of one semantic-subspace analysis.

    Attributes:
      metrics: `engine.similarity` registry names.
      num_permutations: random-pairing null size (Lan et al.: 1000).
      min_pairs: fewest pairs a group needs to be scored (Lan et al. skip <= 2, so 3).
      threshold: keep group pairs whose activation correlation is >= this (None: all).
      member_top_n: top-activating tokens that count for group membership.
      top_n: top-activating rows kept per feature by the feature pass.
      random_draws: random-subset baseline draws per group (0: none).
      knn_k: mutual kNN neighbours (capped at n - 1 for small groups).
      seed: permutation and draw seed.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    num_permutations: int = 1000
    min_pairs: int = 3
    threshold: float | None = None
    member_top_n: int = 5
    top_n: int = 10
    random_draws: int = 20
    knn_k: int = 5
    seed: int = 0


def feature_step(
    name: str,
    stream_factory: Callable[[], object],
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    mesh,
    cfg: SubspaceConfig,
    cache: StepCache,
    *,
    ckpt_root: str,
    progress: bool = False,
) -> dict:
    """The feature pass of one SAE pair (cached as step ``<name>.features``)."""
    from experiments.pipeline import features

    return cache.get(
        f"{name}.features",
        lambda: compare._pass_arrays(
            features.feature_pass(
                stream_factory(),
                sae_a,
                sae_b,
                mesh,
                top_n=cfg.top_n,
                checkpoint_dir=features.checkpoint_path(ckpt_root, name),
                progress=progress,
            )
        ),
    )


def invalid_features(step: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Dead / constant features of each side (by the stats and by the correlation pass)."""
    ia = step["a_dead"] | step["a_constant"] | step["m_a_dead"] | step["m_a_constant"]
    ib = step["b_dead"] | step["b_constant"] | step["m_b_dead"] | step["m_b_constant"]
    return np.asarray(ia, bool), np.asarray(ib, bool)


def group_pairs(
    step: Mapping,
    members_a: np.ndarray,
    members_b: np.ndarray,
    *,
    group: str = "group",
    threshold: float | None = None,
) -> filters.Pairs:
    """One-to-one best pairs inside a group (module docstring, step 2).

    Raises:
      concepts.ConceptError: the group has no feature on one side.
    """
    ma = np.asarray(members_a, np.int64)
    mb = np.asarray(members_b, np.int64)
    for side, m in (("A", ma), ("B", mb)):
        if m.size == 0:
            raise concepts.ConceptError(
                f"group {group!r}: no feature of SAE {side} joined it "
                "(none has a keyword among its top tokens)"
            )
    if "corr" in step:
        sub = np.asarray(step["corr"], np.float64)[np.ix_(ma, mb)]
        best_b = sub.argmax(1)
        best_a = sub.argmax(0)
        a = np.concatenate([ma, ma[best_a]])
        b = np.concatenate([mb[best_b], mb])
        v = np.concatenate([sub[np.arange(len(ma)), best_b], sub[best_a, np.arange(len(mb))]])
    else:
        in_b = np.isin(step["m_a_match"][ma], mb)
        in_a = np.isin(step["m_b_match"][mb], ma)
        a = np.concatenate([ma[in_b], step["m_b_match"][mb[in_a]]]).astype(np.int64)
        b = np.concatenate([step["m_a_match"][ma[in_b]], mb[in_a]]).astype(np.int64)
        v = np.concatenate([step["m_a_value"][ma[in_b]], step["m_b_value"][mb[in_a]]])
    pairs = filters.one_to_one_best(filters.Pairs(a, b, np.asarray(v, np.float64)))
    if threshold is not None:
        pairs = pairs.keep(pairs.value >= threshold)
    return pairs


def whole_pairs(
    step: Mapping, sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, threshold: float | None
) -> filters.Pairs:
    """The whole SAE pair's one-to-one correlation pairing (random-subset baseline pool)."""
    cand = pairing.get("correlation").propose(step, sae_a, sae_b, None)
    ia, ib = invalid_features(step)
    cfg = filters.FilterConfig(non_concept=False, threshold=threshold)
    pairs, _ = filters.apply_filters(
        cand, cfg, invalid_a=ia, invalid_b=ib, top_tokens_a=None, top_tokens_b=None
    )
    return pairs


def metric_options(cfg: SubspaceConfig, n: int) -> dict:
    """Per-metric options for ``n`` pairs (mutual kNN needs k < n)."""
    if "mutual_knn" in cfg.metrics:
        return {"mutual_knn": {"k": int(max(1, min(cfg.knn_k, n - 1)))}}
    return {}


def _rows(sae: sae_lib.SAE, idx: np.ndarray) -> np.ndarray:
    return np.asarray(sae.W_dec, np.float64)[np.asarray(idx, np.int64)]


def random_subsets(
    pool: filters.Pairs,
    n: int,
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    cfg: SubspaceConfig,
    scores: Mapping[str, float] | None = None,
) -> dict:
    """Scores of ``cfg.random_draws`` random ``n``-pair subsets of ``pool`` (no nulls).

    ``fraction_at_or_above`` is the share of draws scoring >= the group's score (``scores``),
    i.e. an empirical p-value of the group against random subsets of the same size.
    """
    if cfg.random_draws <= 0 or len(pool) < n:
        return {"draws": 0, "note": f"pool of {len(pool)} pairs, need {n}"}
    rng = np.random.default_rng(cfg.seed + 7919 * n)
    xa, yb = _rows(sae_a, pool.a), _rows(sae_b, pool.b)
    opts = metric_options(cfg, n)
    per = {m: [] for m in cfg.metrics}
    for _ in range(cfg.random_draws):
        pick = rng.choice(len(pool), size=n, replace=False)
        for m in cfg.metrics:
            per[m].append(similarity.score(m, xa[pick], yb[pick], **opts.get(m, {})))
    out = {"draws": int(cfg.random_draws), "pool": len(pool), "metrics": {}}
    for m, vals in per.items():
        v = np.asarray(vals, np.float64)
        entry = {
            "scores": v.tolist(),
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "q05": float(np.quantile(v, 0.05)),
            "q95": float(np.quantile(v, 0.95)),
        }
        if scores is not None and m in scores:
            entry["fraction_at_or_above"] = float(np.mean(v >= scores[m] - 1e-12))
        out["metrics"][m] = entry
    return out


def _examples(tokens: Sequence[Sequence[str]], idx: np.ndarray, limit: int = 8) -> list:
    return [{"feature": int(f), "top_tokens": list(tokens[f])[:5]} for f in idx[:limit]]


def analyse_groups(
    name: str,
    step: Mapping,
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    token_text: Callable[[np.ndarray], Sequence[str]],
    groups: Mapping[str, frozenset[str]],
    cfg: SubspaceConfig,
    mesh,
    cache: StepCache | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Membership, pairing, metrics with nulls and random subsets for every group.

    Args:
      name: comparison name (cache keys).
      step: feature-pass arrays (`feature_step`).
      token_text: row ids -> token strings (top-activating tokens).
      groups: `concepts.resolve_groups` output.

    Returns:
      ``{"name", "tokens", "min_pairs", "groups": {group: {"n_features_a", "n_features_b",
      "n_pairs", "status": "scored" | "skipped", "skip_reason", "metrics": {metric: {score,
      null_mean, p, z, excess, ...}}, "random_subsets": {...}, "pairs", "examples_a/b"}}}``.
    """
    invalid_a, invalid_b = invalid_features(step)
    tokens_a = compare.top_tokens(step["a_top_rows"], token_text, cfg.member_top_n)
    tokens_b = compare.top_tokens(step["b_top_rows"], token_text, cfg.member_top_n)
    mem_a = concepts.assign_features(tokens_a, groups, cfg.member_top_n, valid=~invalid_a)
    mem_b = concepts.assign_features(tokens_b, groups, cfg.member_top_n, valid=~invalid_b)
    pool = None
    out = {
        "name": name,
        "tokens": int(step["rows"]),
        "min_pairs": int(cfg.min_pairs),
        "threshold": cfg.threshold,
        "groups": {},
    }
    for group in groups:
        ma, mb = mem_a[group], mem_b[group]
        entry = {
            "n_features_a": int(ma.size),
            "n_features_b": int(mb.size),
            "n_pairs": 0,
            "status": "skipped",
            "metrics": {},
            "examples_a": _examples(tokens_a, ma),
            "examples_b": _examples(tokens_b, mb),
        }
        out["groups"][group] = entry
        if ma.size == 0 or mb.size == 0:
            side = "A" if ma.size == 0 else "B"
            entry["skip_reason"] = f"no feature of SAE {side} in the group"
            continue
        pairs = group_pairs(step, ma, mb, group=group, threshold=cfg.threshold)
        entry["n_pairs"] = len(pairs)
        entry["pairs"] = {
            "a": pairs.a.tolist(),
            "b": pairs.b.tolist(),
            "value": pairs.value.tolist(),
        }
        if len(pairs) < cfg.min_pairs:
            entry["skip_reason"] = f"{len(pairs)} pair(s) < min_pairs={cfg.min_pairs}"
            continue
        x, y = _rows(sae_a, pairs.a), _rows(sae_b, pairs.b)
        opts = metric_options(cfg, len(pairs))

        def compute(x=x, y=y, opts=opts):
            return similarity.evaluate(
                x,
                y,
                cfg.metrics,
                num_permutations=cfg.num_permutations,
                seed=cfg.seed,
                mesh=mesh,
                options=opts,
                progress=progress,
            )

        key = f"{name}.group.{concepts._name_key(group)}"
        scored = cache.get(key, compute) if cache is not None else compute()
        entry["status"] = "scored"
        entry["skip_reason"] = None
        entry["metrics"] = {
            m: {k: r[k] for k in ("score", "null_mean", "null_std", "p", "z", "excess") if k in r}
            for m, r in scored["metrics"].items()
        }
        if cfg.random_draws > 0:
            if pool is None:
                pool = whole_pairs(step, sae_a, sae_b, cfg.threshold)
            entry["random_subsets"] = random_subsets(
                pool,
                len(pairs),
                sae_a,
                sae_b,
                cfg,
                {m: r["score"] for m, r in entry["metrics"].items()},
            )
    out["counts"] = {
        "scored": sum(g["status"] == "scored" for g in out["groups"].values()),
        "skipped": sum(g["status"] == "skipped" for g in out["groups"].values()),
    }
    return out


def attach_baseline(main: dict, random_init: dict) -> dict:
    """Copies each group's random-init result (A vs an SAE of a random-init model) in."""
    for group, entry in main["groups"].items():
        other = random_init["groups"].get(group)
        if other is None:
            continue
        entry["random_init"] = {
            k: other.get(k) for k in ("n_features_b", "n_pairs", "status", "skip_reason", "metrics")
        }
    return main


def attach_topic_control(main: dict, topic: dict, topic_name: str) -> dict:
    """Per group and metric: topic-subset score minus full-text score (and excess, p)."""
    diff = {}
    for group, entry in main["groups"].items():
        other = topic["groups"].get(group)
        row = {
            "full_status": entry["status"],
            "topic_status": other["status"] if other else "missing",
            "full_n_pairs": entry["n_pairs"],
            "topic_n_pairs": other["n_pairs"] if other else 0,
            "metrics": {},
        }
        if other and entry["status"] == other["status"] == "scored":
            for m, r in entry["metrics"].items():
                t = other["metrics"].get(m)
                if t:
                    row["metrics"][m] = {
                        "full": r["score"],
                        "topic": t["score"],
                        "difference": t["score"] - r["score"],
                        "excess_difference": t.get("excess", 0.0) - r.get("excess", 0.0),
                        "p_full": r.get("p"),
                        "p_topic": t.get("p"),
                    }
        diff[group] = row
    main["topic_control"] = {
        "topic": topic_name,
        "tokens_full": main["tokens"],
        "tokens_topic": topic["tokens"],
        "groups": diff,
    }
    return main


def significant_groups(result: dict, metric: str, alpha: float) -> list[str]:
    """Scored groups whose ``metric`` p-value is below ``alpha``."""
    return [
        g
        for g, e in result["groups"].items()
        if e["status"] == "scored" and e["metrics"].get(metric, {}).get("p", 1.0) < alpha
    ]


def plot_groups(result: dict, path: str, metrics: Sequence[str] | None = None) -> None:
    """Per-group score vs null bars, with the random-subset and random-init baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [g for g, e in result["groups"].items() if e["status"] == "scored"]
    metrics = list(metrics or [])
    if not metrics and scored:
        metrics = list(result["groups"][scored[0]]["metrics"])
    fig, axes = plt.subplots(
        len(metrics) or 1,
        1,
        figsize=(max(6, 1.4 * len(scored) + 2), 2.8 * max(1, len(metrics))),
        squeeze=False,
    )
    for ax, m in zip(axes[:, 0], metrics or [None]):
        if not scored or m is None:
            ax.text(0.5, 0.5, "no group scored", ha="center", va="center")
            ax.set_axis_off()
            continue
        xs = np.arange(len(scored))
        w = 0.2

        def get(path_fn):
            return np.array([path_fn(result["groups"][g]) for g in scored], np.float64)

        score = get(lambda e: e["metrics"][m]["score"])
        null = get(lambda e: e["metrics"][m].get("null_mean", np.nan))
        null_sd = get(lambda e: e["metrics"][m].get("null_std", np.nan))
        rs = get(
            lambda e: e.get("random_subsets", {}).get("metrics", {}).get(m, {}).get("mean", np.nan)
        )
        rs_sd = get(
            lambda e: e.get("random_subsets", {}).get("metrics", {}).get(m, {}).get("std", np.nan)
        )
        ri = get(
            lambda e: (
                (e.get("random_init") or {}).get("metrics", {}).get(m, {}).get("score", np.nan)
                if e.get("random_init")
                else np.nan
            )
        )
        ax.bar(xs - 1.5 * w, score, w, label="group score", color="tab:blue")
        ax.bar(xs - 0.5 * w, null, w, yerr=null_sd, label="shuffle null", color="tab:gray")
        ax.bar(xs + 0.5 * w, rs, w, yerr=rs_sd, label="random subsets", color="tab:orange")
        ax.bar(xs + 1.5 * w, ri, w, label="random-init model", color="tab:red")
        for x, g in zip(xs, scored):
            p = result["groups"][g]["metrics"][m].get("p")
            if p is not None:
                ax.text(
                    x - 1.5 * w,
                    score[x],
                    f"p={p:.3g}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [f"{g}\n(n={result['groups'][g]['n_pairs']})" for g in scored], fontsize=8
        )
        ax.set_ylabel(m)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="lower right")
    axes[0, 0].set_title(f"semantic subspaces: {result['name']} ({result['tokens']} tokens)")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)

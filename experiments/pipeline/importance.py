"""Importance in the universality comparison: spliced CE per SAE, importance-restricted and
importance-weighted metrics, similarity per importance decile, the "both fire on important
logits" table.

Everything here reads per-feature importance from `models.importance` (attribution =
mean |activation x gradient of the correct token's log-prob| per token, Marks et al. 2024,
arXiv:2403.19647) and the spliced metrics from `models.splice` (CE loss recovered, KL, delta
loss as SAELens / SAEBench define them, Karvonen et al. 2025, arXiv:2503.09532).

* **Spliced CE for every SAE** of the lm preset (``--splice_eval``, on the first
  ``--splice_contexts`` contexts): recorded in results.json ``splice`` and printed; an SAE
  recovering less than `models.splice.POOR_CE_RECOVERED` (0.5) of the CE loss gets a WARNING
  line: its features are a poor stand-in for the model's computation, so universality claims
  built on them are weak. Every SAE the run trains or loads is spliced: main SAEs, replicates,
  sweep conditions, ceilings, and the floor's SAE, which goes into its own random-init model
  (the random-init body whose activations trained it, with the architecture's random-init LM
  head, `models.splice.with_random_head`). On an untrained model zeroing the hookpoint barely
  moves the loss, so the floor's CE recovered is ill-conditioned: the summary prints it with
  a note saying so, and its delta loss and KL are the numbers to read.
* **Restriction** (``--importance``): the main comparison's kept pairs restricted to pairs
  whose two features are both among their side's ``--importance_top_k`` most important
  (``top_k``), and, for contrast, both among the ``k`` least important of the paired features
  (``bottom_k``); each scored with its random-pairing null computed on the restricted rows
  (the null permutes only within the restriction).
* **Weighting**: every kept pair weighted by ``sqrt(importance_a * importance_b)`` (normalised
  to mean 1); metrics that accept row weights (`engine.similarity` table: CKA and the CCA family
  as frequency weights, RSA-Pearson as pair weights, mutual k-NN as query weights) are scored
  with the null computed under the same weights (the weights stay with X's rows while Y is
  permuted). Metrics without weights (RSA-Spearman) are skipped under weighting.
* **Deciles** (the headline plot): the kept pairs binned into equal-count bins by the
  importance of their A-side feature (A's SAE is shared by the cross, ceiling and floor
  comparisons, so the bins mean the same thing in each), similarity and null per bin, for
  cross / ceiling / floor where the run has them: are the important features the universal
  ones?
* **Both fire on important logits**: for each of the corpus's most frequent predicted tokens
  ("classes"), each model's ``--importance_top_m`` features with the largest attribution at
  positions predicting that token. A matched pair "both fires" on a class when both features
  are in their model's top-m for it. Reported: the fraction of pairs that both fire on at least
  one class and the mean number of shared classes, against the same statistics for shuffled
  pairs (``--importance_shuffles`` permutations of B's side), and a per-class table.

Usage (adds ``splice``/``importance`` to results.json, an ``importance_deciles_<metric>.png``
per metric and printed lines)::

    python -m experiments.universality --config=experiments/configs/universality_lm.py \
        --workdir=runs/univ_lm --importance

Standalone importance of one SAE: ``python -m experiments.importance`` (experiments/importance.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine import checks
from experiments import common
from experiments.pipeline import results


@dataclasses.dataclass(frozen=True)
class ImportanceCompareConfig:
    """Settings of the importance comparisons (see the module docstring)."""

    top_k: int = 0
    bins: int = 10
    metrics: tuple[str, ...] = ("cka", "rsa_pearson")
    num_permutations: int = 200
    seed: int = 0
    min_pairs: int = 4
    top_m: int = 10
    n_shuffles: int = 1000
    pad_nulls: bool = True  # pad null kernels to `null_bucket` sizes (one compile per bucket)

    @classmethod
    def from_settings(cls, settings) -> ImportanceCompareConfig:
        return cls(
            top_k=settings.importance_top_k,
            bins=settings.importance_bins,
            metrics=tuple(settings.importance_metrics),
            num_permutations=settings.importance_permutations,
            seed=settings.seed,
            top_m=settings.importance_top_m,
            n_shuffles=settings.importance_shuffles,
        )


# --------------------------------------------------------------------------------------------
# Scoring paired rows under a restriction or a weighting
# --------------------------------------------------------------------------------------------


def pair_weights(imp_a: np.ndarray, imp_b: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sqrt(imp_a[a] * imp_b[b])`` normalised to mean 1 (non-negative importances)."""
    ia, ib = np.asarray(imp_a, np.float64)[a], np.asarray(imp_b, np.float64)[b]
    if np.any(ia < 0) or np.any(ib < 0):
        raise checks.InputError("importance weights: expected non-negative importances")
    w = np.sqrt(ia * ib)
    if not np.any(w > 0):
        raise checks.InputError("importance weights: every paired feature has importance 0")
    return w / w.mean()


def top_k_mask(imp_a, imp_b, a, b, k: int, *, lowest: bool = False) -> np.ndarray:
    """Pairs whose two features are among the ``k`` most (``lowest``: least) important of
    their side's paired features."""

    def side(imp, ids):
        uniq = np.unique(ids)
        vals = np.asarray(imp, np.float64)[uniq]
        order = np.argsort(vals if lowest else -vals, kind="stable")
        return np.isin(ids, uniq[order[:k]])

    return side(imp_a, a) & side(imp_b, b)


def null_bucket(n: int) -> int:
    """Row count the null kernels are padded to: ``n`` rounded up to a multiple of
    ``max(16, 2^(ceil(log2 n) - 3))`` (at most ~12 % padding above 128 rows), so the many
    bin and top-k sizes of one run (and of its cross, ceiling and floor comparisons) share a
    few compiled null kernels (`engine.nulls.padded_null`) instead of one per size."""
    n = max(int(n), 1)
    grain = max(16, 1 << max(0, int(np.ceil(np.log2(n))) - 3))
    return -(-n // grain) * grain


def score_pairs(
    x: np.ndarray,
    y: np.ndarray,
    cfg: ImportanceCompareConfig,
    mesh,
    weights: np.ndarray | None = None,
) -> dict:
    """Metrics with random-pairing nulls on paired rows (one entry per metric, or a reason)."""
    out: dict[str, Any] = {"n": int(x.shape[0]), "metrics": {}, "skipped": {}}
    if x.shape[0] < cfg.min_pairs:
        out["note"] = f"{x.shape[0]} pairs, fewer than {cfg.min_pairs}"
        return out
    from engine import similarity  # here: importing this module must not start JAX

    for metric in cfg.metrics:
        if weights is not None and similarity.get(metric).weights == "none":
            out["skipped"][metric] = "takes no row weights"
            continue
        try:
            size = null_bucket(x.shape[0]) if cfg.pad_nulls else None
            r = similarity.evaluate(
                x,
                y,
                (metric,),
                weights=weights,
                num_permutations=cfg.num_permutations,
                seed=cfg.seed,
                mesh=mesh,
                null_size=size,
            )["metrics"][metric]
        except checks.InputError as e:
            out["skipped"][metric] = str(e)
            continue
        out["metrics"][metric] = {
            k: r.get(k)
            for k in ("score", "null_mean", "null_std", "excess", "z", "p", "null_method")
        }
    return out


def restricted_comparisons(
    w_dec_a, w_dec_b, a, b, imp_a, imp_b, cfg: ImportanceCompareConfig, mesh
) -> dict:
    """All kept pairs, top-k / bottom-k restrictions and the importance weighting."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    x = np.asarray(w_dec_a, np.float64)[a]
    y = np.asarray(w_dec_b, np.float64)[b]
    k = cfg.top_k or max(cfg.min_pairs, len(np.unique(a)) // 4)
    out = {"k": int(k), "all": score_pairs(x, y, cfg, mesh)}
    for name, lowest in (("top_k", False), ("bottom_k", True)):
        keep = top_k_mask(imp_a, imp_b, a, b, k, lowest=lowest)
        out[name] = score_pairs(x[keep], y[keep], cfg, mesh)
        out[name]["pairs"] = int(keep.sum())
    w = pair_weights(imp_a, imp_b, a, b)
    out["weighted"] = score_pairs(x, y, cfg, mesh, weights=w)
    return out


def decile_curve(w_dec_a, w_dec_b, a, b, imp_a, cfg: ImportanceCompareConfig, mesh) -> list:
    """Similarity (with null) per equal-count bin of the A-side feature's importance.

    Bin 0 holds the least important pairs. Each entry: ``{"bin", "lo", "hi", "n", "metrics"}``
    with ``lo``/``hi`` the importance range of the bin.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ia = np.asarray(imp_a, np.float64)[a]
    order = np.argsort(ia, kind="stable")
    x = np.asarray(w_dec_a, np.float64)
    y = np.asarray(w_dec_b, np.float64)
    out = []
    for i, idx in enumerate(np.array_split(order, cfg.bins)):
        if len(idx) == 0:
            continue
        s = score_pairs(x[a[idx]], y[b[idx]], cfg, mesh)
        out.append(
            {
                "bin": i,
                "lo": float(ia[idx].min()),
                "hi": float(ia[idx].max()),
                "n": int(len(idx)),
                "metrics": s["metrics"],
                "skipped": s["skipped"],
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Both fire on important logits
# --------------------------------------------------------------------------------------------


def top_m_members(by_class: np.ndarray, m: int) -> np.ndarray:
    """``[d_sae, C]`` bool: feature among the ``m`` largest of its class's column (> 0 only)."""
    by_class = np.asarray(by_class, np.float64)
    m = min(m, by_class.shape[0])
    top = np.argsort(-by_class, axis=0, kind="stable")[:m]
    out = np.zeros(by_class.shape, bool)
    np.put_along_axis(out, top, True, axis=0)
    return out & (by_class > 0)


def both_fire_table(
    a,
    b,
    by_class_a: np.ndarray,
    by_class_b: np.ndarray,
    class_ids: np.ndarray,
    *,
    top_m: int = 10,
    n_shuffles: int = 1000,
    seed: int = 0,
    class_text=None,
) -> dict:
    """How often matched pairs are both among their model's top-m features for the same
    predicted tokens, against shuffled pairs (module docstring).

    Args:
      a, b: paired feature ids.
      by_class_a / by_class_b: ``[d_sae, C]`` attribution mass per predicted-token class.
      class_ids: ``[C]`` the classes' token ids (the same on both sides).
      class_text: optional ``ids -> strings`` for the per-class table.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if len(a) == 0:
        raise checks.InputError("both-fire table: no pairs")
    ma, mb = top_m_members(by_class_a, top_m), top_m_members(by_class_b, top_m)
    if ma.shape[1] != mb.shape[1]:
        raise checks.InputError(
            f"both-fire table: {ma.shape[1]} classes on A, {mb.shape[1]} "
            "on B; both sides must use the same predicted tokens"
        )
    shared = ma[a] & mb[b]  # [pairs, C]
    frac = float(shared.any(1).mean())
    mean_shared = float(shared.sum(1).mean())
    rng = np.random.default_rng(seed)
    null_frac = np.empty(n_shuffles)
    null_mean = np.empty(n_shuffles)
    null_per_class = np.zeros(ma.shape[1])
    for r in range(n_shuffles):
        s = ma[a] & mb[b[rng.permutation(len(b))]]
        null_frac[r] = s.any(1).mean()
        null_mean[r] = s.sum(1).mean()
        null_per_class += s.sum(0)
    null_per_class /= max(n_shuffles, 1)
    per_class = shared.sum(0)
    a_important = ma[a].any(1)
    texts = (
        class_text(np.asarray(class_ids))
        if class_text is not None
        else [str(int(c)) for c in class_ids]
    )
    order = np.argsort(-per_class, kind="stable")
    return {
        "pairs": int(len(a)),
        "top_m": int(top_m),
        "classes": int(ma.shape[1]),
        "fraction_both": frac,
        "fraction_both_null_mean": float(null_frac.mean()),
        "fraction_both_null_std": float(null_frac.std()),
        "p": float((1 + np.sum(null_frac >= frac)) / (n_shuffles + 1)),
        "mean_shared_classes": mean_shared,
        "mean_shared_classes_null": float(null_mean.mean()),
        "fraction_b_given_a": (
            float(shared.any(1)[a_important].mean()) if a_important.any() else float("nan")
        ),
        "per_class": [
            {"token": texts[c], "both": int(per_class[c]), "shuffled": float(null_per_class[c])}
            for c in order[:20]
        ],
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def splice_lines(records: list[dict]) -> list[str]:
    """Printed lines for the spliced metrics, WARNING lines for SAEs recovering less than
    0.5 of the CE loss, and a note where zero ablation barely moves the loss (the ratio is
    then ill-conditioned, e.g. on a random model)."""
    from models import splice

    if not records:
        return []
    lines = [
        "SAEs spliced into their model (CE loss recovered vs zero / mean ablation, "
        "delta loss, KL; nats):"
    ]
    for r in records:
        if "error" in r:
            lines.append(f"   {r['label']:<28} not spliced: {r['error']}")
            continue
        lines.append(
            f"   {r['label']:<28} recovered {r['ce_loss_recovered']:6.3f} / "
            f"{r['ce_loss_recovered_mean']:6.3f}   delta {r['delta_loss']:7.4f}   "
            f"KL {r['kl_div']:7.4f}   clean CE {r['ce_clean']:.3f}  "
            f"({r['n_positions']} {r['objective']} predictions)"
        )
    for r in records:
        if "error" in r:
            continue
        gap = r["ce_zero"] - r["ce_clean"]
        if gap < splice.ILL_CONDITIONED_GAP:
            lines.append(
                f"   note: zeroing {r['label']} changes the loss by only {gap:.4f} nats "
                "(an untrained model?): its CE-recovered ratio is ill-conditioned"
            )
            continue
        if (
            not np.isfinite(r["ce_loss_recovered"])
            or r["ce_loss_recovered"] < splice.POOR_CE_RECOVERED
        ):
            lines.append(
                f"   WARNING: {r['label']} recovers {r['ce_loss_recovered']:.2f} of the "
                f"CE loss (< {splice.POOR_CE_RECOVERED}); its features are a poor "
                "stand-in for the model, universality claims built on it are weak"
            )
    return lines


def importance_lines(section: dict) -> list[str]:
    if not section:
        return []
    lines = [
        f"importance ({section.get('score', 'attribution')}; excess over the random-pairing null):"
    ]
    rc = section.get("restricted", {})
    for name in ("all", "top_k", "bottom_k", "weighted"):
        entry = rc.get(name, {})
        parts = [
            f"{m} {v['excess']:+.3f}"
            for m, v in entry.get("metrics", {}).items()
            if v.get("excess") is not None
        ]
        label = f"{name} (k={rc.get('k')})" if name.endswith("_k") else name
        lines.append(f"   {label:<16} n={entry.get('n', 0):<5} " + "  ".join(parts))
    bf = section.get("both_fire")
    if bf:
        lines.append(
            f"   both fire on important logits: {bf['fraction_both']:.2f} of pairs vs "
            f"{bf['fraction_both_null_mean']:.2f} shuffled (p={bf['p']:.3g})"
        )
    return lines


def plot_deciles(curves: dict[str, list], metric: str, path: str) -> None:
    """Excess over the random-pairing null per importance bin (error bars: 2 null sd), one
    line per comparison kind (cross, ceiling, floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for i, (kind, curve) in enumerate(curves.items()):
        pts = [(c["bin"], c["metrics"][metric]) for c in curve if metric in c["metrics"]]
        if not pts:
            continue
        xs = np.array([p[0] for p in pts], float) + 0.08 * (i - 1)
        ax.errorbar(
            xs,
            [p[1]["excess"] for p in pts],
            yerr=[2 * p[1]["null_std"] for p in pts],
            fmt="o-",
            capsize=2,
            label=kind,
        )
        any_line = True
    if not any_line:
        plt.close(fig)
        return
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("A-side feature importance bin (0 = least important)")
    ax.set_ylabel(f"{metric}: score - null mean")
    ax.set_title(f"{metric} excess over random pairing per importance bin")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------
# The lm preset's hook
# --------------------------------------------------------------------------------------------


def annotate_feature_table(path: str, scores: dict) -> bool:
    """Adds each feature's importance (attribution) to the comparison's feature table, where
    the report's pair table and feature pages show it. Returns False when there is no table."""
    if not os.path.exists(path):
        return False
    from engine import metrics_io

    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    for side, values in scores.items():
        rows = table.get(side) or []
        if len(rows) != len(values):
            raise checks.InputError(
                f"{path}: {len(rows)} features on side {side}, importance has {len(values)}"
            )
        for row, v in zip(rows, np.asarray(values, np.float64)):
            row["importance"] = float(v)
    metrics_io.write_json(path, table)
    return True


def sae_label(
    side: str, hookpoint: str, kind: str = "main", replicate: int = 0, condition: str = ""
) -> str:
    """Summary label of an SAE: ``A resid_post.0``, ``A resid_post.0 (ceiling)``,
    ``B resid_post.1 (floor, random init)``, ``A resid_post.0 (r1, k=8)``."""
    base, random = side.split("~")[0], "~random" in side
    extra = [kind] if kind != "main" else []
    extra += ["random init"] if random else []
    extra += [f"r{replicate}"] if replicate else []
    extra += [condition] if condition else []
    return f"{base.upper()} {hookpoint}" + (f" ({', '.join(extra)})" if extra else "")


def lm_extras(
    run,
    settings,
    *,
    paths: list[str],
    contexts,
    saes_a: dict,
    saes_b: dict,
    comps: Sequence[results.ComparisonResult],
    ceiling: tuple | None = None,
    floor: tuple | None = None,
    cache=None,
    contexts_b=None,
    every_sae: list | None = None,
    random_model=None,
) -> dict:
    """Spliced metrics of every SAE and (``--importance``) the importance comparisons.

    Args:
      paths: model A and B directories (loaded again WITH their LM heads).
      contexts: the run's contexts of model A (the first ``--splice_contexts`` are used).
      contexts_b: model B's contexts when its tokenizer differs (default: ``contexts``).
      saes_a / saes_b: hookpoint -> SAE per side (the importance comparisons use these).
      comps: the run's comparison results (their ``pairs``, ``kind``, hookpoints).
      ceiling: ``(hookpoint, SAE)``, the ceiling's second SAE of model A.
      floor: ``(hookpoint, SAE)``, the floor's SAE (random-init B; decile curve).
      cache: the run's `StepCache` (spliced metrics and importances are saved as steps).
      every_sae: ``[(saes.Role, SAE)]``, every SAE the run trained or loaded (main,
        replicates, ceilings, floors, sweep conditions): each is spliced into its own model
        (default: ``saes_a``, ``saes_b``, ``ceiling`` and ``floor``).
      random_model: ``side -> LanguageModel``, the random-init base copy of model ``side``
        whose activations trained the floor SAEs of ``side~random``; it gets a random-init
        LM head (`models.splice.with_random_head`) so the floor SAE is spliced into its own
        (untrained) model.
    """
    from models import importance as imp_lib
    from models import splice

    out: dict[str, Any] = {}
    if not (settings.splice_eval or settings.importance):
        return out
    ctx = contexts[: settings.splice_contexts]
    ctx_of = {
        "a": ctx,
        "b": (contexts if contexts_b is None else contexts_b)[: settings.splice_contexts],
    }
    try:
        lms = {"a": splice.load_with_head(paths[0]), "b": splice.load_with_head(paths[1])}
    except checks.InputError as e:  # e.g. a base-model checkpoint: no head, no losses
        out["splice"] = [{"label": "models", "error": str(e)}]
        return out
    saes = [("a", hp, s, f"A {hp}") for hp, s in saes_a.items()]
    saes += [("b", hp, s, f"B {hp}") for hp, s in saes_b.items()]
    if ceiling is not None:
        saes.append(("a", ceiling[0], ceiling[1], f"A {ceiling[0]} (ceiling)"))
    if every_sae is None:
        spliced = list(saes)
        if floor is not None:
            side = next((c.labels.random_init for c in comps if c.kind == "floor"), None) or "b"
            spliced.append(
                (
                    f"{side}~random",
                    floor[0],
                    floor[1],
                    sae_label(f"{side}~random", floor[0], "floor"),
                )
            )
    else:
        spliced, seen = [], set()
        for role, s in every_sae:
            if id(s) in seen:
                continue
            seen.add(id(s))
            spliced.append(
                (
                    role.side,
                    role.hookpoint,
                    s,
                    sae_label(role.side, role.hookpoint, role.kind, role.replicate, role.condition),
                )
            )
    scfg = splice.SpliceConfig(batch_size=settings.lm_batch_size, seed=settings.seed)

    def key(label, sae):
        return (
            "".join(ch if ch.isalnum() else "_" for ch in label)
            + "."
            + splice.sae_fingerprint(sae)[:10]
        )

    def model_of(side: str):
        if side in lms:
            return lms[side]
        base = side.split("~")[0]
        if "~random" not in side or base not in lms:
            raise checks.InputError(f"SAE side {side!r}: no model to splice it into")
        if random_model is None:
            raise checks.InputError(
                f"SAE side {side!r}: the random-init model is not available here"
            )
        lms[side] = splice.with_random_head(random_model(base), seed=settings.seed)
        return lms[side]

    if settings.splice_eval:
        records = []
        for side, hp, s, label in spliced:
            k = key(label, s)

            def compute(side=side, hp=hp, s=s, k=k):
                m = splice.splice_metrics(
                    model_of(side),
                    s,
                    hp,
                    ctx_of[side.split("~")[0]],
                    scfg,
                    checkpoint_dir=run.path("checkpoints", "splice", k),
                    mesh=run.mesh,
                    progress=settings.progress,
                )
                return {kk: v for kk, v in m.to_dict().items()}

            try:
                rec = cache.get(f"splice.{k}", compute) if cache is not None else compute()
            except checks.InputError as e:
                records.append({"label": label, "side": side, "error": str(e)})
                continue
            records.append(
                {
                    "label": label,
                    "side": side,
                    **{kk: (v.item() if hasattr(v, "item") else v) for kk, v in rec.items()},
                }
            )
        out["splice"] = records
    if not settings.importance:
        return out
    icfg = imp_lib.ImportanceConfig(
        splice=scfg,
        n_classes=settings.importance_classes,
        n_ablate=16,
        ablate_contexts=min(32, len(ctx)),
        seed=settings.seed,
    )
    imps = {}
    for side, hp, s, label in saes:
        k = key(label, s)
        path = run.path("importance", f"{k}.npz")
        if not os.path.exists(path):
            imp_lib.feature_importance(
                lms[side],
                s,
                hp,
                ctx_of[side],
                icfg,
                checkpoint_dir=run.path("checkpoints", "importance", k),
                mesh=run.mesh,
                progress=settings.progress,
            ).save(path)
        imps[label] = imp_lib.FeatureImportance.load(path)
        # the third score, per feature beside the other two (causal models: the DLE needs a
        # final norm and a linear unembedding)
        dle_path = run.path("importance", f"{k}.dle.npz")
        if (
            not lms[side].is_encoder
            and np.isfinite(imps[label].norm_scale)
            and not os.path.exists(dle_path)
        ):
            imp_lib.direct_logit_effect(lms[side], s, imps[label].norm_scale).save(dle_path)
    cfg = ImportanceCompareConfig.from_settings(settings)
    by_kind = {c.kind: c for c in comps}
    cross = by_kind.get("cross")  # the kinds this run has (a floorless run has no "floor")
    section: dict[str, Any] = {
        "score": "attribution",
        "features": {
            label: {
                "ablation_check": imp.ablation_agreement(),
                "n_positions": imp.n_positions,
                "path": run.path("importance", f"{key(label, s)}.npz"),
                "dle_path": (
                    run.path("importance", f"{key(label, s)}.dle.npz")
                    if os.path.exists(run.path("importance", f"{key(label, s)}.dle.npz"))
                    else None
                ),
            }
            for (side, hp, s, label), imp in zip(saes, imps.values())
        },
    }
    if not cross or not cross.pairs.a:
        section["note"] = "no kept pairs in the main comparison"
        out["importance"] = section
        return out
    ha, hb = cross.labels.hookpoint_a, cross.labels.hookpoint_b
    ia, ib = imps[f"A {ha}"], imps[f"B {hb}"]
    annotate_feature_table(
        run.path("features", f"{cross.name}.json"), {"a": ia.attribution, "b": ib.attribution}
    )
    a, b = np.asarray(cross.pairs.a), np.asarray(cross.pairs.b)

    def score(side, sae, imp):
        if settings.importance_score == "dle":
            return imp_lib.direct_logit_effect(lms[side], sae, imp.norm_scale, top_n=1).norm
        return imp.score(settings.importance_score)

    score_a, score_b = score("a", saes_a[ha], ia), score("b", saes_b[hb], ib)
    section["score"] = settings.importance_score
    section["restricted"] = restricted_comparisons(
        saes_a[ha].W_dec, saes_b[hb].W_dec, a, b, score_a, score_b, cfg, run.mesh
    )
    curves = {
        "cross": decile_curve(saes_a[ha].W_dec, saes_b[hb].W_dec, a, b, score_a, cfg, run.mesh)
    }
    if "ceiling" in by_kind and ceiling is not None and by_kind["ceiling"].pairs.a:
        c = by_kind["ceiling"]
        curves["ceiling"] = decile_curve(
            saes_a[ha].W_dec,
            ceiling[1].W_dec,
            np.asarray(c.pairs.a),
            np.asarray(c.pairs.b),
            score_a,
            cfg,
            run.mesh,
        )
    if "floor" in by_kind and floor is not None and by_kind["floor"].pairs.a:
        f = by_kind["floor"]
        curves["floor"] = decile_curve(
            saes_a[ha].W_dec,
            floor[1].W_dec,
            np.asarray(f.pairs.a),
            np.asarray(f.pairs.b),
            score_a,
            cfg,
            run.mesh,
        )
    section["deciles"] = curves
    tok = lms["a"].tokenizer
    if np.array_equal(ia.class_ids, ib.class_ids):
        section["both_fire"] = both_fire_table(
            a,
            b,
            ia.attr_abs_by_class,
            ib.attr_abs_by_class,
            ia.class_ids,
            top_m=cfg.top_m,
            n_shuffles=cfg.n_shuffles,
            seed=cfg.seed,
            class_text=(lambda ids: tok.convert_ids_to_tokens(ids.tolist())) if tok else None,
        )
    for metric in cfg.metrics:
        plot_deciles(
            curves, metric, os.path.join(run.plots_dir, f"importance_deciles_{metric}.png")
        )
    out["importance"] = section
    return out

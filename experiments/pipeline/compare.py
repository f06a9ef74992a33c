"""One comparison of two SAEs: features -> pairing -> filters -> metrics with nulls.

Steps 1-4 of the universality pipeline for one (SAE A, SAE B) pair on the same tokens, each
step saved in the run's `StepCache` so that a killed run resumes after its last finished step:

1. `features.feature_pass`: feature statistics and activation correlations (streamed);
2. pairing: a rule of the pairing registry (`experiments.pipeline.pairing`: activation
   correlation, each feature's best partner both directions; decoder cosine, one-to-one);
3. `filters.apply_filters` (dead/constant, non-concept, best-pair one-to-one, threshold);
4. metrics on the paired decoder rows with random-pairing nulls (`engine.similarity`).

The result is a typed `results.ComparisonResult` (every number of the comparison).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from engine import checks, metrics_io, similarity
from engine import fingerprint as fp_lib
from experiments.pipeline import feature_pages, features, filters, pairing
from experiments.pipeline import results as res
from experiments.pipeline.stepcache import StepCache
from models import sae as sae_lib

DEFAULT_METRICS = ("svcca", "pwcca", "cka", "rsa_spearman", "procrustes", "mutual_knn")


class PipelineError(ValueError):
    """A condition the user must fix (one line, shown without a traceback)."""


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    pairing: str = "correlation"  # a name in `pairing.RULES`
    filters: filters.FilterConfig = filters.FilterConfig()
    metrics: tuple[str, ...] = DEFAULT_METRICS
    num_permutations: int = 1000
    top_n: int = 10
    min_pairs: int = 3
    seed: int = 0
    metric_options: tuple = ()  # ((metric, {option: value}), ...)
    memory_budget: int | None = None  # bytes for the feature pass (None: half the RAM)

    def __post_init__(self):
        pairing.get(self.pairing)  # an unknown rule fails here, before any work


def _pass_arrays(fp: features.FeaturePass) -> dict:
    out = {}
    for side, st in (("a", fp.stats_a), ("b", fp.stats_b)):
        for field in (
            "density",
            "mean",
            "std",
            "max",
            "top_values",
            "top_rows",
            "dead",
            "constant",
        ):
            out[f"{side}_{field}"] = np.asarray(getattr(st, field))
    m = fp.matches
    for field in (
        "a_match",
        "a_value",
        "b_match",
        "b_value",
        "a_dead",
        "a_constant",
        "b_dead",
        "b_constant",
    ):
        out[f"m_{field}"] = np.asarray(getattr(m, field))
    out["mean_best_a"] = float(m.mean_best_a)
    out["mean_best_b"] = float(m.mean_best_b)
    out["rows"] = int(m.rows)
    if fp.corr is not None:
        out["corr"] = np.asarray(fp.corr, np.float32)
    return out


# A comparison warns when the kept pairs join feature i with feature i more often than a
# random one-to-one pairing would: chance is taken as 1 / min(F_a, F_b) per pair (an upper
# bound: a feature's random partner has the same index with probability <= 1 / F_b), and the
# count is tested with the binomial tail P(X >= count) < SAME_INDEX_ALPHA. Far above chance
# means the two SAEs share initialisation or data order (a shared seed made 45 % of the kept
# pairs i with i on a real model), not that the models share features.
SAME_INDEX_ALPHA = 1e-3


def same_index_report(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> res.SameIndex:
    """Fraction of pairs ``(a_i, b_i)`` with ``a_i == b_i`` against chance (see above)."""
    from scipy import stats

    a = np.asarray(a)
    b = np.asarray(b)
    n = int(a.size)
    count = int(np.sum(a == b))
    chance = 1.0 / max(1, min(int(n_a), int(n_b)))
    p = float(stats.binom.sf(count - 1, n, chance)) if n else 1.0
    return res.SameIndex(
        count=count,
        pairs=n,
        fraction=count / n if n else 0.0,
        chance_fraction=chance,
        p_value=p,
        above_chance=bool(n and count >= 2 and p < SAME_INDEX_ALPHA),
    )


def top_tokens(
    top_rows: np.ndarray, token_text: Callable[[np.ndarray], Sequence[str]], n: int
) -> list[list[str]]:
    """Token strings of each feature's top-activating rows (rows < 0 are empty slots)."""
    rows = top_rows[:, :n]
    flat = token_text(np.maximum(rows.reshape(-1), 0))
    out = []
    for f in range(rows.shape[0]):
        out.append([flat[f * rows.shape[1] + j] for j in range(rows.shape[1]) if rows[f, j] >= 0])
    return out


def truth_scores(
    pairs: filters.Pairs, sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, truth: dict
) -> res.TruthScores:
    """Toy ground truth: which kept pairs join the SAE features of the same true feature.

    An SAE feature is assigned the true feature whose direction has the largest cosine with
    its decoder row (when that cosine >= ``truth["min_cos"]``). A pair is correct when both
    sides are assigned and ``true_match[assigned_a] == assigned_b``.
    """

    def assign(w_dec, true_dirs):
        w = np.asarray(w_dec, np.float64)
        t = np.asarray(true_dirs, np.float64)
        cos = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (
            t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        ).T
        best = cos.argmax(1)
        return np.where(cos.max(1) >= truth["min_cos"], best, -1)

    ta = assign(sae_a.W_dec, truth["features_a"])
    tb = assign(sae_b.W_dec, truth["features_b"])
    true_match = np.asarray(truth["true_match"])
    pa, pb = ta[pairs.a], tb[pairs.b]
    correct = (pa >= 0) & (pb >= 0) & (true_match[np.maximum(pa, 0)] == pb)
    recoverable = np.asarray(truth["recoverable"], bool)
    found = set(pa[correct].tolist())
    n_true = int(recoverable.sum())
    return res.TruthScores(
        n_true_pairs=n_true,
        n_kept_pairs_correct=int(correct.sum()),
        fraction_kept_pairs_correct=float(correct.mean()) if len(pairs) else 0.0,
        fraction_true_pairs_recovered=(
            len(found & set(np.flatnonzero(recoverable))) / n_true if n_true else 0.0
        ),
    )


def _write_feature_table(
    path: str, step: dict, tokens_a, tokens_b, context_text, extra: dict | None = None
) -> dict:
    """Writes and returns ``{"a": [row per feature], "b": [...]}``; ``extra[side][f]`` dicts
    are merged into the rows."""

    def side(prefix, tokens):
        rows = []
        for f in range(len(tokens)):
            top = int(step[f"{prefix}_top_rows"][f, 0])
            rows.append(
                {
                    "feature": f,
                    "density": float(step[f"{prefix}_density"][f]),
                    "mean": float(step[f"{prefix}_mean"][f]),
                    "max": float(step[f"{prefix}_max"][f]),
                    "dead": bool(step[f"{prefix}_dead"][f]),
                    "top_tokens": tokens[f],
                    "top_context": (context_text(top) if context_text and top >= 0 else None),
                    **((extra or {}).get(prefix) or [{}] * len(tokens))[f],
                }
            )
        return rows

    table = {"a": side("a", tokens_a), "b": side("b", tokens_b)}
    metrics_io.write_json(path, table)  # process 0 alone writes; parents made there
    return table


def _write_pages(
    features_dir: str,
    name: str,
    step: dict,
    stream_factory,
    sae_a,
    sae_b,
    cand: filters.Pairs,
    dropped_by: np.ndarray,
    invalid: dict,
    cfg,
    tokens: dict,
    context_text,
    pages: feature_pages.PageSource,
    cache: StepCache,
    key: str,
    progress: bool,
    meta: dict,
) -> None:
    """Feature table ``features/<name>.json`` and the per-feature export
    ``features/<name>/<side>/batch-<k>.json`` (`feature_pages`)."""
    depends = _fingerprint(
        key,
        pages.before,
        pages.after,
        pages.bins,
        pages.n_logits,
        pages.segments is None,
        pages.unembed_a is None,
        pages.unembed_b is None,
    )
    arrays = cache.get(
        f"{name}.pages.{depends}",
        lambda: feature_pages.compute(
            stream_factory(), sae_a, sae_b, step, pages, progress=progress
        ),
    )
    tables = {}
    for side in "ab":
        nc = (
            filters.non_concept_features(tokens[side], cfg.filters)
            if cfg.filters.non_concept
            else None
        )
        tables[side] = feature_pages.drop_reasons(
            len(tokens[side]),
            side,
            cand,
            dropped_by,
            invalid[side],
            step[f"{side}_dead"],
            nc,
            cfg.filters.threshold,
        )
        for f, row in enumerate(tables[side]):
            row["non_concept"] = bool(nc[f]) if nc is not None else False
            row["constant"] = bool(step[f"{side}_constant"][f])
    full = _write_feature_table(
        os.path.join(features_dir, f"{name}.json"),
        step,
        tokens["a"],
        tokens["b"],
        context_text,
        tables,
    )
    for side in "ab":
        feature_pages.write_export(
            os.path.join(features_dir, name),
            name,
            side,
            feature_pages.export_features(side, step, arrays, pages, full[side]),
            {**meta, "layer": meta.get(f"hookpoint_{side}")},
        )


def _decoder_cosines(
    sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, pairs: filters.Pairs
) -> tuple[float, ...] | None:
    """Decoder cosines of the kept pairs when both SAEs have the same width, else None.

    Only meaningful when both SAEs read the same activation space (ceiling, decoder pairing):
    across two models the residual bases are unrelated.
    """
    if sae_a.config.d_in != sae_b.config.d_in:
        return None
    wa = np.asarray(sae_a.W_dec, np.float64)[pairs.a]
    wb = np.asarray(sae_b.W_dec, np.float64)[pairs.b]
    cos = np.sum(wa * wb, 1) / np.maximum(
        np.linalg.norm(wa, axis=1) * np.linalg.norm(wb, axis=1), 1e-12
    )
    return tuple(cos.tolist())


def _fingerprint(*parts) -> str:
    """Short hash of what a cached step depends on (reruns with other inputs recompute)."""
    return fp_lib.digest(*parts, size=8)


def run_comparison(
    name: str,
    stream_factory: Callable[[], object],
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    token_text: Callable[[np.ndarray], Sequence[str]],
    mesh,
    cfg: CompareConfig,
    cache: StepCache,
    *,
    ckpt_root: str,
    truth: dict | None = None,
    progress: bool = False,
    labels: res.Labels | None = None,
    context_text: Callable[[int], str] | None = None,
    features_dir: str | None = None,
    stage: Callable[[str], None] | None = None,
    pages: feature_pages.PageSource | None = None,
    data_key: str = "",
) -> res.ComparisonResult:
    """Runs steps 1-4 for one pair of SAEs and returns its typed result.

    With ``features_dir``, every feature's statistics (density, mean, max, top-activating
    tokens, and the context of its top token when ``context_text`` is given) are written to
    ``features_dir/<name>.json`` for inspection, with each feature's pair status and drop
    reason, and the per-feature pages (top contexts with per-token activations, activation
    histograms, promoted tokens when ``pages`` has unembeddings) are exported under
    ``features_dir/<name>/<side>/`` (`feature_pages`; default ``pages``: single-token
    contexts, as for independent toy rows). ``stage(label)`` is called as each long part
    starts (the runner prints ``[k/N] label ...`` lines). ``data_key``: a digest of the rows
    the stream yields (`engine.fingerprint.digest`), part of the cached steps' keys with every
    weight of both SAEs, so a rerun on other activations recomputes.
    """
    stage = stage or (lambda label: None)

    def labelled_stream():
        stream = stream_factory()
        stream.name = f"{name}: feature pass"  # the progress bar's label
        return stream

    stage(f"{name}: feature pass")
    key = _fingerprint(sae_a.fingerprint(), sae_b.fingerprint(), cfg.top_n, data_key)
    step = cache.get(
        f"{name}.features.{key}",
        lambda: _pass_arrays(
            features.feature_pass(
                labelled_stream(),
                sae_a,
                sae_b,
                mesh,
                top_n=cfg.top_n,
                checkpoint_dir=features.checkpoint_path(ckpt_root, f"{name}.{key}"),
                progress=progress,
                memory_budget=cfg.memory_budget,
            )
        ),
    )
    cand = pairing.get(cfg.pairing).propose(step, sae_a, sae_b, mesh)
    invalid_a = step["a_dead"] | step["a_constant"] | step["m_a_dead"] | step["m_a_constant"]
    invalid_b = step["b_dead"] | step["b_constant"] | step["m_b_dead"] | step["m_b_constant"]
    tokens_a = top_tokens(step["a_top_rows"], token_text, cfg.filters.top_tokens)
    tokens_b = top_tokens(step["b_top_rows"], token_text, cfg.filters.top_tokens)
    pairs, counts, dropped_by = filters.trace_filters(
        cand,
        cfg.filters,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    labels = labels or res.Labels(kind="comparison", label=name)
    if features_dir is not None:
        _write_pages(
            features_dir,
            name,
            step,
            stream_factory,
            sae_a,
            sae_b,
            cand,
            dropped_by,
            {"a": invalid_a, "b": invalid_b},
            cfg,
            {"a": tokens_a, "b": tokens_b},
            context_text,
            pages or feature_pages.PageSource(token_text=token_text),
            cache,
            key,
            progress,
            {k: v for k, v in labels.to_json().items() if isinstance(v, str)},
        )
    same_index = same_index_report(pairs.a, pairs.b, sae_a.config.d_sae, sae_b.config.d_sae)
    if same_index.above_chance:
        r = same_index
        logging.warning(
            "%s: %d of %d kept pairs (%.0f%%) join feature i with feature i, far "
            "above chance (%.2g%%, p=%.2g): do the two SAEs share a seed or data "
            "order?",
            name,
            r.count,
            r.pairs,
            100 * r.fraction,
            100 * r.chance_fraction,
            r.p_value,
        )

    def same_top(a: int, b: int) -> bool:
        return bool(tokens_a[a][:1] and tokens_a[a][:1] == tokens_b[b][:1])

    result = res.ComparisonResult(
        name=name,
        labels=labels,
        n_features=(int(sae_a.config.d_sae), int(sae_b.config.d_sae)),
        tokens=int(step["rows"]),
        pairing=res.Pairing(
            method=cfg.pairing,
            mean_best_corr_ab=float(step["mean_best_a"]),
            mean_best_corr_ba=float(step["mean_best_b"]),
            best_corr_ab=tuple(step["m_a_value"][step["m_a_match"] >= 0].tolist()),
            dead_a=int(step["a_dead"].sum()),
            dead_b=int(step["b_dead"].sum()),
            invalid_a=int(invalid_a.sum()),
            invalid_b=int(invalid_b.sum()),
        ),
        filters=res.FilterFunnel(tuple((k, int(v)) for k, v in counts.items())),
        n_pairs=len(pairs),
        pairs=res.KeptPairs(
            tuple(pairs.a.tolist()),
            tuple(pairs.b.tolist()),
            tuple(pairs.value.tolist()),
            _decoder_cosines(sae_a, sae_b, pairs),
        ),
        top_pairs=tuple(
            res.TopPair(
                int(a), int(b), float(v), tuple(tokens_a[a]), tuple(tokens_b[b]), same_top(a, b)
            )
            for a, b, v in sorted(zip(pairs.a, pairs.b, pairs.value), key=lambda t: -t[2])[:20]
        ),
        metrics={},
        same_index=same_index,
        fraction_same_top_token=(
            float(np.mean([same_top(a, b) for a, b in zip(pairs.a, pairs.b)]))
            if len(pairs)
            else None
        ),
        truth=None if truth is None else truth_scores(pairs, sae_a, sae_b, truth),
    )

    def score(kept: filters.Pairs, key: str) -> dict:
        x = np.asarray(sae_a.W_dec, np.float64)[kept.a]
        y = np.asarray(sae_b.W_dec, np.float64)[kept.b]

        def compute():
            # Metric by metric: one that does not apply to these pairs (e.g. CCA with fewer
            # pairs than dimensions) is reported as skipped, not fatal to the others.
            out = {"metrics": {}, "skipped": {}, "d": [int(x.shape[1]), int(y.shape[1])]}
            for metric in cfg.metrics:
                try:
                    out["metrics"].update(
                        similarity.evaluate(
                            x,
                            y,
                            (metric,),
                            num_permutations=cfg.num_permutations,
                            seed=cfg.seed,
                            mesh=mesh,
                            options={
                                k: v for k, v in dict(cfg.metric_options).items() if k == metric
                            },
                            progress=progress,
                        )["metrics"]
                    )
                except checks.InputError as e:
                    out["skipped"][metric] = str(e)
            return out

        depends = _fingerprint(
            kept.a, kept.b, cfg.metrics, cfg.metric_options, cfg.num_permutations, cfg.seed
        )
        return cache.get(f"{key}.{depends}", compute)

    stage(f"{name}: metrics on {len(pairs)} pairs")
    if len(pairs) >= cfg.min_pairs:
        scored = score(pairs, f"{name}.metrics")
        return dataclasses.replace(
            result,
            metrics=res.metrics_from_json(scored["metrics"], f"{name}.metrics"),
            metrics_skipped=dict(scored["skipped"]),
            d=tuple(int(v) for v in scored["d"]),
        )
    result = dataclasses.replace(
        result,
        note=(
            f"{len(pairs)} pair(s) survived the filters, fewer than the "
            f"{cfg.min_pairs} needed for the metrics"
        ),
    )
    # Show the chance-level geometry anyway: the same pairs without the threshold step.
    no_threshold = dataclasses.replace(cfg.filters, threshold=None)
    loose, _ = filters.apply_filters(
        cand,
        no_threshold,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    if len(loose) >= cfg.min_pairs:
        scored = score(loose, f"{name}.metrics_before_threshold")
        result = dataclasses.replace(
            result,
            metrics_before_threshold=res.metrics_from_json(
                scored["metrics"], f"{name}.metrics_before_threshold"
            ),
            n_pairs_before_threshold=len(loose),
        )
    return result

"""The one registry of representation-similarity metrics, and scores with nulls in one call.

``METRICS[name](X, Y, weights=None, **options) -> float`` for every metric of paired rows
X [n, d1], Y [n, d2] (rows = paired SAE features, decoder directions or tokens). `evaluate`
computes a chosen set with their random-pairing nulls (batched, engine/nulls.py) and optional
bootstrap intervals, and returns a JSON-ready dict. Always read a score beside its null: the
chance level of SVCCA/CCA rises as n shrinks relative to the components kept
(docs/references.md, "Effects measured with independent checks"), so rank comparisons by
``excess`` (score - null mean) or z, never by the raw score.

| name | definition | weights | batched null |
| --- | --- | --- | --- |
| cca | mean canonical correlation, rank-aware (engine/cca.py) | frequency | unweighted |
| svcca | Raghu et al. 2017, 99 % variance per side | frequency | unweighted |
| pwcca | Morcos et al. 2018 | frequency | unweighted |
| cka | linear CKA, Kornblith et al. 2019 (engine/cka.py) | frequency | unweighted |
| cka_debiased | unbiased-HSIC linear CKA | frequency | unweighted |
| cka_minibatch | Nguyen et al. 2021 (batch_size option) | frequency | loop only |
| procrustes | ``||X^T Y||_*``, centred, unit norm (engine/geometry.py) | frequency | unweighted |
| rsa_spearman | Spearman of row-correlation upper triangles (engine/rsa.py) | none | yes |
| rsa_pearson | Pearson of the same | pair ``w_i w_j`` | unweighted |
| mutual_knn | Huh et al. 2024, k option | query rows | yes (weighted too) |

With non-uniform weights where the batched null does not apply, the null runs as a Python loop
over the same permutations (`engine.nulls.loop_null`), with the weights staying on X's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engine import cca as cca_lib
from engine import checks, geometry, nulls, paired_stats, rsa
from engine import cka as cka_lib

DEFAULT_METRICS = (
    "svcca",
    "pwcca",
    "cka",
    "cka_debiased",
    "procrustes",
    "rsa_spearman",
    "mutual_knn",
)

Prepared = tuple[Any, Callable[[], "nulls.NullKernel | None"]]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
      name: registry key.
      description: one line.
      prepare: ``prepare(x, y, weights, mesh, **options) -> (result, make_kernel)``; the result
        has ``.score`` and ``.to_dict()``; ``make_kernel()`` returns the `NullKernel` for the
        batched null or None when only the loop applies (e.g. with weights).
      weights: "frequency", "pair", "query", or "none" (what row weights mean, if accepted).
    """

    name: str
    description: str
    prepare: Callable[..., Prepared]
    weights: str = "frequency"

    def result(self, x, y, weights=None, *, mesh=None, **options):
        """The detailed result object (components, n/d, ...)."""
        return self.prepare(x, y, weights, mesh, **options)[0]

    def __call__(self, x, y, weights=None, *, mesh=None, **options) -> float:
        return float(self.result(x, y, weights, mesh=mesh, **options).score)


def _uniform(weights) -> bool:
    if weights is None:
        return True
    w = np.asarray(weights, np.float64)
    return bool(np.all(w == w[0]))


def _moment_metric(method: str):
    def prepare(x, y, weights, mesh, **options):
        stats = paired_stats.pair_stats(x, y, weights, mesh=mesh, name=method)
        result = cca_lib.from_stats(method, stats, **options)

        def make_kernel():
            if not _uniform(weights):
                return None
            kw = dict(options)
            if method == "pwcca":
                kw["weight_side"] = result.weight_side
            return cca_lib.null_kernel(method, x, y, stats, result, **kw)

        return result, make_kernel

    return prepare


def _cka_prepare(debiased: bool):
    def prepare(x, y, weights, mesh):
        stats = paired_stats.pair_stats(
            x, y, weights, mesh=mesh, name="cka", min_rows=4 if debiased else 2
        )
        result = (
            cka_lib.debiased_cka_from_stats(stats)
            if debiased
            else cka_lib.linear_cka_from_stats(stats)
        )
        return (
            result,
            lambda: (
                cka_lib.null_kernel(x, y, stats, debiased=debiased) if _uniform(weights) else None
            ),
        )

    return prepare


def _cka_minibatch_prepare(x, y, weights, mesh, batch_size: int = 256):
    return cka_lib.minibatch_cka(x, y, weights, batch_size=batch_size, mesh=mesh), lambda: None


def _procrustes_prepare(x, y, weights, mesh):
    stats = paired_stats.pair_stats(x, y, weights, mesh=mesh, name="procrustes")
    result = geometry.procrustes_from_stats(stats)
    return (
        result,
        lambda: geometry.procrustes_null_kernel(x, y, stats) if _uniform(weights) else None,
    )


def _rsa_prepare(method: str):
    def prepare(x, y, weights, mesh, **options):
        result = rsa.rsa(x, y, weights, method=method, mesh=mesh, **options)
        kernel_opts = {
            k: v for k, v in options.items() if k in ("max_exact_n", "num_samples", "seed")
        }
        return (
            result,
            lambda: (
                rsa.null_kernel(x, y, result, mesh=mesh, **kernel_opts)
                if _uniform(weights)
                else None
            ),
        )

    return prepare


def _mutual_knn_prepare(
    x, y, weights, mesh, k: int = 10, normalize: bool = False, tile: int = 1024
):
    result = geometry.mutual_knn(x, y, weights, k=k, mesh=mesh, normalize=normalize, tile=tile)
    return result, lambda: geometry.mutual_knn_null_kernel(
        x, y, weights, k=k, mesh=mesh, normalize=normalize, tile=tile
    )


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "cca", "mean canonical correlation (rank-aware; epsilon = ridge)", _moment_metric("cca")
        ),
        Metric(
            "svcca",
            "SVCCA: PCA to `threshold` variance per side, then mean CCA",
            _moment_metric("svcca"),
        ),
        Metric(
            "pwcca",
            "PWCCA (Morcos et al. 2018), weights from `weight_side`",
            _moment_metric("pwcca"),
        ),
        Metric("cka", "linear CKA (biased HSIC)", _cka_prepare(False)),
        Metric("cka_debiased", "linear CKA with the unbiased HSIC", _cka_prepare(True)),
        Metric("cka_minibatch", "minibatch CKA (Nguyen et al. 2021)", _cka_minibatch_prepare),
        Metric(
            "procrustes",
            "orthogonal Procrustes similarity ||X^T Y||_* (unit-norm, centred)",
            _procrustes_prepare,
        ),
        Metric(
            "rsa_spearman",
            "Spearman of row-correlation upper triangles",
            _rsa_prepare("spearman"),
            weights="none",
        ),
        Metric(
            "rsa_pearson",
            "Pearson of row-correlation upper triangles",
            _rsa_prepare("pearson"),
            weights="pair",
        ),
        Metric(
            "mutual_knn",
            "mutual k-NN overlap (Huh et al. 2024)",
            _mutual_knn_prepare,
            weights="query",
        ),
    )
}


def register(metric: Metric) -> Metric:
    """Adds ``metric`` to `METRICS` under its name (a name already taken is refused).

    A new metric is one file (its computation, returning an object with ``.score`` and
    ``.to_dict()``) plus one registration: ``register(Metric(name, description, prepare))``
    with ``prepare(x, y, weights, mesh, **options) -> (result, make_kernel)``, where
    ``make_kernel`` may return None (the null then runs as a loop over permutations). Every
    entry point's ``--metrics`` choices and the pipeline's results read this registry.
    """
    if metric.name in METRICS:
        raise checks.InputError(f"similarity metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def get(name: str) -> Metric:
    """The registered metric called ``name`` (`InputError` listing the names otherwise)."""
    if name not in METRICS:
        raise checks.InputError(
            f"unknown similarity metric {name!r}; expected one of {sorted(METRICS)}"
        )
    return METRICS[name]


def score(name: str, x, y, weights=None, **options) -> float:
    """``METRICS[name](x, y, weights, **options)``."""
    return get(name)(x, y, weights, **options)


def null_for(
    name: str,
    x,
    y,
    weights=None,
    *,
    num_permutations: int = 1000,
    seed: int = 0,
    mesh=None,
    progress: bool = False,
    **options,
) -> dict:
    """Score, random-pairing null and its summary for one metric (see `evaluate`)."""
    metric = get(name)
    result, make_kernel = metric.prepare(x, y, weights, mesh, **options)
    entry = {"metric": name, **result.to_dict(), "score": float(result.score)}
    entry.update(
        _null_entry(
            metric,
            result,
            make_kernel,
            x,
            y,
            weights,
            mesh,
            options,
            num_permutations,
            seed,
            progress,
        )
    )
    return entry


def _null_entry(
    metric,
    result,
    make_kernel,
    x,
    y,
    weights,
    mesh,
    options,
    num_permutations,
    seed,
    progress,
    null_size: int | None = None,
) -> dict:
    kernel = make_kernel()
    if kernel is not None and null_size and kernel.pad is not None:
        observed, null = nulls.padded_null(
            kernel, max(int(null_size), kernel.n), num_permutations, seed=seed, mesh=mesh
        )
        how = "batched-padded"
    elif kernel is not None:
        null = nulls.permutation_null(
            kernel, num_permutations, seed=seed, mesh=mesh, progress=progress
        )
        observed = kernel.observed()
        how = "batched"
    else:
        fn = lambda a, b, w: metric(a, b, w, mesh=mesh, **options)  # noqa: E731
        null = nulls.loop_null(
            fn, x, y, weights, num_permutations=num_permutations, seed=seed, progress=progress
        )
        observed = float(result.score)
        how = "loop"
    summary = nulls.summarize(observed, null)
    summary["null_method"] = how
    summary["null"] = [float(v) for v in null]
    return summary


def evaluate(
    x,
    y,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    weights=None,
    num_permutations: int = 1000,
    seed: int = 0,
    mesh=None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    options: dict | None = None,
    progress: bool = False,
    null_size: int | None = None,
) -> dict:
    """Scores with nulls (and optional bootstrap CIs) for a set of metrics, JSON-ready.

    Args:
      x, y: paired rows ``[n, d1]``, ``[n, d2]``.
      metrics: registry names.
      weights: optional row weights (see the table in the module docstring).
      num_permutations: R for the random-pairing null (0: no null).
      seed: permutation seed (the same permutations for every metric).
      mesh: device mesh (default one device).
      bootstrap: number of bootstrap resamples (0: none).
      options: per-metric keyword options, e.g. ``{"svcca": {"threshold": 0.95}}``.
      null_size: pad the batched null kernels that support it to this many rows
        (`engine.nulls.padded_null`: one compile for every row count up to it; its own
        size-independent permutations, so values differ from the unpadded default null).

    Returns:
      ``{"n": rows, "d": [d1, d2], "num_permutations": R, "seed": seed, "metrics": {name: {
      "score", "null_mean", "null_std", "null_quantiles", "null" (the R values), "p", "z",
      "excess", "components", "n", "rows", "n_over_d", ... , "bootstrap": {...}}}}``.
      ``observed`` is the statistic recomputed by the null's own code path (what ``p``
      compares against; it equals ``score`` up to float32 rounding).
    """
    x, y, weights = paired_stats.check_pair(x, y, weights, name="similarity")
    options = dict(options or {})
    for key in options:
        get(key)
    out: dict[str, Any] = {
        "n": int(x.shape[0]),
        "d": [int(x.shape[1]), int(y.shape[1])],
        "num_permutations": int(num_permutations),
        "seed": int(seed),
        "metrics": {},
    }
    for name in metrics:
        metric = get(name)
        opts = dict(options.get(name, {}))
        result, make_kernel = metric.prepare(x, y, weights, mesh, **opts)
        entry: dict[str, Any] = {
            "metric": name,
            "components": None,
            **result.to_dict(),
            "score": float(result.score),
        }
        if num_permutations:
            entry.update(
                _null_entry(
                    metric,
                    result,
                    make_kernel,
                    x,
                    y,
                    weights,
                    mesh,
                    opts,
                    num_permutations,
                    seed,
                    progress,
                    null_size,
                )
            )
        if bootstrap:
            fn = lambda a, b, w, m=metric, o=opts: m(a, b, w, mesh=mesh, **o)  # noqa: E731
            entry["bootstrap"] = nulls.bootstrap(
                fn,
                x,
                y,
                weights,
                num_samples=bootstrap,
                seed=seed,
                confidence=confidence,
                by_weights=metric.weights == "frequency",
                progress=progress,
            )
        out["metrics"][name] = entry
    return out

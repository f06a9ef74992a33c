"""Typed results of the universality pipeline: every number a comparison or a cell produces.

`compare.run_comparison` returns a `ComparisonResult`; `references.summarise` turns the
comparisons into `CellResult`s (reference points: floor -> cross -> ceiling); the runner
writes a `RunResults` to ``results.json`` with ``to_json`` and every report (terminal table,
plots, HTML page) reads the typed fields. ``RunResults.from_json`` / ``load`` read a
``results.json`` back: a required key that is missing (renamed, or written by another
version) or a key no field knows raises `ResultsError`, one line naming the key and where it
is, instead of a report printing blanks.

The on-disk layout is the one the pipeline has always written: a comparison is a flat object
(``name``, its labels ``kind``, ``label``, ``cell``, ``hookpoint_a``..., then ``n_features``,
``tokens``, ``pairing``, ``filters``, ``n_pairs``, ``pairs``, ``top_pairs``, ``metrics``,
``same_index``...); optional parts are left out when absent. A metric entry keeps the keys
`engine.similarity.evaluate` writes: the typed ones below plus metric-specific extras
(``details``: e.g. CCA's ``coefficients_head``, RSA's ``pairs``), written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from engine import metrics_io


class ResultsError(ValueError):
    """A results.json (or part of it) that does not have the expected keys (one line)."""


def _obj(d: Any, where: str) -> Mapping:
    if not isinstance(d, Mapping):
        raise ResultsError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def _req(d: Mapping, key: str, where: str) -> Any:
    if key not in d:
        raise ResultsError(
            f"{where}: missing key {key!r} (renamed, or written by another "
            f"version?); found {sorted(d)[:12]}"
        )
    return d[key]


def _known(d: Mapping, keys: Iterable[str], where: str) -> None:
    """Refuses keys no field knows (a renamed optional key would otherwise read as absent)."""
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ResultsError(
            f"{where}: unknown key {unknown[0]!r} (renamed?); expected keys among {sorted(keys)}"
        )


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _num(x: Any, where: str) -> float:
    # `engine.metrics_io.write_json` writes non-finite floats as "nan" / "inf" / "-inf".
    if isinstance(x, str) and x in _NON_FINITE:
        return _NON_FINITE[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ResultsError(f"{where}: expected a number, got {x!r}")
    return float(x)


def _opt_num(x: Any, where: str) -> float | None:
    return None if x is None else _num(x, where)


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# -- one metric of one comparison -------------------------------------------------------------

_METRIC_REQUIRED = ("score", "null_mean", "null_std", "p", "z", "excess", "components")
_METRIC_OPTIONAL = ("informative", "n_over_d", "null")


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """A similarity score beside its random-pairing null (`engine.similarity.evaluate`).

    ``z`` is None when the null has no spread; ``components`` the dimensions kept per side
    (CCA family) or None; ``informative`` False when too few pairs for those dimensions (the
    score is then at its chance level whatever the data); ``null`` the null values;
    ``details`` the metric-specific rest of the entry, kept as written.
    """

    score: float
    null_mean: float
    null_std: float
    p: float
    z: float | None
    excess: float
    components: tuple[int, ...] | None = None
    informative: bool = True
    n_over_d: float | None = None
    null: tuple[float, ...] | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Any, where: str) -> MetricResult:
        d = _obj(d, where)
        comps = _req(d, "components", where)
        null = d.get("null")  # optional by layout: absent when no null was drawn
        informative = d.get("informative", True)  # written by the CCA family only
        if not isinstance(informative, bool):
            raise ResultsError(f"{where}.informative: expected true/false, got {informative!r}")
        return cls(
            score=_num(_req(d, "score", where), f"{where}.score"),
            null_mean=_num(_req(d, "null_mean", where), f"{where}.null_mean"),
            null_std=_num(_req(d, "null_std", where), f"{where}.null_std"),
            p=_num(_req(d, "p", where), f"{where}.p"),
            z=_opt_num(_req(d, "z", where), f"{where}.z"),
            excess=_num(_req(d, "excess", where), f"{where}.excess"),
            components=None if comps is None else tuple(int(c) for c in comps),
            informative=informative,
            n_over_d=_opt_num(d.get("n_over_d"), f"{where}.n_over_d"),
            null=None if null is None else tuple(float(v) for v in null),
            details={k: v for k, v in d.items() if k not in _METRIC_REQUIRED + _METRIC_OPTIONAL},
        )

    def to_json(self) -> dict:
        out = dict(self.details)
        out.update(
            {
                "score": self.score,
                "null_mean": self.null_mean,
                "null_std": self.null_std,
                "p": self.p,
                "z": self.z,
                "excess": self.excess,
                "components": None if self.components is None else list(self.components),
            }
        )
        out["informative"] = self.informative
        if self.n_over_d is not None:
            out["n_over_d"] = self.n_over_d
        if self.null is not None:
            out["null"] = list(self.null)
        return out


def metrics_from_json(d: Any, where: str) -> dict[str, MetricResult]:
    return {
        name: MetricResult.from_json(m, f"{where}.{name}") for name, m in _obj(d, where).items()
    }


def _metrics_json(metrics: Mapping[str, MetricResult]) -> dict:
    return {name: m.to_json() for name, m in metrics.items()}


# -- parts of a comparison --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pairing:
    """How candidate pairs were found, and the activation-correlation facts behind them."""

    method: str
    mean_best_corr_ab: float
    mean_best_corr_ba: float
    best_corr_ab: tuple[float, ...]
    dead_a: int
    dead_b: int
    invalid_a: int
    invalid_b: int

    KEYS = (
        "method",
        "mean_best_corr_ab",
        "mean_best_corr_ba",
        "best_corr_ab",
        "dead_a",
        "dead_b",
        "invalid_a",
        "invalid_b",
    )

    @classmethod
    def from_json(cls, d: Any, where: str) -> Pairing:
        d = _obj(d, where)
        _known(d, cls.KEYS, where)
        v = {k: _req(d, k, where) for k in cls.KEYS}
        return cls(
            str(v["method"]),
            _num(v["mean_best_corr_ab"], where),
            _num(v["mean_best_corr_ba"], where),
            tuple(float(x) for x in v["best_corr_ab"]),
            int(v["dead_a"]),
            int(v["dead_b"]),
            int(v["invalid_a"]),
            int(v["invalid_b"]),
        )

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in self.KEYS}, "best_corr_ab": list(self.best_corr_ab)}


@dataclasses.dataclass(frozen=True)
class FilterFunnel:
    """Pairs left after each filter step, in order: ``(("candidates", n), ("after_x", m)...)``."""

    steps: tuple[tuple[str, int], ...]

    @classmethod
    def from_json(cls, d: Any, where: str) -> FilterFunnel:
        d = _obj(d, where)
        _req(d, "candidates", where)
        bad = [k for k in d if k != "candidates" and not k.startswith("after_")]
        if bad:
            raise ResultsError(
                f"{where}: unknown filter step {bad[0]!r}; expected "
                "'candidates' then 'after_<step>' keys"
            )
        return cls(tuple((str(k), int(v)) for k, v in d.items()))

    @property
    def candidates(self) -> int:
        return self.steps[0][1]

    def to_json(self) -> dict:
        return dict(self.steps)


@dataclasses.dataclass(frozen=True)
class KeptPairs:
    """The pairs that survived the filters: feature ``a[i]`` of A with ``b[i]`` of B, the
    pairing value, and the decoder cosines when both SAEs read the same space."""

    a: tuple[int, ...]
    b: tuple[int, ...]
    value: tuple[float, ...]
    decoder_cos: tuple[float, ...] | None = None

    @classmethod
    def from_json(cls, d: Any, where: str) -> KeptPairs:
        d = _obj(d, where)
        _known(d, ("a", "b", "value", "decoder_cos"), where)
        cos = d.get("decoder_cos")
        return cls(
            tuple(int(x) for x in _req(d, "a", where)),
            tuple(int(x) for x in _req(d, "b", where)),
            tuple(float(x) for x in _req(d, "value", where)),
            None if cos is None else tuple(float(x) for x in cos),
        )

    def to_json(self) -> dict:
        return _drop_none(
            {
                "a": list(self.a),
                "b": list(self.b),
                "value": list(self.value),
                "decoder_cos": None if self.decoder_cos is None else list(self.decoder_cos),
            }
        )


@dataclasses.dataclass(frozen=True)
class TopPair:
    a: int
    b: int
    value: float
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    same_top_token: bool

    KEYS = ("a", "b", "value", "tokens_a", "tokens_b", "same_top_token")

    @classmethod
    def from_json(cls, d: Any, where: str) -> TopPair:
        d = _obj(d, where)
        _known(d, cls.KEYS, where)
        v = {k: _req(d, k, where) for k in cls.KEYS}
        return cls(
            int(v["a"]),
            int(v["b"]),
            _num(v["value"], where),
            tuple(v["tokens_a"]),
            tuple(v["tokens_b"]),
            bool(v["same_top_token"]),
        )

    def to_json(self) -> dict:
        return {
            **{k: getattr(self, k) for k in self.KEYS},
            "tokens_a": list(self.tokens_a),
            "tokens_b": list(self.tokens_b),
        }


@dataclasses.dataclass(frozen=True)
class SameIndex:
    """Kept pairs joining feature i with feature i, against chance (`compare.same_index_report`)."""

    count: int
    pairs: int
    fraction: float
    chance_fraction: float
    p_value: float
    above_chance: bool

    KEYS = ("count", "pairs", "fraction", "chance_fraction", "p_value", "above_chance")

    @classmethod
    def from_json(cls, d: Any, where: str) -> SameIndex:
        d = _obj(d, where)
        _known(d, cls.KEYS, where)
        v = {k: _req(d, k, where) for k in cls.KEYS}
        return cls(
            int(v["count"]),
            int(v["pairs"]),
            _num(v["fraction"], where),
            _num(v["chance_fraction"], where),
            _num(v["p_value"], where),
            bool(v["above_chance"]),
        )

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}


@dataclasses.dataclass(frozen=True)
class TruthScores:
    """Toy ground truth: kept pairs that join the same true feature (`compare.truth_scores`)."""

    n_true_pairs: int
    n_kept_pairs_correct: int
    fraction_kept_pairs_correct: float
    fraction_true_pairs_recovered: float

    KEYS = (
        "n_true_pairs",
        "n_kept_pairs_correct",
        "fraction_kept_pairs_correct",
        "fraction_true_pairs_recovered",
    )

    @classmethod
    def from_json(cls, d: Any, where: str) -> TruthScores:
        d = _obj(d, where)
        _known(d, cls.KEYS, where)
        v = {k: _req(d, k, where) for k in cls.KEYS}
        return cls(
            int(v["n_true_pairs"]),
            int(v["n_kept_pairs_correct"]),
            _num(v["fraction_kept_pairs_correct"], where),
            _num(v["fraction_true_pairs_recovered"], where),
        )

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}


@dataclasses.dataclass(frozen=True)
class Labels:
    """What a comparison is: its kind (cross, ceiling, floor, control, ...), a readable label,
    and where it sits (cell, hookpoints, condition, replicates, SAE roles and seeds).

    The planner fills the fields of its kinds: cross and floor ``cell``/``hookpoint_a``/
    ``hookpoint_b``; ceiling ``side``/``hookpoint``; floor ``random_init``/
    ``hookpoint_random``. ``alignment`` is the alignment report when rows are aligned units.
    """

    kind: str
    label: str = ""
    cell: str | None = None
    hookpoint_a: str | None = None
    hookpoint_b: str | None = None
    condition: str = ""
    replicates: tuple[int, int] | None = None
    side: str | None = None
    hookpoint: str | None = None
    random_init: str | None = None
    hookpoint_random: str | None = None
    saes: tuple[str, str] | None = None
    seeds: tuple[Any, Any] | None = None
    alignment: Mapping[str, Any] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_json(cls, d: Mapping, where: str) -> Labels:
        def tup(k):
            return None if d.get(k) is None else tuple(d[k])

        return cls(
            kind=str(_req(d, "kind", where)),
            label=str(d.get("label", "")),
            cell=d.get("cell"),
            hookpoint_a=d.get("hookpoint_a"),
            hookpoint_b=d.get("hookpoint_b"),
            condition=str(d.get("condition", "")),
            replicates=tup("replicates"),
            side=d.get("side"),
            hookpoint=d.get("hookpoint"),
            random_init=d.get("random_init"),
            hookpoint_random=d.get("hookpoint_random"),
            saes=tup("saes"),
            seeds=tup("seeds"),
            alignment=d.get("alignment"),
        )

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# -- one comparison ---------------------------------------------------------------------------

_COMPARISON_KEYS = (
    "name",
    "n_features",
    "tokens",
    "pairing",
    "filters",
    "n_pairs",
    "pairs",
    "top_pairs",
    "metrics",
    "same_index",
    "fraction_same_top_token",
    "truth",
    "metrics_skipped",
    "d",
    "note",
    "metrics_before_threshold",
    "n_pairs_before_threshold",
    "feature_density",
    "rows_are",
)


@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """Every number of one comparison of two SAEs (`compare.run_comparison`).

    ``metrics`` is empty when fewer than ``min_pairs`` pairs survived; then ``note`` says so
    and, when the pairs before the threshold step were enough, ``metrics_before_threshold``
    holds the chance-level geometry of those ``n_pairs_before_threshold`` pairs.
    ``feature_density`` / ``rows_are``: per-own-token densities when rows are aligned units.
    """

    name: str
    labels: Labels
    n_features: tuple[int, int]
    tokens: int
    pairing: Pairing
    filters: FilterFunnel
    n_pairs: int
    pairs: KeptPairs
    top_pairs: tuple[TopPair, ...]
    metrics: Mapping[str, MetricResult]
    same_index: SameIndex
    fraction_same_top_token: float | None = None
    truth: TruthScores | None = None
    metrics_skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    d: tuple[int, int] | None = None
    note: str | None = None
    metrics_before_threshold: Mapping[str, MetricResult] | None = None
    n_pairs_before_threshold: int | None = None
    feature_density: Mapping[str, Any] | None = None
    rows_are: str | None = None

    @property
    def kind(self) -> str:
        return self.labels.kind

    @property
    def label(self) -> str:
        return self.labels.label

    @classmethod
    def from_json(cls, d: Any, where: str = "comparison") -> ComparisonResult:
        d = _obj(d, where)
        name = str(_req(d, "name", where))
        where = f"{where} {name!r}"
        _known(d, _COMPARISON_KEYS + Labels.keys(), where)
        nf = _obj(_req(d, "n_features", where), f"{where}.n_features")
        truth = d.get("truth")
        mbt = d.get("metrics_before_threshold")
        dd = d.get("d")
        return cls(
            name=name,
            labels=Labels.from_json(d, where),
            n_features=(
                int(_req(nf, "a", f"{where}.n_features")),
                int(_req(nf, "b", f"{where}.n_features")),
            ),
            tokens=int(_req(d, "tokens", where)),
            pairing=Pairing.from_json(_req(d, "pairing", where), f"{where}.pairing"),
            filters=FilterFunnel.from_json(_req(d, "filters", where), f"{where}.filters"),
            n_pairs=int(_req(d, "n_pairs", where)),
            pairs=KeptPairs.from_json(_req(d, "pairs", where), f"{where}.pairs"),
            top_pairs=tuple(
                TopPair.from_json(t, f"{where}.top_pairs[{i}]")
                for i, t in enumerate(_req(d, "top_pairs", where))
            ),
            metrics=metrics_from_json(_req(d, "metrics", where), f"{where}.metrics"),
            same_index=SameIndex.from_json(_req(d, "same_index", where), f"{where}.same_index"),
            fraction_same_top_token=_opt_num(
                d.get("fraction_same_top_token"), f"{where}.fraction_same_top_token"
            ),
            truth=None if truth is None else TruthScores.from_json(truth, f"{where}.truth"),
            metrics_skipped=dict(d.get("metrics_skipped") or {}),
            d=None if dd is None else (int(dd[0]), int(dd[1])),
            note=d.get("note"),
            metrics_before_threshold=(
                None if mbt is None else metrics_from_json(mbt, f"{where}.metrics_before_threshold")
            ),
            n_pairs_before_threshold=d.get("n_pairs_before_threshold"),
            feature_density=d.get("feature_density"),
            rows_are=d.get("rows_are"),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "name": self.name,
            **self.labels.to_json(),
            "n_features": {"a": self.n_features[0], "b": self.n_features[1]},
            "tokens": self.tokens,
            "pairing": self.pairing.to_json(),
            "filters": self.filters.to_json(),
            "n_pairs": self.n_pairs,
            "pairs": self.pairs.to_json(),
            "top_pairs": [t.to_json() for t in self.top_pairs],
            "metrics": _metrics_json(self.metrics),
            "same_index": self.same_index.to_json(),
        }
        out.update(
            _drop_none(
                {
                    "fraction_same_top_token": self.fraction_same_top_token,
                    "truth": None if self.truth is None else self.truth.to_json(),
                    "metrics_skipped": dict(self.metrics_skipped) if self.metrics else None,
                    "d": None if self.d is None else list(self.d),
                    "note": self.note,
                    "metrics_before_threshold": (
                        None
                        if self.metrics_before_threshold is None
                        else _metrics_json(self.metrics_before_threshold)
                    ),
                    "n_pairs_before_threshold": self.n_pairs_before_threshold,
                    "feature_density": self.feature_density,
                    "rows_are": self.rows_are,
                }
            )
        )
        return out


# -- reference points of one cell -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Scores of several comparisons (e.g. the N^2 cross pairs of N replicates per side)."""

    n: int
    mean: float | None
    std: float | None
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        v = np.asarray(values, np.float64)
        return cls(
            int(v.size),
            float(v.mean()) if v.size else None,
            float(v.std(ddof=1)) if v.size > 1 else 0.0 if v.size else None,
            tuple(v.tolist()),
        )

    @classmethod
    def from_json(cls, d: Any, where: str) -> Distribution:
        d = _obj(d, where)
        _known(d, ("n", "mean", "std", "values"), where)
        return cls(
            int(_req(d, "n", where)),
            _opt_num(_req(d, "mean", where), where),
            _opt_num(_req(d, "std", where), where),
            tuple(float(x) for x in _req(d, "values", where)),
        )

    def to_json(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std, "values": list(self.values)}


@dataclasses.dataclass(frozen=True)
class Separation:
    ceiling_minus_floor: float
    spread: float
    z: float | None

    @classmethod
    def from_json(cls, d: Any, where: str) -> Separation:
        d = _obj(d, where)
        _known(d, ("ceiling_minus_floor", "spread", "z"), where)
        return cls(
            _num(_req(d, "ceiling_minus_floor", where), where),
            _num(_req(d, "spread", where), where),
            _opt_num(_req(d, "z", where), where),
        )

    def to_json(self) -> dict:
        return {"ceiling_minus_floor": self.ceiling_minus_floor, "spread": self.spread, "z": self.z}


@dataclasses.dataclass(frozen=True)
class Fraction:
    """How far the cross score lies from floor (0) to ceiling (1); ``value`` None with a
    ``note`` when not given (not separated, or uninformative)."""

    value: float | None
    note: str | None = None
    separation: Separation | None = None

    @property
    def not_separated(self) -> bool:
        return self.value is None and self.note is not None


@dataclasses.dataclass(frozen=True)
class CrossWithinTest:
    """One-sided tests of cross < within on the excess over the null (descriptive p-values)."""

    mann_whitney_p: float | None
    permutation_p: float | None
    note: str

    @classmethod
    def from_json(cls, d: Any, where: str) -> CrossWithinTest:
        d = _obj(d, where)
        _known(d, ("mann_whitney_p", "permutation_p", "note"), where)
        return cls(
            _opt_num(_req(d, "mann_whitney_p", where), where),
            _opt_num(_req(d, "permutation_p", where), where),
            str(_req(d, "note", where)),
        )

    def to_json(self) -> dict:
        return {
            "mann_whitney_p": self.mann_whitney_p,
            "permutation_p": self.permutation_p,
            "note": self.note,
        }


_FRACTION = "fraction_floor_to_ceiling"


@dataclasses.dataclass(frozen=True)
class ReferencePoint:
    """One metric of one cell: cross mean, within-side (ceiling) and floor, raw and as excess
    over each comparison's own null; ``fraction`` / ``fraction_excess`` of the way from floor
    to ceiling (`references.group_summary`); ``test`` of cross < within with replicates."""

    cross: float
    cross_excess: float
    cross_distribution: Distribution
    informative: bool
    ceiling: float | None = None
    ceiling_excess: float | None = None
    within_distribution: Distribution | None = None
    ceiling_a: float | None = None
    ceiling_a_excess: float | None = None
    ceiling_b: float | None = None
    ceiling_b_excess: float | None = None
    floor: float | None = None
    floor_excess: float | None = None
    fraction: Fraction | None = None
    fraction_excess: Fraction | None = None
    test: CrossWithinTest | None = None

    _NUMS = (
        "ceiling",
        "ceiling_excess",
        "ceiling_a",
        "ceiling_a_excess",
        "ceiling_b",
        "ceiling_b_excess",
        "floor",
        "floor_excess",
    )
    _FRACTION_KEYS = tuple(f"{_FRACTION}{s}{t}" for s in ("", "_excess") for t in ("", "_note")) + (
        "separation",
        "separation_excess",
    )

    @classmethod
    def from_json(cls, d: Any, where: str) -> ReferencePoint:
        d = _obj(d, where)
        _known(
            d,
            (
                "cross",
                "cross_excess",
                "cross_distribution",
                "informative",
                "within_distribution",
                "test_cross_below_within",
            )
            + cls._NUMS
            + cls._FRACTION_KEYS,
            where,
        )

        def fraction(suffix):
            if f"{_FRACTION}{suffix}" not in d:
                return None
            sep = d.get(f"separation{suffix}")
            return Fraction(
                _opt_num(d[f"{_FRACTION}{suffix}"], where),
                d.get(f"{_FRACTION}{suffix}_note"),
                None if sep is None else Separation.from_json(sep, f"{where}.separation{suffix}"),
            )

        within = d.get("within_distribution")
        test = d.get("test_cross_below_within")
        return cls(
            cross=_num(_req(d, "cross", where), where),
            cross_excess=_num(_req(d, "cross_excess", where), where),
            cross_distribution=Distribution.from_json(
                _req(d, "cross_distribution", where), f"{where}.cross_distribution"
            ),
            informative=bool(_req(d, "informative", where)),
            within_distribution=None
            if within is None
            else Distribution.from_json(within, f"{where}.within_distribution"),
            fraction=fraction(""),
            fraction_excess=fraction("_excess"),
            test=None
            if test is None
            else CrossWithinTest.from_json(test, f"{where}.test_cross_below_within"),
            **{k: _opt_num(d.get(k), f"{where}.{k}") for k in cls._NUMS},
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "cross": self.cross,
            "cross_excess": self.cross_excess,
            "cross_distribution": self.cross_distribution.to_json(),
        }
        if self.within_distribution is not None:
            out["ceiling"] = self.ceiling
            out["ceiling_excess"] = self.ceiling_excess
            out["within_distribution"] = self.within_distribution.to_json()
        out.update(_drop_none({k: getattr(self, k) for k in self._NUMS[2:]}))
        out["informative"] = self.informative
        for suffix, frac in (("", self.fraction), ("_excess", self.fraction_excess)):
            if frac is None:
                continue
            if frac.separation is not None:
                out[f"separation{suffix}"] = frac.separation.to_json()
            out[f"{_FRACTION}{suffix}"] = frac.value
            if frac.note is not None:
                out[f"{_FRACTION}{suffix}_note"] = frac.note
        if self.test is not None:
            out["test_cross_below_within"] = self.test.to_json()
        return out


@dataclasses.dataclass(frozen=True)
class CellComparisons:
    """Names of the comparisons behind one cell's reference points."""

    cross: tuple[str, ...]
    ceiling_a: tuple[str, ...]
    ceiling_b: tuple[str, ...]
    floor: tuple[str, ...]

    KEYS = ("cross", "ceiling_a", "ceiling_b", "floor")

    @classmethod
    def from_json(cls, d: Any, where: str) -> CellComparisons:
        d = _obj(d, where)
        _known(d, cls.KEYS, where)
        return cls(*(tuple(_req(d, k, where)) for k in cls.KEYS))

    def to_json(self) -> dict:
        return {k: list(getattr(self, k)) for k in self.KEYS}


@dataclasses.dataclass(frozen=True)
class CellResult:
    """Reference points of one cell (hookpoint of A, hookpoint of B) under one condition."""

    cell: str
    condition: str
    hookpoint_a: str | None
    hookpoint_b: str | None
    comparisons: CellComparisons
    metrics: Mapping[str, ReferencePoint]

    KEYS = ("cell", "condition", "hookpoint_a", "hookpoint_b", "comparisons", "metrics")

    @classmethod
    def from_json(cls, d: Any, where: str = "cell") -> CellResult:
        d = _obj(d, where)
        where = f"{where} {d.get('cell')!r}"
        _known(d, cls.KEYS, where)
        v = {k: _req(d, k, where) for k in cls.KEYS}
        return cls(
            str(v["cell"]),
            str(v["condition"]),
            v["hookpoint_a"],
            v["hookpoint_b"],
            CellComparisons.from_json(v["comparisons"], f"{where}.comparisons"),
            {
                m: ReferencePoint.from_json(e, f"{where}.metrics.{m}")
                for m, e in _obj(v["metrics"], f"{where}.metrics").items()
            },
        )

    def to_json(self) -> dict:
        return {
            "cell": self.cell,
            "condition": self.condition,
            "hookpoint_a": self.hookpoint_a,
            "hookpoint_b": self.hookpoint_b,
            "comparisons": self.comparisons.to_json(),
            "metrics": {m: e.to_json() for m, e in self.metrics.items()},
        }


# -- a whole run ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerGrid:
    """Excess over the null of the cross comparisons, every hookpoint of A against every
    hookpoint of B (NaN where a cell had too few pairs)."""

    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    cells: Mapping[str, Sequence[Sequence[float]]]

    @classmethod
    def from_json(cls, d: Any, where: str = "grid") -> LayerGrid:
        d = _obj(d, where)
        _known(d, ("layers_a", "layers_b", "cells"), where)
        return cls(
            tuple(_req(d, "layers_a", where)),
            tuple(_req(d, "layers_b", where)),
            {
                m: [
                    [math.nan if v is None else _num(v, f"{where}.cells.{m}") for v in row]
                    for row in rows
                ]
                for m, rows in _obj(_req(d, "cells", where), f"{where}.cells").items()
            },
        )

    def to_json(self) -> dict:
        return {
            "layers_a": list(self.layers_a),
            "layers_b": list(self.layers_b),
            "cells": {m: [list(r) for r in v] for m, v in self.cells.items()},
        }


#: Descriptive parts of results.json a report shows as they are (preset-dependent).
HEAD_KEYS = (
    "preset",
    "models",
    "hookpoints",
    "tokens",
    "contexts",
    "text",
    "data",
    "toy",
    "versions",
    "config",
)
_RUN_TYPED = ("comparisons", "cells", "reference_points", "summary", "grid")


@dataclasses.dataclass(frozen=True)
class RunResults:
    """The typed parts of a universality ``results.json`` plus its descriptive rest.

    ``reference_points`` (the first cell's metrics) is written for a quick look and derived
    again on reading; ``extra`` holds the preset's descriptive and auxiliary sections
    (``preset``, ``models``, ``saes``, ``references``, ``config``, ``versions``, ``sweep``,
    ``splice``, ``importance``...) as written.
    """

    comparisons: tuple[ComparisonResult, ...]
    cells: tuple[CellResult, ...] = ()
    summary: tuple[str, ...] = ()
    grid: LayerGrid | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def reference_points(self) -> Mapping[str, ReferencePoint]:
        return self.cells[0].metrics if self.cells else {}

    def head(self) -> dict:
        """The descriptive fields a report's header shows (those this run has)."""
        return {k: self.extra[k] for k in HEAD_KEYS if k in self.extra}

    @classmethod
    def from_json(cls, d: Any, where: str = "results.json") -> RunResults:
        d = _obj(d, where)
        comps = _req(d, "comparisons", where)
        if not isinstance(comps, list):
            raise ResultsError(f"{where}: 'comparisons' is not a list; not a universality run")
        grid = d.get("grid")
        return cls(
            comparisons=tuple(
                ComparisonResult.from_json(c, f"{where} comparisons[{i}]")
                for i, c in enumerate(comps)
            ),
            cells=tuple(
                CellResult.from_json(c, f"{where} cells[{i}]")
                for i, c in enumerate(d.get("cells") or [])
            ),
            summary=tuple(d.get("summary") or ()),
            grid=None if grid is None else LayerGrid.from_json(grid, f"{where} grid"),
            extra={k: v for k, v in d.items() if k not in _RUN_TYPED},
        )

    @classmethod
    def load(cls, path: str) -> RunResults:
        try:
            data = json.loads(metrics_io.read_text(path))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_json(data, path)

    def to_json(self) -> dict:
        out = dict(self.extra)
        out["comparisons"] = [c.to_json() for c in self.comparisons]
        if self.cells:
            out["cells"] = [c.to_json() for c in self.cells]
            out["reference_points"] = {m: e.to_json() for m, e in self.reference_points.items()}
        if self.summary:
            out["summary"] = list(self.summary)
        if self.grid is not None:
            out["grid"] = self.grid.to_json()
        return out

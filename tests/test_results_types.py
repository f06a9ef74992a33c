"""Comparisons as typed values, and the registries behind them (issue 11).

* `results.ComparisonResult` / `RunResults`: a real comparison round-trips through
  results.json unchanged; a renamed key fails in one line naming it (reading, and the HTML
  report); the terminal tables read from a saved run are the tables of the live run, with
  numbers checked against plain arithmetic.
* Registries: a pairing rule, a similarity metric and an SAE format registered inside a test
  are used by name (run_comparison, load_sae), each checked on a known truth.

The comparisons run on a planted pair: SAE B is SAE A with its features permuted, so the
activation-correlation rule must pair feature ``perm[j]`` of A with feature ``j`` of B.
"""

import dataclasses
import functools
import json
import os

import numpy as np
import pytest

from engine import checks, metrics_io, similarity, streaming
from experiments.pipeline import compare, filters, html_report, pairing, references, report
from experiments.pipeline import results as res
from experiments.pipeline.stepcache import StepCache
from models import formats
from models import sae as sae_lib

D_IN, D_SAE, ROWS = 8, 16, 512


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(D_SAE, D_IN))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    codes = rng.exponential(1.0, (ROWS, D_SAE)) * (rng.random((ROWS, D_SAE)) < 0.2)
    x = (codes @ d).astype(np.float32)
    perm = rng.permutation(D_SAE)

    def sae(rows):
        cfg = sae_lib.SAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)
        return sae_lib.from_arrays(cfg, d[rows].T, np.zeros(D_SAE), d[rows], np.zeros(D_IN))

    return x, d, perm, sae(np.arange(D_SAE)), sae(perm)


@dataclasses.dataclass
class _MeanCos:
    score: float

    def to_dict(self):
        return {"method": "mean_row_cos", "score": self.score}


def _mean_row_cos(x, y, weights, mesh):
    """Toy metric: mean cosine of the paired rows (no batched null: the loop null runs)."""
    del weights, mesh
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return _MeanCos(float(cos.mean())), lambda: None


def _same_index(step, sae_a, sae_b, mesh):
    """Toy pairing rule: feature i of A with feature i of B."""
    n = min(sae_a.config.d_sae, sae_b.config.d_sae)
    return filters.Pairs(np.arange(n), np.arange(n), np.ones(n))


@pytest.fixture
def registered(monkeypatch):
    """The toy rule and metric, registered for this test only (registries copied first)."""
    monkeypatch.setattr(pairing, "RULES", dict(pairing.RULES))
    monkeypatch.setattr(similarity, "METRICS", dict(similarity.METRICS))
    pairing.register(pairing.PairingRule("same_index", "feature i with feature i", _same_index))
    similarity.register(
        similarity.Metric(
            "mean_row_cos", "mean cosine of paired rows", _mean_row_cos, weights="none"
        )
    )


def _run(tmp_path, mesh, sae_a, sae_b, x, rule, metrics=("mean_row_cos", "cka"), **labels):
    cfg = compare.CompareConfig(
        pairing=rule,
        filters=filters.FilterConfig(non_concept=False, threshold=None),
        metrics=metrics,
        num_permutations=50,
        top_n=3,
    )
    rows = np.arange(ROWS, dtype=np.int32)
    # One name for both rules: the feature pass (cached by name and inputs) runs once.
    return compare.run_comparison(
        "planted",
        lambda: streaming.ChunkStream((rows, x, x), 128, name="rows"),
        sae_a,
        sae_b,
        lambda r: [f"t{int(i)}" for i in r],
        mesh,
        cfg,
        StepCache(str(tmp_path / "steps")),
        ckpt_root=str(tmp_path / "ckpt"),
        labels=res.Labels(**labels),
    )


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory, mesh1):
    """The correlation rule and the toy same-index rule on the planted pair (one module-wide
    registration, removed after)."""
    tmp = tmp_path_factory.mktemp("planted")
    x, d, perm, sae_a, sae_b = _planted()
    mp = pytest.MonkeyPatch()
    mp.setattr(pairing, "RULES", dict(pairing.RULES))
    mp.setattr(similarity, "METRICS", dict(similarity.METRICS))
    pairing.register(pairing.PairingRule("same_index", "i with i", _same_index))
    similarity.register(
        similarity.Metric("mean_row_cos", "mean cosine", _mean_row_cos, weights="none")
    )
    try:
        corr = _run(
            tmp,
            mesh1,
            sae_a,
            sae_b,
            x,
            "correlation",
            kind="cross",
            label="planted",
            cell="A.h~B.h",
            hookpoint_a="h",
            hookpoint_b="h",
        )
        toy = _run(
            tmp,
            mesh1,
            sae_a,
            sae_b,
            x,
            "same_index",
            kind="floor",
            label="toy rule",
            cell="A.h~B.h",
            hookpoint_a="h",
            hookpoint_b="h",
            random_init="b",
            hookpoint_random="h",
        )
    finally:
        mp.undo()
    return {"x": x, "d": d, "perm": perm, "correlation": corr, "same_index": toy}


@pytest.mark.slow
def test_correlation_rule_finds_the_planted_permutation(planted_runs):
    c, perm = planted_runs["correlation"], planted_runs["perm"]
    assert isinstance(c, res.ComparisonResult) and c.pairing.method == "correlation"
    assert sorted(zip(c.pairs.a, c.pairs.b)) == sorted((int(perm[j]), j) for j in range(D_SAE))
    assert c.n_pairs == D_SAE and c.filters.candidates >= D_SAE
    # Identical decoder rows: the toy metric is exactly 1 and far above its null.
    m = c.metrics["mean_row_cos"]
    assert m.score == pytest.approx(1.0, abs=1e-6) and m.p < 0.05 and m.excess > 0.5


@pytest.mark.slow
def test_toy_pairing_rule_runs_by_name(planted_runs):
    t, d, perm = planted_runs["same_index"], planted_runs["d"], planted_runs["perm"]
    assert t.pairing.method == "same_index"
    assert list(t.pairs.a) == list(t.pairs.b) == list(range(D_SAE))
    # The metric on pairs (i, i): decoder rows d[i] and d[perm[i]], float64 reference.
    expected = float(np.mean([d[i] @ d[perm[i]] for i in range(D_SAE)]))
    assert t.metrics["mean_row_cos"].score == pytest.approx(expected, abs=1e-5)
    assert t.metrics["cka"].score == pytest.approx(_linear_cka(d, d[perm]), abs=1e-4)


def _linear_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_unknown_pairing_rule_is_refused_with_the_registered_names():
    with pytest.raises(checks.InputError, match=r"--pairing: unknown .*'nope'.*correlation"):
        compare.CompareConfig(pairing="nope")
    with pytest.raises(checks.InputError, match="already registered"):
        pairing.register(pairing.PairingRule("correlation", "again", _same_index))


def test_pairing_setting_choices_are_the_registry(monkeypatch, tmp_path):
    """The universality config's ``pairing`` check reads the registry: a registered rule is
    accepted by name, an unknown one is refused in one line listing the registered names."""
    from experiments import common
    from experiments.configs import universality as config

    values = dict(common.default_values(config), workdir=str(tmp_path))
    rules = common.rules_of(config)
    common.validate(dict(values, pairing="decoder"), rules)
    with pytest.raises(common.ConfigError, match=r"pairing.*'nope'.*correlation.*decoder"):
        common.validate(dict(values, pairing="nope"), rules)
    monkeypatch.setitem(
        pairing.RULES, "toy_rule", pairing.PairingRule("toy_rule", "toy", _same_index)
    )
    common.validate(dict(values, pairing="toy_rule"), rules)


def _saved(tmp_path, run: res.RunResults) -> str:
    os.makedirs(tmp_path, exist_ok=True)
    path = os.path.join(tmp_path, "results.json")
    metrics_io.write_json(path, run.to_json())  # what run.write_results writes
    return path


@pytest.mark.slow
def test_round_trip_through_results_json(planted_runs, tmp_path):
    comps = (planted_runs["correlation"], planted_runs["same_index"])
    cells = references.summarise(comps)
    run = res.RunResults(
        comparisons=comps,
        cells=tuple(cells),
        summary=tuple(report.verdict(c) for c in comps),
        extra={"preset": "planted"},
    )
    back = res.RunResults.load(_saved(tmp_path, run))
    assert back == run
    # The layout is the one the pipeline always wrote: flat labels, typed parts as objects.
    raw = json.loads(open(os.path.join(tmp_path, "results.json")).read())
    c0 = raw["comparisons"][0]
    assert c0["kind"] == "cross" and c0["cell"] == "A.h~B.h"
    assert c0["pairs"]["a"] == list(comps[0].pairs.a)
    assert c0["metrics"]["cka"]["excess"] == comps[0].metrics["cka"].excess
    assert raw["reference_points"] == raw["cells"][0]["metrics"]


@pytest.mark.parametrize(
    "where, old, new",
    [
        ("metric", "excess", "excess_over_null"),
        ("comparison", "n_pairs", "n_kept"),
        ("pairing", "mean_best_corr_ab", "best_corr_mean"),
        ("cell", "cross_excess", "cross_exc"),
    ],
)
def test_renamed_key_fails_in_one_line_naming_it(tmp_path, where, old, new):
    comps = _cell_comps()
    path = _saved(
        tmp_path / "run",
        res.RunResults(comparisons=comps, cells=tuple(references.summarise(comps))),
    )
    raw = json.loads(open(path).read())
    target = {
        "metric": raw["comparisons"][3]["metrics"]["svcca"],
        "comparison": raw["comparisons"][0],
        "pairing": raw["comparisons"][0]["pairing"],
        "cell": raw["cells"][0]["metrics"]["cka"],
    }[where]
    target[new] = target.pop(old)
    with open(path, "w") as fh:
        json.dump(raw, fh)
    with pytest.raises(res.ResultsError) as e:
        res.RunResults.load(path)
    msg = str(e.value)
    assert "\n" not in msg and (repr(old) in msg or repr(new) in msg), msg
    # The HTML report refuses the same file with the same line (no blank page).
    with pytest.raises(html_report.ReportError, match="renamed"):
        html_report.write_report(str(tmp_path / "run"))


def _metric(score, null_mean=0.5, null_std=0.02):
    return res.MetricResult(
        score=score,
        null_mean=null_mean,
        null_std=null_std,
        p=0.01,
        z=(score - null_mean) / null_std,
        excess=score - null_mean,
    )


def _comp(name, kind, score, **labels):
    n = 10
    return res.ComparisonResult(
        name=name,
        labels=res.Labels(kind=kind, label=name, **labels),
        n_features=(n, n),
        tokens=100,
        pairing=res.Pairing("correlation", 0.4, 0.4, (), 0, 0, 0, 0),
        filters=res.FilterFunnel((("candidates", 12), ("after_one_to_one", n))),
        n_pairs=n,
        pairs=res.KeptPairs(tuple(range(n)), tuple(range(n)), (1.0,) * n),
        top_pairs=(),
        metrics={"cka": _metric(score)},
        same_index=res.SameIndex(0, n, 0.0, 0.1, 1.0, False),
    )


@functools.lru_cache(maxsize=1)
def _cell_comps():
    """Cross 0.8, ceiling 0.9, floor 0.5 (CKA, null mean 0.5, null std 0.02) in one cell, and
    a cross comparison of another cell scored by `similarity.evaluate` itself."""
    cell = dict(cell="A.h~B.h", hookpoint_a="h", hookpoint_b="h")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 4))
    ev = similarity.evaluate(x, x + 0.3 * rng.normal(size=x.shape), ("svcca",), num_permutations=20)
    real = dataclasses.replace(
        _comp("cross:x", "cross", 0.0, cell="A.x~B.x", hookpoint_a="x", hookpoint_b="x"),
        metrics=res.metrics_from_json(ev["metrics"], "evaluate"),
    )
    return (
        _comp("cross", "cross", 0.8, **cell),
        _comp("ceiling_a", "ceiling", 0.9, side="a", hookpoint="h"),
        _comp("floor", "floor", 0.5, random_init="b", hookpoint_random="h", **cell),
        real,
    )


def test_tables_from_a_saved_run_match_the_live_run_and_plain_arithmetic(tmp_path):
    comps = _cell_comps()
    cells = tuple(references.summarise(comps))
    back = res.RunResults.load(_saved(tmp_path, res.RunResults(comparisons=comps, cells=cells)))
    assert report.summary_table(back.comparisons) == report.summary_table(comps)
    assert references.format_table(back.cells) == references.format_table(cells)
    line = next(
        ln
        for ln in references.format_table(back.cells).splitlines()
        if "A.h~B.h" in ln and " cka " in ln
    )
    # floor excess 0.5-0.5, cross 0.8-0.5, ceiling 0.9-0.5; way = 0.3 / 0.4 = 75 %.
    assert line.split()[2:7] == ["0.000", "0.300", "0.000", "0.400", "75%"]
    head = report.summary_table(back.comparisons).splitlines()[0]
    assert head == "== cross: cross  (10 pairs, mean best corr A->B 0.400)"
    assert "filters: candidates 12 -> after_one_to_one 10" in report.summary_table(comps)


def test_dummy_metric_is_one_registration(registered):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    out = similarity.evaluate(x, y, ("mean_row_cos",), num_permutations=20)
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    m = out["metrics"]["mean_row_cos"]
    assert m["score"] == pytest.approx(cos.mean(), abs=1e-12) and m["null_method"] == "loop"
    assert res.MetricResult.from_json(m, "mean_row_cos").score == m["score"]
    with pytest.raises(checks.InputError, match="already registered"):
        similarity.register(similarity.Metric("cka", "again", _mean_row_cos))


def _load_json_sae(path, **kwargs):
    """Toy format: one JSON file with the four arrays."""
    p = os.path.join(path, "toy_sae.json") if os.path.isdir(path) else str(path)
    with open(p) as fh:
        arrays = json.load(fh)
    w_dec = np.asarray(arrays["W_dec"], np.float32)
    cfg = sae_lib.SAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0])
    return sae_lib.from_arrays(
        cfg,
        np.asarray(arrays["W_enc"]),
        np.asarray(arrays["b_enc"]),
        w_dec,
        np.asarray(arrays["b_dec"]),
        name=p,
    )


def test_dummy_sae_format_is_one_registration(monkeypatch, tmp_path):
    monkeypatch.setattr(formats, "REGISTRY", dict(formats.REGISTRY))
    formats.register(
        formats.Format("toy_json", _load_json_sae, "toy (toy_sae.json)", files=("toy_sae.json",))
    )
    rng = np.random.default_rng(2)
    w_dec = rng.normal(size=(6, 4))
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "toy_sae.json").write_text(
        json.dumps(
            {
                "W_enc": w_dec.T.tolist(),
                "b_enc": [0.0] * 6,
                "W_dec": w_dec.tolist(),
                "b_dec": [0.0] * 4,
            }
        )
    )
    assert (
        formats.detect_format(folder)
        == formats.detect_format(folder / "toy_sae.json")
        == "toy_json"
    )
    sae = formats.load_sae(folder)
    np.testing.assert_allclose(np.asarray(sae.W_dec), w_dec, rtol=1e-6)
    # Unknown folders name every registered format, the new one included.
    (tmp_path / "empty").mkdir()
    with pytest.raises(formats.InputError, match=r"toy \(toy_sae.json\)"):
        formats.detect_format(tmp_path / "empty")

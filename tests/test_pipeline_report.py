"""Report and runner on comparisons whose metrics are uninformative (issue 12): the summary
flags them, plots never crash, and results.json is written before any plot."""

import dataclasses
import json
import os

import numpy as np
import pytest
import similarity_refs as ref

from engine import similarity
from experiments.pipeline import report, results, runner


def _comparison(name, x, y, kind):
    ev = similarity.evaluate(x, y, ("svcca", "cka"), num_permutations=20)
    n = x.shape[0]
    return results.ComparisonResult(
        name=name,
        labels=results.Labels(
            kind=kind, label=kind, cell="A.toy~B.toy", hookpoint_a="toy", hookpoint_b="toy"
        ),
        n_features=(n, n),
        tokens=10 * n,
        pairing=results.Pairing("correlation", 0.3, 0.3, (0.1, 0.5), 0, 0, 0, 0),
        filters=results.FilterFunnel((("candidates", n),)),
        n_pairs=n,
        pairs=results.KeptPairs(tuple(range(n)), tuple(range(n)), (0.5,) * n),
        top_pairs=(),
        metrics=results.metrics_from_json(ev["metrics"], name),
        same_index=results.SameIndex(0, n, 0.0, 1 / n, 1.0, False),
    )


@pytest.fixture(scope="module")
def comps():
    few = ref.random_pair(0, 12, 40, 40)  # 12 pairs, 40 dims: SVCCA saturates
    many = ref.random_pair(1, 200, 6, 5)
    return [_comparison("cross", *few, "cross"), _comparison("ceiling", *many, "ceiling")]


def test_uninformative_metric_is_flagged_in_table_and_verdict(comps):
    sv = comps[0].metrics["svcca"]
    assert sv.informative is False and sv.z is None
    table = report.summary_table(comps)
    line = next(l for l in table.splitlines() if l.strip().startswith("svcca"))
    assert "UNINFORMATIVE" in line and "0.3" in line  # n/d = 12/40 shown
    assert "uninformative" in report.verdict(comps[0])
    assert "UNINFORMATIVE" not in next(
        l
        for l in table.splitlines()[
            table.splitlines().index(
                next(l for l in table.splitlines() if l.startswith("== ceiling"))
            ) :
        ]
        if l.strip().startswith("svcca")
    )


def test_plots_of_uninformative_metrics_do_not_crash(comps, tmp_path):
    report.plot_nulls(comps[0].name, comps[0].metrics, str(tmp_path / "null.png"))
    report.plot_reference_bars(comps, str(tmp_path / "bars.png"))
    assert os.path.getsize(tmp_path / "null.png") > 0


def test_results_written_before_plots(comps, tmp_path, monkeypatch):
    written = {}

    class FakeRun:
        workdir = str(tmp_path)
        plots_dir = str(tmp_path / "plots")
        mesh = None

        def path(self, *parts):
            return os.path.join(str(tmp_path), *parts)

        def write_results(self, results):
            written["results"] = json.loads(json.dumps(results))
            with open(self.path("results.json"), "w") as f:
                json.dump(results, f)

    def broken_plot(*a, **k):
        assert "results" in written, "a plot was drawn before results.json was written"
        raise RuntimeError("plot failed")

    os.makedirs(tmp_path / "plots")
    monkeypatch.setattr(runner, "run_toy", lambda *a: {"preset": "toy", "comparisons": list(comps)})
    monkeypatch.setattr(report, "plot_nulls", broken_plot)
    from experiments import common
    from experiments.configs import universality as config

    values = common.default_values(config)
    values.update(
        filter_non_concept=False,
        threshold=-1.0,
        metrics=["svcca", "cka"],
        num_permutations=20,
        top_n=5,
        replicate_permutations=100,
    )
    results = runner.main(FakeRun(), common.settings_value("universality", values, config.FIELDS))
    assert os.path.exists(tmp_path / "results.json")
    assert written["results"]["comparisons"][0]["metrics"]["svcca"]["informative"] is False
    assert "plot failed" in results.get("plot_errors", [""])[0]


def _binom_tail(k, n, p):
    """P(X >= k), X ~ Binomial(n, p), by summing the pmf exactly (independent of scipy)."""
    from math import comb

    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def test_same_index_fraction_and_chance_warning(caplog):
    from experiments.pipeline import compare

    rng = np.random.default_rng(0)
    # 45 % of 200 kept pairs are feature i with feature i (the shared-seed symptom).
    a = rng.choice(512, 200, replace=False)
    b = rng.permutation(a)
    same = rng.random(200) < 0.45
    b[same] = a[same]
    rep = compare.same_index_report(a, b, 512, 1024)
    k = int(np.sum(a == b))
    assert rep.count == k and rep.fraction == pytest.approx(k / 200)
    assert rep.chance_fraction == pytest.approx(1 / 512)
    assert rep.p_value == pytest.approx(_binom_tail(k, 200, 1 / 512), rel=1e-6)
    assert rep.above_chance is True
    # Independent pairings: at chance, no warning.
    a2 = rng.integers(0, 512, 300)
    b2 = rng.integers(0, 512, 300)
    rep2 = compare.same_index_report(a2, b2, 512, 512)
    k2 = int(np.sum(a2 == b2))
    assert rep2.p_value == pytest.approx(_binom_tail(k2, 300, 1 / 512), rel=1e-6)
    assert rep2.above_chance is False
    empty = compare.same_index_report(np.zeros(0, int), np.zeros(0, int), 8, 8)
    assert empty.count == 0 and empty.above_chance is False


def test_summary_table_shows_same_index_warning(comps):
    c = dataclasses.replace(
        comps[1],
        same_index=results.SameIndex(
            count=90,
            pairs=200,
            fraction=0.45,
            chance_fraction=0.002,
            p_value=1e-90,
            above_chance=True,
        ),
    )
    table = report.summary_table([c])
    assert "same feature index" in table and "45%" in table

"""experiments/bench.py: the suite runs every benchmark at the smoke scale and gathers them.

Timings are never asserted (benchmarks, not tests); this checks that each benchmark runs with
the suite's flags, writes its JSON, and that the suite's JSON and markdown hold every row.
"""

import json
import os

import pytest

from experiments import bench


@pytest.mark.slow
@pytest.mark.integration
def test_suite_smoke_runs_every_benchmark(tmp_path):
    docs = bench.run_suite(str(tmp_path), "smoke", progress=False, timeout=600)
    assert [d["bench"] for d in docs] == [b.name for b in bench.BENCHMARKS]
    for d in docs:
        assert d["returncode"] == 0, (d["bench"], d.get("error"))
        assert d["results"], d["bench"]
        for r in d["results"]:
            assert r["candidate_median_s"] > 0 and r["baseline_median_s"] > 0
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["scale"] == "smoke" and suite["threads"] == 2
    md = (tmp_path / "suite.md").read_text()
    n_rows = sum(len(d["results"]) for d in docs)
    assert md.count("\n| ") - 1 == n_rows  # header + one row per timed workload
    for b in bench.BENCHMARKS:
        assert os.path.exists(tmp_path / f"{b.name}.json")
        assert b.peer in md


def test_suite_rejects_unknown_benchmark(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark"):
        bench.run_suite(str(tmp_path), "smoke", only=["nope"], progress=False)
    with pytest.raises(SystemExit, match="threads"):
        bench.run_suite(str(tmp_path), "smoke", threads=0, progress=False)


def test_failed_benchmark_is_reported_not_hidden(tmp_path, monkeypatch):
    broken = bench.Benchmark("accumulator", "peer", {"smoke": ["--no_such_flag=1"]})
    monkeypatch.setattr(bench, "BENCHMARKS", (broken,))
    docs = bench.run_suite(str(tmp_path), "smoke", progress=False, timeout=300)
    assert docs[0]["returncode"] != 0 and "no_such_flag" in docs[0]["error"]
    assert "FAILED" in (tmp_path / "suite.md").read_text()

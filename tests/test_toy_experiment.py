"""Smoke test of experiments/toy_superposition.py at tiny sizes: outputs, numbers, resume."""

import json
import os

import numpy as np

from experiments import common
from experiments import toy_superposition as exp

TINY = {
    "steps": 400,
    "batch_size": 128,
    "lr": 1e-2,
    "seeds": 1,
    "pentagon_seeds": 1,
    "log_every": 200,
    "checkpoint_every": 200,
    "pentagon_sparsity": [0.0, 0.95],
    "dim_features": 12,
    "dim_hidden": 3,
    "dim_points": 3,
    "dim_seeds": 1,
    "dim_max_inverse_density": 20.0,
    "phase_points": 3,
    "sweeps": "pentagon,dimensionality,phase",
    "progress": False,
}


def test_toy_superposition_writes_results_plots_and_resumes(tmp_path, mesh4):
    run = common.Run(workdir=str(tmp_path), mesh=mesh4)
    results = exp.run_toy_superposition(run, TINY)
    run.write_results(results)
    for name in ("pentagon.png", "dimensionality.png", "phase_diagram.png"):
        assert os.path.getsize(os.path.join(run.plots_dir, name)) > 5000
    with open(run.path("results.json")) as f:
        saved = json.load(f)
    pent = saved["pentagon"]
    assert len(pent["instances"]) == 2 and pent["sparsity"] == [0.0, 0.95]
    # Geometry numbers are consistent with the saved W (recomputed here with numpy).
    inst = pent["instances"][1]
    W = np.asarray(inst["W"])
    np.testing.assert_allclose(inst["norms"], np.linalg.norm(W, axis=0), rtol=1e-6)
    np.testing.assert_allclose(inst["wtw"], W.T @ W, rtol=1e-6, atol=1e-9)
    # Dense 5 -> 2: two features represented; sparse: more than two (superposition).
    assert pent["instances"][0]["n_represented"] == 2
    assert pent["instances"][1]["n_represented"] > 2
    dim = saved["dimensionality"]
    assert len(dim["dims_per_feature"]) == 3 and np.all(np.asarray(dim["dims_per_feature"]) > 0)
    phase = saved["phase_diagram"]
    assert np.asarray(phase["relu"]["state"]).shape == (3, 3)
    # The linear model never superposes; its extra feature is dedicated when 10x as important.
    linear = np.asarray(phase["linear"]["state"])
    assert np.all(linear != 2) and np.all(linear[-1] == 1)
    rows = [json.loads(line) for line in open(run.metrics_path)]
    assert {r["sweep"] for r in rows} == {
        "pentagon",
        "dimensionality",
        "phase_linear",
        "phase_relu",
    }
    # Rerunning resumes from the finished checkpoints: same numbers, nothing retrained.
    again = exp.run_toy_superposition(run, TINY)
    np.testing.assert_array_equal(again["pentagon"]["instances"][1]["W"], W)
    assert len([json.loads(line) for line in open(run.metrics_path)]) == len(rows)

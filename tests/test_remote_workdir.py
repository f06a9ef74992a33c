"""A ``gs://`` workdir is written in place, through one file API (`engine.metrics_io`, over
`etils.epath`) and orbax, never turned into a local folder.

Offline: `tests/fake_gcs.py` serves ``gs://BUCKET/KEY`` from a local folder by redirecting epath's
backend and orbax's TensorStore spec, the only two ways to a remote path. Code that bypasses them
(a plain ``open``, ``os.makedirs``, ``np.save``) fails or leaves a folder literally named ``gs:`` in
the working directory. Not covered: the real GCS clients (gcsfs / google-cloud-storage are not
installed here; the fake stands in for their answers).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fake_gcs import fake_gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_cache_metrics_and_plots_go_to_the_bucket(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine import metrics_io
    from experiments import common
    from experiments.pipeline.stepcache import StepCache

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with fake_gcs(str(store)):
        cache = StepCache("gs://b/run/steps")
        assert not cache.done("s")
        calls = []
        got = cache.get("s", lambda: calls.append(1) or {"x": x, "n": 3})
        again = StepCache("gs://b/run/steps").get("s", lambda: calls.append(1) or {})
        w = metrics_io.MetricWriter("gs://b/run/metrics.jsonl")
        w.write(1, {"loss": 0.5})
        w.write(2, {"loss": 0.25})
        w.truncate_after(1)
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        common.save_figure(fig, "gs://b/run/plots/p.png")
        assert common.load_json("gs://b/run/steps/s.json") == {"n": 3}
    assert calls == [1]  # computed once, then loaded from the bucket
    np.testing.assert_array_equal(again["x"], x)
    assert got["n"] == again["n"] == 3
    run = store / "b" / "run"
    assert (run / "steps" / "s.done").read_text() == "ok\n"
    with np.load(run / "steps" / "s.npz") as z:
        np.testing.assert_array_equal(z["x"], x)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}]
    assert (run / "plots" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["store"]  # nothing local named gs:


@pytest.mark.slow
def test_universality_run_into_a_bucket(tmp_path):
    """The whole toy pipeline with ``--workdir=gs://bucket/run``: every output lands in the
    bucket (fingerprint, config, step cache, SAEs, feature tables, plots, results, HTML
    report), nothing in a local ``gs:`` folder, and a rerun reads the fingerprint back."""
    store = tmp_path / "store"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        os.path.join(REPO, "tests", "fake_gcs.py"),
        str(store),
        "-m",
        "experiments.universality",
        "--workdir=gs://bucket/run",
        "--toy_n_tokens=2048",
        "--toy_steps=40",
        "--num_permutations=20",
        "--chunk_size=256",
        "--ceiling_sides=",
    ]
    first = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "report:  gs://bucket/run/report/index.html" in first.stdout
    assert os.listdir(cwd) == []
    run = store / "bucket" / "run"
    files = {os.path.relpath(os.path.join(d, n), run) for d, _, ns in os.walk(run) for n in ns}
    for want in (
        "fingerprint.json",
        "config.json",
        "results.json",
        "plots/null_cross.png",
        "plots/matched_correlations.png",
        "report/index.html",
        "features/cross.json",
        "features/cross/a/index.json",
        "saes/a/toy/main0/final/sae_config.json",
        "saes/a/toy/main0/recipe.json",
    ):
        assert want in files, want
    assert any(f.startswith("steps/cross.features.") and f.endswith(".done") for f in files)
    assert any(f.startswith("saes/a/toy/main0/final/params/") for f in files)  # orbax arrays
    results = json.loads((run / "results.json").read_text())
    # the results are the pipeline's, not placeholders: the shared-dictionary pair sits above
    # its null, the floor (same codes through an unrelated dictionary) does not
    m = {c["name"]: c["metrics"]["rsa_spearman"] for c in results["comparisons"]}
    excess = {k: v["score"] - v["null_mean"] for k, v in m.items()}
    assert excess["cross"] > excess["floor"] + 0.05, excess
    second = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert "nothing to do" in second.stdout + second.stderr, second.stderr[-2000:]

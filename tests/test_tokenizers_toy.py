"""The cross-tokenizer known-truth experiment end to end (tiny sizes)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shared_word_features_survive_alignment_and_nulls_hold(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.tokenizers_toy",
            f"--workdir={tmp_path}",
            "--noprogress",
            "--max_documents=3",
            "--sae_steps=400",
            "--num_permutations=60",
            "--metrics=cka,rsa_spearman",
            "--units=shared_boundaries:last,words:mean",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    comps = {c["name"]: c for c in results["comparisons"]}
    for name in ("same_tokenizer", "cross.shared_boundaries.last", "cross.words.mean", "ceiling"):
        assert all(r["p"] < 0.05 and r["excess"] > 0 for r in comps[name]["metrics"].values())
    for name in ("control", "floor"):
        m = comps[name].get("metrics") or comps[name].get("metrics_before_threshold", {})
        assert all(r["p"] > 0.01 for r in m.values()), (name, m)
    cross = comps["cross.shared_boundaries.last"]
    assert cross["alignment"]["fraction_text_covered"] > 0.95
    assert cross["truth"]["fraction_true_pairs_recovered"] >= (
        0.5 * comps["same_tokenizer"]["truth"]["fraction_true_pairs_recovered"]
    )
    assert comps["control"]["truth"]["fraction_true_pairs_recovered"] <= 0.1
    assert (tmp_path / "plots" / "units.png").stat().st_size > 1000
    table = json.loads((tmp_path / "features" / "cross.words.mean.json").read_text())
    assert "density_own_token" in table["a"][0]

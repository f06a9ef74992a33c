"""The universality pipeline end to end: toy acceptance, layer grid, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 0.01


def universality(workdir, *flags, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.universality",
                           f"--workdir={workdir}", "--noprogress", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


TOY = ("--toy_n_tokens=8000", "--toy_steps=800", "--num_permutations=200")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    proc = universality(workdir, *TOY)
    with open(workdir / "results.json") as f:
        return workdir, proc, json.load(f)


def by_name(results):
    return {c["name"]: c for c in results["comparisons"]}


def test_shared_pair_is_recovered_and_significant(toy_run):
    _, proc, results = toy_run
    cross = by_name(results)["cross"]
    assert cross["truth"]["fraction_true_pairs_recovered"] >= 0.7
    assert cross["truth"]["fraction_kept_pairs_correct"] >= 0.9
    assert set(cross["metrics"]) == {"svcca", "pwcca", "cka", "rsa_spearman", "procrustes",
                                     "mutual_knn"}
    for name, m in cross["metrics"].items():
        assert m["p"] < ALPHA, name
        assert m["score"] > m["null_mean"], name
        assert m["num_permutations"] == 200
    assert "cross: every metric (6) is above its random-pairing null" in proc.stdout


def test_control_pair_is_not_significant(toy_run):
    _, proc, results = toy_run
    control = by_name(results)["control"]
    assert control["truth"]["n_true_pairs"] == 0
    metrics = control["metrics"] or control["metrics_before_threshold"]
    assert metrics, "the control must still be scored (before the threshold if need be)"
    significant = [m for m, r in metrics.items() if r["p"] < ALPHA]
    # Expected false positives at alpha = 0.01 over 6 metrics: 0.06; allow one.
    assert len(significant) <= 1, significant
    assert "control: no pair passed the correlation threshold" in proc.stdout or \
        "control: no metric is significant" in proc.stdout


def test_ceiling_at_least_cross_and_floor_below(toy_run):
    _, _, results = toy_run
    comps = by_name(results)
    for metric, cross in comps["cross"]["metrics"].items():
        assert comps["ceiling"]["metrics"][metric]["score"] >= cross["score"], metric
        assert comps["floor"]["metrics"][metric]["excess"] < cross["excess"], metric
    rp = results["reference_points"]
    assert all(0.5 < rp[m]["fraction_floor_to_ceiling_excess"] <= 1.0 for m in rp)


def test_outputs_and_resume(toy_run):
    workdir, proc, results = toy_run
    for plot in ("matched_correlations.png", "reference_bars.png", "null_cross.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000, plot
    assert {"config", "versions", "summary", "reference_points"} <= set(results)
    assert (workdir / "config.json").exists()
    # A rerun loads every finished step (no SAE retraining) and reproduces the numbers.
    again = universality(workdir, *TOY)
    with open(workdir / "results.json") as f:
        rerun = json.load(f)
    for a, b in zip(results["comparisons"], rerun["comparisons"]):
        assert a["pairs"] == b["pairs"] and a["metrics"] == b["metrics"]
    assert again.stdout.splitlines()[:3] == proc.stdout.splitlines()[:3]


def test_layer_grid_on_tiny_transformers_pair(tmp_path):
    proc = universality(tmp_path, "--preset=lm", "--num_permutations=50", "--sae_steps=150",
                        "--max_contexts=24", "--context_length=32", "--sae_expansion=4",
                        "--sae_k=8", "--sae_batch_size=128")
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    grid = results["grid"]
    assert grid["layers_a"] == ["resid_post.0", "resid_post.1"]
    assert np.asarray(grid["cells"]["cka"]).shape == (2, 2)
    kinds = [c["kind"] for c in results["comparisons"]]
    assert kinds.count("cross") == 1 and kinds.count("grid") == 3
    assert "ceiling" in kinds and "floor" in kinds
    for metric in ("svcca", "cka", "rsa_spearman"):
        assert (tmp_path / "plots" / f"layers_{metric}.png").stat().st_size > 1000
    # every SAE (2 + 2 hookpoints, the ceiling's) spliced into its model (issue 16)
    assert [r["label"] for r in results["splice"]] == [
        "A resid_post.0", "A resid_post.1", "B resid_post.0", "B resid_post.1",
        "A resid_post.0 (ceiling)"]
    assert all(r["n_positions"] > 0 and np.isfinite(r["ce_clean"]) for r in results["splice"])
    assert "SAEs spliced into their model" in proc.stdout
    assert "results:" in proc.stdout


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("universality:")]
    assert len(lines) == 1
    return lines[0]


def test_zero_pairs_surviving_is_a_clear_error(toy_run):
    # Same workdir: the SAEs and feature passes are reused (cached steps are keyed by what
    # they depend on), only the filters change.
    workdir, _, _ = toy_run
    proc = universality(workdir, *TOY, "--threshold=1.5", check=False)
    assert "no pair survived the filters" in one_line_error(proc)
    with open(workdir / "results.json") as f:
        assert by_name(json.load(f))["cross"]["filters"]["after_threshold"] == 0


def test_absent_preset_weights_are_a_clear_error(tmp_path):
    proc = universality(tmp_path, "--preset=lm", "--lm_setup=pythia",
                        f"--weights_dir={tmp_path}/nowhere", check=False)
    line = one_line_error(proc)
    assert "weights absent" in line and "pythia-70m" in line


def test_mismatched_tokenizers_are_refused(tmp_path):
    from models import lm_tiny
    a = lm_tiny.make_tiny_model_pair(str(tmp_path / "p1"), vocab_size=400)
    b = lm_tiny.make_tiny_model_pair(str(tmp_path / "p2"), vocab_size=300)
    proc = universality(tmp_path / "run", "--preset=lm", f"--model_a={a.path_a}",
                        f"--model_b={b.path_b}", check=False)
    assert "token" in one_line_error(proc).lower()


def test_sae_width_mismatch_is_refused(tmp_path):
    import jax
    from models import formats, sae as sae_lib
    saes = tmp_path / "saes"
    bad = sae_lib.init(jax.random.PRNGKey(0), sae_lib.SAEConfig(d_in=7, d_sae=16,
                                                                activation="topk", k=2))
    formats.save_saelens(str(saes / "resid_post.0"), bad)
    proc = universality(tmp_path / "run", "--preset=lm", f"--saes_a={saes}",
                        "--hookpoints_a=resid_post.0", "--hookpoints_b=resid_post.0",
                        check=False)
    line = one_line_error(proc)
    assert "d_in=7" in line and "resid_post.0" in line


def test_activation_caches_as_sources(tmp_path):
    """Both sides read from activation caches (harvested once) instead of forward passes."""
    from models import activation_cache, lm, lm_tiny
    from models import text as text_lib
    pair = lm_tiny.make_tiny_model_pair(str(tmp_path / "models"))
    with lm.quiet_transformers():
        models = [lm.LanguageModel.load(p) for p in (pair.path_a, pair.path_b)]
    contexts = text_lib.make_contexts(text_lib.sample_documents(), models[0].tokenizer, 32,
                                      max_contexts=24)
    dirs = [str(tmp_path / "cache_a"), str(tmp_path / "cache_b")]
    activation_cache.harvest_models(models, contexts, ["resid_post.0"], dirs)
    proc = universality(tmp_path / "run", "--preset=lm", f"--model_a={pair.path_a}",
                        f"--model_b={pair.path_b}", f"--cache_a={dirs[0]}",
                        f"--cache_b={dirs[1]}", "--hookpoints_a=resid_post.0",
                        "--hookpoints_b=resid_post.0", "--num_permutations=50",
                        "--sae_steps=100", "--sae_expansion=4", "--sae_k=8",
                        "--sae_batch_size=128", "--norandom_init_floor")
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert results["activations"].startswith("caches")
    assert results["tokens"] == int(contexts.mask.sum())
    assert by_name(results)["A.resid_post.0~B.resid_post.0"]["n_pairs"] > 0
    assert "results:" in proc.stdout

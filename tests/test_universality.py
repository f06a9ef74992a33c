"""The universality pipeline end to end: toy acceptance, layer grid, resume, bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.pipeline import references
from experiments.pipeline import saes as saes_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = "--config=experiments/configs/universality_lm.py"  # the language-model preset
ALPHA = 0.01


def universality(workdir, *flags, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.universality",
            f"--workdir={workdir}",
            "--noprogress",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    assert set(cross["metrics"]) == {
        "svcca",
        "pwcca",
        "cka",
        "rsa_spearman",
        "procrustes",
        "mutual_knn",
    }
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
    assert (
        "control: no pair passed the correlation threshold" in proc.stdout
        or "control: no metric is significant" in proc.stdout
    )


def test_ceiling_at_least_cross_and_floor_below(toy_run):
    _, _, results = toy_run
    comps = by_name(results)
    for metric, cross in comps["cross"]["metrics"].items():
        # Seed-vs-seed on either side is at least as alike as A vs B (within null noise).
        for side in ("ceiling_a", "ceiling_b"):
            ceil = comps[side]["metrics"][metric]
            assert ceil["score"] >= cross["score"] - 2 * ceil["null_std"], (side, metric)
        assert comps["floor"]["metrics"][metric]["excess"] < cross["excess"], metric
    rp = results["reference_points"]
    for m, e in rp.items():
        # Separated reference points, and the cross score most of the way up (a little
        # above 1 is noise: the ceiling is the mean of two seed pairs).
        sep = e["separation_excess"]
        assert sep["ceiling_minus_floor"] > references.SEPARATION_Z * sep["spread"], m
        assert (
            0.5
            < e["fraction_floor_to_ceiling_excess"]
            <= 1.0 + 2 * sep["spread"] / sep["ceiling_minus_floor"]
        ), m


def test_every_sae_has_its_own_seeds_recorded(toy_run):
    _, _, results = toy_run
    saes = results["saes"]
    assert {s["key"] for s in saes} == {
        "a/toy/main0",
        "a/toy/ceiling0",
        "b/toy/main0",
        "b/toy/ceiling0",
        "b_random/toy/floor0",
        "control/toy/main0",
    }
    assert len({s["seed"] for s in saes}) == len(saes)
    assert len({s["data_seed"] for s in saes}) == len(saes)
    for s in saes:
        assert s["recipe"]["config"]["seed"] == s["seed"]
        assert s["seed"] == saes_lib.role_seeds(0, saes_lib.Role(**s["role"]))[0]
    for c in results["comparisons"]:
        assert c["seeds"][0] != c["seeds"][1], c["name"]


def test_outputs_and_resume(toy_run):
    workdir, proc, results = toy_run
    for plot in ("matched_correlations.png", "reference_bars.png", "null_cross.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000, plot
    assert {"config", "versions", "summary", "reference_points"} <= set(results)
    assert (workdir / "config.json").exists()
    # Stage lines on stdout, numbered against the expected total.
    stages = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert stages[0] == "[1/12] toy data and SAEs (train or load) ..."
    assert "[10/12] control: feature pass ..." in stages and stages[-1].startswith("[12/12]")
    assert all(s.split("]")[0].endswith("/12") for s in stages), stages
    # The log file holds the project's messages, not orbax's.
    with open(workdir / "log.INFO") as f:
        log = f.read()
    assert "[1/12] toy data" in log and "orbax" not in log.lower()
    # A rerun of the finished run has nothing to do (and says so in one line).
    again = universality(workdir, *TOY)
    assert again.stdout.strip().startswith("nothing to do: results from ")
    # Without results.json the rerun loads every finished step (no SAE retraining) and
    # reproduces the numbers.
    os.rename(workdir / "results.json", workdir / "results.first.json")
    again = universality(workdir, *TOY)
    with open(workdir / "results.json") as f:
        rerun = json.load(f)
    for a, b in zip(results["comparisons"], rerun["comparisons"]):
        assert a["pairs"] == b["pairs"] and a["metrics"] == b["metrics"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("==")]
    assert summary == [line for line in again.stdout.splitlines() if line.startswith("==")]


@pytest.mark.slow
def test_layer_grid_on_tiny_transformers_pair(tmp_path):
    proc = universality(
        tmp_path,
        LM,
        "--num_permutations=50",
        "--sae_steps=150",
        "--max_contexts=24",
        "--context_length=32",
        "--sae_expansion=4",
        "--sae_k=8",
        "--sae_batch_size=128",
        "--metrics=svcca,cka,rsa_spearman",
    )
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    grid = results["grid"]
    assert grid["layers_a"] == ["resid_post.0", "resid_post.1"]
    assert np.asarray(grid["cells"]["cka"]).shape == (2, 2)
    kinds = [c["kind"] for c in results["comparisons"]]
    # Every cell has its own floor; every hookpoint of each side its own seed ceiling.
    assert kinds.count("cross") == 4 and kinds.count("floor") == 4
    assert kinds.count("ceiling") == 4
    cells = results["cells"]
    assert len(cells) == 4
    for cell in cells:
        ha, hb = cell["hookpoint_a"], cell["hookpoint_b"]
        assert cell["comparisons"]["ceiling_a"] == [f"ceiling_a:A.{ha}"]
        assert cell["comparisons"]["ceiling_b"] == [f"ceiling_b:B.{hb}"]
        assert cell["comparisons"]["floor"] == [f"floor:A.{ha}~B.{hb}"]
        for metric, e in cell["metrics"].items():
            assert {"floor", "ceiling_a", "ceiling_b", "cross"} <= set(e), metric
            assert "fraction_floor_to_ceiling_excess" in e, metric
    seeds = [s["seed"] for s in results["saes"]]
    assert len(seeds) == 10 and len(set(seeds)) == 10  # 4 main, 4 ceiling, 2 floor
    for metric in ("svcca", "cka", "rsa_spearman"):
        assert (tmp_path / "plots" / f"layers_{metric}.png").stat().st_size > 1000
    # every SAE the run trained (4 main, 4 ceiling, 2 floor) spliced into its own model
    # (issue 16); the floor's into its random-init model, given a random-init LM head
    assert sorted(r["label"] for r in results["splice"]) == sorted(
        [f"{s} resid_post.{i}{k}" for s in "AB" for i in (0, 1) for k in ("", " (ceiling)")]
        + [f"B resid_post.{i} (floor, random init)" for i in (0, 1)]
    )
    assert all(r["n_positions"] > 0 and np.isfinite(r["ce_clean"]) for r in results["splice"])
    assert "B resid_post.0 (floor, random init)" in proc.stdout
    assert "SAEs spliced into their model" in proc.stdout
    assert "results:" in proc.stdout
    # The report and the per-feature export: multi-token contexts that stay inside their
    # context, the top token's activation = the feature's top activation, promoted tokens.
    assert (tmp_path / "report" / "index.html").exists()
    name = next(
        c["name"]
        for c in results["comparisons"]
        if c["kind"] == "cross"
        and c["hookpoint_a"] == "resid_post.0"
        and c["hookpoint_b"] == "resid_post.0"
    )
    table = json.loads((tmp_path / "features" / f"{name}.json").read_text())
    batch = json.loads((tmp_path / "features" / name / "a" / "batch-0.json").read_text())
    assert batch["layout"].startswith("saedashboard-neuronpedia-batch")
    lengths = []
    for feat in batch["features"]:
        row = table["a"][feat["feature_index"]]
        assert feat["universality"]["status"] == row["status"]
        if not feat["activations"]:
            continue
        top = feat["activations"][0]
        q = top["qualifying_token_index"]
        assert top["values"][q] == pytest.approx(row["max"], rel=1e-3, abs=1e-3)
        assert top["tokens"][q] == row["top_tokens"][0]
        assert max(top["values"]) <= row["max"] + 1e-3
        lengths.append(len(top["tokens"]))
        assert len(feat["pos_str"]) == 10 and feat["pos_values"] == sorted(
            feat["pos_values"], reverse=True
        )
    assert max(lengths) > 1 and max(lengths) <= 8 + 1 + 4


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("universality:")]
    assert len(lines) == 1
    return lines[0]


def test_zero_pairs_surviving_is_a_clear_error(toy_run, tmp_path):
    # A copy of the finished run without its fingerprint: the SAEs and feature passes are
    # reused (cached steps are keyed by what they depend on), only the filters change.
    workdir, _, _ = toy_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    for name in ("fingerprint.json", "config.json", "results.json"):
        os.remove(copy / name)
    proc = universality(copy, *TOY, "--threshold=0.9999", check=False)
    assert "no pair survived the filters" in one_line_error(proc)
    with open(copy / "results.json") as f:
        assert by_name(json.load(f))["cross"]["filters"]["after_threshold"] == 0


def test_changed_settings_are_refused_before_any_work(toy_run):
    workdir, _, results = toy_run
    before = sorted(os.listdir(workdir))
    proc = universality(workdir, *TOY, "--threshold=0.2", "--num_permutations=100", check=False)
    line = one_line_error(proc)
    assert "settings.threshold (recorded 0.1, now 0.2)" in line
    assert "settings.num_permutations (recorded 200, now 100)" in line
    assert "--overwrite" in line
    assert sorted(os.listdir(workdir)) == before


def test_out_of_range_threshold_is_refused_before_any_work(tmp_path):
    proc = universality(tmp_path / "run", *TOY, "--threshold=2.0", check=False)
    assert "--threshold: expected a number <= 1" in one_line_error(proc)
    assert not (tmp_path / "run").exists()


def test_absent_preset_weights_are_a_clear_error(tmp_path):
    proc = universality(
        tmp_path,
        "--config=experiments/configs/universality_pythia.py",
        f"--weights_dir={tmp_path}/nowhere",
        check=False,
    )
    line = one_line_error(proc)
    assert "weights absent" in line and "pythia-70m" in line


def test_mismatched_tokenizers_are_refused(tmp_path):
    from models import lm_tiny

    a = lm_tiny.make_tiny_model_pair(str(tmp_path / "p1"), vocab_size=400)
    b = lm_tiny.make_tiny_model_pair(str(tmp_path / "p2"), vocab_size=300)
    # Different tokenizers are compared on aligned text (tests/test_alignment_pipeline.py);
    # asking for token-by-token rows is refused.
    proc = universality(
        tmp_path / "run",
        LM,
        f"--model_a={a.path_a}",
        f"--model_b={b.path_b}",
        "--alignment=tokens",
        check=False,
    )
    assert "token" in one_line_error(proc).lower()


def test_sae_width_mismatch_is_refused(tmp_path):
    import jax

    from models import formats
    from models import sae as sae_lib

    saes = tmp_path / "saes"
    bad = sae_lib.init(
        jax.random.PRNGKey(0), sae_lib.SAEConfig(d_in=7, d_sae=16, activation="topk", k=2)
    )
    formats.save_saelens(str(saes / "resid_post.0"), bad)
    proc = universality(
        tmp_path / "run",
        LM,
        f"--saes_a={saes}",
        "--hookpoints_a=resid_post.0",
        "--hookpoints_b=resid_post.0",
        check=False,
    )
    line = one_line_error(proc)
    assert "d_in=7" in line and "resid_post.0" in line


def test_activation_caches_as_sources(tmp_path):
    """Both sides read from activation caches (harvested once) instead of forward passes."""
    from models import activation_cache, lm, lm_tiny
    from models import text as text_lib

    pair = lm_tiny.make_tiny_model_pair(str(tmp_path / "models"))
    with lm.quiet_transformers():
        models = [lm.LanguageModel.load(p) for p in (pair.path_a, pair.path_b)]
    contexts = text_lib.make_contexts(
        text_lib.sample_documents(), models[0].tokenizer, 32, max_contexts=24
    )
    dirs = [str(tmp_path / "cache_a"), str(tmp_path / "cache_b")]
    activation_cache.harvest_models(models, contexts, ["resid_post.0"], dirs)
    proc = universality(
        tmp_path / "run",
        LM,
        f"--model_a={pair.path_a}",
        f"--model_b={pair.path_b}",
        f"--cache_a={dirs[0]}",
        f"--cache_b={dirs[1]}",
        "--hookpoints_a=resid_post.0",
        "--hookpoints_b=resid_post.0",
        "--num_permutations=50",
        "--sae_steps=100",
        "--sae_expansion=4",
        "--sae_k=8",
        "--sae_batch_size=128",
        "--norandom_init_floor",
    )
    with open(tmp_path / "run" / "results.json") as f:
        results = json.load(f)
    assert results["activations"].startswith("caches")
    assert results["tokens"] == int(contexts.mask.sum())
    assert by_name(results)["cross"]["n_pairs"] > 0
    assert "results:" in proc.stdout

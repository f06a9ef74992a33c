"""The universality CLI with replicates, sweeps, the classic trio and loaded SAEs.

Tiny sizes (few tokens, steps, permutations and metrics); each run still trains several SAEs,
so the end-to-end runs are marked slow.
"""

import json

import jax
import pytest
from test_universality import by_name, one_line_error, universality

from models import formats, lm_tiny
from models import sae as sae_lib

LM = "--config=experiments/configs/universality_lm.py"  # the language-model preset
TINY_TOY = (
    "--toy_n_tokens=3000",
    "--toy_steps=150",
    "--num_permutations=30",
    "--metrics=cka,svcca",
    "--threshold=-1",
)
TINY_LM = (
    LM,
    "--num_permutations=30",
    "--sae_steps=100",
    "--max_contexts=16",
    "--context_length=32",
    "--sae_batch_size=128",
    "--metrics=cka,svcca",
    "--threshold=-1",
)


def load(workdir):
    with open(workdir / "results.json") as f:
        return json.load(f)


def check_replicates_and_sweep(results, workdir, conditions, n_rep, ceiling_sides):
    """Each condition has N^2 cross comparisons, within-side pairs, its own floor, a
    distribution summary with both tests, a row of the sweep table per metric, and plots."""
    cells = results["cells"]
    assert [c["condition"] for c in cells] == conditions
    n_within = len(ceiling_sides) * n_rep * (n_rep - 1) // 2
    for cell in cells:
        comps = cell["comparisons"]
        assert len(comps["cross"]) == n_rep**2
        assert len(comps["ceiling_a"]) + len(comps["ceiling_b"]) == n_within
        assert len(comps["floor"]) == 1 and comps["floor"][0].endswith(cell["condition"])
        for metric in ("cka", "svcca"):
            e = cell["metrics"][metric]
            assert e["cross_distribution"]["n"] == n_rep**2
            assert e["within_distribution"]["n"] == n_within
            test = e["test_cross_below_within"]
            assert 0 < test["mann_whitney_p"] <= 1 and 0 < test["permutation_p"] <= 1
    rows = results["sweep"]["table"]
    assert sorted({r["condition"] for r in rows}) == sorted(conditions)
    assert len(rows) == 2 * len(conditions)
    # Every SAE of the run has its own seeds; replicates of a side differ in data order.
    saes = results["saes"]
    assert len({s["seed"] for s in saes}) == len(saes)
    assert len({s["data_seed"] for s in saes}) == len(saes)
    assert (workdir / "plots" / "sweep.png").stat().st_size > 1000
    for i in range(len(conditions)):
        assert (workdir / "plots" / f"replicates_{i}.png").stat().st_size > 1000


@pytest.mark.slow
def test_toy_replicates_and_sweep(tmp_path):
    proc = universality(tmp_path, *TINY_TOY, "--replicates=2", "--sweep=k=2,4")
    results = load(tmp_path)
    check_replicates_and_sweep(results, tmp_path, ["k=2", "k=4"], 2, ("a", "b"))
    # The condition reaches the SAEs: k of every trained SAE is the condition's.
    for s in results["saes"]:
        cond = s["role"]["condition"]
        assert s["k"] == int(cond.split("=")[1]), s["key"]
    assert "p(c<w)" in proc.stdout


@pytest.mark.slow
def test_lm_replicates_and_sweep(tmp_path):
    universality(
        tmp_path,
        *TINY_LM,
        "--hookpoints_a=resid_post.0",
        "--hookpoints_b=resid_post.1",
        "--replicates=2",
        "--sweep=k=4,8",
        "--ceiling_sides=a",
    )
    results = load(tmp_path)
    check_replicates_and_sweep(results, tmp_path, ["k=4", "k=8"], 2, ("a",))


def write_saes(root, widths, d_in=32, seed=0):
    for i, (hp, (d_sae, k)) in enumerate(widths.items()):
        sae = sae_lib.init(
            jax.random.PRNGKey(seed + i),
            sae_lib.SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k),
        )
        formats.save_saelens(str(root / hp), sae)


@pytest.mark.slow
def test_trio_with_loaded_saes(tmp_path):
    """--trio with published (loaded) SAEs: A.L vs A.(L+1) (both loaded), a ceiling SAE of
    A.L's architecture, width and k trained here, and a floor of the same shape on a
    random-init copy of A at L."""
    pair = lm_tiny.make_tiny_model_pair(str(tmp_path / "models"))
    write_saes(tmp_path / "pub", {"resid_post.0": (40, 3), "resid_post.1": (48, 4)})
    proc = universality(
        tmp_path / "run",
        *TINY_LM,
        "--trio",
        f"--model_a={pair.path_a}",
        "--hookpoints_a=resid_post.0",
        f"--saes_a={tmp_path / 'pub'}",
    )
    results = load(tmp_path / "run")
    assert results["trio"] and results["hookpoints"] == {
        "a": ["resid_post.0"],
        "b": ["resid_post.1"],
    }
    assert results["models"]["a"] == results["models"]["b"] == pair.path_a
    comps = by_name(results)
    assert set(comps) == {"cross", "ceiling_a", "floor"}
    assert comps["floor"]["random_init"] == "a"
    assert comps["floor"]["hookpoint_random"] == "resid_post.0"
    saes = {s["key"]: s for s in results["saes"]}
    assert saes["a/resid_post.0/main0"]["source"].endswith("pub")
    assert saes["b/resid_post.1/main0"]["d_sae"] == 48
    for key in ("a/resid_post.0/ceiling0", "a_random/resid_post.0/floor0"):
        assert saes[key]["source"] == "trained here"
        assert (saes[key]["d_sae"], saes[key]["k"]) == (40, 3), key
    assert comps["cross"]["n_features"] == {"a": 40, "b": 48}
    assert comps["ceiling_a"]["n_features"] == {"a": 40, "b": 40}
    assert comps["floor"]["n_features"] == {"a": 40, "b": 40}
    e = results["reference_points"]["cka"]
    assert {"floor", "ceiling", "cross"} <= set(e)
    assert "results:" in proc.stdout


def test_bad_reference_flags_are_refused_early(tmp_path):
    pub = tmp_path / "pub"
    write_saes(pub, {"resid_post.0": (40, 3)})
    cases = [
        (("--replicates=0",), "--replicates"),
        (("--sweep=width=3",), "--sweep"),
        (("--ceiling_sides=c",), "--ceiling_sides"),
        (("--replicate_data=subset",), "--replicate_data=subset"),
        ((LM, f"--saes_a={pub}", "--replicates=2"), "cannot be replicated"),
        ((LM, f"--saes_a_ceiling={pub}"), "needs --saes_a"),
        ((LM, f"--saes_a={tmp_path / 'none'}"), "no such file"),
    ]
    for flags_, expected in cases:
        proc = universality(tmp_path / "run", *flags_, check=False)
        assert expected in one_line_error(proc), flags_

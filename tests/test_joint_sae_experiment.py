"""experiments/joint_sae.py end to end (subprocess, tiny sizes): toy default and LM caches."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--steps=40",
    "--batch_size=64",
    "--n_tokens=2048",
    "--d_sae=24",
    "--d_sae_single=16",
    "--k=2",
    "--num_permutations=10",
    "--metrics=cka",
    "--l1_coeffs=1",
    "--align_coeffs=1",
    "--progress=false",
]


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "experiments.joint_sae", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bad_flags_exit_2_with_one_line(tmp_path):
    proc = _run([f"--workdir={tmp_path / 'bad'}", "--source=caches", "--progress=false"])
    assert proc.returncode == 2
    assert "--source=caches needs" in proc.stderr.strip().splitlines()[-1]
    proc = _run([f"--workdir={tmp_path / 'bad2'}", "--designs=bogus"])
    assert proc.returncode == 2 and "unknown 'bogus'" in proc.stderr


def _check_results(workdir, designs):
    res = json.load(open(os.path.join(workdir, "results.json")))
    rows = res["summary"]
    assert {r["design"] for r in rows} == designs
    for r in rows:
        assert 0 <= r["fraction_shared"] <= 1 and 0 <= r["floor_fraction_shared"] <= 1
        assert r["excess_over_floor"] == pytest.approx(
            r["fraction_shared"] - r["floor_fraction_shared"]
        )
        assert r["mean_fvu"] >= 0
    assert len(res["real"]) == len(res["floor"]) == len(rows)
    assert os.path.getsize(os.path.join(workdir, "plots", "tradeoff.png")) > 1000
    return res


@pytest.mark.slow
def test_toy_default_end_to_end_and_resume(tmp_path):
    wd = str(tmp_path / "toy")
    designs = ["--designs=crosscoder_topk,aligned,independent"]
    proc = _run([f"--workdir={wd}", *TINY, *designs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _check_results(wd, {"crosscoder", "aligned", "independent"})
    assert "excess" in proc.stdout and "results:" in proc.stdout
    cc = next(r for r in res["real"] if r["design"] == "crosscoder")
    assert "truth" in cc["sharing"]["decoder_norm"]
    assert os.path.isfile(os.path.join(wd, "plots", f"r_histogram_{cc['label']}.png"))
    # Rerun: every training run resumes from its final checkpoint; same numbers.
    proc = _run([f"--workdir={wd}", *TINY, *designs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.load(open(os.path.join(wd, "results.json")))
    assert [r["fraction_shared"] for r in again["summary"]] == [
        r["fraction_shared"] for r in res["summary"]
    ]


@pytest.mark.slow
def test_lm_caches_option(tmp_path):
    from models import activation_cache as ac
    from models import lm, lm_tiny, text

    pair = lm_tiny.make_tiny_model_pair(
        str(tmp_path / "pair"), arch="llama", vocab_size=300, n_layers=2, d_model=16
    )
    floor = lm_tiny.make_tiny_model_pair(
        str(tmp_path / "floor"), arch="llama", seeds=(0, 7), vocab_size=300, n_layers=2, d_model=16
    )
    m_a = lm.LanguageModel.load(pair.path_a)
    ctx = text.make_contexts(
        [d[:400] for d in text.sample_documents(12)], m_a.tokenizer, 16, max_contexts=48
    )
    paths = {}
    for name, path in (("a", pair.path_a), ("b", pair.path_b), ("floor", floor.path_b)):
        paths[name] = str(tmp_path / f"cache_{name}")
        ac.harvest(lm.LanguageModel.load(path), ctx, ["resid_post.1"], paths[name], progress=False)
    wd = str(tmp_path / "lm")
    proc = _run(
        [
            f"--workdir={wd}",
            "--source=caches",
            f"--cache_a={paths['a']}",
            f"--cache_b={paths['b']}",
            f"--floor_cache_b={paths['floor']}",
            "--hookpoint_a=resid_post.1",
            "--hookpoint_b=resid_post.1",
            "--designs=crosscoder_topk,independent",
            *TINY,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _check_results(wd, {"crosscoder", "independent"})
    assert res["data"]["floor_cache_b"] == paths["floor"]
    assert res["data"]["alignment"]["unit"] == "tokens"  # same tokenizer: token pairing


@pytest.mark.slow
def test_three_model_toy_reports_every_model_and_pair(tmp_path):
    """--n_models=3: per-model reconstruction, shared / exclusive fractions and geometry for
    each of the three model pairs, real vs floor, in results.json and the printed tables."""
    wd = str(tmp_path / "three")
    proc = _run([f"--workdir={wd}", *TINY, "--n_models=3", "--designs=crosscoder_topk,independent"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _check_results(wd, {"crosscoder", "independent"})
    assert res["data"]["real"]["n_models"] == 3 and res["data"]["floor"]["n_shared"] == 0
    for row in res["summary"]:
        assert row["n_models"] == 3 and len(row["fvu"]) == 3 and len(row["l0"]) == 3
        assert [p["models"] for p in row["pairs"]] == [[0, 1], [0, 2], [1, 2]]
        for p in row["pairs"]:
            assert 0 <= p["fraction_shared"] <= 1 and 0 <= p["floor_fraction_shared"] <= 1
            assert p["excess_over_floor"] == pytest.approx(
                p["fraction_shared"] - p["floor_fraction_shared"]
            )
            assert "geometry" in p and "shared_recall" in p
        assert row["fraction_shared"] == pytest.approx(
            sum(p["fraction_shared"] for p in row["pairs"]) / 3
        )
    cc = next(r for r in res["real"] if r["design"] == "crosscoder")
    assert len(cc["pairs"]) == 3 and "latent_scaling" in cc["pairs"][2]
    assert "per model pair" in proc.stdout and "per model (FVU" in proc.stdout

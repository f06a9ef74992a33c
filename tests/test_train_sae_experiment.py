"""experiments/train_sae.py end to end on tiny data, and its scoring helpers."""

import json
import os

import numpy as np
import pytest

from experiments import common, train_sae


def _opts(**kw):
    opts = common.default_values(train_sae.CONFIG)
    opts.update(progress=False, **kw)
    return opts


def test_ground_truth_scores_known_values():
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(20, 8))
    s = train_sae.ground_truth_scores(atoms, 3 * atoms[rng.permutation(20)])
    assert s["mmcs"] == pytest.approx(1.0) and s["recovered_frac"] == 1.0
    assert s["latents_per_true"] == 1.0
    doubled = np.concatenate([atoms, atoms + 1e-3 * rng.normal(size=atoms.shape)])
    assert train_sae.ground_truth_scores(atoms, doubled)["latents_per_true"] == 2.0
    alive = np.arange(40) < 30  # the last 10 duplicates are dead: they do not count
    assert train_sae.ground_truth_scores(atoms, doubled, alive=alive)["latents_per_true"] == 1.5
    half = train_sae.ground_truth_scores(atoms, atoms[:10])
    assert half["recovered_frac"] == 0.5


def test_seed_match_fraction_known_values():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(30, 16))
    perm = rng.permutation(30)
    assert train_sae.seed_match_fraction(w, 2 * w[perm], 0.7)["matched_frac"] == 1.0
    # Half the rows replaced by random directions: those cannot pass cos >= 0.7 in 16 dims
    # (chance cosines are ~N(0, 1/16)).
    mixed = w.copy()
    mixed[:15] = rng.normal(size=(15, 16))
    m = train_sae.seed_match_fraction(w, mixed, 0.7)
    assert m["matched_frac"] == 0.5


def test_experiment_synthetic_sweep(tmp_path, mesh4):
    run = common.Run(workdir=str(tmp_path), mesh=mesh4)
    res = train_sae.run_train_sae(
        run,
        _opts(
            source="synthetic",
            n_true=16,
            d=8,
            k_true=2.0,
            d_sae_mult=["1", "2"],
            k=["2"],
            seeds=["0", "1"],
            steps=30,
            batch_size=64,
            lr=1e-2,
            eval_rows=512,
            log_every=10,
            checkpoint_every=30,
            dead_tokens=500,
        ),
    )
    assert len(res["saes"]) == 4 and len(res["seed_pairs"]) == 2
    for r in res["saes"]:
        for key in (
            "mmcs",
            "fvu",
            "l0",
            "dead_frac",
            "density_mean",
            "density_max",
            "latents_per_true",
        ):
            assert np.isfinite(r[key])
        assert 0 < r["l0"] <= 2 + 1e-6 and 0 < r["fvu"] < 1.5
    assert os.path.isfile(tmp_path / "plots" / "feature_density.png")
    assert os.path.isfile(tmp_path / "plots" / "ground_truth_sweep.png")
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert {x["group"] for x in lines} == {"g0_topk_F16", "g1_topk_F32"}
    for key in ("mse", "fvu", "l0", "dead_frac", "density_mean", "density_max"):
        assert key in lines[-1]
    assert len(os.listdir(tmp_path / "saes")) == 4
    from models import formats

    label = res["saes"][3]["label"]
    native = formats.load_sae(str(tmp_path / "saes" / label))
    copy = formats.load_sae(str(tmp_path / "saes" / label / "saelens"))
    assert copy.config.k == 2 and copy.config.input_scale == 1.0
    # The SAELens copy, read with SAELens's own inference forward (float64, from the files:
    # no input normalisation applied), gives this SAE's activations and reconstructions.
    _check_saelens_copy(native, tmp_path / "saes" / label / "saelens")
    sparsity = formats.saelens.read_saelens_sparsity(str(tmp_path / "saes" / label / "saelens"))
    assert sparsity.shape == (32,) and np.all(sparsity <= 0)
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["seed_pairs"][0]["threshold"] == 0.7


def test_experiment_npy_source(tmp_path, mesh1):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6)) + 2).astype(np.float32)
    path = str(tmp_path / "acts.npy")
    np.save(path, x)
    run = common.Run(workdir=str(tmp_path / "run"), mesh=mesh1)
    res = train_sae.run_train_sae(
        run,
        _opts(
            source="npy",
            npy_path=path,
            activation=["relu", "jumprelu"],
            d_sae=["12"],
            l1_coeff=["0.1"],
            l0_coeff=["0.01"],
            steps=20,
            batch_size=50,
            lr=1e-2,
            log_every=10,
        ),
    )
    assert [r["activation"] for r in res["saes"]] == ["relu", "jumprelu"]
    assert res["n_eval_rows"] == 60 and "mmcs" not in res["saes"][0]
    assert res["saes"][0]["fvu"] < 1.0


def _check_saelens_copy(native, folder):
    """SAELens v6 inference forward written from its documented formula, in float64, on the
    exported files: sae_in = x - b_dec * apply_b_dec_to_input; pre = sae_in W_enc + b_enc;
    topk: the k largest of pre, ReLU'd; x_hat = acts W_dec + b_dec."""
    from models.formats._common import read_safetensors

    cfg = json.load(open(folder / "cfg.json"))
    assert cfg["normalize_activations"] == "none" and cfg["architecture"] == "topk"
    assert cfg.get("rescale_acts_by_decoder_norm") is False
    w, _ = read_safetensors(folder / "sae_weights.safetensors", "test")
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, native.config.d_in)) / native.config.input_scale
    pre = (x - w["b_dec"] * float(cfg["apply_b_dec_to_input"])) @ w["W_enc"] + w["b_enc"]
    idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    acts = np.zeros_like(pre)
    rows = np.arange(len(x))[:, None]
    acts[rows, idx] = np.maximum(pre[rows, idx], 0)
    recon = acts @ w["W_dec"] + w["b_dec"]
    xf = x.astype(np.float32)
    scale = max(1.0, float(np.abs(recon).max()))
    np.testing.assert_allclose(np.asarray(native.encode(xf)), acts, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(native(xf)), recon, atol=1e-4 * scale)

"""Tests of models/toy.py: the Elhage et al. 2022 toy model, its data, training and analysis.

References are independent of the code under test: float64 numpy loss and hand-derived
gradients, analytic geometry (regular polygons, orthogonal and antipodal features), the data
distribution's known moments, and the paper's known results (pentagon, dense features).
"""

import json
import os

import jax
import numpy as np
import pytest

from engine import checks
from engine import train as train_lib
from models import toy

# ---------------------------------------------------------------------------------------------
# Loss and gradient against float64 numpy


def _numpy_loss_and_grads(W, b, x, imp, relu):
    """Hand-written float64 forward/backward of L = mean_b sum_i I_i (x_i - x'_i)^2.

    z = W^T W x + b; x' = relu(z); with dZ = dL/dz:
    dL/dW = H^T dZ + W dZ^T X (H = X W^T), dL/db = sum_b dZ.
    """
    W, b, x, imp = (np.asarray(a, np.float64) for a in (W, b, x, imp))
    B = x.shape[0]
    H = x @ W.T
    Z = H @ W + b
    out = np.maximum(Z, 0) if relu else Z
    r = out - x
    loss = np.mean(np.sum(imp * r**2, axis=1))
    d_out = 2.0 * imp * r / B
    dZ = d_out * (Z > 0) if relu else d_out
    dW = H.T @ dZ + W @ (dZ.T @ x)
    db = dZ.sum(axis=0)
    return loss, dW, db


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_loss_and_gradient_match_float64_numpy(activation, rng):
    n, m, B = 7, 3, 16
    W = rng.normal(size=(m, n)).astype(np.float32)
    b = rng.normal(scale=0.3, size=n).astype(np.float32)
    x = rng.uniform(size=(B, n)) * (rng.uniform(size=(B, n)) > 0.5)
    x = x.astype(np.float32)
    imp = (0.8 ** np.arange(n)).astype(np.float32)
    loss_ref, dW_ref, db_ref = _numpy_loss_and_grads(W, b, x, imp, activation == "relu")
    if activation == "relu":  # the test is only meaningful with both ReLU branches present
        Z = (x @ W.T) @ W + b
        assert (Z > 0).mean() > 0.2 and (Z < 0).mean() > 0.2
    params = toy.ToyParams(W=W, b=b)
    loss, grads = jax.value_and_grad(toy.instance_loss)(params, x, imp, activation)
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.W), dW_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.b), db_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data distribution


def test_hashed_uniform_is_uniform_and_uncorrelated():
    key = np.array([12345, 67890], np.uint32)
    u = np.asarray(toy.hashed_uniform(key, (200_000,)), np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    # Moments of U[0, 1): mean 1/2, variance 1/12 (4-sigma bounds for 200k draws).
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / u.size)
    # Chi-square over 64 equal bins (63 dof: mean 63, sd ~11.2; 63 + 5 sd = 119).
    counts = np.bincount((u * 64).astype(int), minlength=64)
    expected = u.size / 64
    assert np.sum((counts - expected) ** 2 / expected) < 119
    # Lag-1 and lag-20 autocorrelation (neighbouring features / rows) ~ 0.
    for lag in (1, 20):
        c = np.corrcoef(u[:-lag], u[lag:])[0, 1]
        assert abs(c) < 4 / np.sqrt(u.size)
    # A key differing in one bit gives an unrelated stream.
    v = np.asarray(toy.hashed_uniform(key ^ np.array([0, 1], np.uint32), (200_000,)))
    assert abs(np.corrcoef(u, v)[0, 1]) < 4 / np.sqrt(u.size)
    assert np.mean(np.abs(u - v) < 1e-6) < 1e-3


def test_sample_batch_has_the_papers_distribution():
    n, batch = 4, 20_000
    sparsity = np.array([[0.0, 0.5, 0.9, 0.99], [0.3, 0.3, 0.3, 0.3]])
    inst = toy.make_instances(n, sparsity=sparsity, seeds=[3, 4])
    x = np.asarray(toy.sample_batch(inst, step=7, batch=batch), np.float64)
    assert x.shape == (2, batch, n)
    for k in range(2):
        for i in range(n):
            s = sparsity[k, i]
            col = x[k, :, i]
            p_off = np.mean(col == 0)
            assert abs(p_off - s) < 4 * np.sqrt(max(s * (1 - s), 1e-4) / batch) + 1e-3
            on = col[col > 0]
            # Active values are U[0, 1): mean 1/2, variance 1/12.
            assert abs(on.mean() - 0.5) < 4 * np.sqrt(1 / 12 / on.size)
            assert abs(on.var() - 1 / 12) < 6 * np.sqrt(1 / 180 / on.size)
    # Features (and instances) are independent: correlations ~ 0.
    c = np.corrcoef(x[1].T)
    assert np.max(np.abs(c - np.eye(n))) < 4 / np.sqrt(batch)
    assert abs(np.corrcoef(x[0, :, 1], x[1, :, 1])[0, 1]) < 4 / np.sqrt(batch)
    # Deterministic in (seed, step); different steps differ.
    again = np.asarray(toy.sample_batch(inst, step=7, batch=batch))
    np.testing.assert_array_equal(x, again)
    other = np.asarray(toy.sample_batch(inst, step=8, batch=batch))
    assert np.mean(x == other) < 0.5


# ---------------------------------------------------------------------------------------------
# Analysis against analytic geometry


def _polygon(k, radius=1.0):
    angles = 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(angles), np.sin(angles)])


def test_feature_geometry_analytic_cases():
    # Regular pentagon: superposition 2 cos^2(72) + 2 cos^2(144) = 1.5, D_i = 1 / 2.5 = 2/5.
    geo = toy.feature_geometry(_polygon(5, 1.2))
    np.testing.assert_allclose(geo["norms"], 1.2)
    np.testing.assert_allclose(geo["superposition"], 1.5 * 1.44, rtol=1e-12)
    np.testing.assert_allclose(geo["dimensionality"], 0.4, rtol=1e-12)
    np.testing.assert_allclose(geo["dims_per_feature"], 2 / (5 * 1.44))
    # Antipodal pair + an orthogonal feature + a dead feature in 2 dims.
    W = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]])
    geo = toy.feature_geometry(W[None])
    np.testing.assert_allclose(geo["dimensionality"][0], [0.5, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(geo["superposition"][0], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(geo["represented"][0], [True, True, True, False])
    np.testing.assert_allclose(geo["wtw"][0], W.T @ W)
    np.testing.assert_array_equal(toy.feature_state(W, 0), 2)
    np.testing.assert_array_equal(toy.feature_state(W, 2), 1)
    np.testing.assert_array_equal(toy.feature_state(W[None], 3), [0])
    # Angles: a pentagon has five 72-degree gaps; the dead feature is ignored.
    np.testing.assert_allclose(toy.feature_angles(_polygon(5)), 72.0)
    np.testing.assert_allclose(toy.feature_angles(W), [180.0 - 90.0, 90.0, 180.0])


# ---------------------------------------------------------------------------------------------
# The paper's results

PENTAGON = toy.ToyConfig(5, 2, lr=1e-2, batch_size=256)


def test_five_features_in_two_dims_form_a_pentagon_when_sparse(mesh4):
    inst = toy.make_instances(5, sparsity=0.9, importance=1.0, seeds=[0, 1, 2, 3])
    result = toy.train(PENTAGON, inst, steps=2000, log_every=500, mesh=mesh4, progress=False)
    geo = toy.feature_geometry(result.params.W)
    for k in range(4):
        assert np.all(np.abs(geo["norms"][k] - 1.0) < 0.2), geo["norms"][k]
        gaps = toy.feature_angles(result.params.W[k])
        assert gaps.size == 5 and np.all(np.abs(gaps - 72.0) < 4.0), gaps
        # Each feature then has dimensionality ~2/5 (the paper's pentagon fraction).
        assert np.all(np.abs(geo["dimensionality"][k] - 0.4) < 0.05)
    assert np.all(result.loss < result.history_loss[0])


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_dense_features_only_the_m_most_important_are_represented(activation, mesh4):
    cfg = toy.ToyConfig(6, 2, activation=activation, lr=1e-2, batch_size=256)
    inst = toy.make_instances(6, sparsity=0.0, importance=0.7 ** np.arange(6), seeds=[0, 1])
    result = toy.train(cfg, inst, steps=1500, log_every=500, mesh=mesh4, progress=False)
    geo = toy.feature_geometry(result.params.W)
    for k in range(2):
        assert np.all(np.abs(geo["norms"][k, :2] - 1.0) < 0.05), geo["norms"][k]
        assert np.all(geo["norms"][k, 2:] < 0.3), geo["norms"][k]
        # The two represented features are orthogonal: no superposition when dense.
        np.testing.assert_allclose(geo["wtw"][k, :2, :2], np.eye(2), atol=0.05)


# ---------------------------------------------------------------------------------------------
# Instance axis and devices

SWEEP = toy.ToyConfig(5, 2, lr=1e-2, batch_size=128)


def _sweep_instances(count):
    sparsity = np.linspace(0.0, 0.95, count)[:, None] * np.ones(5)
    importance = np.stack([0.5 + 0.5 * np.linspace(1, 0.2, 5) ** (k + 1) for k in range(count)])
    return toy.make_instances(
        5, sparsity=sparsity, importance=importance, seeds=100 + 7 * np.arange(count)
    )


def test_eight_instances_together_equal_each_alone(mesh1):
    inst = _sweep_instances(8)
    together = toy.train(SWEEP, inst, steps=300, log_every=100, mesh=mesh1, progress=False)
    for k in range(8):
        one = jax.tree.map(lambda a: a[k : k + 1], inst)
        alone = toy.train(SWEEP, one, steps=300, log_every=100, mesh=mesh1, progress=False)
        np.testing.assert_allclose(alone.params.W[0], together.params.W[k], atol=1e-5)
        np.testing.assert_allclose(alone.params.b[0], together.params.b[k], atol=1e-5)
        np.testing.assert_allclose(alone.loss[0], together.loss[k], rtol=1e-5)
    # Different settings really gave different models (the check above is not vacuous).
    assert np.abs(together.params.W[0] - together.params.W[7]).max() > 0.1


def test_one_and_four_devices_give_the_same_sweep(mesh1, mesh4):
    inst = _sweep_instances(6)  # 6 is not divisible by 4: exercises instance padding
    a = toy.train(SWEEP, inst, steps=300, log_every=100, mesh=mesh1, progress=False)
    b = toy.train(SWEEP, inst, steps=300, log_every=100, mesh=mesh4, progress=False)
    assert a.params.W.shape == b.params.W.shape == (6, 2, 5)
    np.testing.assert_allclose(a.params.W, b.params.W, atol=1e-5)
    np.testing.assert_allclose(a.history_loss, b.history_loss, rtol=1e-5)


def test_resume_continues_exactly(tmp_path, mesh4):
    inst = _sweep_instances(4)
    full = toy.train(SWEEP, inst, steps=300, log_every=100, mesh=mesh4, progress=False)
    work = str(tmp_path / "run")
    toy.train(
        SWEEP,
        inst,
        steps=200,
        log_every=100,
        checkpoint_every=100,
        mesh=mesh4,
        workdir=work,
        progress=False,
    )
    resumed = toy.train(
        SWEEP, inst, steps=300, log_every=100, mesh=mesh4, workdir=work, progress=False
    )
    np.testing.assert_array_equal(resumed.params.W, full.params.W)
    np.testing.assert_array_equal(resumed.history_loss, full.history_loss)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [100, 200, 300]


def test_non_finite_loss_stops_the_run(mesh1):
    cfg = toy.ToyConfig(5, 2, lr=1e30, batch_size=64)
    with pytest.raises(train_lib.NonFiniteError, match="instance"):
        toy.train(cfg, _sweep_instances(2), steps=50, log_every=25, mesh=mesh1, progress=False)


def test_more_hidden_dims_than_features_is_allowed(mesh1):
    # m > n: no pressure to superpose; every dense feature gets its own direction.
    cfg = toy.ToyConfig(3, 4, lr=1e-2, batch_size=128)
    inst = toy.make_instances(3, sparsity=0.0, seeds=[5])
    result = toy.train(cfg, inst, steps=1000, log_every=500, mesh=mesh1, progress=False)
    wtw = toy.feature_geometry(result.params.W)["wtw"][0]
    np.testing.assert_allclose(wtw, np.eye(3), atol=0.05)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=-0.1), "sparsity must be in"),
        (dict(sparsity=1.0), "sparsity must be in"),
        (dict(sparsity=[0.5, 0.5]), "expected 4 values per instance"),
        (dict(importance=[1.0, 1.0, 1.0]), "importance: expected 4 values"),
        (dict(importance=[1.0, np.nan, 1.0, 1.0]), "non-finite"),
        (dict(importance=0.0), "importance must be > 0"),
        (dict(sparsity=np.zeros((3, 4)), importance=np.ones((2, 4))), "expected 3 rows"),
        (dict(seeds=[1, 2], n_instances=3), "expected 3 seeds"),
        (dict(seeds=[-1]), "seeds must be in"),
        (dict(sparsity=np.zeros((2, 2, 4))), "expected a scalar"),
    ],
)
def test_bad_instance_settings_raise_one_line_errors(kwargs, match):
    with pytest.raises(checks.InputError, match=match) as info:
        toy.make_instances(4, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_config_and_mismatches_raise(mesh1):
    with pytest.raises(checks.InputError, match="activation"):
        toy.ToyConfig(5, 2, activation="gelu")
    with pytest.raises(checks.InputError, match="n_hidden"):
        toy.ToyConfig(5, 0)
    with pytest.raises(checks.InputError, match="lr"):
        toy.ToyConfig(5, 2, lr=float("nan"))
    with pytest.raises(checks.InputError, match="n_features=5"):
        toy.train(toy.ToyConfig(5, 2), toy.make_instances(4), steps=10, mesh=mesh1, progress=False)
    with pytest.raises(checks.InputError, match="multiple of log_every"):
        toy.train(
            toy.ToyConfig(5, 2),
            toy.make_instances(5),
            steps=10,
            log_every=4,
            checkpoint_every=6,
            mesh=mesh1,
            progress=False,
        )
    with pytest.raises(checks.InputError, match="non-finite"):
        toy.feature_geometry(np.full((2, 3), np.nan))
    with pytest.raises(checks.InputError, match=r"expected W \[2, n\]"):
        toy.feature_angles(np.ones((3, 5)))

"""Tests of models/toy_pair.py: the toy model pair (shared ground truth) and its control.

Independent references: the defining linear relation acts = codes @ features recomputed in
float64, canonical correlations computed with numpy QR/SVD (a shared pair has strongly
correlated activation spaces, the control none), rotation invariances, and independence of
the control's codes.
"""

import numpy as np
import pytest

from engine import checks
from models import toy_pair

SIZES = dict(n_features=12, d_a=6, d_b=6, n_tokens=4000, sparsity=0.9, steps=1000)


@pytest.fixture(scope="module")
def shared_pair():
    return toy_pair.make_toy_pair(3, **SIZES)


@pytest.fixture(scope="module")
def control_pair():
    return toy_pair.make_toy_pair(3, shared=False, **SIZES)


def _canonical_correlations(x, y):
    """Numpy reference: singular values of Qx^T Qy after centring (x, y full column rank)."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    qx, _ = np.linalg.qr(x)
    qy, _ = np.linalg.qr(y)
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def test_shapes_alignment_and_defining_relation(shared_pair):
    p = shared_pair
    n, N = 12, 4000
    assert p.acts_a.shape == (N, 6) and p.acts_b.shape == (N, 6)
    assert p.token_ids.shape == (N,) and p.codes_a.shape == (N, n)
    assert p.features_a.shape == (n, 6) and p.features_b.shape == (n, 6)
    assert p.acts_a.dtype == np.float32 and p.token_ids.dtype == np.int32
    # acts = codes @ features (the toy model's hidden layer h = W x, row-wise), float64.
    np.testing.assert_allclose(p.acts_a, p.codes_a.astype(np.float64) @ p.features_a, atol=1e-5)
    np.testing.assert_allclose(p.acts_b, p.codes_b.astype(np.float64) @ p.features_b, atol=1e-5)
    # Tokens: 1 + dominant active feature of A, 0 ("<none>") when nothing is active.
    none = ~(p.codes_a > 0).any(axis=1)
    assert np.all(p.token_ids[none] == 0)
    expected = 1 + np.argmax(p.codes_a[~none], axis=1)
    np.testing.assert_array_equal(p.token_ids[~none], expected)
    assert p.vocab[0] == "<none>" and len(p.vocab) == n + 1
    assert p.tokens([0, 3]) == ["<none>", "feat2"]
    # The ground-truth distribution: P(feature off) = S = 0.9.
    assert abs(np.mean(p.codes_a == 0) - 0.9) < 0.01


def test_shared_pair_shares_codes_but_not_models(shared_pair):
    p = shared_pair
    assert p.codes_b is p.codes_a and p.shared
    np.testing.assert_array_equal(p.true_match, np.arange(12))
    assert p.represented_a.sum() >= 10 and p.represented_b.sum() >= 10
    assert len(p.true_pairs()) == int(np.sum(p.represented_a & p.represented_b))
    # Different seeds: the learned geometries differ (rotation-invariant Gram matrices).
    gram_a = p.features_a @ p.features_a.T
    gram_b = p.features_b @ p.features_b.T
    assert np.abs(gram_a - gram_b).max() > 0.05
    # Same features per token: the two activation spaces are strongly linearly related.
    rho = _canonical_correlations(p.acts_a, p.acts_b)
    assert rho[0] > 0.99 and np.mean(rho) > 0.6, rho
    desc = p.description
    assert desc["shared"] and "codes_b is codes_a" in desc["what_is_shared"]
    assert any("rotation" in d for d in desc["what_differs"])
    assert desc["training"]["final_loss_a"] < 0.1


def test_control_pair_shares_nothing(shared_pair, control_pair):
    p, c = shared_pair, control_pair
    assert not c.shared and np.all(c.true_match == -1) and len(c.true_pairs()) == 0
    # Side A is the same as the shared pair's (same seed); B's codes are new and independent.
    np.testing.assert_array_equal(c.acts_a, p.acts_a)
    np.testing.assert_array_equal(c.token_ids, p.token_ids)
    assert np.mean(c.codes_b == c.codes_a) < 0.9  # not a copy (zeros agree often at S=0.9)
    corr = np.corrcoef(c.codes_a.T, c.codes_b.T)[:12, 12:]
    assert np.abs(corr).max() < 5 / np.sqrt(4000)
    assert abs(np.mean(c.codes_b == 0) - 0.9) < 0.01  # same marginal statistics
    rho = _canonical_correlations(c.acts_a, c.acts_b)
    assert rho[0] < 0.1, rho


def test_rotation_and_widths(shared_pair):
    small = dict(SIZES, steps=200)
    plain = toy_pair.make_toy_pair(5, rotate=False, **small)
    rotated = toy_pair.make_toy_pair(5, rotate=True, **small)
    q = rotated.rotation_b.astype(np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-6)
    np.testing.assert_array_equal(plain.rotation_b, np.eye(6))
    np.testing.assert_allclose(rotated.acts_b, plain.acts_b.astype(np.float64) @ q, atol=1e-5)
    np.testing.assert_array_equal(rotated.acts_a, plain.acts_a)
    # Different widths on the two sides.
    wide = toy_pair.make_toy_pair(5, **dict(small, d_b=9))
    assert wide.acts_b.shape == (4000, 9) and wide.features_b.shape == (12, 9)
    assert any("hidden width" in d for d in wide.description["what_differs"])
    # Seeded: the same seed reproduces the pair; another seed does not.
    again = toy_pair.make_toy_pair(5, rotate=True, **small)
    np.testing.assert_array_equal(again.acts_b, rotated.acts_b)
    other = toy_pair.make_toy_pair(6, rotate=True, **small)
    assert not np.allclose(other.acts_a, rotated.acts_a)


def test_streams_are_row_aligned(shared_pair):
    p = shared_pair
    chunks = list(toy_pair.pair_stream(p, 1500))
    assert [c.num_valid for c in chunks] == [1500, 1500, 1000]
    tokens = np.concatenate([c.arrays[0][c.mask] for c in chunks])
    acts_b = np.concatenate([c.arrays[2][c.mask] for c in chunks])
    np.testing.assert_array_equal(tokens, p.token_ids)
    np.testing.assert_array_equal(acts_b, p.acts_b)
    side = next(iter(toy_pair.side_stream(p, "a", 100)))
    np.testing.assert_array_equal(side.arrays[1], p.acts_a[:100])
    with pytest.raises(checks.InputError, match="side"):
        toy_pair.side_stream(p, "c", 100)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity must be in"),
        (dict(sparsity=[0.9, 0.9]), "expected 12 values"),
        (dict(importance=float("nan")), "non-finite"),
        (dict(n_tokens=0), "n_tokens"),
        (dict(d_b=0), "d_b"),
        (dict(steps=-1), "steps"),
        (dict(noise_std=-1.0), "noise_std"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(SIZES, **kwargs)
    with pytest.raises(checks.InputError, match=match):
        toy_pair.make_toy_pair(0, **args)

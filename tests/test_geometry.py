"""Orthogonal Procrustes and mutual kNN (engine/geometry.py) against scipy / numpy float64."""

import numpy as np
import pytest
import similarity_refs as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from engine import checks, geometry, paired_stats, streaming

N, D1, D2 = 200, 6, 5  # shared with test_cca / test_cka: compiled steps are reused


def structured(seed, n=N, d1=D1, d2=D2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.5, 2.0, d1) + 20.0
    y = (x[:, :4] - 20.0) @ rng.normal(size=(4, d2)) + 0.8 * rng.normal(size=(n, d2))
    return x.astype(np.float32), y.astype(np.float32)


def random_pair(seed, n=N, d1=D1, d2=D2):
    return ref.random_pair(seed, n, d1, d2)


INPUTS = {"random": random_pair(0), "structured": structured(1)}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_procrustes_matches_scipy(kind, mesh):
    x, y = INPUTS[kind]
    got = geometry.procrustes(x, y, mesh=mesh, chunk_size=48)
    want = ref.procrustes_distance(x, y)  # zero-padded to a common width
    np.testing.assert_allclose(got.distance, want, rtol=1e-5)
    np.testing.assert_allclose(got.score, 1.0 - want**2 / 2.0, rtol=1e-5)
    same_width = geometry.procrustes(x[:, :D2], y, mesh=mesh)
    np.testing.assert_allclose(
        same_width.distance, ref.procrustes_distance(x[:, :D2], y), rtol=1e-5
    )


def test_procrustes_streamed_and_weighted():
    x, y = INPUTS["structured"]
    whole = geometry.procrustes(x, y)
    streamed = geometry.from_stream(streaming.ChunkStream((x, y), 48), paired_stats.default_mesh())
    np.testing.assert_allclose(streamed.score, whole.score, rtol=2e-6)
    w = np.random.default_rng(2).integers(0, 3, N)
    rep = np.repeat(np.arange(N), w)
    got = geometry.procrustes(x, y, w.astype(np.float32))
    np.testing.assert_allclose(got.distance, ref.procrustes_distance(x[rep], y[rep]), rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_procrustes_is_one_up_to_rotation_translation_and_scale(seed, scale):
    x, y = structured(seed)
    q = ortho_group.rvs(D1, random_state=seed)
    moved = (x @ q * scale - 3.0).astype(np.float32)
    np.testing.assert_allclose(geometry.procrustes(x, moved).score, 1.0, atol=2e-6)
    np.testing.assert_allclose(
        geometry.procrustes(x, y).score, geometry.procrustes(moved, y).score, rtol=2e-5
    )
    np.testing.assert_allclose(
        geometry.procrustes(x, y).score, geometry.procrustes(y, x).score, rtol=1e-5
    )


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_mutual_knn_matches_numpy(kind, mesh):
    x, y = INPUTS[kind]
    for k, tile, normalize in ((5, 32, False), (3, 1024, True)):
        got = geometry.mutual_knn(x, y, k=k, mesh=mesh, tile=tile, normalize=normalize)
        assert got.score == pytest.approx(ref.mutual_knn(x, y, k, normalize=normalize), abs=1e-12)
    np.testing.assert_array_equal(geometry.knn_indices(x, 4, mesh=mesh, tile=16), ref.knn(x, 4))


def test_mutual_knn_ties_go_to_the_lower_index():
    # Integer rows: inner products are exact in float32 and tie often.
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(N, 3)).astype(np.float32)
    y = rng.integers(-2, 3, size=(N, 3)).astype(np.float32)
    np.testing.assert_array_equal(geometry.knn_indices(x, 6), ref.knn(x, 6))
    assert geometry.mutual_knn(x, y, k=6).score == pytest.approx(ref.mutual_knn(x, y, 6), abs=1e-12)


def test_mutual_knn_weights_average_over_query_rows():
    x, y = INPUTS["structured"]
    w = np.random.default_rng(6).uniform(0, 1, N)
    got = geometry.mutual_knn(x, y, w, k=5)
    assert got.score == pytest.approx(ref.mutual_knn(x, y, 5, w=w), rel=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 10))
def test_mutual_knn_one_on_identical_and_symmetric(seed, k):
    x, y = structured(seed)
    assert geometry.mutual_knn(x, x, k=k).score == 1.0
    assert geometry.mutual_knn(x, y, k=k).score == geometry.mutual_knn(y, x, k=k).score


def test_bad_inputs():
    x, y = INPUTS["random"]
    with pytest.raises(checks.InputError, match="smaller than"):
        geometry.mutual_knn(x, y, k=N)
    with pytest.raises(checks.InputError, match="k must be"):
        geometry.mutual_knn(x, y, k=0)
    with pytest.raises(checks.InputError, match="zero"):
        geometry.mutual_knn(np.zeros_like(x), y, k=3, normalize=True)
    with pytest.raises(checks.InputError, match="constant"):
        geometry.procrustes(np.ones_like(x), y)
    with pytest.raises(checks.InputError, match="rows"):
        geometry.procrustes(x, y[:5])
    with pytest.raises(checks.InputError, match="dtype"):
        geometry.mutual_knn(x, y.astype(np.float64), k=3)


@pytest.mark.parametrize("normalize", [True, False])
def test_mutual_knn_with_a_large_common_offset_matches_float64(normalize, mesh):
    # offset / std = 1e4: every cosine is 1 - O(1e-8), below float32's resolution if the
    # cosines themselves are ranked in float32 (the score was 0.09 against 0.26).
    rng = np.random.default_rng(12)
    z = rng.normal(size=(N, 4))
    x = z @ rng.normal(size=(4, 8)) + 1e4 * rng.normal(size=8)
    y = z @ rng.normal(size=(4, 6)) + 0.5 * rng.normal(size=(N, 6)) + 1e4 * rng.normal(size=6)
    want = ref.mutual_knn(x, y, 5, normalize=normalize)
    assert want > 0.15 or not normalize  # plain inner products: the offset dominates
    got = geometry.mutual_knn(x, y, k=5, mesh=mesh, tile=64, normalize=normalize)
    assert got.score == pytest.approx(want, abs=1e-12)
    np.testing.assert_array_equal(
        geometry.knn_indices(x, 5, mesh=mesh, normalize=normalize),
        ref.knn(x, 5, normalize=normalize),
    )


def test_mutual_knn_normalized_ties_go_to_the_lower_index():
    # Integer rows, many of them parallel: exact cosine ties after normalisation.
    rng = np.random.default_rng(13)
    x = rng.integers(-1, 2, size=(N, 3)).astype(np.float64)
    x[np.all(x == 0, axis=1)] = 1.0
    y = rng.integers(1, 3, size=(N, 2)).astype(np.float64)
    for a in (x, y):
        np.testing.assert_array_equal(
            geometry.knn_indices(a, 7, normalize=True), ref.knn(a, 7, normalize=True)
        )

"""engine/pca.py, circular.py, group_geometry.py and rsa.mantel: concept geometry against
independent references."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from engine import accumulators, checks, circular, group_geometry, pca, rsa, streaming
from models import planted


def _ring(m, radius=1.0, rotation=0.0, reflect=False, centre=(0.0, 0.0)):
    phi = 2 * np.pi * np.arange(m) / m
    phi = -phi if reflect else phi
    return np.stack(
        [radius * np.cos(phi + rotation) + centre[0], radius * np.sin(phi + rotation) + centre[1]],
        1,
    )


def _spearman_upper(A, B):
    iu = np.triu_indices(A.shape[0], 1)
    return scipy.stats.spearmanr(A[iu], B[iu]).statistic


def _cos(X):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    return Xn @ Xn.T


# -- PCA ------------------------------------------------------------------------------------


def test_pca_matches_covariance_eigendecomposition(rng):
    X = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 3.0
    res = pca.pca(X, 3)
    cov = np.cov(X.T, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    np.testing.assert_allclose(res.explained_variance, vals[:3], rtol=1e-10)
    assert res.total_variance == pytest.approx(np.trace(cov), rel=1e-12)
    for c in range(3):  # same directions up to sign
        assert abs(res.components[c] @ vecs[:, c]) == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(res.project(X), (X - X.mean(0)) @ res.components.T, atol=1e-10)


def test_pca_integer_weights_equal_repeated_rows(rng):
    X = rng.normal(size=(12, 4))
    w = rng.integers(0, 4, size=12)
    w[0] = 2
    a = pca.pca(X, 2, weights=w)
    b = pca.pca(np.repeat(X, w, axis=0), 2)
    np.testing.assert_allclose(a.explained_variance, b.explained_variance, rtol=1e-10)
    np.testing.assert_allclose(np.abs(a.components @ b.components.T), np.eye(2), atol=1e-8)


def _ref_recon_pca(W, codes):
    active = np.any(codes > 0, axis=1)
    R = codes[active].astype(np.float64) @ W.astype(np.float64)
    _, s, vt = np.linalg.svd(R - R.mean(0), full_matrices=False)
    return (s**2) / active.sum(), vt, R


def test_reconstruction_pca_streamed_equals_explicit(mesh, rng):
    m, d, n = 5, 20, 1000
    W = rng.normal(size=(m, d))
    codes = np.where(rng.random((n, m)) < 0.15, rng.random((n, m)), 0.0).astype(np.float32)
    var, vt, R = _ref_recon_pca(W, codes)
    acc = pca.ActiveRowMoments(m)
    stream = streaming.ChunkStream((codes,), 96, name="codes")  # ragged last chunk
    moments = acc.finalize(accumulators.accumulate(acc, stream, mesh))
    assert moments.count == np.any(codes > 0, axis=1).sum()
    for res in (
        pca.reconstruction_pca(W, moments=moments, n_components=3),
        pca.reconstruction_pca(W, codes, n_components=3),
    ):
        np.testing.assert_allclose(res.explained_variance, var[:3], rtol=1e-4)
        assert res.total_variance == pytest.approx(var.sum(), rel=1e-4)
        np.testing.assert_allclose(np.abs(np.sum(res.components * vt[:3], 1)), 1.0, atol=1e-4)
        np.testing.assert_allclose(res.mean, R.mean(0), rtol=1e-4, atol=1e-5)


# -- circularity ----------------------------------------------------------------------------


@pytest.mark.parametrize("reflect", [False, True])
def test_perfect_circle_scores_one_with_exact_p(reflect):
    m = 7
    pts = _ring(m, radius=2.5, rotation=1.1, reflect=reflect, centre=(4.0, -1.0))
    res = circular.circularity(pts, np.arange(m), m)
    assert res.score == pytest.approx(1.0, abs=1e-12)
    assert res.direction == (-1 if reflect else 1)
    assert res.ring_cv == pytest.approx(0.0, abs=1e-12)
    # Exact null: the 2m rotations/reflections of the labels tie with the truth.
    assert res.test.exact and res.test.num_permutations == math.factorial(m)
    assert res.p == pytest.approx(2 * m / math.factorial(m))


def test_double_winding_scores_zero():
    # theta = 2 phi: sum exp(i(2phi - phi)) and sum exp(i(2phi + phi)) both vanish for m = 7.
    m = 7
    phi = 2 * np.pi * np.arange(m) / m
    pts = np.stack([np.cos(2 * phi), np.sin(2 * phi)], 1)
    assert circular.circularity(pts, np.arange(m), m).score == pytest.approx(0.0, abs=1e-12)


def test_months_sampled_null_and_many_points_per_item(rng):
    m = 12
    ring = _ring(m, rotation=0.3)
    order = np.repeat(np.arange(m), 30)
    # Radial spread only, the same for every item (so the item centroids stay on a ring).
    pts = ring[order] * np.tile(rng.uniform(0.5, 1.5, size=30), m)[:, None]
    res = circular.circularity(pts, order, m, num_permutations=300, seed=3)
    assert res.score == pytest.approx(1.0, abs=1e-12)
    assert not res.test.exact and res.test.num_permutations == 300
    assert res.p == pytest.approx(1 / 301)
    assert res.test.null_quantiles["0.99"] < 0.9


def test_circularity_statistic_matches_bruteforce(rng):
    m = 5
    pts = rng.normal(size=(m * 3, 2))
    order = np.tile(np.arange(m), 3)
    res = circular.circularity(pts, order, m)
    centre = np.stack([pts[order == i].mean(0) for i in range(m)]).mean(0)
    theta = np.arctan2(*(pts - centre).T[::-1])

    def score(perm):
        phi = 2 * np.pi * np.asarray(perm)[order] / m
        return max(
            abs(np.mean(np.exp(1j * (theta - phi)))), abs(np.mean(np.exp(1j * (theta + phi))))
        )

    null = np.asarray([score(p) for p in itertools.permutations(range(m))])
    assert res.score == pytest.approx(score(range(m)), abs=1e-12)
    assert res.p == pytest.approx(np.mean(null >= res.score - 1e-9))
    np.testing.assert_allclose(np.sort(res.test.null), np.sort(null), atol=1e-12)


def test_null_calibration_random_points():
    # Under no ordering, exact permutation p-values are (super-)uniform.
    ps = [
        circular.circularity(np.random.default_rng(s).normal(size=(6, 2)), np.arange(6), 6).p
        for s in range(200)
    ]
    ps = np.asarray(ps)
    assert np.mean(ps <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)
    assert np.mean(ps <= 0.5) == pytest.approx(0.5, abs=0.12)


def test_decoder_circularity_planted_and_unplanted():
    pair = planted.make_planted_pair(0, n_tokens=64)
    res, p = circular.decoder_circularity(pair.atoms_a[pair.concept_features], np.arange(7), 7)
    assert res.score > 0.999 and res.p < 0.01
    assert res.plane_fraction == pytest.approx(1.0, abs=1e-6)
    assert p.components.shape == (2, pair.atoms_a.shape[1])
    ctrl = planted.make_planted_pair(0, n_tokens=64, planted=False, shared=False)
    res_c, _ = circular.decoder_circularity(ctrl.atoms_a[ctrl.concept_features], np.arange(7), 7)
    assert res_c.p > 0.05 and res_c.score < 0.8


def test_circularity_bad_inputs():
    pts = _ring(7)
    with pytest.raises(checks.InputError, match="need at least 3 items"):
        circular.circularity(pts[:2], [0, 1], 7)
    bad = pts.copy()
    bad[2, 0] = np.nan
    with pytest.raises(checks.InputError, match="non-finite"):
        circular.circularity(bad, np.arange(7), 7)
    with pytest.raises(checks.InputError, match="period"):
        circular.circularity(pts, np.arange(7), 5)
    with pytest.raises(checks.InputError, match="2-D points"):
        circular.circularity(np.zeros((7, 3)), np.arange(7), 7)
    with pytest.raises(checks.InputError, match="one order value per point"):
        circular.circularity(pts, np.arange(6), 7)
    with pytest.raises(checks.InputError, match="at least 3 rows"):
        circular.decoder_circularity(np.ones((2, 5)), [0, 1], 7)
    with pytest.raises(checks.InputError, match="exactly one of codes or moments"):
        pca.reconstruction_pca(np.ones((3, 4)))
    with pytest.raises(checks.InputError, match="activate the cluster"):
        pca.reconstruction_pca(np.ones((3, 4)), np.zeros((10, 3)))


# -- across models --------------------------------------------------------------------------


def test_compare_geometry_rotation_and_independent(rng):
    pair = planted.make_planted_pair(2, n_tokens=64, b_perturb=0.0)
    A = pair.atoms_a[pair.concept_features]
    B = pair.atoms_b[pair.concept_features]
    res = circular.compare_geometry(A, B)
    assert res.rsa.observed == pytest.approx(1.0, abs=1e-9)
    assert res.ordering.observed == pytest.approx(1.0, abs=1e-6)
    assert res.rsa.p < 0.01 and res.ordering.p < 0.01
    # A reflection of B leaves both scores at 1 (either sense of rotation is agreement).
    R = np.eye(B.shape[1])
    R[0, 0] = -1
    res2 = circular.compare_geometry(A, B @ R)
    assert res2.ordering.observed == pytest.approx(1.0, abs=1e-6)
    assert res2.rsa.observed == pytest.approx(1.0, abs=1e-9)
    assert res.direction in (1, -1) and res2.direction in (1, -1)
    indep = circular.compare_geometry(
        A, _ring(7) @ rng.normal(size=(2, 9)) + rng.normal(size=(7, 9))
    )
    assert indep.rsa.p > 0.01 or indep.ordering.p > 0.01


def test_rsa_test_matches_scipy_and_bruteforce_mantel(rng):
    m = 6
    A = _cos(rng.normal(size=(m, 5)))
    B = _cos(rng.normal(size=(m, 5)) + 0.8 * rng.normal(size=(m, 5)))
    res = rsa.mantel(A, B)
    assert res.observed == pytest.approx(_spearman_upper(A, B), abs=1e-12)
    null = np.asarray(
        [_spearman_upper(A, B[np.ix_(p, p)]) for p in itertools.permutations(range(m))]
    )
    assert res.p == pytest.approx(np.mean(null >= res.observed - 1e-9))
    assert res.null_mean == pytest.approx(null.mean(), abs=1e-12)


def test_rsa_with_ties_matches_scipy(rng):
    C = _cos(np.concatenate([_ring(7), np.ones((7, 1))], 1))  # circulant: many ties
    D = _cos(rng.normal(size=(7, 3)))
    # Float round-off makes the circulant's equal entries differ by ulps; rsa.mantel ranks them
    # as ties, as scipy does on the exactly tied (rounded) matrix.
    assert rsa.mantel(C, D).observed == pytest.approx(
        _spearman_upper(np.round(C, 10), D), abs=1e-12
    )


def test_group_distance_rsa_reference_and_nulls(rng):
    pair = planted.make_planted_pair(0, n_tokens=64)
    ga = {k: pair.atoms_a[v] for k, v in pair.groups.items()}
    gb = {k: pair.atoms_b[v] for k, v in pair.groups.items()}
    res = group_geometry.group_distance_rsa(ga, gb)
    names = list(ga)
    ref = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                ref[i, j] = 1 - np.mean(
                    _cos(np.concatenate([ga[a], ga[b]]))[: len(ga[a]), len(ga[a]) :]
                )
    np.testing.assert_allclose(res.dist_a, ref, atol=1e-6)
    assert res.rsa.observed == pytest.approx(_spearman_upper(res.dist_a, res.dist_b))
    assert res.rsa.observed > 0.9 and res.rsa.p < 0.01
    cent = group_geometry.group_distance_rsa(ga, gb, linkage="centroid")
    assert cent.rsa.p < 0.01
    ctrl = planted.make_planted_pair(0, n_tokens=64, planted=False, shared=False)
    res_c = group_geometry.group_distance_rsa(
        {k: ctrl.atoms_a[v] for k, v in ctrl.groups.items()},
        {k: ctrl.atoms_b[v] for k, v in ctrl.groups.items()},
    )
    assert res_c.rsa.p > 0.01


def test_group_and_geometry_bad_inputs(rng):
    g = {
        "Food": rng.normal(size=(3, 4)),
        "Numbers": rng.normal(size=(2, 4)),
        "Days": rng.normal(size=(4, 4)),
    }
    with pytest.raises(checks.InputError, match="unknown group name"):
        group_geometry.group_distance_rsa(g, {**g, "Emotions": rng.normal(size=(2, 4))})
    with pytest.raises(checks.InputError, match="has no features"):
        group_geometry.group_distance_rsa(g, {**g, "Food": np.zeros((0, 4))})
    with pytest.raises(checks.InputError, match="need at least 3"):
        group_geometry.group_distance_rsa(
            {"Food": g["Food"], "Days": g["Days"]}, {"Food": g["Food"], "Days": g["Days"]}
        )
    with pytest.raises(checks.InputError, match="non-finite"):
        group_geometry.group_distance_rsa(g, {**g, "Food": np.full((2, 4), np.nan)})
    with pytest.raises(checks.InputError, match="linkage"):
        group_geometry.group_distance_rsa(g, g, linkage="single")
    with pytest.raises(checks.InputError, match="rows"):
        circular.compare_geometry(rng.normal(size=(7, 4)), rng.normal(size=(6, 4)))
    with pytest.raises(checks.InputError, match="at least 4"):
        circular.compare_geometry(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)))
    with pytest.raises(checks.InputError, match="zero norm"):
        circular.compare_geometry(
            np.vstack([np.zeros((1, 4)), rng.normal(size=(5, 4))]), rng.normal(size=(6, 4))
        )
    with pytest.raises(checks.InputError, match="all off-diagonal entries are equal"):
        rsa.mantel(np.ones((4, 4)), _cos(rng.normal(size=(4, 3))))


def test_tied_ranks(rng):
    v = rng.normal(size=50)
    v[10] = v[3]
    np.testing.assert_allclose(rsa.rankdata(v, rel_tol=rsa.RANK_TIE_TOL), scipy.stats.rankdata(v))
    w = np.array([0.3, 0.3 + 1e-9, 0.1, 0.3 - 1e-9, 0.7])
    np.testing.assert_allclose(rsa.rankdata(w, rel_tol=rsa.RANK_TIE_TOL), [3, 3, 1, 3, 5])

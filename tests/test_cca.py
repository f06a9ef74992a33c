"""CCA / SVCCA / PWCCA (engine/cca.py) against float64 numpy references on the data itself."""

import numpy as np
import pytest
import similarity_refs as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from engine import cca, checks, paired_stats, streaming

N, D1, D2 = 200, 6, 5  # shared with test_cka / test_geometry: compiled steps are reused


def well_conditioned(rng, d, lo=0.5, hi=2.0):
    """Random invertible map with singular values in [lo, hi] (float32 moments stay exact
    to ~1e-6; the error of whitening grows with the condition number)."""
    q1 = ortho_group.rvs(d, random_state=rng)
    q2 = ortho_group.rvs(d, random_state=rng)
    return q1 @ np.diag(rng.uniform(lo, hi, d)) @ q2


def structured(seed, n=N, d1=D1, d2=D2, noise=0.7, offset=50.0):
    """Y shares a 4-dim subspace with X plus noise; large means test the centring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) @ well_conditioned(rng, d1) + offset
    y = (x[:, :4] - offset) @ rng.normal(size=(4, d2)) + noise * rng.normal(size=(n, d2)) - offset
    return x.astype(np.float32), y.astype(np.float32)


def random_pair(seed, n=N, d1=D1, d2=D2):
    return ref.random_pair(seed, n, d1, d2)


INPUTS = {"random": random_pair(0), "structured": structured(1)}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_cca_svcca_pwcca_match_float64_references(kind, mesh):
    x, y = INPUTS[kind]
    want = ref.cca_qr(x, y)[0]
    got = cca.cca(x, y, mesh=mesh, chunk_size=48)
    np.testing.assert_allclose(got.coefficients, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got.score, want.mean(), rtol=1e-5)
    assert (got.components_x, got.components_y, got.rows) == (D1, D2, N)

    want_sv, kx, ky = ref.svcca_google(x, y, 0.99)
    got_sv = cca.svcca(x, y, mesh=mesh)
    assert (got_sv.components_x, got_sv.components_y) == (kx, ky)
    np.testing.assert_allclose(got_sv.score, want_sv, rtol=1e-5)

    np.testing.assert_allclose(cca.pwcca(x, y, mesh=mesh).score, ref.pwcca_morcos(x, y), rtol=1e-5)
    np.testing.assert_allclose(
        cca.pwcca(x, y, mesh=mesh, weight_side="y").score, ref.pwcca_morcos(y, x), rtol=1e-5
    )


def test_svcca_threshold_keeps_the_right_number_of_components():
    # Known spectrum: variances 8, 4, 2, 1, 0.5, 0.3, 0.01 (sum 15.81). 99 % needs the first
    # 6 (15.80 / 15.81 = 0.9994 >= 0.99 > 15.50 / 15.81 = 0.980); 90 % needs 4 (15 / 15.81 =
    # 0.949 >= 0.9 > 14 / 15.81). The docs/references.md pitfall (normalised cumsum compared with
    # threshold * total variance) would keep one.
    rng = np.random.default_rng(3)
    var = np.array([8, 4, 2, 1, 0.5, 0.3, 0.01])
    z = rng.normal(size=(4000, 7))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T, bias=True))).T
    q = ortho_group.rvs(7, random_state=rng)
    x = (z * np.sqrt(var)) @ q
    y = x @ well_conditioned(rng, 7) + 0.1 * rng.normal(size=x.shape)
    x, y = x.astype(np.float32), y.astype(np.float32)
    got = cca.svcca(x, y)
    assert got.components_x == 6
    assert cca.svcca(x, y, threshold=0.9).components_x == 4
    assert cca.svcca(x, y, num_components=2).components_x == 2
    want, kx, _ = ref.svcca_google(x, y, 0.99)
    assert kx == 6
    np.testing.assert_allclose(got.score, want, rtol=1e-5)
    d = got.to_dict()
    assert d["components"][0] == 6 and d["n_over_d"] == pytest.approx(4000 / 7)


def test_streamed_equals_all_at_once_and_generator_source(mesh):
    x, y = INPUTS["structured"]
    whole = cca.svcca(x, y, mesh=mesh, chunk_size=256)  # one chunk
    chunked = cca.svcca(x, y, mesh=mesh, chunk_size=48)  # ragged last chunk

    def open_at(start):
        for lo in range(start, N, 50):
            yield x[lo : lo + 50], y[lo : lo + 50]

    streamed = cca.from_stream("svcca", streaming.ChunkStream(open_at, 48), mesh)
    for other in (chunked, streamed):
        np.testing.assert_allclose(other.coefficients, whole.coefficients, rtol=2e-6, atol=2e-6)
        assert other.components_x == whole.components_x


def test_plain_crossmoments_accumulator_works_too(mesh):
    from engine import accumulators

    x, y = INPUTS["structured"]
    acc = accumulators.CrossMoments(D1, D2)
    moments = acc.finalize(accumulators.accumulate(acc, streaming.ChunkStream((x, y), 48), mesh))
    for method in ("cca", "svcca", "pwcca"):
        got = cca.from_stats(method, moments)
        want = cca.METHODS[method](paired_stats.pair_stats(x, y, mesh=mesh, chunk_size=48))
        np.testing.assert_allclose(got.score, want.score, rtol=2e-6)
        assert got.rows == N


def test_frequency_weights_equal_repeated_rows():
    x, y = INPUTS["structured"]
    w = np.random.default_rng(4).integers(0, 4, N)
    rep = np.repeat(np.arange(N), w)
    for method in ("cca", "pwcca"):
        got = cca.METHODS[method](paired_stats.pair_stats(x, y, w.astype(np.float32)))
        want = cca.METHODS[method](paired_stats.pair_stats(x[rep], y[rep]))
        np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    got = cca.cca(x, y, w.astype(np.float32))
    np.testing.assert_allclose(got.coefficients, ref.cca_qr(x, y, w)[0], rtol=1e-5, atol=2e-6)
    assert got.rows == int(np.count_nonzero(w)) and got.n == pytest.approx(w.sum())


def _stats(x, y):
    return paired_stats.stats_from_numpy(x, y)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_cca_and_full_rank_svcca_invariant_to_invertible_maps(seed):
    x, y = structured(seed)
    rng = np.random.default_rng(seed + 1)
    ax, ay = well_conditioned(rng, D1), well_conditioned(rng, D2)
    base = cca.cca(x, y).coefficients
    moved = cca.cca((x @ ax + 3.0).astype(np.float32), (y @ ay).astype(np.float32))
    np.testing.assert_allclose(moved.coefficients, base, rtol=2e-5, atol=5e-6)
    sv = cca.svcca(x, y, threshold=1.0).score
    sv_moved = cca.svcca(
        (x @ ax).astype(np.float32), (y @ ay - 7.0).astype(np.float32), threshold=1.0
    ).score
    np.testing.assert_allclose(sv_moved, sv, rtol=2e-5)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_identical_inputs_give_one_and_symmetry(seed):
    x, y = structured(seed)
    for fn in (cca.cca, cca.svcca, cca.pwcca):
        np.testing.assert_allclose(fn(x, x).score, 1.0, atol=2e-6)
    np.testing.assert_allclose(
        cca.cca(x, y).coefficients, cca.cca(y, x).coefficients, rtol=1e-5, atol=2e-6
    )
    np.testing.assert_allclose(cca.svcca(x, y).score, cca.svcca(y, x).score, rtol=1e-5)
    # PWCCA is not symmetric; swapping the inputs swaps the weighting side.
    np.testing.assert_allclose(
        cca.pwcca(x, y).score, cca.pwcca(y, x, weight_side="y").score, rtol=1e-5
    )


def test_zero_variance_column_is_dropped_not_inverted():
    x, y = INPUTS["structured"]
    x_const = np.concatenate([x, np.full((N, 1), 3.25, np.float32)], axis=1)
    got = cca.cca(x_const, y)
    assert got.components_x == D1
    np.testing.assert_allclose(got.coefficients, cca.cca(x, y).coefficients, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(cca.pwcca(x_const, y).score, cca.pwcca(x, y).score, rtol=1e-5)


def test_saturation_is_reported_when_n_is_small():
    x, y = random_pair(5, n=20, d1=12, d2=12)
    got = cca.svcca(x, y, threshold=1.0)
    # 12 + 12 directions in the 19-dim space of centred 20-row columns: 5 must coincide.
    assert got.saturated == 5
    np.testing.assert_allclose(got.coefficients[:5], 1.0, atol=1e-3)
    assert got.coefficients[5] < 0.999


def test_d_at_least_n_raises_unless_regularised():
    x, y = random_pair(6, n=10, d1=12, d2=4)
    with pytest.raises(checks.InputError, match="epsilon"):
        cca.cca(x, y)
    eps = 0.1
    got = cca.cca(x, y, epsilon=eps)
    sx = ref.centre(x).T @ ref.centre(x) / 10 + eps * np.eye(12)
    sy = ref.centre(y).T @ ref.centre(y) / 10 + eps * np.eye(4)
    sxy = ref.centre(x).T @ ref.centre(y) / 10

    def inv_sqrt(c):
        e, v = np.linalg.eigh(c)
        return v @ np.diag(e**-0.5) @ v.T

    want = np.linalg.svd(inv_sqrt(sx) @ sxy @ inv_sqrt(sy), compute_uv=False)
    np.testing.assert_allclose(got.coefficients, want, rtol=1e-4, atol=1e-5)
    assert got.coefficients.max() < 1.0
    assert cca.svcca(x, y).components_x <= 9  # SVCCA reduces d first: no error


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x, y: (x[:-1], y), "rows"),
        (lambda x, y: (x[:1], y[:1]), "at least 2 rows"),
        (lambda x, y: (np.where(np.arange(N)[:, None] == 3, np.nan, x), y), "non-finite"),
        (lambda x, y: (x, np.where(np.arange(N)[:, None] == 5, np.inf, y)), "non-finite"),
        (lambda x, y: (x.astype(np.float64), y), "dtype"),
        (lambda x, y: (np.ones_like(x), y), "constant"),
        (lambda x, y: (x[:, 0], y), "2-D"),
    ],
)
def test_bad_inputs_raise_one_line_errors(bad, match):
    x, y = INPUTS["random"]
    with pytest.raises(checks.InputError, match=match):
        cca.svcca(*bad(x, y))


def test_bad_options():
    x, y = INPUTS["random"]
    with pytest.raises(checks.InputError, match="threshold"):
        cca.svcca(x, y, threshold=1.5)
    with pytest.raises(checks.InputError, match="weight_side"):
        cca.pwcca(x, y, weight_side="z")
    with pytest.raises(checks.InputError, match="weights"):
        cca.cca(x, y, -np.ones(N))
    with pytest.raises(checks.InputError, match="unknown CCA method"):
        cca.from_stats("kcca", _stats(x, y))


# --------------------------------------------------------------------------------------------
# Rank decisions relative to noise, not to scale (issue 12).
# --------------------------------------------------------------------------------------------


def _scaled_columns(x, factors):
    return (np.asarray(x, np.float64) * np.asarray(factors, np.float64)).astype(x.dtype)


@pytest.mark.parametrize("factor", [3e-4, 1e-6, 1e4])
def test_cca_invariant_to_scaling_one_column_from_exact_statistics(factor):
    # Float64 statistics of the data: nothing is noise, so no direction may be dropped. A
    # rank cut relative to the largest covariance eigenvalue dropped the scaled column.
    x, y = structured(5)
    x, y = x.astype(np.float64), y.astype(np.float64)
    f = np.ones(D1)
    f[2] = factor
    xs = x * f
    base = cca.cca_from_stats(_stats(x, y))
    got = cca.cca_from_stats(_stats(xs, y))
    assert got.components_x == D1
    np.testing.assert_allclose(got.coefficients, base.coefficients, atol=1e-6)
    np.testing.assert_allclose(got.coefficients, ref.cca_qr(xs, y)[0], atol=1e-6)
    np.testing.assert_allclose(
        cca.pwcca_from_stats(_stats(xs, y)).score, ref.pwcca_morcos(xs, y), atol=1e-6
    )


@pytest.mark.parametrize("factor", [3e-4, 1e4])
def test_cca_invariant_to_scaling_one_column_from_float32_accumulators(factor, mesh):
    x, y = structured(6)
    f = np.ones(D1)
    f[1] = factor
    base = cca.cca(x, y, mesh=mesh, chunk_size=48)
    got = cca.cca(_scaled_columns(x, f), y, mesh=mesh, chunk_size=48)
    assert got.components_x == D1
    np.testing.assert_allclose(got.coefficients, base.coefficients, atol=1e-6)
    np.testing.assert_allclose(got.coefficients, ref.cca_qr(x * f, y)[0], atol=2e-6)


def test_cca_invariant_to_ill_conditioned_invertible_map_from_exact_statistics():
    # A map with singular values 1 .. 1e-4 (covariance eigenvalue ratio 1e-8): invertible, so
    # CCA must not change; float64 statistics resolve it exactly.
    x, y = structured(7)
    x, y = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.default_rng(8)
    q1, q2 = ortho_group.rvs(D1, random_state=rng), ortho_group.rvs(D1, random_state=rng)
    a = q1 @ np.diag(np.logspace(0, -4, D1)) @ q2
    base = cca.cca_from_stats(_stats(x, y))
    got = cca.cca_from_stats(_stats(x @ a + 3.0, y))
    assert got.components_x == D1
    np.testing.assert_allclose(got.coefficients, base.coefficients, atol=1e-6)


def test_duplicated_and_constant_columns_are_still_dropped(mesh):
    # Columns that are linear combinations of others (up to the data's own rounding) and a
    # constant column: their directions are at the statistics' noise level and are dropped.
    x, y = structured(9)
    r = np.random.default_rng(10).normal(size=D1)

    def with_extra(a):
        return np.column_stack([a, a[:, 0] * 2.5, np.full(N, 0.1, a.dtype), a @ r.astype(a.dtype)])

    x64 = x.astype(np.float64)
    for stats in (
        paired_stats.pair_stats(with_extra(x), y, mesh=mesh, chunk_size=48),
        _stats(with_extra(x64), y),
    ):
        got = cca.cca_from_stats(stats)
        assert got.components_x == D1
        np.testing.assert_allclose(got.coefficients, ref.cca_qr(x, y)[0], atol=2e-5)


def test_svcca_with_fewer_rows_than_components_is_flagged_uninformative():
    # Unrelated data, 20 pairs, 64 columns: SVCCA keeps ~19 components per side, so every
    # coefficient is 1 for ANY data (the centred column spaces must intersect in R^19).
    x, y = ref.random_pair(11, 20, 64, 64)
    got = cca.svcca(x, y)
    assert got.score > 0.99  # the number itself is meaningless ...
    d = got.to_dict()
    assert d["informative"] is False  # ... and says so
    assert "n/d" in d["uninformative_reason"] and "20" in d["uninformative_reason"]
    ok = cca.svcca(*INPUTS["random"]).to_dict()
    assert ok["informative"] is True and "uninformative_reason" not in ok

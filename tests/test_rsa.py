"""RSA (engine/rsa.py) against np.corrcoef + scipy.stats on the upper triangles."""

import numpy as np
import pytest
import similarity_refs as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import checks, rsa

N, D1, D2 = 60, 6, 5


def structured(seed, n=N, d1=D1, d2=D2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + rng.normal(size=(n, 1)) * 3.0  # row offsets: centring
    y = x[:, :4] @ rng.normal(size=(4, d2)) + 0.8 * rng.normal(size=(n, d2))
    return x.astype(np.float32), y.astype(np.float32)


def random_pair(seed, n=N, d1=D1, d2=D2):
    return ref.random_pair(seed, n, d1, d2)


INPUTS = {"random": random_pair(0), "structured": structured(1)}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_exact_spearman_and_pearson_match_scipy(kind, mesh):
    x, y = INPUTS[kind]
    got = rsa.rsa(x, y, mesh=mesh)
    assert got.exact and got.pairs == N * (N - 1) // 2
    np.testing.assert_allclose(got.score, ref.rsa(x, y, "spearman"), rtol=1e-5, atol=1e-6)
    for tile in (7, N):
        p = rsa.rsa(x, y, method="pearson", mesh=mesh, tile=tile)
        np.testing.assert_allclose(p.score, ref.rsa(x, y, "pearson"), rtol=1e-5, atol=1e-6)


def test_ties_get_average_ranks():
    x, y = INPUTS["structured"]
    # Duplicated rows give exactly tied correlations on both sides.
    x = np.concatenate([x, x[:10]])
    y = np.concatenate([y, y[:10]])
    np.testing.assert_allclose(rsa.rsa(x, y).score, ref.rsa(x, y, "spearman"), rtol=1e-5)
    v = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(rsa.rankdata(v), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_weighted_pearson_uses_pair_weights(mesh):
    x, y = INPUTS["structured"]
    w = np.random.default_rng(3).uniform(0.0, 2.0, N)
    got = rsa.rsa(x, y, w, method="pearson", mesh=mesh, tile=16)
    np.testing.assert_allclose(got.score, ref.rsa_weighted_pearson(x, y, w), rtol=1e-5)


def test_sampled_spearman_within_its_standard_error():
    x, y = structured(4, n=200)
    exact = rsa.rsa(x, y).score
    estimates, errors = [], []
    for seed in range(6):
        got = rsa.rsa(x, y, max_exact_n=100, num_samples=5000, seed=seed)
        assert not got.exact and got.num_samples == 5000
        assert abs(got.score - exact) < 4 * got.standard_error
        estimates.append(got.score)
        errors.append(got.standard_error)
    ratio = np.std(estimates, ddof=1) / np.mean(errors)
    assert 0.3 < ratio < 2.5, ratio


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_identical_inputs_give_one_and_symmetry(seed):
    x, y = structured(seed)
    for method in ("spearman", "pearson"):
        np.testing.assert_allclose(rsa.rsa(x, x, method=method).score, 1.0, atol=1e-6)
        np.testing.assert_allclose(
            rsa.rsa(x, y, method=method).score, rsa.rsa(y, x, method=method).score, atol=1e-6
        )


def test_bad_inputs():
    x, y = INPUTS["random"]
    x_const = x.copy()
    x_const[7] = 1.5
    with pytest.raises(checks.InputError, match="row 7"):
        rsa.rsa(x_const, y)
    with pytest.raises(checks.InputError, match="no row weights"):
        rsa.rsa(x, y, np.ones(N))
    with pytest.raises(checks.InputError, match="at least 3 rows"):
        rsa.rsa(x[:2], y[:2])
    with pytest.raises(checks.InputError, match="2 columns"):
        rsa.rsa(x[:, :1], y)
    with pytest.raises(checks.InputError, match="method"):
        rsa.rsa(x, y, method="kendall")
    with pytest.raises(checks.InputError, match="rows"):
        rsa.rsa(x, y[:-1])


def _spearman_exact_ties(x, y):
    """float64 row correlations, rounded to 12 digits so that values equal in exact
    arithmetic (binary rows with the same counts) are exactly tied, then scipy's Spearman
    (average ranks for ties)."""
    import scipy.stats

    iu = np.triu_indices(len(x), 1)
    rx = np.round(np.corrcoef(np.asarray(x, np.float64))[iu], 12)
    ry = np.round(np.corrcoef(np.asarray(y, np.float64))[iu], 12)
    return float(scipy.stats.spearmanr(rx, ry).statistic)


@pytest.mark.parametrize("n,d", [(60, 8), (90, 16)])
def test_spearman_on_binary_data_gives_ties_average_ranks(n, d, mesh):
    # Binary rows: the row correlations take few distinct values with huge exact-tie groups;
    # float32 similarities split them (5.7e-4 off) instead of giving them average ranks.
    rng = np.random.default_rng(n)
    x = (rng.uniform(size=(n, d)) < 0.4).astype(np.float32)
    y = np.where(rng.uniform(size=(n, d)) < 0.2, 1 - x, x).astype(np.float32)
    for a in (x, y):
        a[a.sum(1) == 0, 0] = 1.0
        a[a.sum(1) == d, 0] = 0.0
    want = _spearman_exact_ties(x, y)
    np.testing.assert_allclose(rsa.rsa(x, y, mesh=mesh).score, want, rtol=0, atol=1e-9)
    # The sampled estimator ranks its samples with the same exact ties.
    i, j = rsa.sample_pairs(n, 4000, 0)
    r = np.corrcoef(x.astype(np.float64))
    s = np.corrcoef(y.astype(np.float64))
    import scipy.stats

    want_sampled = scipy.stats.spearmanr(np.round(r[i, j], 12), np.round(s[i, j], 12)).statistic
    got = rsa.rsa(x, y, mesh=mesh, max_exact_n=10, num_samples=4000, seed=0)
    np.testing.assert_allclose(got.score, want_sampled, rtol=0, atol=1e-9)


def _rsa_matrix_stat_int32(sx, sy, perm, tile):
    """The null statistic as it was before (full row tiles, int32 indices), for comparison."""
    import jax
    import jax.numpy as jnp

    n = sx.shape[0]
    num_tiles = -(-n // tile)
    pad = num_tiles * tile - n
    perm_p = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
    sx_p = jnp.concatenate([sx, jnp.zeros((pad, n), sx.dtype)])

    def body(acc, t):
        rows = jax.lax.dynamic_slice_in_dim(perm_p, t * tile, tile)
        bx = jax.lax.dynamic_slice_in_dim(sx_p, t * tile, tile)
        return acc + jnp.sum(bx * sy[rows][:, perm]), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_tiles))
    return total / (n * (n - 1))


# tiles per matrix: 1; 13 (odd); 8 and 2 (even: the block pair d = T / 2); 3
@pytest.mark.parametrize("n, tile", [(60, 64), (203, 16), (200, 25), (100, 50), (130, 64)])
def test_null_stat_half_gather_matches_float64_and_the_full_gather(n, tile):
    """The null statistic gathers half of sy per permutation (symmetry, circular blocks) with
    uint32 indices: it must equal the float64 Spearman of the permuted upper triangles and
    the previous full int32 gather."""
    import jax
    import jax.numpy as jnp
    import scipy.stats

    from engine import nulls

    x, y = structured(3, n=n)
    result = rsa.rsa(x, y, method="spearman")
    kernel = rsa.null_kernel(x, y, result, tile=tile)
    perms = nulls.permutations(n, 6, seed=1)
    kw = dict(kernel.static)
    got = jax.jit(jax.vmap(lambda p: rsa.rsa_matrix_stat(kernel.consts, p, **kw)))(perms)
    got = np.asarray(got, np.float64)
    iu = np.triu_indices(n, 1)

    def standard(a):
        r = scipy.stats.rankdata(np.corrcoef(a.astype(np.float64))[iu])
        m = np.zeros((n, n))
        m[iu] = (r - r.mean()) / r.std()
        return m + m.T

    zx, zy = standard(x), standard(y)
    want = [np.sum(zx[iu] * zy[np.ix_(p, p)][iu]) / len(iu[0]) for p in perms]
    want_scipy = [scipy.stats.spearmanr(zx[iu], zy[np.ix_(p, p)][iu]).statistic for p in perms]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, want_scipy, atol=1e-6)
    zx32, zy32 = jnp.asarray(zx, jnp.float32), jnp.asarray(zy, jnp.float32)
    old = jax.jit(jax.vmap(lambda p: _rsa_matrix_stat_int32(zx32, zy32, p, kw["tile"])))
    np.testing.assert_allclose(got, np.asarray(old(jnp.asarray(perms))), atol=1e-6)
    assert abs(kernel.observed() - result.score) < 1e-5  # identity = the observed RSA

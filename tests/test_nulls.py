"""Random-pairing nulls, bootstrap and the metric registry (engine/nulls.py,
engine/similarity.py): batched == loop, device invariance, calibration under independence."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from engine import checks, nulls, similarity

N, D1, D2 = 40, 5, 4


def structured(seed, n=N, d1=D1, d2=D2, noise=0.8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.5, 2.0, d1) + 3.0
    y = x[:, :3] @ rng.normal(size=(3, d2)) + noise * rng.normal(size=(n, d2))
    return x.astype(np.float32), y.astype(np.float32)


def independent(seed, n=N, d1=D1, d2=D2):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, d1)).astype(np.float32),
        rng.normal(size=(n, d2)).astype(np.float32),
    )


def dot_stat(consts, perm):
    """sum_i a_i b_perm(i): a statistic whose null is easy to recompute in numpy."""
    return jnp.dot(consts["a"], consts["b"][perm])


def test_permutations_are_seeded_device_invariant_and_match_the_host_copy(mesh):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=N), rng.normal(size=N)
    kernel = nulls.NullKernel(
        dot_stat, {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}, N
    )
    got = nulls.permutation_null(kernel, 37, seed=11, mesh=mesh, batch_size=4, rounds=2)
    perms = nulls.permutations(N, 37, seed=11)
    assert all(np.array_equal(np.sort(p), np.arange(N)) for p in perms)
    np.testing.assert_allclose(got, [a @ b[p] for p in perms], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nulls.permutations(N, 5, seed=11, start=30), perms[30:35])
    assert not np.array_equal(nulls.permutations(N, 5, seed=12), perms[:5])
    assert kernel.observed() == pytest.approx(a @ b, rel=1e-5)


BATCHED = [
    "cca",
    "svcca",
    "pwcca",
    "cka",
    "cka_debiased",
    "procrustes",
    "rsa_spearman",
    "rsa_pearson",
    "mutual_knn",
]


@pytest.mark.parametrize("name", BATCHED)
def test_batched_null_is_the_metric_on_permuted_rows(name, mesh):
    x, y = structured(1)
    opts = {"mutual_knn": {"k": 4}}.get(name, {})
    metric = similarity.get(name)
    result, make_kernel = metric.prepare(x, y, None, mesh, **opts)
    kernel = make_kernel()
    assert kernel is not None
    batched = nulls.permutation_null(kernel, 12, seed=3, mesh=mesh)
    loop = nulls.loop_null(
        lambda a, b, w: metric(a, b, w, mesh=mesh, **opts), x, y, num_permutations=12, seed=3
    )
    np.testing.assert_allclose(batched, loop, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(kernel.observed(), result.score, rtol=2e-4, atol=2e-5)


def test_sampled_rsa_null_is_the_sampled_metric_on_permuted_rows(mesh):
    x, y = structured(6, n=64)
    opts = dict(max_exact_n=32, num_samples=300, seed=4)
    metric = similarity.get("rsa_spearman")
    result, make_kernel = metric.prepare(x, y, None, mesh, **opts)
    assert not result.exact
    kernel = make_kernel()
    batched = nulls.permutation_null(kernel, 8, seed=1, mesh=mesh)
    loop = nulls.loop_null(
        lambda a, b, w: metric(a, b, w, mesh=mesh, **opts), x, y, num_permutations=8, seed=1
    )
    np.testing.assert_allclose(batched, loop, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kernel.observed(), result.score, rtol=1e-4, atol=1e-5)


def test_weighted_nulls_batched_for_knn_and_loop_otherwise():
    x, y = structured(2)
    w = np.random.default_rng(0).uniform(0.2, 1.0, N).astype(np.float32)
    knn = similarity.get("mutual_knn")
    _, make_kernel = knn.prepare(x, y, w, None, k=4)
    batched = nulls.permutation_null(make_kernel(), 10, seed=5)
    loop = nulls.loop_null(
        lambda a, b, ww: knn(a, b, ww, k=4), x, y, w, num_permutations=10, seed=5
    )
    np.testing.assert_allclose(batched, loop, rtol=1e-5)
    _, make_cca = similarity.get("cca").prepare(x, y, w, None)
    assert make_cca() is None  # weighted CCA: the loop path
    uniform = np.full(N, 0.5, np.float32)
    assert similarity.get("cca").prepare(x, y, uniform, None)[1]() is not None


def test_summarize_formula():
    null = np.array([0.1, 0.2, 0.2, 0.3, 0.5])
    s = nulls.summarize(0.2, null)
    assert s["p"] == pytest.approx((1 + 4) / 6)  # 0.2, 0.2, 0.3, 0.5 are >= 0.2
    assert s["null_mean"] == pytest.approx(0.26)
    assert s["null_std"] == pytest.approx(np.std(null, ddof=1))
    assert s["z"] == pytest.approx((0.2 - 0.26) / np.std(null, ddof=1))
    assert s["excess"] == pytest.approx(-0.06)
    assert s["null_quantiles"]["0.5"] == pytest.approx(0.2)
    assert nulls.summarize(0.9, null)["p"] == pytest.approx(1 / 6)  # never 0
    assert nulls.summarize(0.2, np.full(4, 0.2))["z"] is None
    with pytest.raises(checks.InputError):
        nulls.summarize(0.2, np.array([0.1]))


@pytest.mark.parametrize("name", ["svcca", "cka", "rsa_spearman", "procrustes"])
def test_p_values_are_uniform_under_independence(name):
    reps, r = 200, 99
    ps = []
    for rep in range(reps):
        x, y = independent(1000 + rep, n=24, d1=4, d2=3)
        ps.append(similarity.null_for(name, x, y, num_permutations=r, seed=rep)["p"])
    ps = np.asarray(ps)
    assert ps.min() >= 1.0 / (r + 1)
    assert scipy.stats.kstest(ps, "uniform").pvalue > 0.001
    # P(p <= 0.05) = 5/100 exactly for an exchangeable continuous statistic.
    hits = int(np.sum(ps <= 0.05))
    expected, sd = reps * 0.05, np.sqrt(reps * 0.05 * 0.95)
    assert abs(hits - expected) <= 3 * sd, hits


def test_bootstrap_standard_error_of_a_correlation():
    # For bivariate normal data the SE of Pearson's r is ~ (1 - r^2) / sqrt(n).
    rng = np.random.default_rng(7)
    n, rho = 400, 0.6
    x = rng.normal(size=(n, 1))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(n, 1))
    corr = lambda a, b, w: np.corrcoef(a[:, 0], b[:, 0])[0, 1]  # noqa: E731
    out = nulls.bootstrap(corr, x, y, num_samples=400, seed=1)
    r = corr(x, y, None)
    assert out["std"] == pytest.approx((1 - r**2) / np.sqrt(n), rel=0.25)
    assert out["low"] < r < out["high"]


def test_bootstrap_by_weights_equals_resampling_rows():
    x, y = structured(3)
    metric = similarity.get("cka")
    a = nulls.bootstrap(metric, x, y, num_samples=8, seed=2, by_weights=True)
    b = nulls.bootstrap(metric, x, y, num_samples=8, seed=2, by_weights=False)
    for key in ("mean", "std", "low", "high"):
        assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_evaluate_returns_json_ready_scores_with_nulls():
    x, y = structured(4)
    out = similarity.evaluate(
        x,
        y,
        similarity.DEFAULT_METRICS,
        num_permutations=12,
        seed=0,
        bootstrap=2,
        options={"mutual_knn": {"k": 4}},
    )
    json.dumps(out, allow_nan=False)
    assert out["n"] == N and out["d"] == [D1, D2]
    for name, entry in out["metrics"].items():
        assert entry["p"] == pytest.approx(1 / 13), name  # strong shared structure
        assert entry["excess"] > 0 and entry["z"] > 3
        assert len(entry["null"]) == 12 and entry["null_method"] == "batched"
        assert entry["bootstrap"]["num_samples"] == 2
        assert entry["score"] == pytest.approx(entry["observed"], rel=2e-4, abs=2e-5)
    assert out["metrics"]["svcca"]["components"][0] >= 1
    assert out["metrics"]["cka"]["components"] is None
    w = np.linspace(0.5, 1.5, N).astype(np.float32)
    weighted = similarity.evaluate(
        x,
        y,
        ("cca", "mutual_knn"),
        weights=w,
        num_permutations=12,
        options={"mutual_knn": {"k": 4}},
    )
    assert weighted["metrics"]["cca"]["null_method"] == "loop"
    assert weighted["metrics"]["mutual_knn"]["null_method"] == "batched"


def test_registry_errors():
    x, y = structured(5)
    with pytest.raises(checks.InputError, match="unknown similarity metric"):
        similarity.score("kcca", x, y)
    with pytest.raises(checks.InputError, match="unknown similarity metric"):
        similarity.evaluate(x, y, ("cka",), options={"nope": {}})
    with pytest.raises(checks.InputError, match="rows"):
        similarity.evaluate(x, y[:-1], ("cka",))
    assert similarity.score("cka", x, y) == pytest.approx(similarity.get("cka").result(x, y).score)


# Sizes around every branch: 0 or 1 shuffle rounds (n <= 1625), 2 rounds, powers of two (the
# index-bit count b), the largest fast n, and the jax.random.permutation fallback above it.
PERM_SIZES = (1, 3, 1625, 1626, 4096, 4097, 5000, 8193)


@pytest.mark.parametrize("n", PERM_SIZES)
def test_fast_permutation_is_bit_identical_to_jax(n):
    import jax

    seeds = jax.random.split(jax.random.PRNGKey(n), 64)  # 64 raw keys, vmapped
    want = jax.jit(jax.vmap(lambda k: jax.random.permutation(k, n)))(seeds)
    got = jax.jit(jax.vmap(lambda k: nulls.permutation(k, n)))(seeds)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    typed = jax.random.key(3)  # a typed key, unbatched
    np.testing.assert_array_equal(
        np.asarray(nulls.permutation(typed, n)), np.asarray(jax.random.permutation(typed, n))
    )


def test_fast_permutation_fallback_above_the_limit():
    import jax

    n = nulls.FAST_PERMUTATION_MAX_N + 1
    key = jax.random.PRNGKey(11)
    np.testing.assert_array_equal(
        np.asarray(nulls.permutation(key, n)), np.asarray(jax.random.permutation(key, n))
    )


@pytest.mark.parametrize("n", (2, 5, 300, 5000, nulls.FAST_PERMUTATION_MAX_N))
def test_packed_argsort_is_the_stable_argsort_with_tied_keys(n):
    """Random 32-bit keys almost never tie, so ties (and keys sharing only their high or only
    their low bits) are planted: the result must be numpy's stable argsort."""
    import jax

    rng = np.random.default_rng(n)
    b = max(1, (n - 1).bit_length())
    cases = [
        rng.integers(0, 2**32, n, dtype=np.uint32),
        rng.integers(0, 3, n, dtype=np.uint32),  # mostly tied
        (rng.integers(0, 4, n, dtype=np.uint32) << np.uint32(32 - b)),  # high bits only
        rng.integers(0, 4, n, dtype=np.uint32) | np.uint32(0xFFFF0000),  # low bits only
        np.full(n, 0xFFFFFFFF, np.uint32),
    ]
    fn = jax.jit(nulls._stable_argsort_u32)
    for bits in cases:
        np.testing.assert_array_equal(
            np.asarray(fn(bits)), np.argsort(bits, kind="stable").astype(np.int32)
        )

"""engine.matching: Hungarian vs brute force, greedy vs the sequential definition, gaps."""

import itertools

import numpy as np
import pytest

from engine import checks, matching, pairwise


def _brute_force_best(s):
    """Maximum total over all one-to-one assignments of min(n_a, n_b) pairs."""
    n_a, n_b = s.shape
    best = -np.inf
    if n_a <= n_b:
        for cols in itertools.permutations(range(n_b), n_a):
            best = max(best, sum(s[i, c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(n_a), n_b):
            best = max(best, sum(s[r, j] for j, r in enumerate(rows)))
    return best


def _sequential_greedy(s):
    """Textbook greedy: scan pairs by (score desc, row, col), take those with both free."""
    n_a, n_b = s.shape
    order = sorted((-s[i, j], i, j) for i in range(n_a) for j in range(n_b))
    used_r, used_c, pairs = set(), set(), []
    for _, i, j in order:
        if i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def _pairs(m):
    return sorted(zip(m.rows.tolist(), m.cols.tolist()))


@pytest.mark.parametrize("shape", [(6, 6), (5, 7), (7, 4)])
def test_hungarian_is_optimal(rng, shape):
    s = rng.standard_normal(shape)
    m = matching.hungarian(s)
    assert m.size == min(shape)
    assert len(set(m.rows.tolist())) == m.size and len(set(m.cols.tolist())) == m.size
    assert m.total == pytest.approx(_brute_force_best(s), abs=1e-12)
    np.testing.assert_allclose(m.values, s[m.rows, m.cols])
    # minimising = maximising the negated scores
    m_min = matching.hungarian(s, maximize=False)
    assert m_min.total == pytest.approx(-_brute_force_best(-s), abs=1e-12)


@pytest.mark.parametrize("kind", ["random", "integer_ties", "rectangular", "chain"])
def test_greedy_equals_sequential_definition(rng, kind):
    if kind == "random":
        s = rng.standard_normal((40, 40))
    elif kind == "integer_ties":
        s = rng.integers(0, 4, size=(30, 25)).astype(float)  # many exact ties
    elif kind == "rectangular":
        s = rng.standard_normal((17, 50))
    else:
        # Chain: row i prefers column i + 1, which prefers row i + 1: one mutual-best pair
        # per round, which triggers the sequential finish.
        n = 300
        s = np.full((n, n), -10.0)
        i = np.arange(n)
        s[i, i] = i
        s[i[:-1], i[:-1] + 1] = i[:-1] + 0.5
    m = matching.greedy(s)
    assert _pairs(m) == _sequential_greedy(s)
    np.testing.assert_allclose(m.values, s[m.rows, m.cols])
    # The edge-list form on all entries is the same matching.
    rr, cc = np.meshgrid(np.arange(s.shape[0]), np.arange(s.shape[1]), indexing="ij")
    e = matching.greedy_edges(rr.ravel(), cc.ravel(), s.ravel())
    assert _pairs(e) == _pairs(m)


def test_greedy_edges_duplicates_keep_best(rng):
    rows = np.array([0, 0, 1, 1, 2])
    cols = np.array([0, 0, 0, 1, 1])
    vals = np.array([0.2, 0.9, 0.5, 0.4, 0.45])
    m = matching.greedy_edges(rows, cols, vals)
    # (0,0) at 0.9 first; then (2,1) 0.45 beats (1,1) 0.4; row 1 is left unmatched.
    assert _pairs(m) == [(0, 0), (2, 1)]
    np.testing.assert_allclose(m.values, [0.9, 0.45])


def test_one_to_one_keeps_best_not_first(rng):
    # Three A features chose B feature 5 (in this order): Lan et al. would keep the first
    # met (A0, 0.3); one_to_one keeps the best (A2, 0.8).
    rows = np.array([0, 1, 2, 3])
    cols = np.array([5, 5, 5, 6])
    vals = np.array([0.3, 0.6, 0.8, 0.1])
    m = matching.one_to_one(rows, cols, vals)
    assert _pairs(m) == [(2, 5), (3, 6)]
    assert m.method == "one_to_one"


def _planted(rng, n, noise, d=32):
    perm = rng.permutation(n)
    a = rng.standard_normal((n, d))
    b = a[perm] + noise * rng.standard_normal((n, d))
    b[: n // 2] = rng.standard_normal((n // 2, d))
    return a, b


def test_greedy_quality_gap_against_hungarian(rng, mesh1):
    a, b = _planted(rng, 256, 1.5)
    s = pairwise.cosine_matrix(a, b, mesh1).astype(np.float64)
    hun = matching.hungarian(s)
    gre = matching.greedy(s)
    gap = matching.quality_gap(gre, hun)
    assert gre.total <= hun.total + 1e-9  # Hungarian is optimal
    assert gap["total_ratio"] >= 0.96  # measured 0.97-0.99 (module docstring)
    assert gre.total >= 0.5 * hun.total  # the worst-case guarantee
    streamed = matching.greedy_streamed(a, b, mesh1, k=4, max_dense=2000)
    assert streamed.size == 256
    assert matching.quality_gap(streamed, hun)["total_ratio"] >= 0.96
    # float64 cosines of the chosen pairs
    np.testing.assert_allclose(
        streamed.values,
        pairwise.cosine_matrix(a, b, mesh1)[streamed.rows, streamed.cols],
        atol=1e-6,
    )
    r = rng.random((128, 128))
    assert matching.quality_gap(matching.greedy(r), matching.hungarian(r))["total_ratio"] >= 0.95


def test_greedy_streamed_small_rounds_equal_dense(rng, mesh1):
    # With max_dense large the first round is already dense greedy on the cosine matrix.
    a, b = _planted(rng, 60, 1.0)
    s = pairwise.cosine_matrix(a, b, mesh1).astype(np.float64)
    m = matching.greedy_streamed(a, b, mesh1, max_dense=10**6)
    assert _pairs(m) == _pairs(matching.greedy(s))


def test_match_dispatch(rng, mesh1):
    a, b = _planted(rng, 40, 0.3)
    s = pairwise.cosine_matrix(a, b, mesh1).astype(np.float64)
    auto = matching.match(a=a, b=b, mesh=mesh1)
    assert auto.method == "hungarian"
    assert auto.total == pytest.approx(matching.hungarian(s).total, rel=1e-6)
    big = matching.match(a=a, b=b, mesh=mesh1, method="greedy", hungarian_max=100)
    assert big.method == "greedy_streamed" and big.size == 40
    g = matching.match(s, method="greedy")
    assert g.method == "greedy"
    thr = matching.match(s, min_value=0.5)
    assert (thr.values >= 0.5).all() and thr.size < 40
    h = matching.match(s, method="auto", hungarian_max=10)  # too big for auto: greedy
    assert h.method == "greedy"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: matching.hungarian(np.array([[1.0, np.nan]])), "non-finite"),
        (lambda: matching.hungarian(np.ones((10, 10)), max_elements=50), "exceed"),
        (lambda: matching.greedy(np.ones(5)), "2-D"),
        (lambda: matching.greedy_edges([0, 1], [0], [1.0, 2.0]), "one length"),
        (lambda: matching.greedy_edges([0, -1], [0, 1], [1.0, 2.0]), "negative"),
        (lambda: matching.greedy_edges([0.5], [0.0], [1.0]), "integer"),
        (lambda: matching.match(np.ones((2, 2)), method="auction"), "method"),
        (lambda: matching.match(), "either"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(checks.InputError, match=match):
        call()

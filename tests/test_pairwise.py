"""engine.pairwise: streamed max-cosine against a dense float64 numpy reference."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import checks, pairwise
from engine import mesh as mesh_lib


def _ref(a, b):
    """Textbook float64 cosine matrix."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    return an @ bn.T


def _topk_ref(s, k):
    """Indices of the k largest per row, ties to the lowest index (stable sort)."""
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


def _data(rng, n_a=300, n_b=517, d=24):
    a = rng.standard_normal((n_a, d))
    # B: noisy copies of some rows of A (clear partners) and noise rows.
    b = rng.standard_normal((n_b, d))
    b[: n_a // 2] = a[rng.permutation(n_a)[: n_a // 2]] + 0.5 * rng.standard_normal((n_a // 2, d))
    return a, b


THRESH = (-0.2, 0.3, 0.6)


def test_matches_float64_reference(mesh, rng):
    a, b = _data(rng)
    s = _ref(a, b)
    res = pairwise.max_cosine(a, b, mesh, k=3, thresholds=THRESH, tile_a=128, tile_b=256)
    idx, val = _topk_ref(s, 3)
    np.testing.assert_array_equal(res.a_topk_indices, idx)
    np.testing.assert_allclose(res.a_topk_values, val, rtol=0, atol=1e-12)
    idx_b, val_b = _topk_ref(s.T, 3)
    np.testing.assert_array_equal(res.b_topk_indices, idx_b)
    np.testing.assert_allclose(res.b_topk_values, val_b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.a_argmax, s.argmax(axis=1))
    np.testing.assert_array_equal(res.b_argmax, s.argmax(axis=0))
    # Counts: no reference cosine lies within the float32 error of a threshold here.
    gaps = np.min(np.abs(s[..., None] - np.asarray(THRESH)))
    assert gaps > res.tol
    for j, t in enumerate(THRESH):
        np.testing.assert_array_equal(res.a_counts[:, j], (s >= t).sum(axis=1))
        np.testing.assert_array_equal(res.b_counts[:, j], (s >= t).sum(axis=0))
    mutual_ref = s.argmax(axis=0)[s.argmax(axis=1)] == np.arange(s.shape[0])
    np.testing.assert_array_equal(res.mutual, mutual_ref)
    rows, cols, vals = res.mutual_pairs()
    np.testing.assert_array_equal(rows, np.flatnonzero(mutual_ref))
    np.testing.assert_allclose(vals, s[rows, cols], atol=1e-12)
    assert res.mmcs() == pytest.approx(np.mean(s.max(axis=1)), abs=1e-12)


@pytest.mark.parametrize("data,feature", [(1, 4), (2, 2)], ids=["feature4", "data2xfeature2"])
def test_device_layouts_agree(mesh1, rng, data, feature):
    a, b = _data(rng)
    m = mesh_lib.make_mesh(data=data, feature=feature, devices=jax.devices()[:4])
    r1 = pairwise.max_cosine(
        a, b, mesh1, k=2, thresholds=THRESH, tile_a=128, tile_b=256, exact=False
    )
    r4 = pairwise.max_cosine(a, b, m, k=2, thresholds=THRESH, tile_a=128, tile_b=256, exact=False)
    for f in (
        "a_topk_indices",
        "a_topk_values",
        "b_topk_indices",
        "b_topk_values",
        "a_counts",
        "b_counts",
    ):
        np.testing.assert_array_equal(getattr(r1, f), getattr(r4, f), err_msg=f)


def test_near_ties_resolved_in_float64(mesh, rng):
    d = 32
    base = rng.standard_normal((6, d))
    # B: for every base vector, 8 copies perturbed by ~1e-9 (float32 cannot tell them apart,
    # float64 can), then a vector v at row 48 and again at the last row (an exact tie).
    reps = [base[i] + 1e-9 * rng.standard_normal((8, d)) for i in range(6)]
    v = rng.standard_normal((1, d))
    b = np.concatenate(reps + [v, rng.standard_normal((40, d)), v])
    a = base + 1e-3 * rng.standard_normal(base.shape)
    a = np.concatenate([a, 3.0 * v])  # parallel to the two copies of v
    s = _ref(a, b)
    res = pairwise.max_cosine(a, b, mesh, k=2)
    np.testing.assert_array_equal(res.a_argmax, s.argmax(axis=1))
    np.testing.assert_array_equal(res.a_topk_indices, _topk_ref(s, 2)[0])
    assert res.a_argmax[-1] == 48  # exact tie -> lowest index (numpy rule)
    assert res.n_fallback_a > 0  # the certification caught the near-ties
    np.testing.assert_array_equal(res.b_argmax, s.argmax(axis=0))


def test_close_pairs_rescored_without_fallback(mesh1, rng):
    # Pairs of near-duplicate rows in B (1e-9 apart): the float32 order of the top two is
    # unreliable, but the remaining candidates are far, so the float64 rescoring of the
    # candidate list decides without a full-row fallback.
    d = 32
    b = rng.standard_normal((60, d))
    b[50:55] = b[:5] + 1e-9 * rng.standard_normal((5, d))
    a = b[:5] + 1e-3 * rng.standard_normal((5, d))
    s = _ref(a, b)
    res = pairwise.max_cosine(a, b, mesh1, k=1)
    np.testing.assert_array_equal(res.a_argmax, s.argmax(axis=1))
    np.testing.assert_allclose(res.a_max, s.max(axis=1), atol=1e-15)
    assert res.n_fallback_a == 0


def test_all_negative_cosines_ignore_padding(mesh, rng):
    # Every cosine is negative: the zero-padded rows (cosine exactly 0) must never win.
    b = np.abs(rng.standard_normal((5, 16))) + 0.1
    a = -(np.abs(rng.standard_normal((7, 16))) + 0.1)
    s = _ref(a, b)
    assert s.max() < 0
    res = pairwise.max_cosine(a, b, mesh, k=2, thresholds=(-1.0, -0.5, 0.0))
    np.testing.assert_array_equal(res.a_topk_indices, _topk_ref(s, 2)[0])
    np.testing.assert_array_equal(res.b_topk_indices, _topk_ref(s.T, 2)[0])
    for j, t in enumerate((-1.0, -0.5, 0.0)):
        np.testing.assert_array_equal(res.a_counts[:, j], (s >= t).sum(axis=1))
        np.testing.assert_array_equal(res.b_counts[:, j], (s >= t).sum(axis=0))
    r32 = pairwise.max_cosine(a, b, mesh, k=2, exact=False)
    np.testing.assert_array_equal(r32.a_topk_indices, _topk_ref(s, 2)[0])


def test_float32_mode_within_tolerance(mesh, rng):
    a, b = _data(rng)
    s = _ref(a, b)
    res = pairwise.max_cosine(a, b, mesh, k=1, exact=False, tile_a=128, tile_b=256)
    assert res.a_topk_values.dtype == np.float32
    assert np.max(np.abs(res.a_max - s.max(axis=1))) <= res.tol
    top2 = np.sort(s, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * res.tol
    np.testing.assert_array_equal(res.a_argmax[clear], s.argmax(axis=1)[clear])


def test_identical_dictionaries(mesh, rng):
    a = rng.standard_normal((200, 20))
    res = pairwise.max_cosine(a, a * rng.uniform(0.5, 2.0, (200, 1)), mesh)
    np.testing.assert_array_equal(res.a_argmax, np.arange(200))
    np.testing.assert_allclose(res.a_max, 1.0, atol=1e-12)
    assert res.mutual.all()


def test_full_matrix_opt_in(mesh, rng):
    a, b = _data(rng, 40, 50, 12)
    res = pairwise.max_cosine(a, b, mesh, full=True)
    np.testing.assert_allclose(res.full, _ref(a, b), atol=1e-6)
    np.testing.assert_allclose(pairwise.cosine_matrix(a, b, mesh), _ref(a, b), atol=1e-6)
    with pytest.raises(checks.InputError, match="max_full"):
        pairwise.max_cosine(a, b, mesh, full=True, max_full=100)
    with pytest.raises(checks.InputError, match="max_elements"):
        pairwise.cosine_matrix(a, b, mesh, max_elements=100)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), scale_pow=st.integers(-3, 3))
def test_positive_row_scaling_invariance(mesh1, seed, scale_pow):
    rng = np.random.default_rng(seed)
    a, b = _data(rng, 60, 90, 10)
    r1 = pairwise.max_cosine(a, b, mesh1, k=2)
    scale_a = (10.0**scale_pow) * rng.uniform(0.1, 10.0, (60, 1))
    scale_b = rng.uniform(0.1, 10.0, (90, 1))
    r2 = pairwise.max_cosine(a * scale_a, b * scale_b, mesh1, k=2)
    np.testing.assert_array_equal(r1.a_topk_indices, r2.a_topk_indices)
    np.testing.assert_array_equal(r1.b_topk_indices, r2.b_topk_indices)
    np.testing.assert_allclose(r1.a_topk_values, r2.a_topk_values, atol=1e-12)


@pytest.mark.parametrize(
    "a,b,kwargs,match",
    [
        (np.ones((3, 4)), np.ones((5, 3)), {}, "same space"),
        (np.ones(4), np.ones((5, 4)), {}, "2-D"),
        (np.array([[1.0, np.nan]]), np.ones((2, 2)), {}, "non-finite"),
        (np.array([[1.0, 1.0], [0.0, 0.0]]), np.ones((2, 2)), {}, "zero norm"),
        (np.ones((3, 2)), np.ones((2, 2)), {"k": 3}, "exceeds"),
        (np.ones((3, 2)), np.ones((2, 2)), {"thresholds": (1.5,)}, r"\[-1, 1\]"),
        (np.array([["a", "b"]]), np.ones((2, 2)), {}, "float"),
    ],
)
def test_bad_input(mesh1, a, b, kwargs, match):
    with pytest.raises(checks.InputError, match=match):
        pairwise.max_cosine(a, b, mesh1, **kwargs)


def _near_orthogonal(rng, n=400, n_b=3, d=1024, scale=3e-8):
    """A whose cosines with B's n_b orthonormal rows are all ~1e-8: below the float32 error,
    so float32 gets the sign and the order of the cosines wrong for many rows."""
    q, _ = np.linalg.qr(rng.standard_normal((d, n_b)))
    b = q.T.copy()
    u = rng.standard_normal((n, d))
    u -= (u @ q) @ q.T
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u + scale * rng.standard_normal((n, n_b)) @ b, b


@pytest.mark.parametrize("gemm", ["host", "xla"])
def test_padding_never_certifies_a_wrong_argmax(mesh, rng, gemm):
    # n_b = 3 rows in a 128-column tile: 125 padded columns. With zero padding (cosine exactly
    # 0) the padded columns displaced the real ones whose float32 cosine came out negative,
    # and the old certification ("K >= n_b: every column is a candidate") accepted the list
    # without the float64 check: 12 of these 400 argmaxes were wrong.
    a, b = _near_orthogonal(rng)
    s = _ref(a, b)
    res = pairwise.max_cosine(a, b, mesh, k=1, gemm=gemm)
    np.testing.assert_array_equal(res.a_argmax, s.argmax(axis=1))
    np.testing.assert_allclose(res.a_max, s.max(axis=1), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(res.b_topk_indices[:, 0], s.argmax(axis=0))
    # k = 2 with the near-ties spread over two B tiles (the second one mostly padding).
    b2 = np.concatenate([rng.standard_normal((126, b.shape[1])), b])
    s2 = _ref(a, b2)
    r2 = pairwise.max_cosine(a, b2, mesh, k=2, tile_a=128, tile_b=128, gemm=gemm)
    np.testing.assert_array_equal(r2.a_topk_indices, _topk_ref(s2, 2)[0])


def test_host_and_xla_gemm_agree(mesh, rng):
    a, b = _data(rng)
    s = _ref(a, b)
    kw = dict(k=3, thresholds=THRESH, tile_a=128, tile_b=256)
    rh = pairwise.max_cosine(a, b, mesh, gemm="host", **kw)
    rx = pairwise.max_cosine(a, b, mesh, gemm="xla", **kw)
    for r in (rh, rx):
        np.testing.assert_array_equal(r.a_topk_indices, _topk_ref(s, 3)[0])
        np.testing.assert_array_equal(r.b_topk_indices, _topk_ref(s.T, 3)[0])
        for j, t in enumerate(THRESH):
            np.testing.assert_array_equal(r.a_counts[:, j], (s >= t).sum(axis=1))
            np.testing.assert_array_equal(r.b_counts[:, j], (s >= t).sum(axis=0))
    np.testing.assert_allclose(rh.a_topk_values, rx.a_topk_values, rtol=0, atol=1e-15)
    np.testing.assert_allclose(rh.b_topk_values, rx.b_topk_values, rtol=0, atol=1e-15)
    # float32 mode: same argmax wherever the float32 gap decides it.
    fh = pairwise.max_cosine(a, b, mesh, gemm="host", exact=False, **kw)
    assert np.max(np.abs(fh.a_max - s.max(axis=1))) <= fh.tol
    assert pairwise.default_gemm(mesh) == ("host" if mesh.size == 1 else "xla")


def test_non_finite_input_found_by_the_row_norms(mesh1):
    a = np.ones((6, 4), np.float32)
    b = np.ones((5, 4))
    b[3, 2] = np.inf
    with pytest.raises(checks.InputError, match=r"^B: 1 non-finite value\(s\).*\(3, 2\)"):
        pairwise.max_cosine(a, b, mesh1)
    a[4, 1] = np.nan
    with pytest.raises(checks.InputError, match=r"^A: .*non-finite.*\(4, 1\)"):
        pairwise.max_cosine(a, b, mesh1, gemm="xla")
    # finite=False skips the scan; check_finite_rows finds NaN/Inf and float64 overflow.
    assert checks.as_float_matrix("A", a, finite=False) is not None
    big = np.full((2, 3), 1e200)
    with np.errstate(over="ignore"), pytest.raises(checks.InputError, match="overflows float64"):
        checks.check_finite_rows("X", big, np.linalg.norm(big, axis=1))
    with pytest.raises(checks.InputError, match="gemm"):
        pairwise.max_cosine(np.ones((2, 2)), np.ones((2, 2)), mesh1, gemm="torch")

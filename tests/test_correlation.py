"""engine.correlation: streamed Pearson correlation vs a float64 numpy reference."""

import jax
import numpy as np
import pytest

from engine import accumulators, checkpoint, checks, streaming
from engine import correlation as corr_lib

N_A, N_B, K_A, K_B = 48, 40, 6, 5
CHUNK = 128  # one chunk size everywhere: the compiled programs are shared between tests


def _ref(x, y, w=None):
    """Textbook weighted Pearson correlation in float64 (NaN where a variance is 0)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(x.shape[0]) if w is None else np.asarray(w, np.float64)
    tot = w.sum()
    xc = x - (w @ x) / tot
    yc = y - (w @ y) / tot
    cov = (xc * w[:, None]).T @ yc / tot
    sx = np.sqrt((w @ xc**2) / tot)
    sy = np.sqrt((w @ yc**2) / tot)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = cov / np.outer(sx, sy)
    c[sx == 0, :] = np.nan
    c[:, sy == 0] = np.nan
    return c


def _distinct(rng, t, n, k):
    idx = np.sort(rng.integers(0, n - k + 1, size=(t, k)), axis=1) + np.arange(k)
    return rng.permuted(idx, axis=1).astype(np.int32)  # TopK outputs come unsorted


def _codes(rng, t=1000):
    """TopK codes with planted pairs: B feature i mirrors A feature 2 i on half the slots."""
    ia = _distinct(rng, t, N_A, K_A)
    ib = _distinct(rng, t, N_B, K_B)
    va = rng.random((t, K_A)).astype(np.float32) + 0.05
    vb = rng.random((t, K_B)).astype(np.float32) + 0.05
    # Plant: when A's first slot is an even feature 2j < 2 N_B, B's first slot becomes j.
    even = (ia[:, 0] % 2 == 0) & (ia[:, 0] // 2 < N_B)
    j = ia[:, 0] // 2
    clash = (ib[:, 1:] == j[:, None]).any(axis=1)
    sel = even & ~clash
    ib[sel, 0] = j[sel]
    vb[sel, 0] = va[sel, 0] * 0.9 + 0.05
    return va, ia, vb, ib


def _dense(v, i, n):
    x = np.zeros((v.shape[0], n), np.float32)
    np.put_along_axis(x, i.astype(np.int64), v, axis=1)
    return x


def _valid(c):
    return np.isfinite(c)


def _check_result(res, ref, atol=1e-5):
    ok = _valid(ref)
    assert not np.isnan(res.corr).any()
    np.testing.assert_allclose(res.corr[ok], ref[ok], atol=atol)
    assert (res.corr[~ok] == 0).all()


def test_dense_matches_float64_with_weights_and_offsets(mesh, rng):
    t = 1000
    x = rng.standard_normal((t, 12)).astype(np.float32)
    y = (0.6 * x[:, :9] + rng.standard_normal((t, 9))).astype(np.float32)
    x[:, 0] = 100.0 + x[:, 0]  # large mean, unit spread (cancellation test)
    y[:, 3] = -5e3 + 0.01 * y[:, 3]
    w = rng.uniform(0.0, 2.0, t).astype(np.float32)
    acc = corr_lib.CorrelationAccumulator(12, 9)
    ref = _ref(x, y, w)
    for state in (
        accumulators.accumulate(acc, streaming.ChunkStream((x, y, w), CHUNK), mesh),
        corr_lib.accumulate_inplace(acc, streaming.ChunkStream((x, y, w), CHUNK), mesh),
    ):
        res = acc.finalize(state)
        _check_result(res, ref)
        mean = (w @ x.astype(np.float64)) / w.sum()
        sd = np.sqrt(w @ (x - mean) ** 2 / w.sum())
        np.testing.assert_allclose(res.mean_a, mean, rtol=1e-6, atol=1e-6)  # sd ~ 1
        np.testing.assert_allclose(res.std_a, sd, rtol=1e-5)
        assert res.count == pytest.approx(float(w.astype(np.float64).sum()), rel=1e-6)
        assert res.rows == t


def test_sparse_path_equals_dense_path_and_reference(mesh, rng):
    va, ia, vb, ib = _codes(rng)
    xa, xb = _dense(va, ia, N_A), _dense(vb, ib, N_B)
    w = rng.uniform(0.5, 1.5, va.shape[0]).astype(np.float32)
    ref = _ref(xa, xb, w)
    dense = corr_lib.CorrelationAccumulator(N_A, N_B)
    sparse = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)
    rd = dense.finalize(
        corr_lib.accumulate_inplace(dense, streaming.ChunkStream((xa, xb, w), CHUNK), mesh)
    )
    rs = sparse.finalize(
        corr_lib.accumulate_inplace(sparse, streaming.ChunkStream((va, ia, vb, ib, w), CHUNK), mesh)
    )
    rg = sparse.finalize(
        accumulators.accumulate(sparse, streaming.ChunkStream((va, ia, vb, ib, w), CHUNK), mesh)
    )
    for res in (rd, rs, rg):
        _check_result(res, ref)
    np.testing.assert_allclose(rs.corr, rd.corr, atol=1e-5)
    np.testing.assert_allclose(rs.density_a, (w @ (xa != 0)) / w.sum(), rtol=1e-6)
    np.testing.assert_array_equal(rs.a_best, rd.a_best)
    np.testing.assert_array_equal(rs.b_best, rd.b_best)
    np.testing.assert_array_equal(rs.a_best, np.nanargmax(ref, axis=1))


def test_chunking_and_merging_do_not_change_the_result(mesh1, rng):
    va, ia, vb, ib = _codes(rng, 2 * CHUNK)
    xa, xb = _dense(va, ia, N_A), _dense(vb, ib, N_B)
    acc = corr_lib.CorrelationAccumulator(N_A, N_B)
    whole = acc.finalize(
        accumulators.accumulate(acc, streaming.ChunkStream((xa, xb), 2 * CHUNK), mesh1)
    )
    small = acc.finalize(
        accumulators.accumulate(acc, streaming.ChunkStream((xa, xb), CHUNK), mesh1)
    )
    np.testing.assert_allclose(small.corr, whole.corr, atol=5e-6)  # float32 rounding
    _check_result(whole, _ref(xa, xb))
    # Two halves on different shifts, merged (the halves have different means).
    xa2 = xa.copy()
    xa2[CHUNK:] += 3.0
    ones = np.ones(CHUNK, np.float32)
    update, merge = jax.jit(acc.update), jax.jit(acc.merge)
    s1 = update(acc.init(), (xa2[:CHUNK], xb[:CHUNK]), ones)
    s2 = update(acc.init(), (xa2[CHUNK:], xb[CHUNK:]), ones)
    _check_result(acc.finalize(merge(s1, s2)), _ref(xa2, xb))
    accs = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)
    update, merge = jax.jit(accs.update), jax.jit(accs.merge)
    s1 = update(accs.init(), (va[:CHUNK], ia[:CHUNK], vb[:CHUNK], ib[:CHUNK]), ones)
    s2 = update(accs.init(), (va[CHUNK:], ia[CHUNK:], vb[CHUNK:], ib[CHUNK:]), ones)
    _check_result(accs.finalize(merge(s1, s2)), _ref(xa, xb))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_tiling_and_subsets(mesh, rng, sparse):
    va, ia, vb, ib = _codes(rng)
    xa, xb = _dense(va, ia, N_A), _dense(vb, ib, N_B)
    src = (va, ia, vb, ib) if sparse else (xa, xb)
    untiled = corr_lib.correlate(src, N_A, N_B, mesh, sparse=sparse, chunk_size=CHUNK)
    # 2 x 2 blocks of one shape (one compiled program).
    tiled = corr_lib.correlate(
        src, N_A, N_B, mesh, sparse=sparse, chunk_size=CHUNK, tile_a=N_A // 2, tile_b=N_B // 2
    )
    ref = _ref(xa, xb)
    masked = np.where(_valid(ref), ref, -np.inf)
    for m in (untiled, tiled):
        np.testing.assert_array_equal(m.a_match, np.argmax(masked, axis=1))
        np.testing.assert_array_equal(m.b_match, np.argmax(masked, axis=0))
        np.testing.assert_allclose(m.a_value, masked.max(axis=1), atol=1e-5)
        assert m.mean_best_a == pytest.approx(masked.max(axis=1).mean(), abs=1e-5)
        assert m.mean_best_b == pytest.approx(masked.max(axis=0).mean(), abs=1e-5)
    # Subsets: best partners are searched inside the subset only.
    sub_a = np.array([3, 7, 10, 11, 30, 47])
    sub_b = np.array([0, 2, 5, 9, 21, 39])
    sub = corr_lib.correlate(
        src,
        N_A,
        N_B,
        mesh,
        sparse=sparse,
        chunk_size=CHUNK,
        a_features=sub_a,
        b_features=sub_b,
        tile_a=3,
        tile_b=6,
    )
    assert sub.a_included.sum() == 6 and sub.b_included.sum() == 6
    np.testing.assert_array_equal(
        sub.a_match[sub_a], sub_b[np.argmax(masked[np.ix_(sub_a, sub_b)], 1)]
    )
    assert (sub.a_match[np.setdiff1d(np.arange(N_A), sub_a)] == -1).all()
    rows, cols, vals = sub.pairs("a")
    np.testing.assert_array_equal(rows, sub_a)
    np.testing.assert_allclose(vals, ref[rows, cols], atol=1e-5)


def test_dead_and_constant_features_are_reported_not_nan(mesh1, rng):
    va, ia, vb, ib = _codes(rng, 500)
    # A feature 7 never fires; B feature 3 is 2.5 on every token (constant).
    va = np.where(ia == 7, 0.0, va).astype(np.float32)
    vb = np.where(ib == 3, 0.0, vb).astype(np.float32)
    ib = np.concatenate([ib, np.full((500, 1), 3, np.int32)], axis=1)
    vb = np.concatenate([vb, np.full((500, 1), 2.5, np.float32)], axis=1)
    xa, xb = _dense(va, ia, N_A), _dense(vb, ib, N_B)
    ref = _ref(xa, xb)
    for sparse, src in ((False, (xa, xb)), (True, (va, ia, vb, ib))):
        acc = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=sparse)
        res = acc.finalize(
            corr_lib.accumulate_inplace(acc, streaming.ChunkStream(src, CHUNK), mesh1)
        )
        assert np.flatnonzero(res.dead_a).tolist() == [7]
        assert np.flatnonzero(res.constant_b).tolist() == [3]
        assert not res.dead_b.any() and not res.constant_a.any()
        _check_result(res, ref)
        assert res.a_best[7] == -1 and res.a_best_value[7] == 0.0
        assert 3 not in res.a_best.tolist() and res.b_best[3] == -1
        m = corr_lib.correlation_matches(res)
        masked = np.where(_valid(ref), ref, -np.inf)
        valid_rows = np.isfinite(masked).any(axis=1)
        assert m.mean_best_a == pytest.approx(masked.max(axis=1)[valid_rows].mean(), abs=1e-5)
        assert np.isfinite(m.a_value).all() and np.isfinite(m.a_std).all()
        assert m.summary()["dead_a"] == 1 and m.summary()["constant_b"] == 1


def test_blocked_finalize_equals_dense_argmax(mesh1, rng, monkeypatch):
    # Large blocks find their best matches with the strip kernel in row blocks; force it on
    # a small block (odd sizes: a shifted last row block, padded columns) and compare with
    # numpy's argmax of the kept matrix.
    n_a, n_b = 300, 250
    va, ia = rng.random((CHUNK, 7)).astype(np.float32), _distinct(rng, CHUNK, n_a, 7)
    vb, ib = rng.random((CHUNK, 5)).astype(np.float32), _distinct(rng, CHUNK, n_b, 5)
    vb[:, 0] = va[:, 0]
    ib[:, 0] = ia[:, 0] % n_b
    ib[:, 1:] = np.where(ib[:, 1:] == ib[:, :1], (ib[:, 1:] + 1) % n_b, ib[:, 1:])
    keep = corr_lib.CorrelationAccumulator(n_a, n_b, sparse=True, keep_matrix=True)
    state = corr_lib.accumulate_inplace(keep, _stream(va, ia, vb, ib), mesh1)
    ref = keep.finalize(state)
    monkeypatch.setattr(corr_lib, "BLOCKED_FINALIZE_MIN", 0)
    monkeypatch.setattr(corr_lib, "FINALIZE_ROWS", 64)
    blocked = corr_lib.CorrelationAccumulator(n_a, n_b, sparse=True, keep_matrix=False)
    res = blocked.finalize(state)
    masked = np.where(ref.valid_a[:, None] & ref.valid_b[None, :], ref.corr, -np.inf)
    has_a = np.isfinite(masked).any(axis=1)
    has_b = np.isfinite(masked).any(axis=0)
    np.testing.assert_array_equal(res.a_best[has_a], np.argmax(masked, axis=1)[has_a])
    np.testing.assert_array_equal(res.b_best[has_b], np.argmax(masked, axis=0)[has_b])
    # (values may differ in the last bit: the block is fused in another order)
    np.testing.assert_allclose(res.a_best_value[has_a], masked.max(axis=1)[has_a], atol=1e-6)
    np.testing.assert_allclose(res.b_best_value[has_b], masked.max(axis=0)[has_b], atol=1e-6)
    assert (res.a_best[~has_a] == -1).all() and (res.b_best[~has_b] == -1).all()


def test_planted_pairs_are_recovered(mesh1, rng):
    va, ia, vb, ib = _codes(rng, 3000)
    # Automatic near-square tiling (blocks of <= 480 entries).
    m = corr_lib.correlate(
        (va, ia, vb, ib), N_A, N_B, mesh1, sparse=True, chunk_size=CHUNK, max_block_elements=480
    )
    # A feature 2 j was mirrored into B feature j.
    j = np.arange(N_A // 2)
    assert (m.a_match[2 * j] == j).mean() > 0.9
    assert m.a_value[2 * j].mean() > 2 * m.a_value[2 * j + 1].mean()


def test_checkpoint_resume_gives_the_same_state(mesh1, rng, tmp_path):
    t = 6 * CHUNK + 40
    va, ia, vb, ib = _codes(rng, t)
    acc = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)

    def source(fail_after=None):
        def open_at(start):
            for i, lo in enumerate(range(start, t, CHUNK)):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("simulated crash")
                sl = slice(lo, lo + CHUNK)
                yield va[sl], ia[sl], vb[sl], ib[sl]

        return open_at

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with pytest.raises(RuntimeError, match="simulated"):
        corr_lib.accumulate_inplace(
            acc, streaming.ChunkStream(source(4), CHUNK), mesh1, checkpointer=ckpt, save_every=1
        )
    assert ckpt.latest_step() is not None
    resumed = corr_lib.accumulate_inplace(
        acc, streaming.ChunkStream(source(), CHUNK), mesh1, checkpointer=ckpt, save_every=1
    )
    straight = corr_lib.accumulate_inplace(acc, streaming.ChunkStream(source(), CHUNK), mesh1)
    np.testing.assert_allclose(acc.finalize(resumed).corr, acc.finalize(straight).corr, atol=1e-6)
    assert acc.finalize(resumed).rows == t


def _stream(*arrays, chunk=CHUNK):
    return streaming.ChunkStream(tuple(arrays), chunk)


@pytest.mark.parametrize(
    "case,match",
    [
        ("index_out_of_range", "outside"),
        ("duplicate_index", "twice"),
        ("float_index", "integers"),
        ("wrong_arrays", "expected chunks"),
        ("dense_shape", "expected acts_a"),
        ("negative_weight", "row weights"),
        ("one_row", "at least 2 rows"),
        ("nan", "non-finite"),
    ],
)
def test_bad_input(mesh1, rng, case, match):
    va, ia, vb, ib = _codes(rng, 100)
    sparse = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)
    dense = corr_lib.CorrelationAccumulator(N_A, N_B)
    xa, xb = _dense(va, ia, N_A), _dense(vb, ib, N_B)
    with pytest.raises(checks.InputError, match=match):
        if case == "index_out_of_range":
            ia[5, 2] = N_A
            corr_lib.accumulate_inplace(sparse, _stream(va, ia, vb, ib), mesh1)
        elif case == "duplicate_index":
            ia[5, 1] = ia[5, 0]
            corr_lib.accumulate_inplace(sparse, _stream(va, ia, vb, ib), mesh1)
        elif case == "float_index":
            corr_lib.accumulate_inplace(sparse, _stream(va, ia.astype(np.float32), vb, ib), mesh1)
        elif case == "wrong_arrays":
            corr_lib.accumulate_inplace(sparse, _stream(va, ia, vb), mesh1)
        elif case == "dense_shape":
            corr_lib.accumulate_inplace(dense, _stream(xa[:, :10], xb), mesh1)
        elif case == "negative_weight":
            w = np.ones(100, np.float32)
            w[3] = -1
            corr_lib.accumulate_inplace(dense, _stream(xa, xb, w), mesh1)
        elif case == "one_row":
            dense.finalize(corr_lib.accumulate_inplace(dense, _stream(xa[:1], xb[:1]), mesh1))
        elif case == "nan":
            xa[3, 3] = np.nan
            corr_lib.accumulate_inplace(dense, _stream(xa, xb), mesh1)


def test_out_of_range_index_caught_in_generic_driver(mesh1, rng):
    # The generic engine.accumulators.accumulate has no host check: finalize refuses.
    va, ia, vb, ib = _codes(rng, 100)
    ib[7, 0] = -3
    acc = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)
    state = accumulators.accumulate(acc, _stream(va, ia, vb, ib), mesh1)
    with pytest.raises(checks.InputError, match="out of range"):
        acc.finalize(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"a_features": [1, 1]}, "distinct"),
        ({"a_features": [0, N_A]}, "lie in"),
        ({"b_features": np.zeros((2, 2), int)}, "1-D"),
        ({"n_a": 0}, ">= 1"),
    ],
)
def test_bad_configuration(kwargs, match):
    args = {"n_a": N_A, "n_b": N_B, **kwargs}
    with pytest.raises(checks.InputError, match=match):
        corr_lib.CorrelationAccumulator(args.pop("n_a"), args.pop("n_b"), **args)


@pytest.mark.parametrize("chunk", [256, 4096])
def test_constant_nonzero_dense_feature_found_whatever_the_chunk_size(mesh, chunk):
    # 3000 rows in ONE chunk (4096) or in 12 chunks: a feature that is the same non-zero value
    # on every row is constant either way (the float64 reference has std exactly 0). The
    # first chunk's float32 mean was off by up to ~n * eps, which left a spurious variance.
    rng = np.random.default_rng(21)
    t = 3000
    x = np.maximum(rng.standard_normal((t, 6)), 0).astype(np.float32)
    y = rng.standard_normal((t, 3)).astype(np.float32)
    consts = [0.9670734, 0.30601633, 1.7362214, 2.7492054, 20.379341, 1.3545433]
    for c in consts:
        x[:, 2] = np.float32(c)
        res = corr_lib.correlate((x, y), 6, 3, mesh, chunk_size=chunk)
        assert np.flatnonzero(res.a_constant).tolist() == [2], c
        assert res.a_match[2] == -1
        ref = _ref(x, y)
        ok = np.isfinite(ref).all(axis=1)
        np.testing.assert_array_equal(res.a_match[ok], np.argmax(ref[ok], axis=1))


# --------------------------------------------------------------------------------------------
# Native sparse kernel (engine/kernels/sparse_cross.cc) against the XLA scatter path.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native():
    from engine import kernels

    if not kernels.available("sparse_cross"):
        pytest.skip("native kernels unavailable (no compiler or SAE_NATIVE_KERNELS=0)")
    return kernels


def _bits(x):
    return np.asarray(x).view(np.int32)


def _messy_chunk(rng, rows, n_a, n_b, ka, kb):
    """Chunk with everything the accumulator must tolerate: out-of-range ids (-ve and >= n),
    repeated ids in a row (nonzero values too), zero values, zero and fractional weights."""
    ia = rng.integers(-2, n_a + 2, (rows, ka)).astype(np.int32)
    ib = rng.integers(-2, n_b + 2, (rows, kb)).astype(np.int32)
    ia[:, 1] = ia[:, 0]
    ib[::3, 2] = ib[::3, 0]
    va = rng.standard_normal((rows, ka)).astype(np.float32)
    vb = rng.standard_normal((rows, kb)).astype(np.float32)
    va[rng.random((rows, ka)) < 0.1] = 0
    w = rng.random(rows).astype(np.float32)
    w[::7] = 0
    return va, ia, vb, ib, w


@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
def test_native_kernel_bit_identical_to_xla_scatter(native, rng, subset):
    n_a, n_b = 90, 70
    kw = (
        dict(
            a_features=rng.choice(n_a, 40, replace=False),
            b_features=rng.choice(n_b, 30, replace=False),
        )
        if subset
        else {}
    )
    acc_n = corr_lib.CorrelationAccumulator(n_a, n_b, sparse=True, native=True, **kw)
    acc_x = corr_lib.CorrelationAccumulator(n_a, n_b, sparse=True, native=False, **kw)
    assert acc_n != acc_x  # distinct compiled programs
    up_n, up_x = jax.jit(acc_n.update), jax.jit(acc_x.update)
    s_n, s_x = acc_n.init(), acc_x.init()
    mask = np.ones(600, np.float32)
    mask[-50:] = 0  # padding rows
    for _ in range(3):
        chunk = _messy_chunk(rng, 600, n_a, n_b, 6, 5)
        s_n, s_x = up_n(s_n, chunk, mask), up_x(s_x, chunk, mask)
    for a, b in zip(jax.tree.leaves(s_n), jax.tree.leaves(s_x), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert np.abs(np.asarray(s_n.cross)).max() > 1  # something was accumulated


def test_native_kernel_threads_do_not_change_the_bits(native, rng):
    """Enough products (>= 2^18) for the kernel to split the A ids over threads."""
    fa, fb, rows, ka, kb = 64, 48, 8192, 8, 5
    la = rng.integers(0, fa + 1, (rows, ka)).astype(np.int32)  # fa: dropped
    lb = rng.integers(0, fb + 1, (rows, kb)).astype(np.int32)
    wa = rng.standard_normal((rows, ka)).astype(np.float32)
    vb = rng.standard_normal((rows, kb)).astype(np.float32)
    init = rng.standard_normal((1, fa, fb)).astype(np.float32)
    out = {
        t: np.asarray(
            jax.jit(lambda c, *x, t=t: corr_lib._native_cross(c, *x, threads=t))(
                init, la, wa, lb, vb
            )
        )
        for t in (1, 2, 3)
    }
    np.testing.assert_array_equal(_bits(out[1]), _bits(out[2]))
    np.testing.assert_array_equal(_bits(out[1]), _bits(out[3]))
    # Against float64: the same sums, in any order.
    ref = init[0].astype(np.float64)
    keep = (la[:, :, None] < fa) & (lb[:, None, :] < fb)
    r, j, m = np.nonzero(keep)
    np.add.at(ref, (la[r, j], lb[r, m]), wa[r, j].astype(np.float64) * vb[r, m])
    np.testing.assert_allclose(out[1][0], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_native_and_fallback_paths_agree_in_the_inplace_driver(native, mesh, rng, monkeypatch):
    """accumulate_inplace (1 and 4 devices): native == XLA scatter bit for bit, both close to
    float64 numpy; SAE_NATIVE_KERNELS=0 picks the XLA path by default."""
    va, ia, vb, ib = _codes(rng, 700)
    w = rng.uniform(0, 2, va.shape[0]).astype(np.float32)
    src = (va, ia, vb, ib, w)
    sub_a = np.arange(0, N_A, 2)
    states = {}
    for nat in (True, False):
        acc = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True, native=nat, a_features=sub_a)
        states[nat] = corr_lib.accumulate_inplace(acc, streaming.ChunkStream(src, CHUNK), mesh)
    for a, b in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False]), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    xa, xb = _dense(va, ia, N_A)[:, sub_a], _dense(vb, ib, N_B)
    ref = (xa.astype(np.float64) * w[:, None]).T @ xb
    np.testing.assert_allclose(np.asarray(states[True].cross), ref, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("SAE_NATIVE_KERNELS", "0")
    off = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True, a_features=sub_a)
    assert not off.native
    s_off = corr_lib.accumulate_inplace(off, streaming.ChunkStream(src, CHUNK), mesh)
    np.testing.assert_array_equal(_bits(s_off.cross), _bits(states[True].cross))


def test_inplace_native_step_does_not_copy_the_state(native, mesh1):
    """The per-device state is donated and updated in place: no full-state copy in the
    compiled step (a reshape before the aliased kernel call used to cost two per chunk)."""
    f = 512
    acc = corr_lib.CorrelationAccumulator(f, f, sparse=True, native=True, keep_matrix=False)
    init, step, _ = corr_lib._inplace_fns(acc, mesh1)
    state = init(acc)
    rows = 64
    chunk = (
        np.ones((rows, 4), np.float32),
        np.tile(np.arange(4, dtype=np.int32), (rows, 1)),
        np.ones((rows, 4), np.float32),
        np.tile(np.arange(4, dtype=np.int32), (rows, 1)),
    )
    hlo = step.lower(state, chunk, np.ones(rows, np.float32)).compile().as_text()
    big = [ln for ln in hlo.splitlines() if f"{f},{f}]" in ln]
    assert any("sae_sparse_cross" in ln for ln in big)
    assert not [ln for ln in big if " copy(" in ln or "copy_fusion" in ln], big
    ptr = state.cross.addressable_shards[0].data.unsafe_buffer_pointer()
    state = step(state, chunk, np.ones(rows, np.float32))
    assert state.cross.addressable_shards[0].data.unsafe_buffer_pointer() == ptr
    np.testing.assert_array_equal(np.asarray(state.cross)[0, :4, :4], np.full((4, 4), rows))


def test_kernel_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    from engine import kernels

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("SAE_NATIVE_KERNELS", raising=False)
    monkeypatch.setenv("SAE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with caplog.at_level("WARNING", logger="engine.kernels"):
        assert not kernels.available("sparse_cross")
        assert not kernels.available("sparse_cross")
        acc = corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True)
    assert not acc.native
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert list(tmp_path.iterdir()) == []
    # Switched off: one warning too, and nothing is built.
    caplog.clear()
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SAE_NATIVE_KERNELS", "0")
    with caplog.at_level("WARNING", logger="engine.kernels"):
        assert not kernels.available("sparse_cross")
        assert not corr_lib.CorrelationAccumulator(N_A, N_B, sparse=True).native
    assert len([r for r in caplog.records if "SAE_NATIVE_KERNELS" in r.getMessage()]) == 1
    assert list(tmp_path.iterdir()) == []


def test_concurrent_kernel_builds_are_atomic(native, monkeypatch, tmp_path):
    """Two first builds at once (as from pytest-xdist workers) leave one complete library."""
    import concurrent.futures
    import ctypes

    monkeypatch.setenv("SAE_KERNEL_CACHE", str(tmp_path))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: native._build("sparse_cross"), range(2)))
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].rsplit("/", 1)[1]]
    assert hasattr(ctypes.CDLL(paths[0]), "SaeSparseCross")

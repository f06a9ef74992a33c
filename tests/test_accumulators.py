"""CrossMoments against a float64 numpy one-pass reference, chunked, merged, sharded."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import accumulators, checks, streaming


def reference(x, y, w=None):
    """Textbook float64 weighted moments."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    n = w.sum()
    mx = (w[:, None] * x).sum(0) / n
    my = (w[:, None] * y).sum(0) / n
    xc, yc = x - mx, y - my
    return dict(
        count=n,
        mean_x=mx,
        mean_y=my,
        cov_xx=(w[:, None] * xc).T @ xc / n,
        cov_yy=(w[:, None] * yc).T @ yc / n,
        cov_xy=(w[:, None] * xc).T @ yc / n,
    )


def assert_close(moments, ref, rtol=1e-5):
    assert moments.count == pytest.approx(ref["count"], rel=1e-7)
    for field in ("mean_x", "mean_y"):
        got, want = getattr(moments, field), ref[field]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    for field in ("cov_xx", "cov_yy", "cov_xy"):
        got, want = getattr(moments, field), ref[field]
        # Relative to the matrix scale: off-diagonal covariances can be ~0.
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < rtol, f"{field}: relative error {err:.2e} >= {rtol}"


def data(rng, n, d1=5, d2=3, offset=0.0, spread=1.0):
    x = offset + spread * rng.normal(size=(n, d1))
    y = 0.5 * x[:, :d2] + rng.normal(size=(n, d2)) - 3.0
    return x.astype(np.float32), y.astype(np.float32)


def fold(acc, x, y, chunk, w=None):
    state = acc.init()
    update = jax.jit(acc.update)
    for lo in range(0, len(x), chunk):
        wc = np.ones(len(x[lo : lo + chunk])) if w is None else w[lo : lo + chunk]
        state = update(
            state, (x[lo : lo + chunk], y[lo : lo + chunk]), jnp.asarray(wc, jnp.float32)
        )
    return state


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_update_matches_float64(rng, chunk):
    x, y = data(rng, 1000)
    acc = accumulators.CrossMoments(5, 3)
    assert_close(acc.finalize(fold(acc, x, y, chunk)), reference(x, y))


def test_catastrophic_cancellation(rng):
    # Mean 1e4 times the spread: raw sums of squares in float32 would lose every digit.
    x, y = data(rng, 5000, offset=1e4, spread=1.0)
    y = (y + 1e4).astype(np.float32)
    acc = accumulators.CrossMoments(5, 3)
    assert_close(acc.finalize(fold(acc, x, y, 128)), reference(x, y))
    naive = np.float32(
        np.sum(x[:, 0].astype(np.float32) ** 2, dtype=np.float32) / len(x) - np.mean(x[:, 0]) ** 2
    )
    assert abs(naive - np.var(x[:, 0].astype(np.float64))) > 0.01  # the trap is real


def test_row_weights(rng):
    x, y = data(rng, 300)
    w = rng.uniform(0, 2, size=300)
    w[::7] = 0.0
    acc = accumulators.CrossMoments(5, 3)
    assert_close(acc.finalize(fold(acc, x, y, 32, w)), reference(x, y, w))


def test_single_stream(rng):
    x, _ = data(rng, 200)
    acc = accumulators.CrossMoments(5)
    state = jax.jit(acc.update)(acc.init(), (x,), jnp.ones(200))
    m = acc.finalize(state)
    np.testing.assert_allclose(
        m.cov_xx, np.cov(x.astype(np.float64).T, bias=True), rtol=1e-5, atol=1e-6
    )


def test_merge_in_any_order(rng):
    x, y = data(rng, 900, offset=50.0)
    acc = accumulators.CrossMoments(5, 3)
    parts = [fold(acc, x[i : i + 300], y[i : i + 300], 50) for i in (0, 300, 600)]
    ref = reference(x, y)
    merge = jax.jit(acc.merge)
    for order in itertools.permutations(range(3)):
        state = acc.init()
        for i in order:
            state = merge(state, parts[i])
        assert_close(acc.finalize(state), ref)
    # Tree-shaped merge and merging with empty states.
    tree = merge(merge(parts[0], acc.init()), merge(parts[1], parts[2]))
    assert_close(acc.finalize(tree), ref)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_sharded_stream_with_ragged_last_chunk(rng, mesh, offset):
    x, y = data(rng, 1003, offset=offset)  # 1003 = 15 * 64 + 43: ragged last chunk
    acc = accumulators.CrossMoments(5, 3)
    stream = streaming.ChunkStream((x, y), 64)
    assert_close(acc.finalize(accumulators.accumulate(acc, stream, mesh)), reference(x, y))


def test_one_and_four_devices_agree(rng, mesh1, mesh4):
    x, y = data(rng, 777, offset=3.0)
    acc = accumulators.CrossMoments(5, 3)
    a = acc.finalize(accumulators.accumulate(acc, streaming.ChunkStream((x, y), 32), mesh1))
    b = acc.finalize(accumulators.accumulate(acc, streaming.ChunkStream((x, y), 32), mesh4))
    for field in ("mean_x", "cov_xx", "cov_xy", "cov_yy"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)


def test_generic_merge_across_matches_collective_form(rng, mesh4):
    """The gather-and-fold fallback used by accumulators without a collective merge."""

    class NoCollective(accumulators.CrossMoments):
        merge_across = property(lambda self: (_ for _ in ()).throw(AttributeError))

    acc = NoCollective(5, 3)
    assert not hasattr(acc, "merge_across")
    x, y = data(rng, 256, offset=10.0)
    state = accumulators.accumulate(acc, streaming.ChunkStream((x, y), 64), mesh4)
    assert_close(acc.finalize(state), reference(x, y))


def test_checkpointed_accumulation_resumes(rng, mesh4, tmp_path):
    from engine import checkpoint

    x, y = data(rng, 640)
    acc = accumulators.CrossMoments(5, 3)
    # First pass stops after 4 chunks (simulated kill), second pass resumes from the save.
    partial = streaming.ChunkStream((x[:256], y[:256]), 64)
    ck = checkpoint.Checkpointer(str(tmp_path / "acc"))
    accumulators.accumulate(acc, partial, mesh4, checkpointer=ck, save_every=2)
    ck.close()
    ck = checkpoint.Checkpointer(str(tmp_path / "acc"))
    full = streaming.ChunkStream((x, y), 64)
    state = accumulators.accumulate(acc, full, mesh4, checkpointer=ck, save_every=2)
    assert_close(acc.finalize(state), reference(x, y))


def test_resume_after_a_crash_mid_stream(rng, mesh4, tmp_path):
    """A run that dies after some chunks (prefetch already read ahead) resumes exactly."""
    from engine import checkpoint

    x, y = data(rng, 640)
    acc = accumulators.CrossMoments(5, 3)

    class Crash(Exception):
        pass

    def dying(start):
        for lo in range(start, 640, 64):
            if lo >= 384:
                raise Crash()
            yield x[lo : lo + 64], y[lo : lo + 64]

    ck = checkpoint.Checkpointer(str(tmp_path / "acc"))
    with pytest.raises(Crash):
        accumulators.accumulate(
            acc, streaming.ChunkStream(dying, 64), mesh4, checkpointer=ck, save_every=2
        )
    ck.close()
    ck = checkpoint.Checkpointer(str(tmp_path / "acc"))
    whole = lambda start: ((x[lo : lo + 64], y[lo : lo + 64]) for lo in range(start, 640, 64))
    state = accumulators.accumulate(
        acc, streaming.ChunkStream(whole, 64), mesh4, checkpointer=ck, save_every=2
    )
    m = acc.finalize(state)
    assert m.count == 640
    assert_close(m, reference(x, y))


def test_bad_inputs(rng):
    acc = accumulators.CrossMoments(5, 3)
    x, y = data(rng, 10)
    with pytest.raises(checks.InputError, match=r"X \[rows, 5\]"):
        acc.update(acc.init(), (x[:, :4], y), jnp.ones(10))
    with pytest.raises(checks.InputError, match="no rows"):
        acc.finalize(acc.init())
    with pytest.raises(checks.InputError, match="d1"):
        accumulators.CrossMoments(0, 3)


def test_transform_and_combined_accumulators(rng, mesh):
    """On-device featurisation (params as an argument) feeding two accumulators at once."""
    x, y = data(rng, 200)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    acc = accumulators.Combined(
        {
            "xy": (accumulators.CrossMoments(5, 3), (0, 1)),
            "hy": (accumulators.CrossMoments(4, 3), (2, 1)),
        }
    )

    def transform(params, xb, yb):
        return xb, yb, jnp.tanh(xb @ params)

    out = acc.finalize(
        accumulators.accumulate(
            acc, streaming.ChunkStream((x, y), 40), mesh, transform=transform, params=w
        )
    )
    assert_close(out["xy"], reference(x, y))
    h = np.tanh(x.astype(np.float64) @ w.astype(np.float64))
    assert_close(out["hy"], reference(h, y), rtol=1e-4)


def test_checkpointer_round_trips_zero_size_leaves(tmp_path):
    from engine import checkpoint

    state = {"a": jnp.arange(3.0), "empty": jnp.zeros((0,), jnp.int32)}
    ck = checkpoint.Checkpointer(str(tmp_path / "c"))
    ck.save(1, state, {"position": 7})
    step, restored, meta = ck.restore(state)
    assert step == 1 and meta == {"position": 7}
    np.testing.assert_array_equal(restored["a"], [0, 1, 2])
    assert restored["empty"].shape == (0,) and restored["empty"].dtype == jnp.int32

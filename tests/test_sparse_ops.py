"""engine.sparse_ops: the native CPU kernels (engine/kernels/sparse_sae.cc) against float64
numpy references, jax.lax.top_k (bit for bit) and the XLA path; threads, jit, vmap, grad,
4-device sharding and the fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine import sparse_ops as so


@pytest.fixture(scope="module")
def native():
    from engine import kernels

    if not kernels.available("topk"):
        pytest.skip("native kernels unavailable (no compiler or SAE_NATIVE_KERNELS=0)")
    return kernels


# -- float64 numpy references ----------------------------------------------------------------


def ref_top_k(x):
    """Indices of each row sorted by value descending, ties to the lower index."""
    return np.argsort(-x.astype(np.float64), axis=-1, kind="stable")


def ref_dot(table, vecs, idx):
    t = table.astype(np.float64)
    return np.einsum("rkd,rd->rk", t[idx], vecs.astype(np.float64))


def ref_combine(table, coef, idx):
    t = table.astype(np.float64)
    return np.einsum("rk,rkd->rd", coef.astype(np.float64), t[idx])


def ref_scatter(coef, vecs, idx, n):
    out = np.zeros((n, vecs.shape[1]))
    for r in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if 0 <= idx[r, j] < n:
                out[idx[r, j]] += float(coef[r, j]) * vecs[r].astype(np.float64)
    return out


def _data(rng, rows, n, d, k, distinct=True):
    table = rng.normal(size=(n, d)).astype(np.float32)
    vecs = rng.normal(size=(rows, d)).astype(np.float32)
    coef = rng.normal(size=(rows, k)).astype(np.float32)
    if distinct:
        idx = np.argsort(rng.random((rows, n)), axis=1)[:, :k].astype(np.int32)
    else:
        idx = rng.integers(0, n, size=(rows, k)).astype(np.int32)
    return table, vecs, coef, idx


def _topk_native(x, k, threads=None):
    return jax.jit(lambda a: so._native_top_k_raw(a, k, threads=threads))(x)


# -- top-k -----------------------------------------------------------------------------------

TOPK_SHAPES = [(1, 64, 1), (3, 40, 40), (7, 100, 16), (5, 1000, 16), (9, 2000, 32), (4, 37, 5)]


@pytest.mark.parametrize("rows,n,k", TOPK_SHAPES)
@pytest.mark.parametrize("data", ["normal", "ties", "scaled"])
def test_top_k_bit_identical_to_lax_top_k(native, rng, rows, n, k, data):
    if data == "normal":
        x = rng.normal(size=(rows, n))
    elif data == "ties":  # small integers: many ties, signed zeros among them
        x = rng.integers(-3, 4, size=(rows, n)).astype(np.float64)
        x[rng.random((rows, n)) < 0.2] = -0.0
    else:  # rows of very different scales (the block bound is recomputed)
        x = rng.normal(size=(rows, n)) * 10.0 ** (np.arange(rows)[:, None] % 5 * 3 - 6)
    x = x.astype(np.float32)
    vals, idx = jax.jit(lambda a: so.top_k(a, k, native=True))(jnp.asarray(x))
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(x), k)
    assert vals.dtype == jnp.float32 and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_i))
    np.testing.assert_array_equal(
        np.asarray(vals).view(np.int32), np.asarray(ref_v).view(np.int32)
    )  # bits (signed zeros too)
    if data != "ties":  # an independent reference (no signed-zero ties)
        np.testing.assert_array_equal(np.asarray(idx), ref_top_k(x)[:, :k])


def test_top_k_constant_rows_and_leading_axes(native):
    x = np.zeros((2, 3, 600), np.float32)
    x[1, 2, 500:] = 1.0
    vals, idx = so.top_k(jnp.asarray(x), 8, native=True)
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(x), 8)
    assert idx.shape == (2, 3, 8)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(vals, ref_v)
    np.testing.assert_array_equal(idx[0, 0], np.arange(8))
    np.testing.assert_array_equal(idx[1, 2], np.arange(500, 508))


def test_top_k_nan_and_inf_do_not_crash(native, rng):
    """NaN: XLA's total order (sign-bit-clear NaN above +inf); callers reject NaN earlier."""
    x = rng.normal(size=(4, 700)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 10] = np.inf
    x[2, 20] = -np.inf
    x[3, :] = np.nan
    vals, idx = so.top_k(jnp.asarray(x), 6, native=True)
    ref_v, ref_i = jax.lax.top_k(jnp.asarray(x), 6)
    np.testing.assert_array_equal(idx[:3], ref_i[:3])
    assert idx[0, 0] == 3 and idx[1, 0] == 10
    assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 700))


def test_top_k_gradient_matches_lax(native, rng):
    x = jnp.asarray(rng.normal(size=(5, 300)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32))
    g_nat = jax.grad(lambda a: jnp.sum(w * so.top_k(a, 7, native=True)[0]))(x)
    g_ref = jax.grad(lambda a: jnp.sum(w * jax.lax.top_k(a, 7)[0]))(x)
    np.testing.assert_array_equal(g_nat, g_ref)


# -- gathers and scatter against float64 -----------------------------------------------------

SHAPES = [(1, 20, 8, 3), (6, 50, 13, 1), (17, 9, 5, 9), (40, 300, 33, 16), (64, 1536, 384, 16)]


@pytest.mark.parametrize("rows,n,d,k", SHAPES)
def test_gathers_and_scatter_match_float64(native, rng, rows, n, d, k):
    table, vecs, coef, idx = _data(rng, rows, n, d, k, distinct=k < n)
    j = [jnp.asarray(a) for a in (table, vecs, coef, idx)]
    dot = jax.jit(lambda t, v, i: so.gather_dot(t, v, i, native=True))(j[0], j[1], j[3])
    comb = jax.jit(lambda t, c, i: so.gather_combine(t, c, i, native=True))(j[0], j[2], j[3])
    scat = jax.jit(lambda c, v, i: so.scatter_outer(c, v, i, n, native=True))(j[2], j[1], j[3])
    scale = np.sqrt(d)
    np.testing.assert_allclose(dot, ref_dot(table, vecs, idx), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(
        comb, ref_combine(table, coef, idx), rtol=1e-5, atol=1e-5 * np.sqrt(k)
    )
    np.testing.assert_allclose(
        scat, ref_scatter(coef, vecs, idx, n), rtol=1e-5, atol=1e-5 * np.sqrt(rows)
    )
    # The XLA path agrees (the scatter and the combine add in the same order).
    np.testing.assert_allclose(dot, so.gather_dot(j[0], j[1], j[3]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(comb, so.gather_combine(j[0], j[2], j[3]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scat, so.scatter_outer(j[2], j[1], j[3], n))


def test_scatter_outer_repeated_and_out_of_range_ids(native, rng):
    n, d = 10, 7
    coef = rng.normal(size=(6, 4)).astype(np.float32)
    vecs = rng.normal(size=(6, d)).astype(np.float32)
    idx = np.array(
        [
            [0, 0, 0, 3],
            [3, 3, 9, 9],
            [10, 11, -1, 2],
            [2**31 - 1, -(2**31), 5, 5],
            [1] * 4,
            [9] * 4,
        ],
        np.int32,
    )
    out = so.scatter_outer(jnp.asarray(coef), jnp.asarray(vecs), jnp.asarray(idx), n, native=True)
    np.testing.assert_allclose(out, ref_scatter(coef, vecs, idx, n), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[[4, 6, 7, 8]] == 0)


def test_gathers_give_nan_for_out_of_range_ids(native, rng):
    table, vecs, coef, _ = _data(rng, 3, 8, 5, 2)
    idx = np.array([[0, 8], [1, 2], [-1, 3]], np.int32)
    dot = np.asarray(so.gather_dot(table, vecs, jnp.asarray(idx), native=True))
    comb = np.asarray(so.gather_combine(table, coef, jnp.asarray(idx), native=True))
    assert np.isnan(dot[0, 1]) and np.isnan(dot[2, 0]) and np.isfinite(dot[1]).all()
    assert np.isnan(comb[0]).all() and np.isnan(comb[2]).all() and np.isfinite(comb[1]).all()


def test_threads_do_not_change_the_bits(native, rng):
    rows, n, d, k = 300, 1536, 100, 16
    table, vecs, coef, idx = _data(rng, rows, n, d, k, distinct=False)
    x = rng.normal(size=(rows, n)).astype(np.float32)
    outs = []
    for t in (1, 3):
        outs.append(
            [
                *_topk_native(x, k, threads=t),
                jax.jit(lambda a, b, c, t=t: so._native_dot(a, b, c, threads=t))(table, vecs, idx),
                jax.jit(lambda a, b, c, t=t: so._native_combine(a, b, c, threads=t))(
                    table, coef, idx
                ),
                jax.jit(lambda a, b, c, t=t: so._native_scatter_outer(a, b, c, n, threads=t))(
                    coef, vecs, idx
                ),
            ]
        )
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


# -- gradients -------------------------------------------------------------------------------


def _dense(coef, idx, n):
    out = np.zeros(coef.shape[:-1] + (n,))
    np.put_along_axis(out, idx, 0.0, axis=-1)
    for r in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[r, idx[r, j]] += coef[r, j]
    return out


@pytest.mark.parametrize("distinct", [True, False])
def test_gradients_native_equal_xla_and_analytic(native, rng, distinct):
    rows, n, d, k = 12, 40, 11, 5
    table, vecs, coef, idx = _data(rng, rows, n, d, k, distinct=distinct)
    w_out = rng.normal(size=(rows, d)).astype(np.float32)
    w_k = rng.normal(size=(rows, k)).astype(np.float32)

    def loss_comb(t, c, nat):
        return jnp.sum(w_out * so.gather_combine(t, c, idx, native=nat))

    def loss_dot(t, v, nat):
        return jnp.sum(w_k * so.gather_dot(t, v, idx, native=nat))

    gc = [
        jax.jit(jax.grad(loss_comb, argnums=(0, 1)), static_argnums=2)(table, coef, nat)
        for nat in (True, False)
    ]
    gd = [
        jax.jit(jax.grad(loss_dot, argnums=(0, 1)), static_argnums=2)(table, vecs, nat)
        for nat in (True, False)
    ]
    for a, b in zip(gc[0] + gd[0], gc[1] + gd[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Analytic float64: combine = D(coef) @ T, dot = (T[idx] . v).
    dense = _dense(coef.astype(np.float64), idx, n)  # [rows, n]
    np.testing.assert_allclose(gc[0][0], dense.T @ w_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        gc[0][1],
        np.einsum("rd,rkd->rk", w_out, table.astype(np.float64)[idx]),
        rtol=1e-5,
        atol=1e-5,
    )
    dense_w = _dense(w_k.astype(np.float64), idx, n)
    np.testing.assert_allclose(gd[0][0], dense_w.T @ vecs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gd[0][1], dense_w @ table, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nat", [True, False])
def test_gather_dot_values_returns_the_values_with_the_gather_dot_gradient(native, rng, nat):
    rows, n, d, k = 9, 30, 7, 4
    table, vecs, _, idx = _data(rng, rows, n, d, k)
    values = np.asarray(so.gather_dot(table, vecs, idx)) + 0.5  # any values pass through
    w_k = rng.normal(size=(rows, k)).astype(np.float32)

    def loss(v, t, x):
        return jnp.sum(w_k * so.gather_dot_values(v, t, x, idx, native=nat))

    out = jax.jit(lambda v, t, x: so.gather_dot_values(v, t, x, idx, native=nat))(
        values, table, vecs
    )
    np.testing.assert_array_equal(np.asarray(out), values)
    g_v, g_t, g_x = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(values, table, vecs)
    np.testing.assert_array_equal(np.asarray(g_v), 0.0)
    dense_w = _dense(w_k.astype(np.float64), idx, n)  # d/dtable of sum w * (T[idx] . x)
    np.testing.assert_allclose(g_t, dense_w.T @ vecs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x, dense_w @ table, rtol=1e-5, atol=1e-5)


def test_sparse_topk_encode_native_equals_xla(native, rng):
    from models import sae as sae_lib

    w_enc = jnp.asarray(rng.normal(size=(24, 300)).astype(np.float32))
    b_enc = jnp.asarray(rng.normal(size=300).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(2, 9, 24)).astype(np.float32))

    def loss(w, b, nat):
        v, i = sae_lib.sparse_topk_encode(w, b, x, 8, native=nat)
        return jnp.sum(v * jnp.cos(i.astype(jnp.float32))), (v, i)

    (l1, (v1, i1)), g1 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w_enc, b_enc, True)
    (l0, (v0, i0)), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w_enc, b_enc, False)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- vmap, sharding, fallback ----------------------------------------------------------------


def test_vmap_over_saes_and_rows(native, rng):
    """The sweep's vmap: batched tables with shared or batched ids/inputs, and grads."""
    rows, n, d, k, s = 10, 30, 6, 4, 3
    table, vecs, coef, idx = _data(rng, rows, n, d, k)
    tables = np.stack([table * (i + 1) for i in range(s)])
    vecs_b = np.stack([vecs + i for i in range(s)])
    for nat in (True, False):
        out = jax.vmap(lambda t, v: so.gather_dot(t, v, idx, native=nat))(tables, vecs_b)
        for i in range(s):
            np.testing.assert_allclose(out[i], ref_dot(tables[i], vecs_b[i], idx), rtol=1e-5)
        out = jax.vmap(lambda t: so.gather_combine(t, coef, idx, native=nat))(tables)
        for i in range(s):
            np.testing.assert_allclose(out[i], ref_combine(tables[i], coef, idx), rtol=1e-5)
    x = rng.normal(size=(s, rows, n)).astype(np.float32)
    v_nat, i_nat = jax.vmap(lambda a: so.top_k(a, k, native=True))(x)
    v_ref, i_ref = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(i_nat, i_ref)
    np.testing.assert_array_equal(v_nat, v_ref)
    # vmap of grad (per-SAE losses), native vs XLA, nested over a second axis too.

    def loss(t, v, nat):
        _, i = so.top_k(v @ t.T, k, native=nat)
        vals = so.gather_dot(t, v, i, native=nat)
        return jnp.sum(so.gather_combine(t, jax.nn.relu(vals), i, native=nat) ** 2)

    g = {
        nat: jax.jit(
            jax.vmap(jax.vmap(jax.grad(loss), (0, None, None)), (None, 0, None)), static_argnums=2
        )(tables, vecs_b, nat)
        for nat in (True, False)
    }
    assert g[True].shape == (s, s, n, d)
    np.testing.assert_allclose(g[True], g[False], rtol=1e-4, atol=1e-4)


def test_sharded_rows_equal_one_device(native, rng, mesh1, mesh4):
    rows, n, d, k = 16, 200, 12, 6
    table, vecs, coef, idx = _data(rng, rows, n, d, k)
    x = rng.normal(size=(rows, n)).astype(np.float32)

    def run(t, v, c, i, a):
        vals, ids = so.top_k(a, k, native=True)
        return (
            vals,
            ids,
            so.gather_dot(t, v, i, native=True),
            so.gather_combine(t, c, i, native=True),
            so.scatter_outer(c, v, i, n, native=True),
            jax.grad(lambda tt: jnp.sum(so.gather_dot(tt, v, i, native=True) ** 2))(t),
        )

    results = []
    for mesh in (mesh1, mesh4):
        axis = mesh.axis_names[0]
        row = NamedSharding(mesh, P(axis))
        rep = NamedSharding(mesh, P())
        args = [
            jax.device_put(table, rep),
            jax.device_put(vecs, row),
            jax.device_put(coef, row),
            jax.device_put(idx, row),
            jax.device_put(x, row),
        ]
        results.append(jax.jit(run)(*args))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert so.native_default(mesh1) and not so.native_default(mesh4)


def test_native_path_is_used_on_cpu_and_xla_otherwise(native, rng, monkeypatch):
    x = jnp.asarray(rng.normal(size=(4, 64)).astype(np.float32))
    t = jnp.asarray(rng.normal(size=(64, 5)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))

    def f(x, t, v, nat):
        _, i = so.top_k(x, 3, native=nat)
        return so.gather_dot(t, v, i, native=nat)

    hlo = jax.jit(f, static_argnums=3).lower(x, t, v, True).as_text()
    assert "sae_topk" in hlo and "sae_gather_dot" in hlo
    hlo = jax.jit(f, static_argnums=3).lower(x, t, v, False).as_text()
    assert "sae_topk" not in hlo and "sae_gather_dot" not in hlo
    # float64 never goes native (the kernels are float32).
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        assert "sae_topk" not in jax.jit(lambda a: so.top_k(a, 3, native=True)).lower(x64).as_text()
    # SAE_NATIVE_KERNELS=0: native=True falls back to XLA with the same results.
    from engine import kernels

    want = f(x, t, v, True)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SAE_NATIVE_KERNELS", "0")
    assert not so.native_default()
    hlo = jax.jit(lambda *a: f(*a, True)).lower(x, t, v).as_text()  # a fresh trace
    assert "sae_topk" not in hlo
    np.testing.assert_allclose(f(x, t, v, True), want, rtol=1e-5, atol=1e-6)


def test_encode_sparse_native_passthrough(native, rng):
    from models import sae as sae_lib

    cfg = sae_lib.SAEConfig(d_in=16, d_sae=200, activation="topk", k=5)
    sae = sae_lib.init(jax.random.PRNGKey(0), cfg)
    sae = sae.replace(b_enc=jnp.asarray(rng.normal(size=200).astype(np.float32)))
    x = jnp.asarray(rng.normal(size=(3, 7, 16)).astype(np.float32))
    for fwd in (True, False):
        v1, i1 = sae.encode_sparse(x, forward_only=fwd, native=True)
        v0, i0 = sae.encode_sparse(x, forward_only=fwd)
        np.testing.assert_array_equal(i1, i0)
        np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)


def test_failed_build_falls_back_to_xla_with_one_warning(rng, monkeypatch, tmp_path, caplog):
    from engine import kernels

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("SAE_NATIVE_KERNELS", raising=False)
    monkeypatch.setenv("SAE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    x = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32))
    t = jnp.asarray(rng.normal(size=(50, 4)).astype(np.float32))
    with caplog.at_level("WARNING", logger="engine.kernels"):
        assert not so.native_default()
        vals, idx = jax.jit(lambda a: so.top_k(a, 5, native=True))(x)
        comb = so.gather_combine(t, vals, idx, native=True)
        scat = so.scatter_outer(vals, x[:, :4], idx, 50, native=True)
    ref_v, ref_i = jax.lax.top_k(x, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(vals, ref_v)
    np.testing.assert_allclose(comb, ref_combine(np.asarray(t), np.asarray(vals), ref_i), rtol=1e-5)
    np.testing.assert_allclose(
        scat, ref_scatter(np.asarray(vals), np.asarray(x[:, :4]), np.asarray(ref_i), 50), rtol=1e-5
    )
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert list(tmp_path.iterdir()) == []

"""The SAE type: forward of every activation against float64 numpy, sparse TopK primitives
against the dense path (values and gradients), init helpers, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.checks import InputError
from models import sae as sae_lib

D_IN, D_SAE = 12, 40


def _random_sae(activation, k=0, seed=0, input_scale=1.0, apply_b=True, threshold=None):
    rng = np.random.default_rng(seed)
    cfg = sae_lib.SAEConfig(
        D_IN, D_SAE, activation, k=k, input_scale=input_scale, apply_b_dec_to_input=apply_b
    )
    w_enc = rng.normal(size=(D_IN, D_SAE)) / 3
    w_dec = rng.normal(size=(D_SAE, D_IN)) / 3
    b_enc = rng.normal(size=D_SAE) / 5
    b_dec = rng.normal(size=D_IN) / 5
    thr = rng.uniform(0.0, 0.6, size=D_SAE) if threshold is None else threshold
    return sae_lib.from_arrays(cfg, w_enc, b_enc, w_dec, b_dec, thr), (
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        thr,
    )


def _np_forward(arrs, x, activation, k, scale=1.0, apply_b=True):
    """Textbook float64 forward."""
    w_enc, b_enc, w_dec, b_dec, thr = (np.asarray(a, np.float64) for a in arrs)
    xn = x * scale
    pre = (xn - (b_dec if apply_b else 0)) @ w_enc + b_enc
    if activation == "relu":
        f = np.maximum(pre, 0)
    elif activation == "topk":
        r = np.maximum(pre, 0)
        f = np.zeros_like(r)
        for i, row in enumerate(r):
            top = np.argsort(-row)[:k]
            f[i, top] = row[top]
    else:  # jumprelu / batchtopk inference
        f = np.where((pre > thr) & (pre > 0), pre, 0.0)
    return f, (f @ w_dec + b_dec) / scale


@pytest.mark.parametrize(
    "activation,k", [("relu", 0), ("topk", 5), ("jumprelu", 0), ("batchtopk", 4)]
)
@pytest.mark.parametrize("scale,apply_b", [(1.0, True), (2.5, False)])
def test_forward_matches_float64_reference(activation, k, scale, apply_b):
    sae, arrs = _random_sae(activation, k, input_scale=scale, apply_b=apply_b)
    x = np.random.default_rng(1).normal(size=(30, D_IN))
    f_ref, xhat_ref = _np_forward(arrs, x, activation, k, scale, apply_b)
    f = np.asarray(sae.encode(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(f, f_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sae(jnp.asarray(x, jnp.float32))), xhat_ref, atol=5e-5)
    if activation == "topk":
        assert np.all((f > 0).sum(axis=1) <= k)


def test_encode_sparse_and_decode_sparse_equal_dense():
    sae, _ = _random_sae("topk", k=6)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, D_IN)), jnp.float32)
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == idx.shape == (3, 7, 6)
    dense = sae.encode(x)
    rebuilt = np.zeros(dense.shape)
    np.put_along_axis(rebuilt, np.asarray(idx), np.asarray(vals), axis=-1)
    np.testing.assert_allclose(rebuilt, np.asarray(dense), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(sae.decode_sparse(vals, idx)), np.asarray(sae.decode(dense)), atol=1e-5
    )


def test_forward_only_codes_equal_the_gradient_path():
    """``forward_only`` skips the gather-dot recomputation: same indices, values to float32
    rounding, and both equal to the float64 top-k of the dense pre-activations."""
    sae, _ = _random_sae("topk", k=6)
    x = np.random.default_rng(4).normal(size=(40, D_IN))
    xj = jnp.asarray(x, jnp.float32)
    vals, idx = sae.encode_sparse(xj)
    fvals, fidx = sae.encode_sparse(xj, forward_only=True)
    np.testing.assert_array_equal(np.asarray(fidx), np.asarray(idx))
    np.testing.assert_allclose(np.asarray(fvals), np.asarray(vals), atol=1e-5)
    c = sae.config
    xc = x * c.input_scale - (np.asarray(sae.b_dec, np.float64) if c.apply_b_dec_to_input else 0)
    pre = xc @ np.asarray(sae.W_enc, np.float64) + np.asarray(sae.b_enc, np.float64)
    ref = np.maximum(np.take_along_axis(pre, np.asarray(fidx), axis=1), 0)
    np.testing.assert_allclose(np.asarray(fvals), ref, atol=1e-5)
    np.testing.assert_allclose(np.maximum(-np.sort(-pre, axis=1)[:, :6], 0), ref, atol=1e-5)


def test_batch_topk_keeps_k_times_rows_largest():
    acts = np.abs(np.random.default_rng(3).normal(size=(6, 20))).astype(np.float32)
    out = np.asarray(sae_lib.batch_topk(jnp.asarray(acts), 3))
    cut = np.sort(acts.reshape(-1))[-18]
    np.testing.assert_array_equal(out, np.where(acts >= cut, acts, 0))
    assert (out > 0).sum() == 18


def _dense_from_sparse(coef, idx, n):
    return jnp.sum(jax.nn.one_hot(idx, n, dtype=coef.dtype) * coef[..., None], axis=-2)


def test_gather_primitives_values_and_gradients_equal_dense():
    """Sparse decode/backward == dense path (float64, exact to rounding)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        table = jnp.asarray(rng.normal(size=(30, 9)))
        coef = jnp.asarray(rng.normal(size=(2, 5, 4)))
        idx = jnp.asarray(rng.integers(0, 30, size=(2, 5, 4)))  # repeats included
        vecs = jnp.asarray(rng.normal(size=(2, 5, 9)))
        w = jnp.asarray(rng.normal(size=(2, 5, 9)))

        def dense_combine(t, c):
            return _dense_from_sparse(c, idx, 30) @ t

        def dense_dot(t, v):
            return jnp.einsum("...kd,...d->...k", t[idx], v)

        np.testing.assert_allclose(
            sae_lib.gather_combine(table, coef, idx), dense_combine(table, coef), atol=1e-12
        )
        np.testing.assert_allclose(
            sae_lib.gather_dot(table, vecs, idx), dense_dot(table, vecs), atol=1e-12
        )
        gs = jax.grad(
            lambda t, c: jnp.sum(w * jnp.sin(sae_lib.gather_combine(t, c, idx))), argnums=(0, 1)
        )(table, coef)
        gd = jax.grad(lambda t, c: jnp.sum(w * jnp.sin(dense_combine(t, c))), argnums=(0, 1))(
            table, coef
        )
        for a, b in zip(gs, gd):
            np.testing.assert_allclose(a, b, atol=1e-12)
        w2 = w[..., :4]
        gs = jax.grad(
            lambda t, v: jnp.sum(w2 * jnp.cos(sae_lib.gather_dot(t, v, idx))), argnums=(0, 1)
        )(table, vecs)
        gd = jax.grad(lambda t, v: jnp.sum(w2 * jnp.cos(dense_dot(t, v))), argnums=(0, 1))(
            table, vecs
        )
        for a, b in zip(gs, gd):
            np.testing.assert_allclose(a, b, atol=1e-12)
        # vmap over a leading SAE axis (the sweep) gives the per-SAE result.
        tables = jnp.stack([table, 2 * table])
        out = jax.vmap(lambda t: sae_lib.gather_combine(t, coef, idx))(tables)
        np.testing.assert_allclose(out[1], 2 * dense_combine(table, coef), atol=1e-12)


def test_sparse_topk_encode_gradient_equals_dense_topk():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        w_enc = jnp.asarray(rng.normal(size=(D_IN, D_SAE)))
        b_enc = jnp.asarray(rng.normal(size=D_SAE))
        x = jnp.asarray(rng.normal(size=(8, D_IN)))
        w = jnp.asarray(rng.normal(size=(8, D_SAE)))

        def sparse_loss(we, be, xx):
            v, i = sae_lib.sparse_topk_encode(we, be, xx, 4)
            return jnp.sum(w * _dense_from_sparse(v, i, D_SAE) ** 2)

        def dense_loss(we, be, xx):
            return jnp.sum(w * sae_lib.topk_dense(jax.nn.relu(xx @ we + be), 4) ** 2)

        np.testing.assert_allclose(
            sparse_loss(w_enc, b_enc, x), dense_loss(w_enc, b_enc, x), rtol=1e-12
        )
        gs = jax.grad(sparse_loss, argnums=(0, 1, 2))(w_enc, b_enc, x)
        gd = jax.grad(dense_loss, argnums=(0, 1, 2))(w_enc, b_enc, x)
        for a, b in zip(gs, gd):
            np.testing.assert_allclose(a, b, atol=1e-10)


def test_prefer_sparse_by_size():
    assert sae_lib.prefer_sparse(16384, 32)
    assert not sae_lib.prefer_sparse(512, 5)
    assert not sae_lib.prefer_sparse(4096, 1024)


def test_geometric_median_known_values():
    # Symmetric configuration: the gradient of sum of distances vanishes at (0.5, 0.5).
    pts = np.array([[0.0, 0.0], [1, 0], [0, 1], [10, 10]])
    np.testing.assert_allclose(sae_lib.geometric_median(pts), [0.5, 0.5], atol=1e-5)
    # Robust to a far outlier, unlike the mean; collinear points: the middle one.
    line = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [1000, 0]])
    np.testing.assert_allclose(sae_lib.geometric_median(line), [2, 0], atol=1e-4)
    # Compare with a brute-force minimiser of the sum of distances on a grid.
    rng = np.random.default_rng(6)
    p = rng.normal(size=(40, 2)) + np.array([3.0, -1.0])
    gm = sae_lib.geometric_median(p)
    g = np.stack(
        np.meshgrid(
            np.linspace(gm[0] - 0.05, gm[0] + 0.05, 101),
            np.linspace(gm[1] - 0.05, gm[1] + 0.05, 101),
        ),
        -1,
    ).reshape(-1, 2)
    cost = np.linalg.norm(p[None] - g[:, None], axis=-1).sum(-1)
    np.testing.assert_allclose(g[np.argmin(cost)], gm, atol=1e-3)


def test_expected_norm_scale_and_feature_density():
    x = np.random.default_rng(7).normal(size=(100, D_IN)) * 7
    s = sae_lib.expected_norm_scale(x)
    np.testing.assert_allclose(np.mean(np.linalg.norm(x * s, axis=1)), np.sqrt(D_IN))
    with pytest.raises(InputError, match="every row is zero"):
        sae_lib.expected_norm_scale(np.zeros((4, 3)))
    sae, arrs = _random_sae("relu")
    dens = sae_lib.feature_density(sae, x.astype(np.float32), batch_size=33)
    f_ref, _ = _np_forward(arrs, x.astype(np.float32).astype(np.float64), "relu", 0)
    np.testing.assert_allclose(dens, (f_ref > 0).mean(axis=0), atol=0.011)


def test_bad_input_errors():
    with pytest.raises(InputError, match="k=50 exceeds d_sae=40"):
        sae_lib.SAEConfig(D_IN, D_SAE, "topk", k=50)
    with pytest.raises(InputError, match="unknown 'gelu'"):
        sae_lib.SAEConfig(D_IN, D_SAE, "gelu")
    sae, _ = _random_sae("topk", k=3)
    with pytest.raises(InputError, match="does not match SAE d_in=12"):
        sae.check_input(np.zeros((4, 11)))
    x = np.zeros((4, D_IN))
    x[2, 3] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        sae.check_input(x)
    with pytest.raises(InputError, match="exceeds d_sae"):
        sae.encode_sparse(jnp.zeros((2, D_IN)), k=41)
    with pytest.raises(InputError, match="W_dec"):
        sae_lib.from_arrays(
            sae.config,
            np.zeros((D_IN, D_SAE)),
            np.zeros(D_SAE),
            np.zeros((D_IN, D_SAE)),
            np.zeros(D_IN),
        )


@pytest.mark.parametrize("activation,k", [("relu", 0), ("topk", 3), ("jumprelu", 0)])
def test_wrong_width_names_the_sae_and_both_shapes(activation, k):
    sae, _ = _random_sae(activation, k=k)
    sae = sae.replace(config=sae.config.with_metadata(hookpoint="resid_post.3", model_name="tiny"))
    cases = [
        (sae.encode, jnp.zeros((4, D_IN + 1)), r"\(4, 13\).*\[\.\.\., 12\]"),
        (sae.pre_activations, jnp.zeros((D_IN - 1,)), r"\(11,\).*\[\.\.\., 12\]"),
        (sae, jnp.zeros((2, 3, 7)), r"\(2, 3, 7\).*\[\.\.\., 12\]"),
        (sae.decode, jnp.zeros((4, D_IN)), r"\(4, 12\).*\[\.\.\., 40\]"),
        (lambda a: sae.encode_sparse(a, k=2), jnp.zeros((5, 3)), r"\(5, 3\)"),
    ]
    for fn, arg, shapes in cases:
        with pytest.raises(InputError, match=shapes) as e:
            fn(arg)
        msg = str(e.value)
        assert "\n" not in msg and "resid_post.3" in msg and f"d_in={D_IN}" in msg, msg
        assert f"d_sae={D_SAE}" in msg
    # Inside jit and vmap the shapes are static: the same one-line error at trace time.
    with pytest.raises(InputError, match=r"\(4, 13\)"):
        jax.jit(sae.encode)(jnp.zeros((4, D_IN + 1)))
    with pytest.raises(InputError, match=r"values \(4, 2\) and indices \(4, 3\)"):
        sae.decode_sparse(jnp.zeros((4, 2)), jnp.zeros((4, 3), jnp.int32))

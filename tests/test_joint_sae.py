"""Joint cross-model SAEs (models/joint_sae.py, experiments/pipeline/joint_metrics.py).

References are independent: float64 numpy re-implementations of each design's loss, central
finite differences of that numpy loss for gradients, per-latent `np.linalg.lstsq` for latent
scaling, hand-built decoders for the sharing calls, a known-truth toy for recovery.
"""

import dataclasses
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import checks
from experiments.pipeline import joint_metrics as jm
from models import dictionary_pair, sae_io_native
from models import joint_sae as js

# -- float64 numpy references ------------------------------------------------------------------


def _np_act(pre, cfg, weights):
    f = np.maximum(pre, 0.0)
    if cfg.activation == "relu":
        return f
    score = f * weights
    out = np.zeros_like(f)
    if cfg.activation == "topk":
        idx = np.argsort(-score, axis=1)[:, : cfg.k]
        np.put_along_axis(out, idx, np.take_along_axis(f, idx, 1), 1)
        return out
    flat = score.reshape(-1)
    keep = np.argsort(-flat)[: cfg.k * pre.shape[0]]
    mask = np.zeros(flat.shape, bool)
    mask[keep] = True
    return np.where(mask.reshape(f.shape) & (f > 0), f, 0.0)


def np_loss(p, xs, cfg, source=None):
    """The designs' losses as written in the module docstring, float64."""
    M = len(xs)
    dec = [np.asarray(w, np.float64) for w in p["W_dec"]]
    enc = [np.asarray(w, np.float64) for w in p["W_enc"]]
    be = [np.asarray(b, np.float64) for b in p["b_enc"]]
    bd = [np.asarray(b, np.float64) for b in p["b_dec"]]
    norms = sum(np.linalg.norm(w, axis=1) for w in dec)
    weights = norms if cfg.design == "crosscoder" else np.ones(cfg.d_sae)

    def recon(x, xh):
        return np.mean(np.sum((x - xh) ** 2, axis=1))

    if cfg.design == "crosscoder":
        z = _np_act(be[0] + sum(x @ w for x, w in zip(xs, enc)), cfg, weights)
        loss = sum(recon(x, z @ dec[m] + bd[m]) for m, x in enumerate(xs))
        code = z
    elif cfg.design == "universal":

        def one(s):
            z = _np_act((xs[s] - bd[s]) @ enc[s] + be[s], cfg, weights)
            return sum(recon(x, z @ dec[n] + bd[n]) for n, x in enumerate(xs)), z

        if source is None:
            loss = np.mean([one(s)[0] for s in range(M)])
            code = one(0)[1]
        else:
            loss, code = one(source)
    else:
        zs = [_np_act((x - bd[m]) @ enc[m] + be[m], cfg, weights) for m, x in enumerate(xs)]
        loss = sum(recon(x, zs[m] @ dec[m] + bd[m]) for m, x in enumerate(xs))
        pairs = [(a, b) for a in range(M) for b in range(a + 1, M)]
        loss += cfg.align_coeff * np.mean([recon(zs[a], zs[b]) for a, b in pairs])
        code = zs[0]
    if cfg.activation == "relu":
        loss += cfg.l1_coeff * np.mean(np.sum(code * norms, axis=1))
    return loss


def _random_params(cfg, d_ins, seed=0):
    rng = np.random.default_rng(seed)
    p = js.init_params(cfg, d_ins, [rng.normal(size=d) * 0.1 for d in d_ins])
    # Perturb away from W_enc = W_dec^T and zero biases so every term is exercised.
    return jax.tree.map(
        lambda a: np.asarray(a, np.float64) + 0.05 * rng.normal(size=np.shape(a)), p
    )


DESIGN_CASES = [
    js.JointConfig("crosscoder", 12, "relu", l1_coeff=0.7),
    js.JointConfig("crosscoder", 12, "topk", k=3),
    js.JointConfig("crosscoder", 12, "batchtopk", k=3),
    js.JointConfig("universal", 12, "topk", k=3, source="all"),
    js.JointConfig("universal", 12, "relu", l1_coeff=0.3, source="all"),
    js.JointConfig("aligned", 12, "topk", k=3, align_coeff=0.8),
]


@pytest.mark.parametrize("cfg", DESIGN_CASES, ids=lambda c: c.label())
def test_loss_and_gradient_match_float64_numpy(cfg):
    d_ins = (5, 7, 6)  # three models of different widths
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(10, d)) for d in d_ins]
    p = _random_params(cfg, d_ins)
    with jax.enable_x64(True):
        pj = jax.tree.map(jnp.asarray, p)
        xj = [jnp.asarray(x) for x in xs]
        loss, _ = js.joint_loss(pj, xj, cfg, jax.random.PRNGKey(0))
        np.testing.assert_allclose(float(loss), np_loss(p, xs, cfg), rtol=1e-10)
        grads = jax.grad(lambda q: js.joint_loss(q, xj, cfg, jax.random.PRNGKey(0))[0])(pj)
    # Central differences of the numpy loss on random coordinates of every leaf.
    eps = 1e-6
    for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
        for m, leaf in enumerate(p[field]):
            for _ in range(4):
                idx = tuple(rng.integers(0, s) for s in leaf.shape)
                plus = jax.tree.map(np.copy, p)
                minus = jax.tree.map(np.copy, p)
                plus[field][m][idx] += eps
                minus[field][m][idx] -= eps
                fd = (np_loss(plus, xs, cfg) - np_loss(minus, xs, cfg)) / (2 * eps)
                got = float(np.asarray(grads[field][m])[idx])
                assert abs(got - fd) <= 1e-5 * max(1.0, abs(fd)), (field, m, idx, got, fd)


def test_universal_sampled_source_is_one_of_the_sources():
    cfg = js.JointConfig("universal", 10, "topk", k=2, source="sample")
    d_ins = (4, 6)
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(8, d)) for d in d_ins]
    p = _random_params(cfg, d_ins, 3)
    per_source = [np_loss(p, xs, cfg, source=s) for s in range(2)]
    seen = set()
    with jax.enable_x64(True):
        for key in range(12):
            loss, _ = js.joint_loss(
                jax.tree.map(jnp.asarray, p),
                [jnp.asarray(x) for x in xs],
                cfg,
                jax.random.PRNGKey(key),
            )
            hits = [s for s in range(2) if abs(float(loss) - per_source[s]) < 1e-9]
            assert len(hits) == 1
            seen.add(hits[0])
    assert seen == {0, 1}


# -- AuxK and the dead-latent counters ---------------------------------------------------------


def _np_pre_outs(p, xs, cfg, source):
    """Pre-activations and reconstructions per code, float64: [(pre, dead_row_index,
    targets, outs)] with targets the model indices that code reconstructs."""
    M = len(xs)
    dec = [np.asarray(w, np.float64) for w in p["W_dec"]]
    enc = [np.asarray(w, np.float64) for w in p["W_enc"]]
    be = [np.asarray(b, np.float64) for b in p["b_enc"]]
    bd = [np.asarray(b, np.float64) for b in p["b_dec"]]
    norms = sum(np.linalg.norm(w, axis=1) for w in dec)
    weights = norms if cfg.design == "crosscoder" else np.ones(cfg.d_sae)
    out = []
    if cfg.design == "crosscoder":
        pre = be[0] + sum(x @ w for x, w in zip(xs, enc))
        z = _np_act(pre, cfg, weights)
        out.append((pre, 0, list(range(M)), [z @ dec[m] + bd[m] for m in range(M)]))
    elif cfg.design == "universal":
        pre = (xs[source] - bd[source]) @ enc[source] + be[source]
        z = _np_act(pre, cfg, weights)
        out.append((pre, 0, list(range(M)), [z @ dec[m] + bd[m] for m in range(M)]))
    else:
        for m, x in enumerate(xs):
            pre = (x - bd[m]) @ enc[m] + be[m]
            z = _np_act(pre, cfg, weights)
            out.append((pre, m, [m], [z @ dec[m] + bd[m]]))
    return out


def np_aux(p, xs, cfg, dead, k_aux, resid_params):
    """AuxK as written in `aux_k_loss`, float64; the residuals come from ``resid_params``
    (held fixed: the loss stops their gradient), and with free decoder norms so does each
    latent's summed decoder norm (``W_dec / n(p) * n(resid_params)``)."""
    dec = [np.asarray(w, np.float64) for w in p["W_dec"]]
    if not cfg.unit_norm:
        n = sum(np.linalg.norm(w, axis=1) for w in dec)
        n0 = sum(np.linalg.norm(np.asarray(w, np.float64), axis=1) for w in resid_params["W_dec"])
        dec = [w / n[:, None] * n0[:, None] for w in dec]
    sources = range(len(xs)) if cfg.design == "universal" else [None]
    total = 0.0
    for s in sources:
        fixed = _np_pre_outs(resid_params, xs, cfg, s)
        for (pre, row, targets, _), (_, _, _, outs0) in zip(_np_pre_outs(p, xs, cfg, s), fixed):
            d = dead[row]
            masked = np.where(d, pre, -np.inf)
            idx = np.argsort(-masked, axis=1)[:, :k_aux]
            gate = np.zeros(pre.shape, bool)
            np.put_along_axis(gate, idx, True, 1)
            a = np.where(gate & d, np.maximum(pre, 0.0), 0.0)
            scale = min(d.sum() / k_aux, 1.0)
            total += scale * sum(
                np.mean(np.sum((xs[t] - o0 - a @ dec[t]) ** 2, axis=1))
                for t, o0 in zip(targets, outs0)
            )
    return total / (len(xs) if cfg.design == "universal" else 1)


AUX_CASES = [
    js.JointConfig("crosscoder", 12, "topk", k=3, k_aux=4, aux_coeff=0.7),
    js.JointConfig("universal", 12, "topk", k=3, k_aux=4, aux_coeff=0.7, source="all"),
    js.JointConfig("aligned", 12, "batchtopk", k=3, k_aux=4, aux_coeff=0.7, align_coeff=0.3),
]


@pytest.mark.parametrize("cfg", AUX_CASES, ids=lambda c: c.label())
def test_auxk_loss_and_gradient_match_float64_numpy(cfg):
    d_ins = (5, 7, 6)
    M = len(d_ins)
    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(10, d)) for d in d_ins]
    p = _random_params(cfg, d_ins, 5)
    n_codes = M if cfg.design == "aligned" else 1
    # Code 0: 6 dead latents (scale 1); others: 2 dead latents (scale 2 / k_aux).
    dead = np.zeros((n_codes, cfg.d_sae), bool)
    dead[0, rng.permutation(cfg.d_sae)[:6]] = True
    for c in range(1, n_codes):
        dead[c, rng.permutation(cfg.d_sae)[:2]] = True
    expect = np_loss(p, xs, cfg) + cfg.aux_coeff * np_aux(p, xs, cfg, dead, 4, p)
    with jax.enable_x64(True):
        pj = jax.tree.map(jnp.asarray, p)
        xj = [jnp.asarray(x) for x in xs]

        def f(q):
            return js.joint_loss(q, xj, cfg, jax.random.PRNGKey(0), dead=jnp.asarray(dead))

        loss, metrics = f(pj)
        np.testing.assert_allclose(float(loss), expect, rtol=1e-10)
        assert float(metrics["aux_loss"]) > 0
        grads = jax.grad(lambda q: f(q)[0])(pj)
        # Nothing dead: no AuxK term at all.
        none = js.joint_loss(
            pj, xj, cfg, jax.random.PRNGKey(0), dead=jnp.zeros_like(jnp.asarray(dead))
        )[0]
        np.testing.assert_allclose(float(none), np_loss(p, xs, cfg), rtol=1e-10)
    eps = 1e-6
    for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
        for m, leaf in enumerate(p[field]):
            for _ in range(4):
                idx = tuple(rng.integers(0, s) for s in leaf.shape)
                plus = jax.tree.map(np.copy, p)
                minus = jax.tree.map(np.copy, p)
                plus[field][m][idx] += eps
                minus[field][m][idx] -= eps
                fd = (
                    (np_loss(plus, xs, cfg) + cfg.aux_coeff * np_aux(plus, xs, cfg, dead, 4, p))
                    - (np_loss(minus, xs, cfg) + cfg.aux_coeff * np_aux(minus, xs, cfg, dead, 4, p))
                ) / (2 * eps)
                got = float(np.asarray(grads[field][m])[idx])
                assert abs(got - fd) <= 1e-5 * max(1.0, abs(fd)), (field, m, idx, got, fd)


@pytest.mark.parametrize(
    "cfg",
    [
        js.JointConfig("crosscoder", 12, "topk", k=2, dead_tokens=70),
        js.JointConfig("aligned", 12, "topk", k=2, dead_tokens=70),
    ],
    ids=lambda c: c.design,
)
def test_dead_counters_follow_the_firing_latents(cfg, mesh1):
    """One step of the engine's train step: a latent that fired in the batch (numpy forward
    of the pre-step parameters) resets to 0, any other adds the batch's rows (saturating)."""
    import optax

    from engine import train as train_lib

    d_ins = (5, 6)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(8, d)).astype(np.float32) for d in d_ins]
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _random_params(cfg, d_ins, 2))
    n_codes = 2 if cfg.design == "aligned" else 1
    since0 = rng.integers(0, 100, size=(1, n_codes, cfg.d_sae)).astype(np.int32)
    since0[0, 0, 0] = js._NEVER
    loss_fn, stats_update = js._sweep_loss_and_stats([cfg], (1.0, 1.0), d_ins, 8, "map")
    tx = optax.adam(1e-3)
    step = train_lib.make_train_step(loss_fn, tx, mesh1, stats_update=stats_update)
    state = train_lib.create_train_state(
        jax.tree.map(lambda a: a[None], p),
        tx,
        jax.random.PRNGKey(0),
        stats={"since_fired": jnp.asarray(since0)},
    )
    new, metrics = step(state, tuple(jnp.asarray(x) for x in xs))
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    fired = np.stack(
        [
            np.any(
                _np_act(
                    pre,
                    cfg,
                    np.ones(cfg.d_sae)
                    if cfg.design != "crosscoder"
                    else sum(np.linalg.norm(w, axis=1) for w in pn["W_dec"]),
                )
                > 0,
                axis=0,
            )
            for pre, _, _, _ in _np_pre_outs(pn, [x.astype(np.float64) for x in xs], cfg, None)
        ]
    )
    expect = np.where(fired[None], 0, np.minimum(since0.astype(np.int64) + 8, js._NEVER))
    got = np.asarray(new.params["stats"]["since_fired"])
    np.testing.assert_array_equal(got, expect)
    assert 0 < fired.sum() < fired.size
    assert float(metrics["dead_frac"]) == pytest.approx(np.mean(expect >= 70))
    assert "_fired" not in metrics


@pytest.mark.parametrize(
    "cfg",
    AUX_CASES[:2] + [dataclasses.replace(AUX_CASES[2], activation="topk")],
    ids=lambda c: c.design,
)
def test_auxk_gradient_reaches_only_dead_latents(cfg):
    """The AuxK term's gradient (loss with a dead mask minus the loss without) is zero on
    every live latent's encoder column, encoder bias and decoder rows (and the crosscoder's
    b_dec); it is
    non-zero on some dead latent. With free decoder norms the gradient is orthogonal to scaling
    a dead latent's decoder rows together (AuxK cannot shrink its selection weight)."""
    d_ins = (5, 7, 6)
    rng = np.random.default_rng(4)
    xs = [jnp.asarray(rng.normal(size=(16, d)), jnp.float32) for d in d_ins]
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _random_params(cfg, d_ins, 9))
    n_codes = 3 if cfg.design == "aligned" else 1
    dead = np.zeros((n_codes, cfg.d_sae), bool)
    for c in range(n_codes):
        dead[c, rng.permutation(cfg.d_sae)[:5]] = True

    def aux_only(q):
        key = jax.random.PRNGKey(0)
        return (
            js.joint_loss(q, xs, cfg, key, dead=jnp.asarray(dead))[0]
            - js.joint_loss(q, xs, cfg, key)[0]
        )

    g = jax.tree.map(np.asarray, jax.grad(aux_only)(p))
    # The two losses are separate float32 programs: "zero" up to their rounding.
    tol = 1e-5 * max(np.abs(w).max() for w in g["W_dec"])
    for m in range(3):
        row = dead[m if cfg.design == "aligned" else 0]
        b = 0 if cfg.shared_code else m
        assert np.abs(g["W_enc"][m][:, ~row]).max() <= tol
        assert np.abs(g["b_enc"][b][~row]).max() <= tol
        assert np.abs(g["W_dec"][m][~row]).max() <= tol
        if cfg.shared_code:
            # (universal / aligned subtract b_dec before encoding, so AuxK's pre-activations
            # reach it there, as in the SAE family.)
            assert np.abs(g["b_dec"][m]).max() <= tol
        assert np.abs(g["W_dec"][m][row]).max() > 1e3 * tol
    if not cfg.unit_norm:
        # Scaling all of latent i's decoder rows together does not change the AuxK loss:
        # sum_m <g_i^m, w_i^m> = 0.
        for i in np.flatnonzero(dead[0]):
            radial = sum(
                float(np.dot(g["W_dec"][m][i], np.asarray(p["W_dec"][m])[i])) for m in range(3)
            )
            scale = max(float(np.linalg.norm(g["W_dec"][m][i])) for m in range(3))
            assert abs(radial) <= 1e-4 * max(scale, 1e-6), (i, radial, scale)


# -- batched sweeps ---------------------------------------------------------------------------


def test_batched_sweep_equals_separate_runs(mesh1):
    """Two universal SAEs (seed, lr and AuxK coefficient differ; sampled source per step, so
    each member's keys matter) as one lax.map program equal the two trained alone."""
    pair = _tiny_pair(512, seed=6)
    xs = [pair.acts_a, pair.acts_b]
    uni = js.JointConfig(
        "universal", 12, "topk", k=2, source="sample", dead_tokens=128, sweep_axis="map"
    )
    configs = [
        dataclasses.replace(uni, seed=0, lr=1e-3),
        dataclasses.replace(uni, seed=1, lr=3e-3, aux_coeff=0.2),
    ]
    kw = dict(steps=8, batch_size=64, mesh=mesh1, log_every=4, data_seed=7)
    alone = [js.train_joint(xs, c, **kw) for c in configs]
    swept = js.train_joint_sweep(xs, configs, **kw)
    for a, b in zip(alone, swept):
        for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
            for u, v in zip(a.params[field], b.params[field]):
                np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-5)
    assert not np.allclose(
        np.asarray(alone[0].params["W_dec"][0]), np.asarray(alone[1].params["W_dec"][0]), atol=1e-3
    )


@pytest.mark.slow
def test_batched_sweep_vmap_and_several_programs_equal_separate_runs(mesh1):
    """One stacked program over seeds, learning rates and coefficients (lax.map and vmap),
    two programs in one sweep, gives each member what the same config trained alone gives."""
    pair = _tiny_pair(1024, seed=6)
    xs = [pair.acts_a, pair.acts_b]
    uni = js.JointConfig("universal", 12, "topk", k=2, source="sample", dead_tokens=128)
    configs = [
        dataclasses.replace(uni, seed=0, lr=1e-3),
        dataclasses.replace(uni, seed=1, lr=3e-3, aux_coeff=0.2),
        js.JointConfig("aligned", 12, "topk", k=2, align_coeff=0.5, seed=2),
        js.JointConfig("aligned", 12, "topk", k=2, align_coeff=2.0, seed=2),
    ]
    kw = dict(steps=12, batch_size=64, mesh=mesh1, log_every=6, data_seed=7)
    alone = [js.train_joint(xs, c, **kw) for c in configs]
    mapped = js.train_joint_sweep(
        xs, [dataclasses.replace(c, sweep_axis="map") for c in configs], **kw
    )
    vmapped = js.train_joint_sweep(
        xs, [dataclasses.replace(c, sweep_axis="vmap") for c in configs[:2]], **kw
    )
    assert len(js.group_joint_configs(configs)) == 2
    for got_list in (mapped, vmapped):
        for a, b in zip(alone, got_list):
            for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
                for u, v in zip(a.params[field], b.params[field]):
                    np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-4, atol=1e-5)
    # The members really differ (the comparison is not between copies of one model).
    assert not np.allclose(
        np.asarray(alone[0].params["W_dec"][0]), np.asarray(alone[1].params["W_dec"][0]), atol=1e-3
    )
    assert not np.allclose(
        np.asarray(alone[2].params["W_dec"][0]), np.asarray(alone[3].params["W_dec"][0]), atol=1e-4
    )


# -- slices, format ------------------------------------------------------------------------------


def _tiny_pair(n=2048, seed=0):
    return dictionary_pair.make_partial_pair(
        seed, n_shared=6, n_exclusive_a=3, n_exclusive_b=3, d_a=8, d_b=10, n_tokens=n, k=2.0
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mesh4):
    pair = _tiny_pair()
    xs = [pair.acts_a, pair.acts_b]
    out = {}
    for cfg in (
        js.JointConfig("universal", 16, "topk", k=2),
        js.JointConfig("crosscoder", 16, "relu", l1_coeff=1.0),
        js.JointConfig("crosscoder", 16, "batchtopk", k=3),
        js.JointConfig("aligned", 16, "topk", k=2, align_coeff=1.0),
    ):
        out[cfg.label()] = js.train_joint(
            xs, cfg, steps=30, batch_size=64, mesh=mesh4, log_every=10
        )
    return xs, out


def test_slices_are_ordinary_saes_with_the_joint_forward(trained):
    xs, models = trained
    for label, joint in models.items():
        cfg = joint.spec.config
        xns = joint.normalise(xs)
        for m in range(2):
            sl = joint.slice(m)
            assert sl.config.d_in == xs[m].shape[1] and sl.config.d_sae == cfg.d_sae
            z = joint.encode_joint(xns) if cfg.shared_code else joint.encode_from(m, xns[m])
            # Decode is exact for every design (original units).
            np.testing.assert_allclose(
                np.asarray(sl.decode(z)),
                np.asarray(joint.decode_to(m, z)) / sl.config.input_scale,
                rtol=1e-5,
                atol=1e-5,
                err_msg=label,
            )
            if cfg.shared_code:
                # The slice's pre-activation is model m's share of the crosscoder's.
                w = [np.asarray(a, np.float64) for a in joint.params["W_enc"]]
                expect = np.asarray(xns[m], np.float64) @ w[m] + np.asarray(
                    joint.params["b_enc"][0], np.float64
                )
                np.testing.assert_allclose(
                    np.asarray(sl.pre_activations(xs[m])), expect, rtol=1e-4, atol=1e-4
                )
            else:
                np.testing.assert_allclose(
                    np.asarray(sl.encode(xs[m])), np.asarray(z), rtol=1e-5, atol=1e-5, err_msg=label
                )


def test_crosscoder_batchtopk_slices_reproduce_the_joint_code_from_full_pre(trained):
    """The slice thresholds (thr / weight_i) gate the crosscoder's full pre-activation exactly
    like the joint inference rule (score > thr)."""
    xs, models = trained
    joint = next(j for j in models.values() if j.spec.config.activation == "batchtopk")
    xns = joint.normalise(xs)
    pre = joint.params["b_enc"][0] + sum(x @ w for x, w in zip(xns, joint.params["W_enc"]))
    sl = joint.slice(0)
    assert float(joint.threshold[0]) > 0
    np.testing.assert_allclose(
        np.asarray(sl.activate(pre)), np.asarray(joint.encode_joint(xns)), rtol=1e-5, atol=1e-5
    )


def test_save_load_round_trip(trained, tmp_path):
    xs, models = trained
    for label, joint in models.items():
        path = js.save_joint(str(tmp_path / label), joint)
        back = js.load_joint(path)
        assert back.spec == joint.spec
        for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert len(back.params[field]) == len(joint.params[field])
            for a, b in zip(back.params[field], joint.params[field]):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(back.threshold), np.asarray(joint.threshold))
        # Every model's part is an ordinary native SAE directory naming its model.
        for m, name in enumerate(joint.spec.model_names):
            sae = sae_io_native.load_sae(os.path.join(path, "models", f"{m}_{name}"))
            assert sae.config.meta["joint_model_index"] == m
            assert sae.config.meta["joint_design"] == joint.spec.config.design
            np.testing.assert_array_equal(
                np.asarray(sae.W_dec), np.asarray(joint.params["W_dec"][m])
            )


def test_load_refuses_mismatched_crosscoder_slices(trained, tmp_path):
    _, models = trained
    joint = next(j for j in models.values() if j.spec.config.design == "crosscoder")
    path = js.save_joint(str(tmp_path / "cc"), joint)
    other = js.save_joint(
        str(tmp_path / "cc2"),
        joint.replace(params={**joint.params, "b_enc": [joint.params["b_enc"][0] + 1.0]}),
    )
    shutil.rmtree(os.path.join(path, "models", "1_model1"))
    shutil.copytree(
        os.path.join(other, "models", "1_model1"), os.path.join(path, "models", "1_model1")
    )
    with pytest.raises(checks.InputError, match="shared b_enc"):
        js.load_joint(path)
    with pytest.raises(checks.InputError, match="joint_config.json"):
        js.load_joint(str(tmp_path))


# -- training: devices, resume ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        js.JointConfig("universal", 12, "topk", k=2, seed=1),
        js.JointConfig("crosscoder", 12, "topk", k=3, seed=2),
    ],
    ids=lambda c: c.label(),
)
def test_one_and_four_devices_agree(mesh1, mesh4, cfg):
    pair = _tiny_pair(512, seed=3)
    xs = [pair.acts_a, pair.acts_b]
    a = js.train_joint(xs, cfg, steps=15, batch_size=64, mesh=mesh1, log_every=5)
    b = js.train_joint(xs, cfg, steps=15, batch_size=64, mesh=mesh4, log_every=5)
    for field in ("W_enc", "W_dec", "b_dec"):
        for u, v in zip(a.params[field], b.params[field]):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=2e-5)


def test_killed_run_resumes_exactly(tmp_path, mesh4):
    pair = _tiny_pair(512, seed=4)
    xs = [pair.acts_a, pair.acts_b]
    # relu: the L1 ramp travels with the data position, so resume must restore it too.
    cfg = js.JointConfig("crosscoder", 12, "relu", l1_coeff=0.5, l1_warmup_frac=0.5)
    full = js.train_joint(
        xs,
        cfg,
        steps=20,
        batch_size=64,
        mesh=mesh4,
        log_every=5,
        workdir=str(tmp_path / "full"),
        checkpoint_every=10,
    )
    wd = str(tmp_path / "killed")
    js.train_joint(
        xs, cfg, steps=20, batch_size=64, mesh=mesh4, log_every=5, workdir=wd, checkpoint_every=10
    )
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))  # as if killed after step 10
    resumed = js.train_joint(
        xs, cfg, steps=20, batch_size=64, mesh=mesh4, log_every=5, workdir=wd, checkpoint_every=10
    )
    for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
        for u, v in zip(full.params[field], resumed.params[field]):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert os.path.isfile(os.path.join(wd, "joint", js.CONFIG_FILE))


def test_bad_inputs_are_refused():
    with pytest.raises(checks.InputError, match="design"):
        js.JointConfig("bogus", 8).validate()
    with pytest.raises(checks.InputError, match="aligned"):
        js.JointConfig("aligned", 8, "relu").validate()
    with pytest.raises(checks.InputError, match="k=9"):
        js.JointConfig("crosscoder", 8, "topk", k=9).validate()
    with pytest.raises(checks.InputError, match=">= 2 models"):
        js.check_aligned([np.zeros((4, 3))])
    with pytest.raises(checks.InputError):
        js.check_aligned([np.zeros((4, 3)), np.zeros((5, 3))])
    with pytest.raises(checks.InputError, match="finite"):
        js.check_aligned([np.zeros((4, 3)), np.full((4, 3), np.nan)])


# -- the known-truth generator ---------------------------------------------------------------------


def test_partial_pair_truth():
    p = dictionary_pair.make_partial_pair(
        0, n_shared=5, n_exclusive_a=3, n_exclusive_b=4, d_a=12, d_b=9, n_tokens=4000
    )
    assert p.features_a.shape == (8, 12) and p.features_b.shape == (9, 9)
    np.testing.assert_array_equal(p.codes_a[:, :5], p.codes_b[:, :5])  # shared codes
    # Exclusive codes are different world columns (independent of the other side's).
    c = np.corrcoef(np.c_[p.codes_a[:, 5:], p.codes_b[:, 5:]].T)[:3, 3:]
    assert np.abs(c).max() < 0.1
    np.testing.assert_allclose(p.acts_a, p.codes_a @ p.features_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p.true_match, [0, 1, 2, 3, 4, -1, -1, -1])
    control = dictionary_pair.make_partial_pair(
        0, n_shared=0, n_exclusive_a=8, n_exclusive_b=9, n_tokens=4000
    )
    assert (control.true_match == -1).all()
    c = np.corrcoef(np.c_[control.codes_a, control.codes_b].T)[:8, 8:]
    assert np.abs(c).max() < 0.1


# -- sharing calls, truth scores, latent scaling ------------------------------------------------


def test_sharing_by_norm_and_truth_scores_on_a_hand_built_decoder():
    rng = np.random.default_rng(0)
    fa = np.linalg.qr(rng.normal(size=(6, 6)))[0][:4]  # 2 shared (0, 1) + 2 exclusive A
    fb = np.linalg.qr(rng.normal(size=(6, 6)))[0][:4]  # 2 shared + 2 exclusive B
    # Latents: 0,1 shared (both sides), 2 exclusive A, 3 exclusive B, 4 a wrong "shared"
    # latent (A's shared 0 with B's exclusive 2), 5 dead.
    wa = np.stack([fa[0], fa[1], fa[2], 0.01 * fa[3], fa[0], fa[3]])
    wb = np.stack([fb[0], fb[1], 0.01 * fb[0], fb[2], fb[2], fb[3]])
    na, nb = np.linalg.norm(wa, axis=1), np.linalg.norm(wb, axis=1)
    r = nb / (na + nb)
    live = np.array([1, 1, 1, 1, 1, 0], bool)
    call = jm.sharing_by_norm(r, live)
    np.testing.assert_array_equal(call.shared_a, [0, 1, 4])
    np.testing.assert_array_equal(call.exclusive_a, [2])
    np.testing.assert_array_equal(call.exclusive_b, [3])
    assert call.summary()["fraction_shared"] == pytest.approx(3 / 5)
    t = jm.truth_scores(call, wa, wb, fa, fb, 2, live, live)
    assert t["shared_precision"] == pytest.approx(2 / 3)
    assert t["shared_recall"] == pytest.approx(1.0)
    assert t["exclusive_a_precision"] == 1.0 and t["exclusive_a_recall"] == 0.5
    assert t["exclusive_b_precision"] == 1.0 and t["exclusive_b_recall"] == 0.5
    # Latents carrying B's exclusive feature 2 (3 and 4): one of them was called shared.
    assert t["exclusive_b_called_shared"] == pytest.approx(0.5)


def test_activation_sharing_same_index_vs_best_partner(mesh):
    rng = np.random.default_rng(1)
    base = np.maximum(rng.normal(size=(3000, 6)), 0)
    za = base
    zb = base[:, [1, 0, 2, 3, 4, 5]].copy()  # 0 and 1 swapped
    zb[:, 5] = np.maximum(rng.normal(size=3000), 0)  # latent 5: independent
    same, _ = jm.sharing_by_activation(za, zb, mesh, pairing="same_index")
    best, stats = jm.sharing_by_activation(za, zb, mesh, pairing="best_partner")
    np.testing.assert_array_equal(same.shared_a, [2, 3, 4])
    np.testing.assert_array_equal(best.shared_a, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(best.shared_b, [1, 0, 2, 3, 4])
    np.testing.assert_array_equal(best.exclusive_a, [5])
    assert stats["mean_best_partner_corr"] > stats["mean_same_index_corr"]


def test_latent_scaling_matches_per_latent_lstsq():
    rng = np.random.default_rng(2)
    N, F, da, db = 800, 5, 6, 4
    f = np.maximum(rng.normal(size=(N, F)), 0) * (rng.random((N, F)) < 0.3)
    wa, wb = rng.normal(size=(F, da)), rng.normal(size=(F, db))
    wb[0] *= 0.01  # latent 0 "exclusive" to A
    xa = f @ wa + 0.1 * rng.normal(size=(N, da))
    v = rng.normal(size=db)
    xb = f @ wb + np.outer(f[:, 0], v) + 0.1 * rng.normal(size=(N, db))  # B misses 0's part
    ra, rb = f @ wa, f @ wb
    sc = js.latent_scaling([f, f], [xa, xb], [ra, rb], [wa, wb])

    def lstsq_norm(fj, target):
        design = np.c_[fj, np.ones(N)]
        coef = np.linalg.lstsq(design, target, rcond=None)[0]
        return np.linalg.norm(coef[0])

    for j in range(F):
        owner = int(sc.owner[j])
        other = 1 - owner
        xs, recs, ws = [xa, xb], [ra, rb], [wa, wb]
        own = lstsq_norm(f[:, j], recs[owner])
        err = lstsq_norm(f[:, j], xs[other] - recs[other] + np.outer(f[:, j], ws[other][j]))
        rec = lstsq_norm(f[:, j], recs[other] - np.outer(f[:, j], ws[other][j]))
        np.testing.assert_allclose(sc.beta_own[j], own, rtol=1e-8)
        np.testing.assert_allclose(sc.nu_error[other, j], err / own, rtol=1e-8)
        np.testing.assert_allclose(sc.nu_recon[other, j], rec / own, rtol=1e-8)
    assert sc.owner[0] == 0
    # B's error holds f_0 * v: latent 0 explains B too (a sparsity artifact), nu ~ |v|/|w_a0|.
    assert sc.nu_error[1, 0] == pytest.approx(np.linalg.norm(v) / np.linalg.norm(wa[0]), rel=0.1)
    summary = jm.artifact_summary(sc, np.array([0]), np.array([], int))
    assert summary["exclusive_a"]["flagged"] == [0]
    # Scored against a truth in which latent 0's A direction is a shared feature (and latent
    # 1's is not): one true artifact, flagged.
    other = np.linalg.qr(rng.normal(size=(da, da)))[0][0]
    other -= other @ wa[0] / (wa[0] @ wa[0]) * wa[0]
    truth = types.SimpleNamespace(
        features_a=np.stack([wa[0], other]),
        features_b=rng.normal(size=(2, db)),
        true_match=np.array([0, -1]),
    )
    summary = jm.artifact_summary(sc, np.array([0, 1]), np.array([], int), [wa, wb], truth)
    assert summary["exclusive_a"]["n_carrying_true_shared"] == 1
    assert summary["exclusive_a"]["n_flagged_carrying_true_shared"] == 1


def test_partial_sides_truth():
    g = dictionary_pair.make_partial_sides(1, 3, n_shared=4, n_exclusive=3, d=10, n_tokens=3000)
    assert len(g.acts) == 3 and all(f.shape == (7, 10) for f in g.features)
    for m in range(3):
        np.testing.assert_allclose(g.acts[m], g.codes[m] @ g.features[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g.codes[m][:, :4], g.codes[0][:, :4])  # shared codes
    # Exclusive codes are different world columns in every pair of sides.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        c = np.corrcoef(np.c_[g.codes[a][:, 4:], g.codes[b][:, 4:]].T)[:3, 3:]
        assert np.abs(c).max() < 0.1
        t = g.pair(a, b)
        np.testing.assert_array_equal(t.true_match, [0, 1, 2, 3, -1, -1, -1])
        np.testing.assert_array_equal(t.features_b, g.features[b])
    with pytest.raises(checks.InputError, match="distinct sides"):
        g.pair(1, 1)


def test_three_model_report_per_pair_on_a_hand_built_crosscoder(mesh1):
    """Three models; decoder norms built so that latent 0 is shared by all, latent 1 is
    exclusive to model 0, latent 2 is shared by models 0 and 2 only (absent in 1), latent 3
    exclusive to model 1. Every pair's call must follow from the norms."""
    d_ins, F = (4, 5, 6), 4
    rng = np.random.default_rng(0)
    norms = np.array(
        [
            [1.0, 1.0, 1.0, 0.0],  # model 0
            [1.0, 0.0, 0.0, 1.0],  # model 1
            [1.0, 0.0, 1.0, 0.0],
        ]
    )  # model 2
    W_dec = [
        jnp.asarray(_unit(rng, F, d) * norms[m][:, None], jnp.float32) for m, d in enumerate(d_ins)
    ]
    params = {
        "W_enc": [jnp.asarray(rng.normal(size=(d, F)) * 0.01, jnp.float32) for d in d_ins],
        "b_enc": [jnp.ones((F,), jnp.float32)],  # every latent fires (relu)
        "W_dec": W_dec,
        "b_dec": [jnp.zeros((d,), jnp.float32) for d in d_ins],
    }
    cfg = js.JointConfig("crosscoder", F, "relu", l1_coeff=1.0)
    joint = js.JointSAE(
        params=params,
        threshold=jnp.zeros((1,)),
        spec=js.JointSpec(cfg, d_ins, (1.0, 1.0, 1.0), ("a", "b", "c")),
    )
    xs = [rng.normal(size=(64, d)).astype(np.float32) for d in d_ins]
    res = jm.analyze_joint(joint, xs, mesh1, num_permutations=5)
    assert res["n_models"] == 3 and len(res["reconstruction"]["per_model"]) == 3
    pairs = {tuple(p["models"]): p for p in res["pairs"]}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    # Latent 3 is in neither model of pair 0-2 and latent 1 in neither of 1-2: not counted.
    expect = {(0, 1): ([0], [1, 2], [3]), (0, 2): ([0, 2], [1], []), (1, 2): ([0], [3], [2])}
    for ab, (shared, ex_a, ex_b) in expect.items():
        call = pairs[ab]["sharing"]["decoder_norm"]
        assert call["n_shared"] == len(shared), ab
        assert call["n_exclusive_a"] == len(ex_a) and call["n_exclusive_b"] == len(ex_b), ab
        present = norms[ab[0]] + norms[ab[1]] > 0.1 * norms.sum(0)
        assert call["n_live"] == present.sum(), ab
        assert pairs[ab]["fraction_shared"] == pytest.approx(len(shared) / present.sum())
        with np.errstate(invalid="ignore"):
            r = norms[ab[1]] / (norms[ab[0]] + norms[ab[1]])
        np.testing.assert_allclose(np.asarray(pairs[ab]["r"])[present], r[present], rtol=1e-6)
        assert "geometry" in pairs[ab]["sharing"]["decoder_norm"]
        assert "latent_scaling" in pairs[ab]
    # Top level: pair 0-1's numbers, the shared fraction averaged over pairs.
    assert res["fraction_shared"] == pytest.approx(np.mean([1 / 4, 2 / 3, 1 / 3]))
    assert res["sharing"] == pairs[(0, 1)]["sharing"]
    # Per-model FVU against a float64 reconstruction.
    xn = [x.astype(np.float64) for x in xs]
    z = np.maximum(
        sum(x @ np.asarray(w, np.float64) for x, w in zip(xn, params["W_enc"])) + 1.0, 0.0
    )
    for m in range(3):
        xh = z @ np.asarray(W_dec[m], np.float64)
        want = np.sum((xn[m] - xh) ** 2) / np.sum((xn[m] - xn[m].mean(0)) ** 2)
        assert res["reconstruction"]["per_model"][m]["fvu"] == pytest.approx(want, rel=1e-4)


def _unit(rng, n, d):
    w = rng.normal(size=(n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


# -- recovery of known truth ---------------------------------------------------------------------


@pytest.mark.slow
def test_crosscoder_recovers_known_shared_and_exclusive_features(mesh1):
    """Crosscoder TopK on a partial pair: the shared call finds the shared features, the
    exclusive features stay exclusive, and on the nothing-shared control almost nothing is
    called shared. One device: 1 vs 4 devices agree (`test_one_and_four_devices_agree`), and
    800 steps of cross-device top-k on 4 simulated CPU devices of a loaded 2-core machine can
    exceed XLA's collective rendezvous timeout, which aborts the process."""
    kw = dict(d_a=16, d_b=16, n_tokens=8192, k=2.0)
    real = dictionary_pair.make_partial_pair(0, n_shared=12, n_exclusive_a=6, n_exclusive_b=6, **kw)
    control = dictionary_pair.make_partial_pair(
        0, n_shared=0, n_exclusive_a=18, n_exclusive_b=18, **kw
    )
    cfg = js.JointConfig("crosscoder", 40, "topk", k=3, lr=3e-3)
    out = {}
    for name, pair in (("real", real), ("control", control)):
        joint = js.train_joint(
            [pair.acts_a, pair.acts_b], cfg, steps=800, batch_size=256, mesh=mesh1, log_every=200
        )
        out[name] = jm.analyze_joint(
            joint, (pair.acts_a, pair.acts_b), mesh1, truth=pair, num_permutations=20
        )
    truth = out["real"]["sharing"]["decoder_norm"]["truth"]
    assert truth["shared_recall"] >= 0.8
    # Wrong shared calls are rare, barely trained latents that kept the initial r = 0.5
    # (documented bias of the decoder-norm criterion); among frequent latents they vanish.
    assert truth["shared_precision"] >= 0.5
    assert truth["shared_precision_frequent"] >= 0.8 and truth["n_shared_frequent"] >= 8
    assert truth["exclusive_a_recall"] >= 0.6 and truth["exclusive_b_recall"] >= 0.6
    assert truth["exclusive_a_called_shared"] <= 0.25  # measured 0.11-0.13
    assert truth["exclusive_b_called_shared"] <= 0.25
    assert out["control"]["fraction_shared"] <= 0.1
    assert out["real"]["fraction_shared"] - out["control"]["fraction_shared"] >= 0.2

"""SAE training: losses against float64 numpy, gradients by finite differences, decoder norms,
sweeps == separate runs, 1 vs 4 devices, exact resume, statistics, bad input, ground truth."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import mesh as mesh_lib
from engine.checks import InputError
from models import sae_io_native, synthetic
from models import sae_train as st

D_IN, D_SAE, ROWS = 10, 24, 32


# -- float64 numpy references -----------------------------------------------------------------


def _np_params(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def np_loss(p, x, act, *, k=0, l1=0.0, warm=1.0, l0=0.0, dead=None, k_aux=0, aux_coeff=0.0):
    """Textbook loss of one SAE on normalised rows ``x`` (see models/sae_train.py)."""
    p = _np_params(p)
    x = np.asarray(x, np.float64)
    pre = (x - p["b_dec"]) @ p["W_enc_T"].T + p["b_enc"]
    r = np.maximum(pre, 0)
    if act == "relu":
        f = r
    elif act == "topk":
        f = np.zeros_like(r)
        for i in range(len(r)):
            top = np.argsort(-r[i])[:k]
            f[i, top] = r[i, top]
    elif act == "batchtopk":
        cut = np.sort(r.reshape(-1))[-k * len(r)]
        f = np.where(r >= cut, r, 0.0)
    else:
        theta = np.exp(p["log_threshold"])
        f = np.where(pre > theta, pre, 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    if act == "relu":
        loss += l1 * warm * np.mean(np.sum(f * np.linalg.norm(p["W_dec"], axis=1), axis=1))
    if act == "jumprelu":
        loss += l0 * np.mean(np.sum(pre > np.exp(p["log_threshold"]), axis=1))
    if dead is not None and dead.any() and k_aux:
        resid = x - x_hat
        masked = np.where(dead, pre, -np.inf)
        a = np.zeros_like(pre)
        for i in range(len(pre)):
            top = np.argsort(-masked[i])[:k_aux]
            top = top[dead[top]]
            a[i, top] = np.maximum(pre[i, top], 0)
        e_hat = a @ p["W_dec"]
        scale = min(dead.sum() / k_aux, 1.0)
        loss += aux_coeff * scale * np.mean(np.sum((e_hat - resid) ** 2, axis=1))
    return loss, f


def _program(act, mesh, n=1, **kw):
    cfgs = [
        st.TrainConfig(d_sae=D_SAE, activation=act, k=kw.pop("k", 4), seed=s, **kw)
        for s in range(n)
    ]
    return st.SweepProgram(cfgs, D_IN, 100, mesh)


def _data(seed=0, rows=ROWS, d=D_IN):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, d)) * np.linspace(0.5, 2, d) + 0.3).astype(np.float32)


def _perturbed_params(program, x, seed=1, dtype=jnp.float64):
    """Initial params of SAE 0 with random biases (so that every term is exercised)."""
    state = program.init_state(x)
    p = jax.tree.map(lambda a: np.asarray(a[0]), state.params["sae"])
    rng = np.random.default_rng(seed)
    p["b_enc"] = p["b_enc"] + rng.normal(size=p["b_enc"].shape) * 0.3
    p["W_enc_T"] = p["W_enc_T"] + rng.normal(size=p["W_enc_T"].shape) * 0.2
    if "log_threshold" in p:
        p["log_threshold"] = np.log(rng.uniform(0.1, 1.0, size=D_SAE))
    return {k: jnp.asarray(v, dtype) for k, v in p.items()}


def _stats(dead=None):
    since = np.zeros(D_SAE, np.int32) if dead is None else np.where(dead, 10**8, 0)
    return {
        "since_fired": jnp.asarray(since, jnp.int32),
        "batch_threshold": jnp.asarray(-1.0, jnp.float32),
    }


def _hyper(program, i=0):
    return jax.tree.map(lambda a: a[i], program.hyper)


# -- losses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act,decode,extra",
    [
        ("relu", "dense", {"l1_coeff": 0.7, "l1_warmup_steps": 10}),
        ("topk", "dense", {"k": 4}),
        ("topk", "sparse", {"k": 4}),
        ("batchtopk", "dense", {"k": 3}),
        ("jumprelu", "dense", {"l0_coeff": 0.05}),
    ],
)
def test_loss_matches_float64_reference(mesh1, act, decode, extra):
    program = _program(act, mesh1, decode=decode, k_aux=6, dead_tokens=5, **extra)
    x = _data()
    dead = np.zeros(D_SAE, bool)
    dead[[1, 4, 5, 9, 17, 20, 23]] = True
    with jax.enable_x64(True):
        p = _perturbed_params(program, x)
        xd = jnp.asarray(x, jnp.float64)
        step = jnp.asarray(3, jnp.int32)
        use_dead = program.use_aux
        loss, (metrics, out) = program.loss_one(
            p, _stats(dead if use_dead else None), _hyper(program), xd, step, jnp.asarray(use_dead)
        )
        ref, f_ref = np_loss(
            p,
            x,
            act,
            k=extra.get("k", 0),
            l1=extra.get("l1_coeff", 0.0),
            warm=4 / 10,
            l0=extra.get("l0_coeff", 0.0),
            dead=dead if use_dead else None,
            k_aux=6,
            aux_coeff=1 / 32,
        )
    np.testing.assert_allclose(float(loss), ref, rtol=1e-9)
    np.testing.assert_allclose(float(metrics["l0"]), np.mean(np.sum(f_ref > 0, axis=1)))
    counts = np.sum(f_ref > 0, axis=0)
    np.testing.assert_array_equal(np.asarray(out["counts"]), counts)
    np.testing.assert_allclose(float(metrics["density_max"]), counts.max() / ROWS)
    x64 = x.astype(np.float64)
    xh = np.asarray(f_ref @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"]))
    fvu = np.sum((x64 - xh) ** 2) / np.sum((x64 - x64.mean(0)) ** 2)
    np.testing.assert_allclose(float(metrics["fvu"]), fvu, rtol=1e-9)
    if act in ("topk", "batchtopk"):
        assert use_dead and float(metrics["aux_loss"]) > 0


# -- gradients --------------------------------------------------------------------------------


def _directional_fd(fn, p, keys, seed, h=1e-7):
    """(autodiff . v, central difference along v) for a random direction v over ``keys``.

    Float64; a small step keeps ReLU / top-k kinks (a pre-activation within h of zero or of
    the k-th value) from being crossed.
    """
    fn = jax.jit(fn)
    rng = np.random.default_rng(seed)
    v = {
        k: (jnp.asarray(rng.normal(size=p[k].shape)) if k in keys else jnp.zeros_like(p[k]))
        for k in p
    }
    g = jax.grad(fn)(p)
    auto = sum(float(jnp.sum(g[k] * v[k])) for k in p)
    plus = {k: p[k] + h * v[k] for k in p}
    minus = {k: p[k] - h * v[k] for k in p}
    return auto, (float(fn(plus)) - float(fn(minus))) / (2 * h)


@pytest.mark.parametrize("decode", ["dense", "sparse"])
def test_topk_gradient_finite_differences(mesh1, decode):
    program = _program("topk", mesh1, decode=decode, k=4)
    x = _data(2)
    with jax.enable_x64(True):
        p = _perturbed_params(program, x, seed=3)
        xd = jnp.asarray(x, jnp.float64)

        def fn(pp):
            return program.loss_one(
                pp, _stats(), _hyper(program), xd, jnp.asarray(0), jnp.asarray(False)
            )[0]

        for seed in range(3):
            auto, fd = _directional_fd(fn, p, ("W_enc_T", "b_enc", "W_dec", "b_dec"), seed)
            np.testing.assert_allclose(auto, fd, rtol=1e-6)


def test_auxk_gradient_finite_differences(mesh1):
    """AuxK's gradient (residual held fixed, as in Gao et al.) on both TopK paths."""
    x = _data(4)
    dead = np.zeros(D_SAE, bool)
    dead[::3] = True
    grads = []
    for decode in ("dense", "sparse"):
        program = _program("topk", mesh1, decode=decode, k=4, k_aux=5)
        with jax.enable_x64(True):
            p = _perturbed_params(program, x, seed=5)
            xd = jnp.asarray(x, jnp.float64)
            resid = jnp.asarray(np.random.default_rng(6).normal(size=x.shape))
            pre = jax.lax.stop_gradient((xd - p["b_dec"]) @ p["W_enc_T"].T + p["b_enc"])

            def fn(pp):
                return program._aux_loss(pp, xd - pp["b_dec"], pre, resid, jnp.asarray(dead))

            auto, fd = _directional_fd(fn, p, ("W_enc_T", "b_enc", "W_dec", "b_dec"), 7)
            np.testing.assert_allclose(auto, fd, rtol=1e-6)
            grads.append(jax.jit(jax.grad(fn))(p))
    for k in grads[0]:
        np.testing.assert_allclose(np.asarray(grads[0][k]), np.asarray(grads[1][k]), atol=1e-10)


@pytest.mark.parametrize(
    "act,decode,n,sweep_axis",
    [
        ("topk", "sparse", 1, "map"),
        ("topk", "dense", 2, "map"),
        ("topk", "sparse", 2, "vmap"),
        ("batchtopk", "dense", 2, "vmap"),
    ],
)
@pytest.mark.parametrize("with_dead", [True, False])
def test_step_gradients_equal_the_whole_loss_gradient(mesh1, act, decode, n, sweep_axis, with_dead):
    """`loss_and_grads` (AuxK's gradient under a cond outside the differentiated loss) equals
    the gradient of the sum of every SAE's whole `loss_one`, with and without dead latents."""
    program = _program(
        act, mesh1, n=n, decode=decode, k=3, k_aux=5, dead_tokens=5, sweep_axis=sweep_axis
    )
    x = _data(11)
    dead = np.zeros((n, D_SAE), bool)
    if with_dead:
        dead[:, ::4] = True
        dead[-1, 1] = True
    with jax.enable_x64(True):
        per = [_perturbed_params(program, x, seed=20 + i) for i in range(n)]
        params = jax.tree.map(lambda *a: jnp.stack(a), *per)
        stats = {
            "since_fired": jnp.asarray(np.where(dead, 10**6, 0), jnp.int32),
            "batch_threshold": jnp.full((n,), -1.0, jnp.float32),
        }
        xd = jnp.asarray(x, jnp.float64)
        step = jnp.asarray(2, jnp.int32)
        grads, metrics, _ = jax.jit(program.loss_and_grads)(params, stats, program.hyper, xd, step)

        def whole(ps):
            total = 0.0
            for i in range(n):
                one = jax.tree.map(lambda a: a[i], (ps, stats, program.hyper))
                total += program.loss_one(*one, xd, step, jnp.asarray(with_dead))[0]
            return total

        ref = jax.device_get(jax.jit(jax.grad(whole))(params))
        ref_loss = float(jax.jit(whole)(params))
        grads, metrics = jax.device_get((grads, metrics))
    for key in ref:
        scale = np.max(np.abs(ref[key]))
        np.testing.assert_allclose(grads[key], ref[key], atol=1e-12 * scale)
    np.testing.assert_allclose(np.sum(metrics["sae_loss"]), ref_loss, rtol=1e-12)
    assert (np.min(metrics["aux_loss"]) > 0) == with_dead


def test_jumprelu_gradients(mesh1):
    """Exact parameters by finite differences; log-threshold by the paper's STE formula."""
    l0 = 0.05
    eps = 0.3  # a wide kernel so that many pre-activations fall inside it
    program = _program("jumprelu", mesh1, l0_coeff=l0, jumprelu_bandwidth=eps)
    x = _data(8)
    with jax.enable_x64(True):
        p = _perturbed_params(program, x, seed=9)
        xd = jnp.asarray(x, jnp.float64)

        def fn(pp):
            return program.loss_one(
                pp, _stats(), _hyper(program), xd, jnp.asarray(0), jnp.asarray(False)
            )[0]

        for seed in range(2):
            auto, fd = _directional_fd(fn, p, ("W_enc_T", "b_enc", "W_dec", "b_dec"), seed)
            np.testing.assert_allclose(auto, fd, rtol=1e-6)
        g = jax.grad(fn)(p)["log_threshold"]
    q = _np_params(p)
    x64 = x.astype(np.float64)
    pre = (x64 - q["b_dec"]) @ q["W_enc_T"].T + q["b_enc"]
    theta = np.exp(q["log_threshold"])
    f = np.where(pre > theta, pre, 0)
    resid = x64 - (f @ q["W_dec"] + q["b_dec"])
    df = -2 * resid @ q["W_dec"].T / ROWS  # dL/df
    kern = (np.abs((pre - theta) / eps) < 0.5).astype(float)
    l0_32 = float(np.float32(l0))  # the program holds its coefficients in float32
    dtheta = np.sum(df * (-theta / eps) * kern, axis=0) + l0_32 / ROWS * np.sum(
        -(1 / eps) * kern, axis=0
    )
    assert np.count_nonzero(kern) > 10
    np.testing.assert_allclose(np.asarray(g), dtheta * theta, rtol=1e-9, atol=1e-12)


def test_projection_removes_parallel_component():
    rng = np.random.default_rng(10)
    w = st.normalise_rows(jnp.asarray(rng.normal(size=(7, 5))))
    g = jnp.asarray(rng.normal(size=(7, 5)))
    out = np.asarray(st.project_out_parallel(g, w))
    np.testing.assert_allclose(np.sum(out * np.asarray(w), axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(out + np.sum(np.asarray(g * w), 1, keepdims=True) * w, g, atol=1e-6)


# -- steps, statistics, sweeps ----------------------------------------------------------------


def _run(program, batches, state=None, x0=None):
    state = program.init_state(batches[0] if x0 is None else x0) if state is None else state
    state = mesh_lib.replicate(program.mesh, state, copy=True)  # as engine.train.train does
    fn = program.step_fn()
    metrics = []
    for b in batches:
        state, m = fn(state, mesh_lib.shard_batch(program.mesh, b))
        metrics.append(jax.device_get(m))
    return state, metrics


@pytest.mark.parametrize("act", ["topk", "batchtopk", "jumprelu", "relu"])
def test_decoder_rows_unit_norm_after_steps(mesh1, act):
    program = _program(act, mesh1, lr=1e-2)
    state, metrics = _run(program, [_data(s) for s in range(5)])
    norms = np.linalg.norm(np.asarray(state.params["sae"]["W_dec"][0]), axis=1)
    if act == "relu":  # Anthropic's update: unconstrained, starts at 0.1 and moves
        assert not np.allclose(norms, 0.1, atol=1e-4)
    else:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values())


def test_dead_tracking_and_batchtopk_threshold(mesh1):
    """Tokens-since-fired counters and the threshold EMA against a numpy replay."""
    program = _program("batchtopk", mesh1, k=2, lr=1e-3, batchtopk_beta=0.9, dead_tokens=3 * ROWS)
    batches = [_data(s) for s in range(4)]
    state = mesh_lib.replicate(mesh1, program.init_state(batches[0]), copy=True)
    since = np.zeros(D_SAE)
    thr = -1.0
    fn = program.step_fn()
    for b in batches:
        p = _np_params(jax.tree.map(lambda a: a[0], jax.device_get(state.params["sae"])))
        xn = b.astype(np.float64) * program.input_scale
        _, f = np_loss(p, xn, "batchtopk", k=2)
        fired = (f > 0).any(axis=0)
        since = np.where(fired, 0, since + ROWS)
        mp = f[f > 0].min()
        thr = mp if thr < 0 else 0.9 * thr + 0.1 * mp
        state, m = fn(state, b)
        np.testing.assert_array_equal(np.asarray(state.params["stats"]["since_fired"][0]), since)
        np.testing.assert_allclose(
            float(state.params["stats"]["batch_threshold"][0]), thr, rtol=1e-4
        )
        np.testing.assert_allclose(float(m["dead_frac"]), np.mean(since >= 3 * ROWS))
    sae = program.to_saes(state)[0]
    np.testing.assert_allclose(np.asarray(sae.threshold), thr, rtol=1e-4)
    assert sae.config.activation == "batchtopk" and sae.config.k == 2


def _assert_states_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=0
        )


@pytest.mark.parametrize("sweep_axis", ["vmap", "map"])
def test_sweep_of_four_seeds_equals_four_runs(mesh1, sweep_axis):
    batches = [_data(10 + s) for s in range(6)]
    kw = dict(
        d_sae=D_SAE,
        activation="topk",
        k=3,
        lr=3e-3,
        adam_eps=1e-5,
        k_aux=4,
        dead_tokens=2 * ROWS,
        sweep_axis=sweep_axis,
    )
    cfgs = [st.TrainConfig(seed=s, **kw) for s in range(4)]
    swept, _ = _run(st.SweepProgram(cfgs, D_IN, 6, mesh1), batches)
    for i, cfg in enumerate(cfgs):
        alone, _ = _run(st.SweepProgram([cfg], D_IN, 6, mesh1), batches)
        one = jax.tree.map(lambda a: a[i : i + 1], swept.params)
        _assert_states_close(one, alone.params, atol=2e-5)


def test_sweep_of_k_and_lr_equals_separate_runs(mesh1):
    batches = [_data(20 + s) for s in range(4)]
    cfgs = [
        st.TrainConfig(d_sae=D_SAE, activation=a, k=k, lr=lr, seed=1, adam_eps=1e-5)
        for a, k, lr in [("topk", 2, 1e-2), ("topk", 5, 3e-3)]
    ]
    cfgs += [
        st.TrainConfig(d_sae=D_SAE, activation="relu", l1_coeff=c, lr=1e-2, adam_eps=1e-5)
        for c in (0.1, 2.0)
    ]
    groups = st.group_configs(cfgs)
    assert groups == [[0, 1], [2, 3]]
    for members in groups:
        group = [cfgs[i] for i in members]
        swept, _ = _run(st.SweepProgram(group, D_IN, 4, mesh1), batches)
        for j, cfg in enumerate(group):
            alone, _ = _run(st.SweepProgram([cfg], D_IN, 4, mesh1), batches)
            _assert_states_close(
                jax.tree.map(lambda a: a[j : j + 1], swept.params["sae"]),
                alone.params["sae"],
                atol=2e-5,
            )


@pytest.mark.parametrize(
    "act,decode", [("topk", "sparse"), ("batchtopk", "dense"), ("jumprelu", "dense")]
)
def test_one_vs_four_devices_same_training(mesh1, mesh4, act, decode):
    batches = [_data(30 + s) for s in range(5)]
    out = []
    for mesh in (mesh1, mesh4):
        program = _program(
            act, mesh, n=2, decode=decode, lr=3e-3, adam_eps=1e-5, k_aux=4, dead_tokens=ROWS
        )
        state, _ = _run(program, batches)
        out.append(state.params)
    _assert_states_close(out[0], out[1], atol=2e-5)


def test_native_kernels_train_like_the_xla_path(mesh1, monkeypatch):
    """A single-device CPU program runs the sparse path on the native kernels
    (engine.sparse_ops); its training equals the XLA path's to float32 rounding, AuxK
    included."""
    from engine import kernels

    if not kernels.available("topk"):
        pytest.fail("native kernels unavailable: a C++ compiler is part of the test setup")
    batches = [_data(50 + s) for s in range(5)]
    kw = dict(n=2, decode="sparse", lr=3e-3, adam_eps=1e-5, k=2, k_aux=4, dead_tokens=ROWS)
    native = _program("topk", mesh1, **kw)
    assert native.native and native.sparse
    state_n, metrics_n = _run(native, batches)
    monkeypatch.setenv("SAE_NATIVE_KERNELS", "0")
    xla = _program("topk", mesh1, **kw)
    assert not xla.native
    state_x, metrics_x = _run(xla, batches)
    assert sum(m["aux_loss"] > 0 for m in metrics_n) >= 2  # AuxK ran
    for a, b in zip(metrics_n, metrics_x):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    _assert_states_close(state_n.params, state_x.params, atol=2e-5)


def test_sparse_and_dense_training_agree(mesh1):
    batches = [_data(40 + s) for s in range(5)]
    out = []
    for decode in ("dense", "sparse"):
        program = _program(
            "topk",
            mesh1,
            n=2,
            decode=decode,
            lr=3e-3,
            adam_eps=1e-5,
            k=1,
            k_aux=4,
            dead_tokens=ROWS,
        )
        state, metrics = _run(program, batches)
        assert sum(m["aux_loss"] > 0 for m in metrics) >= 2  # AuxK ran on both paths
        out.append(state.params)
    # Gradients agree to 1e-16 in float64 (test_topk_gradient_finite_differences and the
    # AuxK test); in float32 the two summation orders differ by rounding, which Adam's
    # normalisation amplifies for near-zero gradients.
    _assert_states_close(out[0], out[1], atol=1e-4)


# -- the driver: resume, outputs, bad input ---------------------------------------------------


def test_train_saes_resume_is_exact_and_writes_outputs(tmp_path, mesh4):
    acts = _data(50, rows=200)
    cfgs = st.with_seeds(
        st.TrainConfig(d_sae=D_SAE, activation="topk", k=3, lr=3e-3, dead_tokens=64), [0, 1]
    )
    kw = dict(
        batch_size=32, mesh=mesh4, log_every=2, checkpoint_every=3, metadata={"source": "test"}
    )
    full = st.train_saes(acts, cfgs, steps=8, workdir=str(tmp_path / "a"), **kw)
    st.train_saes(acts, cfgs, steps=5, workdir=str(tmp_path / "b"), **kw)
    resumed = st.train_saes(acts, cfgs, steps=8, workdir=str(tmp_path / "b"), **kw)
    for a, b in zip(full, resumed):
        for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    rows = [json.loads(line) for line in open(tmp_path / "b" / "g0_topk_F24" / "metrics.jsonl")]
    ref = [json.loads(line) for line in open(tmp_path / "a" / "g0_topk_F24" / "metrics.jsonl")]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    assert {k: v for k, v in rows[-1].items() if k != "steps_per_sec"} == {
        k: v for k, v in ref[-1].items() if k != "steps_per_sec"
    }
    for key in ("mse", "fvu", "l0", "dead_frac", "density_mean", "density_max", "sae1/fvu", "loss"):
        assert key in rows[-1]
    loaded = sae_io_native.load_saes(str(tmp_path / "b" / "saes"))
    assert sorted(loaded) == sorted(st.unique_labels(cfgs))
    sae = loaded[cfgs[1].label()]
    np.testing.assert_array_equal(np.asarray(sae.W_dec), np.asarray(resumed[1].W_dec))
    assert sae.config.meta["source"] == "test"
    assert json.loads(sae.config.meta["training"])["seed"] == 1
    # The recorded input normalisation makes the SAE work on raw activations.
    scale = sae.config.input_scale
    np.testing.assert_allclose(
        np.mean(np.linalg.norm(acts * scale, axis=1)), np.sqrt(D_IN), rtol=0.15
    )
    assert float(np.mean((np.asarray(sae(jnp.asarray(acts))) - acts) ** 2)) < np.var(acts)


def test_bad_inputs(mesh1):
    acts = _data(60, rows=64)
    ok = st.TrainConfig(d_sae=D_SAE, activation="topk", k=3)
    with pytest.raises(InputError, match="k=30 exceeds d_sae=24"):
        st.train_saes(acts, dataclasses.replace(ok, k=30), steps=1, batch_size=16, mesh=mesh1)
    with pytest.raises(InputError, match="l1_coeff must be >= 0"):
        st.TrainConfig(d_sae=8, activation="relu", l1_coeff=-1.0).validate()
    with pytest.raises(InputError, match="l0_coeff must be >= 0"):
        st.TrainConfig(d_sae=8, activation="jumprelu", l0_coeff=-0.1).validate()
    with pytest.raises(InputError, match="lr must be > 0"):
        st.TrainConfig(d_sae=8, k=2, lr=0.0).validate()
    bad = acts.copy()
    bad[5, 2] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        st.train_saes(bad, ok, steps=1, batch_size=16, mesh=mesh1)
    with pytest.raises(InputError, match=r"expected shape \(16, 10\)"):
        st.train_saes(
            lambda s: np.zeros((16, 9), np.float32),
            ok,
            steps=1,
            batch_size=16,
            mesh=mesh1,
            init_sample=acts,
        )
    with pytest.raises(InputError, match="expected a 2-D array"):
        st.train_saes(acts[0], ok, steps=1, batch_size=16, mesh=mesh1)
    with pytest.raises(InputError, match="decode='sparse' needs activation 'topk'"):
        st.TrainConfig(d_sae=8, activation="relu", decode="sparse").validate()
    with pytest.raises(InputError, match="differ in more than"):
        st.SweepProgram([ok, dataclasses.replace(ok, d_sae=32)], D_IN, 1, mesh1)


# -- ground truth -----------------------------------------------------------------------------


def test_topk_recovers_ground_truth_dictionary(mesh1):
    """Sharkey et al. data, n_true=512 in d=128, ~5 active: TopK d_sae=512, k=5 finds the
    dictionary (MMCS >= 0.99)."""
    dictionary = synthetic.make_dictionary(jax.random.PRNGKey(1), 512, 128, k=5)
    gen = jax.jit(
        lambda s: synthetic.dictionary_data(
            jax.random.fold_in(jax.random.PRNGKey(2), s), dictionary, 1024
        )[0]
    )
    cfg = st.TrainConfig(
        d_sae=512, activation="topk", k=5, lr=1e-2, lr_decay_frac=0.3, dead_tokens=20_000, seed=1
    )
    (sae,) = st.train_saes(gen, cfg, steps=400, batch_size=1024, mesh=mesh1, log_every=100)
    score = synthetic.mmcs(dictionary.atoms, sae.W_dec)
    assert score >= 0.99, score

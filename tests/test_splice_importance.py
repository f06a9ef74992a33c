"""Spliced CE metrics (models/splice.py) and per-feature importance (models/importance.py)
against hand-written transformers forwards, analytic SAEs and finite differences."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from engine import checks
from models import importance, lm_tiny, splice, text
from models import sae as sae_lib

D = 16


@pytest.fixture(scope="module")
def toks():
    return {
        "bos": text.build_word_tokenizer(vocab_size=200, special_tokens="bos"),
        "cls_sep": text.build_word_tokenizer(vocab_size=200, special_tokens="cls_sep"),
    }


def _model(arch, toks, dtype=torch.float64, seed=0):
    tok = toks["cls_sep" if arch == "bert" else "bos"]
    model = lm_tiny.build_tiny_model(arch, tok, seed=seed, n_layers=2, d_model=D, n_heads=2)
    return splice.wrap(model.to(dtype), tok, device="cpu")


def _contexts(lm, n=6, length=12):
    ctx = text.make_contexts(text.sample_documents(), lm.tokenizer, length, max_contexts=n)
    ids, mask = ctx.token_ids.copy(), ctx.mask.copy()
    mask[-1, length // 2 :] = False  # a padded tail
    ids[-1, length // 2 :] = text.pad_id(lm.tokenizer)
    return text.Contexts(ids, mask, ctx.doc_index)


def _sae(seed=0, d_sae=32, k=6, scale=1.0):
    cfg = sae_lib.SAEConfig(d_in=D, d_sae=d_sae, activation="topk", k=k, input_scale=scale)
    s = sae_lib.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    return sae_lib.from_arrays(
        cfg,
        np.asarray(s.W_enc) * 2,
        rng.normal(0, 0.1, d_sae),
        np.asarray(s.W_dec) * 0.5,
        rng.normal(0, 0.1, D),
    )


def _numpy_sae(sae, x):
    """Reference forward in float64 numpy (formulas of models/sae.py)."""
    p = {k: np.asarray(v, np.float64) for k, v in sae.to_numpy().items()}
    c = sae.config
    xn = x * c.input_scale - (p["b_dec"] if c.apply_b_dec_to_input else 0.0)
    pre = xn @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0)
    if c.activation == "topk":
        kth = np.sort(acts, -1)[..., -c.k][..., None]
        acts = np.where(acts >= kth, acts, 0.0)
    return acts, (acts @ p["W_dec"] + p["b_dec"]) / c.input_scale


def _hand_loss(lm, batch_np, labels, hook_module=None, replace=None, pre=False):
    """HF's own loss with ``labels`` (-100 = ignored), optionally with a hand-written hook."""
    handle = None
    if hook_module is not None:
        if pre:
            handle = hook_module.register_forward_pre_hook(
                lambda m, args, kwargs: (
                    ((replace(args[0]),) + args[1:], kwargs)
                    if args
                    else (args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])})
                ),
                with_kwargs=True,
            )
        else:
            handle = hook_module.register_forward_hook(
                lambda m, a, out: (
                    (replace(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace(out)
                )
            )
    try:
        with torch.no_grad():
            out = lm.model(
                input_ids=torch.as_tensor(batch_np.input_ids),
                attention_mask=torch.as_tensor(batch_np.attention_mask.astype(int)),
                labels=torch.as_tensor(labels),
            )
    finally:
        if handle is not None:
            handle.remove()
    return float(out.loss), out.logits


def _ce64(logits, labels, masked):
    """Mean CE in float64 over labels != -100 (causal: logits at t predict label at t+1)."""
    lab = torch.as_tensor(labels)
    if not masked:
        logits, lab = logits[:, :-1], lab[:, 1:]
    sel = lab != -100
    lp = torch.log_softmax(logits[sel].double(), -1)
    return float(-lp.gather(-1, lab[sel][:, None]).mean())


def _labels(lm, batch):
    """HF labels for the documented position rule (causal models shift internally)."""
    if lm.is_encoder:
        return np.where(batch.loss_pos, batch.targets, -100)
    ids = batch.input_ids
    special = lm.special_mask(ids)
    real = batch.attention_mask & ~special
    # label at t is the token at t; HF predicts it from t-1: both must be real text tokens
    lab = np.full(ids.shape, -100)
    ok = np.zeros_like(real)
    ok[:, 1:] = real[:, 1:] & real[:, :-1]
    lab[ok] = ids[ok]
    return lab


@pytest.mark.parametrize(
    "arch,hookpoint",
    [
        ("gpt_neox", "resid_post.0"),
        ("gpt2", "resid_pre.1"),
        ("llama", "mlp_out.1"),
        ("bert", "resid_post.0"),
    ],
)
def test_spliced_ce_equals_hand_written_forward(arch, hookpoint, toks):
    lm = _model(arch, toks)
    ctx = _contexts(lm)
    sae = _sae()
    cfg = splice.SpliceConfig(batch_size=len(ctx))  # one batch: one HF mean loss
    m = splice.splice_metrics(lm, sae, hookpoint, ctx, cfg)
    batch = splice.prepare_batch(lm, ctx.token_ids, ctx.mask, cfg=cfg, start=0)
    labels = _labels(lm, batch)
    hp = lm.parse(hookpoint)[0]
    block = lm.blocks[hp.layer]
    module = block if hp.kind in ("resid_post", "resid_pre") else block.mlp
    spl = torch.as_tensor(batch.splice)[..., None]

    def with_sae(x):
        x_hat = torch.as_tensor(_numpy_sae(sae, x.detach().numpy())[1], dtype=x.dtype)
        return torch.where(spl, x_hat, x)

    hf_clean, logits_clean = _hand_loss(lm, batch, labels)
    _, logits_sae = _hand_loss(lm, batch, labels, module, with_sae, pre=hp.kind == "resid_pre")
    _, logits_zero = _hand_loss(
        lm,
        batch,
        labels,
        module,
        lambda x: torch.where(spl, 0.0 * x, x),
        pre=hp.kind == "resid_pre",
    )
    clean, with_rec, zero = (
        _ce64(lg, labels, lm.is_encoder) for lg in (logits_clean, logits_sae, logits_zero)
    )
    assert m.n_positions == int((labels != -100).sum())
    # HF's own loss casts logits to float32 (logits.float()), hence rtol 1e-6 against it
    np.testing.assert_allclose(m.ce_clean, hf_clean, rtol=1e-6)
    # per-token losses are float64 here, summed on the device in float32 (engine Sums): the
    # sums agree with a float64 reference to float32 rounding (~1e-7 relative)
    np.testing.assert_allclose(m.ce_clean, clean, rtol=1e-6)
    np.testing.assert_allclose(m.ce_sae, with_rec, rtol=1e-6)  # the numpy SAE is float32-fed
    np.testing.assert_allclose(m.ce_zero, zero, rtol=1e-6)
    np.testing.assert_allclose(m.delta_loss, with_rec - clean, atol=1e-6)
    np.testing.assert_allclose(
        m.ce_loss_recovered, (zero - with_rec) / (zero - clean), rtol=1e-6, atol=1e-6
    )
    # KL(clean || sae) over the counted positions, by hand
    lab = torch.as_tensor(labels)
    if lm.is_encoder:
        sel = lab != -100
        lc, ls = logits_clean[sel], logits_sae[sel]
    else:
        sel = lab[:, 1:] != -100
        lc, ls = logits_clean[:, :-1][sel], logits_sae[:, :-1][sel]
    pc = torch.log_softmax(lc, -1)
    kl = float((pc.exp() * (pc - torch.log_softmax(ls, -1))).sum(-1).mean())
    np.testing.assert_allclose(m.kl_sae, kl, rtol=1e-5)
    # mean ablation uses the streamed mean of the hookpoint over spliced positions
    acts = lm.forward_batch(batch.input_ids, [hp.name], attention_mask=batch.attention_mask).acts[
        hp.name
    ]
    mu = acts[batch.splice].astype(np.float64).mean(0)
    np.testing.assert_allclose(
        splice.hookpoint_mean(lm, hp.name, ctx, cfg), mu, rtol=1e-6, atol=1e-6 * np.abs(mu).max()
    )
    _, logits_mean = _hand_loss(
        lm,
        batch,
        labels,
        module,
        lambda x: torch.where(spl, torch.as_tensor(mu).expand_as(x), x),
        pre=hp.kind == "resid_pre",
    )
    np.testing.assert_allclose(m.ce_mean, _ce64(logits_mean, labels, lm.is_encoder), rtol=1e-6)
    x = acts[batch.splice].astype(np.float64)
    fvu = ((x - _numpy_sae(sae, x)[1]) ** 2).sum() / ((x - mu) ** 2).sum()
    np.testing.assert_allclose(m.fvu, fvu, rtol=1e-5)


def test_batches_sum_like_one_pass(toks):
    """Running sums over several batches give the single-batch answer."""
    lm = _model("gpt_neox", toks)
    ctx = _contexts(lm, n=7)
    sae = _sae(1)
    one = splice.splice_metrics(lm, sae, "resid_post.1", ctx, splice.SpliceConfig(batch_size=7))
    many = splice.splice_metrics(lm, sae, "resid_post.1", ctx, splice.SpliceConfig(batch_size=2))
    for field in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "fvu"):
        np.testing.assert_allclose(getattr(many, field), getattr(one, field), rtol=1e-6)


def _identity_sae(shift=100.0):
    """relu(x + shift) - shift = x whenever x > -shift: an exact identity SAE."""
    cfg = sae_lib.SAEConfig(d_in=D, d_sae=D, activation="relu", apply_b_dec_to_input=False)
    eye = np.eye(D)
    return sae_lib.from_arrays(cfg, eye, np.full(D, shift), eye, np.full(D, -shift))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_identity_sae_recovers_everything_and_zero_sae_nothing(arch, toks):
    lm = _model(arch, toks)
    ctx = _contexts(lm)
    cfg = splice.SpliceConfig(batch_size=3)
    ident = splice.splice_metrics(lm, _identity_sae(), "resid_post.0", ctx, cfg)
    assert abs(ident.ce_loss_recovered - 1.0) < 1e-9
    assert abs(ident.ce_loss_recovered_mean - 1.0) < 1e-9
    assert abs(ident.kl_div) < 1e-10 and abs(ident.delta_loss) < 1e-10
    assert ident.fvu < 1e-20 and "WARNING" not in (ident.warning() or "")
    zcfg = sae_lib.SAEConfig(d_in=D, d_sae=8, activation="relu")
    zero_sae = sae_lib.from_arrays(zcfg, np.ones((D, 8)), np.ones(8), np.zeros((8, D)), np.zeros(D))
    zero = splice.splice_metrics(lm, zero_sae, "resid_post.0", ctx, cfg)
    assert abs(zero.ce_loss_recovered) < 1e-9
    np.testing.assert_allclose(zero.kl_sae, zero.kl_zero, rtol=1e-9)
    np.testing.assert_allclose(zero.kl_div_score, 0.0, atol=1e-9)
    # zero ablation barely moves a random model's loss: the ratio is flagged, not trusted
    gap = zero.ce_zero - zero.ce_clean
    want = "ill-conditioned" if gap < splice.ILL_CONDITIONED_GAP else "weak"
    assert zero.warning() is not None and want in zero.warning()
    poor = dataclasses.replace(zero, ce_zero=zero.ce_clean + 1.0, ce_sae=zero.ce_clean + 0.8)
    assert "WARNING" in poor.warning() and "0.20" in poor.warning()
    fine = dataclasses.replace(poor, ce_sae=zero.ce_clean + 0.1)
    assert fine.warning() is None


def test_masking_rule_is_berts_and_seeded(toks):
    lm = _model("bert", toks)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (400, 50))
    ids[:, 0] = 2  # the tiny tokenizer's BOS/CLS
    mask = np.ones(ids.shape, bool)
    cfg = splice.SpliceConfig(seed=3)
    b = splice.prepare_batch(lm, ids, mask, cfg=cfg, start=8)
    again = splice.prepare_batch(lm, ids, mask, cfg=cfg, start=8)
    other = splice.prepare_batch(lm, ids, mask, cfg=cfg, start=16)
    np.testing.assert_array_equal(b.input_ids, again.input_ids)
    assert not np.array_equal(b.loss_pos, other.loss_pos)
    real = ~lm.special_mask(ids)
    assert not b.loss_pos[~real].any()  # never a special token
    frac = b.loss_pos.sum() / real.sum()
    assert abs(frac - 0.15) < 0.01
    chosen = b.loss_pos
    masked = (b.input_ids == splice.mask_token_id(lm)) & chosen
    kept = (b.input_ids == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    # 10 % kept plus the random draws that hit the same token (1/195 of 10 %)
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.015
    np.testing.assert_array_equal(b.targets[chosen], ids[chosen])
    np.testing.assert_array_equal(b.input_ids[~chosen], ids[~chosen])


def test_resume_after_interruption(toks, tmp_path, monkeypatch):
    lm = _model("gpt_neox", toks)
    ctx = _contexts(lm, n=8)
    sae = _sae(2)
    cfg = splice.SpliceConfig(batch_size=2, save_every=1)
    fresh = splice.splice_metrics(lm, sae, "resid_post.0", ctx, cfg)
    calls = {"n": 0}
    real = splice.log_probs

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # 4 forwards per batch: dies in the third batch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(splice, "log_probs", failing)
    with pytest.raises(KeyboardInterrupt):
        splice.splice_metrics(lm, sae, "resid_post.0", ctx, cfg, checkpoint_dir=str(tmp_path))
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(splice, "log_probs", counting)
    resumed = splice.splice_metrics(lm, sae, "resid_post.0", ctx, cfg, checkpoint_dir=str(tmp_path))
    # resumed, not restarted: the checkpoint holds at least the first batch (the stream
    # prefetches one batch ahead, so the batch after it may be recomputed)
    assert counted["n"] in (4 * 2, 4 * 3)
    for field in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "fvu", "n_positions"):
        np.testing.assert_allclose(getattr(resumed, field), getattr(fresh, field), rtol=1e-12)
    with pytest.raises(checks.InputError, match="another run"):
        splice.splice_metrics(lm, _sae(3), "resid_post.0", ctx, cfg, checkpoint_dir=str(tmp_path))


def test_load_with_head(toks, tmp_path):
    from transformers import AutoModel

    lm = _model("gpt_neox", toks, dtype=torch.float32)
    lm.model.save_pretrained(tmp_path / "full")
    lm.tokenizer.save_pretrained(tmp_path / "full")
    back = splice.load_with_head(str(tmp_path / "full"))
    ids = torch.as_tensor(_contexts(lm).token_ids, dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(
            back.model(input_ids=ids).logits.numpy(),
            lm.model(input_ids=ids).logits.numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
    base = AutoModel.from_config(lm.model.config)
    base.save_pretrained(tmp_path / "base")  # no head weights
    with pytest.raises(checks.InputError, match="no LM-head weights"):
        splice.load_with_head(str(tmp_path / "base"))
    with pytest.raises(checks.InputError, match="no such local directory"):
        splice.load_with_head(str(tmp_path / "nothing"))


def test_bad_inputs(toks):
    lm = _model("gpt2", toks)
    ctx = _contexts(lm)
    wide = sae_lib.init(jax.random.key(0), sae_lib.SAEConfig(d_in=D + 1, d_sae=8))
    with pytest.raises(checks.InputError, match="d_in"):
        splice.splice_metrics(lm, wide, "resid_post.0", ctx)
    with pytest.raises(checks.InputError, match="hookpoint"):
        splice.splice_metrics(lm, _sae(), "resid_post.7", ctx)
    with pytest.raises(checks.InputError, match="masked-LM head"):
        importance.final_norm(_model("bert", toks))


# -- importance ---------------------------------------------------------------------------------


def _metric_with(lm, batch, hookpoint, replace):
    """Sum of counted log-probs with a hand-written substitution (float64)."""
    hp = lm.parse(hookpoint)[0]
    block = lm.blocks[hp.layer]
    handle = block.register_forward_hook(
        lambda m, a, out: (
            (replace(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace(out)
        )
    )
    try:
        with torch.no_grad():
            logits = lm.model(
                input_ids=torch.as_tensor(batch.input_ids),
                attention_mask=torch.as_tensor(batch.attention_mask.astype(int)),
            ).logits
    finally:
        handle.remove()
    lp = torch.log_softmax(logits, -1)[torch.as_tensor(batch.loss_pos)]
    return float(lp.gather(-1, torch.as_tensor(batch.targets[batch.loss_pos])[:, None]).sum())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_attribution_equals_finite_differences(arch, toks):
    lm = _model(arch, toks)
    ctx = _contexts(lm, n=3)
    sae = _sae(4, scale=1.7)
    cfg = splice.SpliceConfig(mask_rate=0.5)
    batch = splice.prepare_batch(lm, ctx.token_ids, ctx.mask, cfg=cfg, start=0)
    tsae = splice.TorchSAE(sae, "cpu", torch.float64)
    f, attr, _ = importance.attribution_batch(lm, tsae, "resid_post.0", batch)
    f, attr = f.numpy(), attr.numpy()
    assert np.all(attr[~batch.splice] == 0)
    w_dec = np.asarray(sae.W_dec, np.float64) / 1.7
    rng = np.random.default_rng(0)
    active = np.argwhere(f > 0)
    eps = 1e-5
    for b, s, j in active[rng.choice(len(active), 6, replace=False)]:

        def shifted(delta, b=b, s=s, j=j):
            def rep(x):
                x = x.clone()
                x[b, s] += delta * torch.as_tensor(w_dec[j])
                return x

            return rep

        grad = (
            _metric_with(lm, batch, "resid_post.0", shifted(eps))
            - _metric_with(lm, batch, "resid_post.0", shifted(-eps))
        ) / (2 * eps)
        np.testing.assert_allclose(attr[b, s, j], f[b, s, j] * grad, rtol=1e-5, atol=1e-9)


def test_importance_sums_ablation_and_dle(toks, tmp_path):
    lm = _model("gpt2", toks)
    ctx = _contexts(lm, n=6)
    sae = _sae(5)
    icfg = importance.ImportanceConfig(
        splice=splice.SpliceConfig(batch_size=3), n_classes=5, n_ablate=6, ablate_contexts=3
    )
    imp = importance.feature_importance(lm, sae, "resid_post.0", ctx, icfg)
    tsae = splice.TorchSAE(sae, "cpu", torch.float64)
    want_abs, want_sum, per_class = 0.0, 0.0, np.zeros((sae.config.d_sae, 5))
    exact = np.zeros(len(imp.ablate_features))
    sigmas = []
    for lo in (0, 3):
        part = ctx[lo : lo + 3]
        batch = splice.prepare_batch(lm, part.token_ids, part.mask, cfg=icfg.splice, start=lo)
        _, attr, _ = importance.attribution_batch(lm, tsae, "resid_post.0", batch)
        attr = attr.numpy()
        want_abs = want_abs + np.abs(attr).sum((0, 1))
        want_sum = want_sum + attr.sum((0, 1))
        for c, tok_id in enumerate(imp.class_ids):
            sel = batch.loss_pos & (batch.targets == tok_id)
            per_class[:, c] += np.abs(attr[sel]).sum(0)
        if lo == 0:
            base = _metric_with(lm, batch, "resid_post.0", lambda x: x)
            spl = torch.as_tensor(batch.splice)[..., None]
            for i, j in enumerate(imp.ablate_features):

                def remove(x, j=int(j)):
                    fx = torch.as_tensor(_numpy_sae(sae, x.numpy())[0][..., j : j + 1])
                    return torch.where(
                        spl, x - fx * torch.as_tensor(np.asarray(sae.W_dec, np.float64)[j]), x
                    )

                exact[i] = _metric_with(lm, batch, "resid_post.0", remove) - base
        # final-norm denominator by hand: sqrt(var + eps) of the last block's output
        h = lm.forward_batch(
            batch.input_ids, ["resid_post.1"], attention_mask=batch.attention_mask
        ).acts["resid_post.1"]
        h = h[batch.loss_pos].astype(np.float64)
        sigmas.append(np.sqrt(h.var(-1) + lm.model.transformer.ln_f.eps))
    # float64 reference vs the device's float32 sums (engine Sums): float32 rounding
    tol = dict(rtol=2e-6, atol=1e-6 * np.abs(want_abs).max())
    np.testing.assert_allclose(imp.attr_abs_sum, want_abs, **tol)
    np.testing.assert_allclose(imp.attr_sum, want_sum, **tol)
    np.testing.assert_allclose(imp.attr_abs_by_class, per_class, **tol)
    np.testing.assert_allclose(imp.ablate_exact, exact, rtol=2e-6, atol=1e-6 * np.abs(exact).max())
    # forward_batch returns float32 activations, hence 1e-6
    np.testing.assert_allclose(imp.norm_scale, np.concatenate(sigmas).mean(), rtol=1e-6)
    # the linear estimate tracks the exact ablation (small single-feature effects)
    agree = imp.ablation_agreement()
    assert agree["pearson"] > 0.9
    np.testing.assert_allclose(imp.attribution, imp.attr_abs_sum / imp.n_positions)

    # direct logit effect = W_dec diag-free explicit product through the frozen LayerNorm
    ln = lm.model.transformer.ln_f
    g = ln.weight.detach().numpy()
    w_u = lm.model.lm_head.weight.detach().numpy()
    w_dec = np.asarray(sae.W_dec, np.float64)
    centred = w_dec - w_dec.mean(1, keepdims=True)
    want = (centred * g) @ w_u.T / imp.norm_scale
    got = importance.dle_rows(lm, sae, imp.norm_scale)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    dle = importance.direct_logit_effect(lm, sae, imp.norm_scale, top_n=4, block=7)
    np.testing.assert_allclose(
        dle.norm, np.linalg.norm(want - want.mean(1, keepdims=True), axis=1), rtol=1e-9
    )
    np.testing.assert_array_equal(dle.promoted[:, 0], want.argmax(1))
    np.testing.assert_array_equal(dle.suppressed[:, 0], want.argmin(1))
    np.testing.assert_allclose(dle.promoted_values[:, 0], want.max(1), rtol=1e-9)
    dle.save(str(tmp_path / "dle.npz"))
    back = importance.DirectLogitEffect.load(str(tmp_path / "dle.npz"))
    np.testing.assert_array_equal(back.suppressed, dle.suppressed)
    assert back.norm_scale == dle.norm_scale


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_dle_through_rms_norms(arch, toks):
    lm = _model(arch, toks)
    sae = _sae(6, scale=2.0)
    norm = lm.model.model.norm
    g = norm.weight.detach().numpy()
    if arch == "gemma2":
        g = 1.0 + g  # Gemma's RMSNorm multiplies by (1 + weight)
    # check the gain convention on the module itself: norm(v) = g * v / rms(v)
    v = torch.randn(3, D, dtype=torch.float64)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    np.testing.assert_allclose(
        norm(v).detach().numpy(),
        (g * v.numpy()) / np.sqrt((v.numpy() ** 2).mean(-1, keepdims=True) + eps),
        rtol=1e-6,
    )
    w_u = lm.model.lm_head.weight.detach().numpy()
    want = (np.asarray(sae.W_dec, np.float64) / 2.0 * g) @ w_u.T / 0.37
    np.testing.assert_allclose(importance.dle_rows(lm, sae, 0.37), want, rtol=1e-9, atol=1e-12)


def test_importance_save_load(toks, tmp_path):
    lm = _model("gpt_neox", toks)
    ctx = _contexts(lm, n=4)
    icfg = importance.ImportanceConfig(
        splice=splice.SpliceConfig(batch_size=2), n_classes=3, n_ablate=2, ablate_contexts=2
    )
    imp = importance.feature_importance(
        lm, _sae(7), "resid_post.1", ctx, icfg, checkpoint_dir=str(tmp_path / "ck")
    )
    imp.save(str(tmp_path / "imp.npz"))
    back = importance.FeatureImportance.load(str(tmp_path / "imp.npz"))
    assert back.hookpoint == "resid_post.1" and back.n_positions == imp.n_positions
    np.testing.assert_array_equal(back.attr_abs_by_class, imp.attr_abs_by_class)
    # a rerun on the finished checkpoint reads the sums back without recomputing
    again = importance.feature_importance(
        lm, _sae(7), "resid_post.1", ctx, icfg, checkpoint_dir=str(tmp_path / "ck")
    )
    np.testing.assert_array_equal(again.attr_abs_sum, imp.attr_abs_sum)


def test_half_precision_model_runs_the_sae_in_float32(toks):
    lm32 = _model("llama", toks, dtype=torch.float32)
    lm16 = splice.wrap(
        lm_tiny.build_tiny_model("llama", toks["bos"], seed=0, n_layers=2, d_model=D, n_heads=2).to(
            torch.bfloat16
        ),
        toks["bos"],
        device="cpu",
    )
    assert splice.sae_dtype(lm16) == torch.float32
    ctx = _contexts(lm32)
    m32 = splice.splice_metrics(lm32, _sae(), "resid_post.0", ctx)
    m16 = splice.splice_metrics(lm16, _sae(), "resid_post.0", ctx)
    for field in ("ce_clean", "ce_sae", "ce_zero"):
        assert abs(getattr(m16, field) - getattr(m32, field)) < 0.05
    imp = importance.feature_importance(
        lm16,
        _sae(),
        "resid_post.0",
        ctx,
        importance.ImportanceConfig(n_classes=3, n_ablate=2, ablate_contexts=2),
    )
    assert imp.attr_abs_sum.dtype == np.float64 and np.isfinite(imp.attr_abs_sum).all()


# -- streaming on the device mesh (engine accumulators) ----------------------------------------


def test_sums_accumulator_matches_float64_on_1_and_4_devices(mesh1, mesh4):
    from engine import accumulators, streaming

    rng = np.random.default_rng(0)
    n = 37
    x = 1e3 + rng.normal(size=(n, 5))  # a large offset: float32 sums lose digits
    seg = rng.integers(-1, 3, n).astype(np.int32)
    w = rng.random(n)
    acc = accumulators.Sums(
        {"s": (0, None, 0), "by": (0, 1, 3), "dup": (2, None, 0)},
        {"s": (5,), "by": (5,), "dup": (2,)},
    )
    twin = np.stack([x[:, 0], x[:, 0]], 1)  # two identical columns
    want_s = (w[:, None] * x).sum(0)
    want_by = np.stack([(w[seg == c, None] * x[seg == c]).sum(0) for c in range(3)])
    out = {}
    for name, mesh in (("1", mesh1), ("4", mesh4)):
        # the weights ride in the stream's rows: accumulate passes the chunk mask, so fold
        # them into the values (a weight is a scale of the row)
        stream = streaming.ChunkStream((x * w[:, None], seg, twin * w[:, None]), 8)
        out[name] = acc.finalize(accumulators.accumulate(acc, stream, mesh))
        np.testing.assert_allclose(out[name]["s"], want_s, rtol=1e-6)
        np.testing.assert_allclose(out[name]["by"], want_by, rtol=1e-6)
        assert out[name]["dup"][0] == out[name]["dup"][1]
    np.testing.assert_allclose(out["4"]["s"], out["1"]["s"], rtol=1e-6)
    # weights through update, and merge == sum of the parts
    a = acc.update(acc.init(), (x[:20], seg[:20], twin[:20]), w[:20])
    b = acc.update(acc.init(), (x[20:], seg[20:], twin[20:]), w[20:])
    np.testing.assert_allclose(acc.finalize(acc.merge(a, b))["s"], want_s, rtol=1e-6)
    with pytest.raises(checks.InputError, match="expected rows of shape"):
        acc.update(acc.init(), (x[:, :4], seg, twin), w)


def test_compensated_sum_does_not_drift_over_chunks():
    """Chunks whose own sums are exact in float32 (few mantissa bits) but whose running total
    outgrows their low bits: a plain float32 running sum drifts, the compensated one is
    exact."""
    from engine import accumulators

    acc = accumulators.Sums({"s": (0, None, 0)}, {"s": ()})
    state = acc.init()
    vals = 1.0 + (np.arange(4000) % 7).reshape(400, 10) * 2.0**-16
    plain = np.float32(0.0)
    update = jax.jit(acc.update)
    for chunk in vals:
        state = update(state, (chunk.astype(np.float32),), np.ones(10, np.float32))
        plain = np.float32(plain + np.float32(chunk.astype(np.float32).sum()))
    want = vals.astype(np.float32).astype(np.float64).sum()
    got = acc.finalize(state)["s"]
    assert got == want
    assert abs(float(plain) - want) > 1e-5


def test_splice_and_importance_on_1_and_4_devices(toks, mesh1, mesh4):
    lm = _model("gpt2", toks)
    ctx = _contexts(lm, n=6)
    sae = _sae(8)
    cfg = splice.SpliceConfig(batch_size=3)  # 3 x 12 = 36 rows per chunk: 9 per device
    one = splice.splice_metrics(lm, sae, "resid_post.0", ctx, cfg, mesh=mesh1)
    four = splice.splice_metrics(lm, sae, "resid_post.0", ctx, cfg, mesh=mesh4)
    for field in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "fvu"):
        np.testing.assert_allclose(getattr(four, field), getattr(one, field), rtol=1e-6)
    assert four.n_positions == one.n_positions and four.n_spliced == one.n_spliced
    icfg = importance.ImportanceConfig(splice=cfg, n_classes=4, n_ablate=3, ablate_contexts=3)
    i1 = importance.feature_importance(lm, sae, "resid_post.0", ctx, icfg, mesh=mesh1)
    i4 = importance.feature_importance(lm, sae, "resid_post.0", ctx, icfg, mesh=mesh4)
    scale = np.abs(i1.attr_abs_sum).max()
    for field in ("attr_abs_sum", "attr_sum", "attr_abs_by_class", "ablate_exact", "ablate_linear"):
        np.testing.assert_allclose(
            getattr(i4, field), getattr(i1, field), rtol=1e-5, atol=1e-6 * scale
        )
    np.testing.assert_array_equal(i4.fire_count, i1.fire_count)
    np.testing.assert_array_equal(i4.class_count, i1.class_count)
    assert i4.n_positions == i1.n_positions


@pytest.mark.parametrize("arch", ["gpt_neox", "bert"])
def test_floor_model_gets_a_random_head_and_keeps_its_body(arch, toks):
    """The random-init floor copy (a base model, no head) inside its LM-head model: the body's
    activations are exactly the copy's, so the floor SAE is spliced where it was trained."""
    from models import lm as lm_lib

    tok = toks["cls_sep" if arch == "bert" else "bos"]
    src = lm_lib.LanguageModel(
        lm_tiny.build_tiny_model(arch, tok, seed=0, n_layers=2, d_model=D, n_heads=2),
        tok,
        device="cpu",
    )
    rnd = lm_lib.random_init_copy(src, seed=1000)
    assert getattr(rnd.model, "get_output_embeddings", lambda: None)() is None
    full = splice.with_random_head(rnd, seed=0)
    ctx = _contexts(full)
    for hp in ("resid_post.0", "resid_post.1"):
        want = rnd.forward_batch(ctx.token_ids, [hp], attention_mask=ctx.mask).acts[hp]
        got = full.forward_batch(ctx.token_ids, [hp], attention_mask=ctx.mask).acts[hp]
        np.testing.assert_array_equal(got, want)
    m = splice.splice_metrics(full, _sae(), "resid_post.0", ctx, splice.SpliceConfig(batch_size=3))
    assert np.isfinite(m.ce_clean) and m.n_positions > 0
    # an untrained model: zero ablation barely moves the loss, and the warning says so
    if m.ce_zero - m.ce_clean < splice.ILL_CONDITIONED_GAP:
        assert "ill-conditioned" in m.warning()


def test_sae_labels():
    from experiments.pipeline import importance as pimp

    assert pimp.sae_label("a", "resid_post.0") == "A resid_post.0"
    assert pimp.sae_label("a", "resid_post.0", "ceiling") == "A resid_post.0 (ceiling)"
    assert (
        pimp.sae_label("b~random", "resid_post.1", "floor") == "B resid_post.1 (floor, random init)"
    )
    assert pimp.sae_label("a", "h", "main", 2, "k=8") == "A h (r2, k=8)"

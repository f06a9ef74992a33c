"""Tests for models/lm.py and models/lm_tiny.py against plain transformers forwards."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from engine import checks
from models import lm, lm_tiny, text

N_LAYERS = 3


@pytest.fixture(scope="module")
def tok():
    return text.build_word_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tiny_lms")
    dirs = {}
    for i, arch in enumerate(lm_tiny.ARCHS):
        model = lm_tiny.build_tiny_model(arch, tok, seed=i, n_layers=N_LAYERS, d_model=32)
        path = str(root / arch)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="module")
def batch(tok):
    return text.make_contexts(text.sample_documents(3), tok, 12, max_contexts=5)


def _reference_hidden_states(path, ids, mask=None):
    """A plain transformers forward of the checkpoint (its own head class), all states."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if path.endswith("bert") else AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids).long(),
            output_hidden_states=True,
            attention_mask=None if mask is None else torch.as_tensor(mask).long(),
        )
    return [h.numpy().astype(np.float64) for h in out.hidden_states], model


# -- hookpoint names ---------------------------------------------------------------------------


def test_hookpoint_names_and_library_mapping():
    hp = lm.parse_hookpoint("resid_post.3")
    assert (hp.layer, hp.kind) == (3, "resid_post")
    assert hp.saelens_name == "blocks.3.hook_resid_post" and hp.sparsify_name == "layers.3"
    assert lm.parse_hookpoint("blocks.3.hook_resid_post") == hp
    assert lm.parse_hookpoint("layers.3") == hp
    assert lm.parse_hookpoint("blocks.2.hook_resid_pre").sparsify_name == "layers.1"
    assert lm.parse_hookpoint("layers.1.mlp") == lm.Hookpoint(1, "mlp_out")
    assert lm.parse_hookpoint("layers.1.self_attn") == lm.Hookpoint(1, "attn_out")
    assert lm.parse_hookpoint("resid_pre.-1", n_layers=6) == lm.Hookpoint(5, "resid_pre")
    for bad, match in [
        ("resid_mid.1", "unknown name"),
        ("resid_post.6", "outside"),
        ("resid_post.-7", "outside"),
    ]:
        with pytest.raises(checks.InputError, match=match):
            lm.parse_hookpoint(bad, n_layers=6)
    with pytest.raises(checks.InputError, match="needs the model's depth"):
        lm.parse_hookpoint("resid_post.-1")
    with pytest.raises(checks.InputError, match="no sparsify"):
        lm.parse_hookpoint("resid_pre.0").sparsify_name


# -- activations equal a plain forward ----------------------------------------------------------


@pytest.mark.parametrize("arch", lm_tiny.ARCHS)
def test_hookpoints_equal_plain_transformers_forward(arch, model_dirs, batch):
    m = lm.LanguageModel.load(model_dirs[arch])
    assert m.n_layers == N_LAYERS and m.d_model == 32
    out = m.forward_batch(batch.token_ids, m.hookpoints(), attention_mask=batch.mask)
    hs, ref_model = _reference_hidden_states(model_dirs[arch], batch.token_ids)
    assert len(hs) == N_LAYERS + 1
    acts = {k: v.astype(np.float64) for k, v in out.acts.items()}
    for layer in range(N_LAYERS):
        np.testing.assert_allclose(acts[f"resid_pre.{layer}"], hs[layer], atol=1e-5, rtol=1e-5)
        if layer < N_LAYERS - 1:
            np.testing.assert_allclose(
                acts[f"resid_post.{layer}"], hs[layer + 1], atol=1e-5, rtol=1e-5
            )
    last = torch.as_tensor(out.acts[f"resid_post.{N_LAYERS - 1}"])
    base = ref_model.base_model
    final_norm = {
        "gpt_neox": "final_layer_norm",
        "gpt2": "ln_f",
        "llama": "norm",
        "gemma2": "norm",
    }.get(arch)
    if final_norm is None:  # BERT: no final norm, hidden_states[-1] is the block output
        np.testing.assert_allclose(acts[f"resid_post.{N_LAYERS - 1}"], hs[-1], atol=1e-5)
    else:  # HF hidden_states[-1] is the FINAL-NORMED output (the off-by-one trap)
        with torch.no_grad():
            normed = getattr(base, final_norm)(last).numpy()
        np.testing.assert_allclose(normed, hs[-1], atol=1e-5, rtol=1e-5)
        assert not np.allclose(acts[f"resid_post.{N_LAYERS - 1}"], hs[-1], atol=1e-3)
    for layer in range(N_LAYERS):
        pre, attn, mlp, post = (acts[f"{k}.{layer}"] for k in lm.KINDS)
        if arch == "bert":  # post-norm: LN(attn + x), then LN(mlp + h)
            blk = base.encoder.layer[layer]
            with torch.no_grad():
                h = blk.attention.output.LayerNorm(torch.as_tensor(attn + pre).float())
                y = blk.output.LayerNorm(torch.as_tensor(mlp).float() + h).numpy()
            np.testing.assert_allclose(y, post, atol=1e-5)
        else:  # pre-norm (NeoX parallel residual and Gemma 2 sandwich norms included)
            np.testing.assert_allclose(pre + attn + mlp, post, atol=1e-5)
    assert out.special[:, 0].all() and not out.special[:, 1:].any()  # BOS flagged only


@pytest.mark.parametrize("arch", ["gpt_neox", "bert"])
def test_stopping_early_changes_nothing_and_skips_later_blocks(arch, model_dirs, batch):
    m = lm.LanguageModel.load(model_dirs[arch])
    calls = []
    m.blocks[N_LAYERS - 1].register_forward_hook(lambda *a: calls.append(1))
    wanted = ["resid_post.0", "mlp_out.1", "resid_pre.1"]
    early = m.forward_batch(batch.token_ids, wanted)
    assert calls == []  # the last block never ran
    full = m.forward_batch(batch.token_ids, wanted, stop_early=False)
    assert calls == [1]
    for k in wanted:
        np.testing.assert_array_equal(early.acts[k], full.acts[k])
    pre_only = m.forward_batch(batch.token_ids, ["resid_pre.2"])
    assert calls == [1]  # stopped before block 2
    post1 = m.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    np.testing.assert_array_equal(pre_only.acts["resid_pre.2"], post1)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_padding_is_masked(arch, model_dirs, tok):
    m = lm.LanguageModel.load(model_dirs[arch])
    texts = ["in the beginning god created the heaven", "and god said"]
    ids, mask = m.encode(texts, max_length=10)
    assert mask.sum(axis=1).tolist() == [8, 4]
    out = m.forward_batch(ids, ["resid_post.1"], attention_mask=mask)
    np.testing.assert_array_equal(out.mask, mask)
    assert out.special[1, 4:].all()  # padding is special too
    for i in range(2):
        n = int(mask[i].sum())
        alone = m.forward_batch(ids[i : i + 1, :n], ["resid_post.1"])
        np.testing.assert_allclose(
            out.acts["resid_post.1"][i, :n], alone.acts["resid_post.1"][0], atol=1e-5
        )


def test_dtypes(model_dirs, batch):
    import ml_dtypes

    path = model_dirs["llama"]
    m32 = lm.LanguageModel.load(path)
    ref = m32.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    out16 = m32.forward_batch(batch.token_ids, ["resid_post.1"], out_dtype="bfloat16")
    got = out16.acts["resid_post.1"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, ref.astype(ml_dtypes.bfloat16))  # round to nearest
    half = m32.forward_batch(batch.token_ids, ["resid_post.1"], out_dtype="float16")
    np.testing.assert_array_equal(half.acts["resid_post.1"], ref.astype(np.float16))
    mbf = lm.LanguageModel.load(path, dtype="bfloat16")
    assert mbf.dtype == "bfloat16"
    low = mbf.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    assert low.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(low - ref).max() < 0.05 * scale  # bf16 compute: ~3 significant digits
    assert not np.array_equal(low, ref)


def test_bad_input(model_dirs, batch, tmp_path):
    m = lm.LanguageModel.load(model_dirs["gpt2"])
    with pytest.raises(checks.InputError, match="unknown name"):
        m.forward_batch(batch.token_ids, ["resid_middle.0"])
    with pytest.raises(checks.InputError, match="outside"):
        m.forward_batch(batch.token_ids, ["resid_post.3"])
    with pytest.raises(checks.InputError, match="vocabulary"):
        m.forward_batch(batch.token_ids + 10_000, ["resid_post.0"])
    with pytest.raises(checks.InputError, match="attention_mask"):
        m.forward_batch(batch.token_ids, ["resid_post.0"], attention_mask=batch.mask[:, :3])
    with pytest.raises(checks.InputError, match="integer ids"):
        m.forward_batch(batch.token_ids.astype(float), ["resid_post.0"])
    with pytest.raises(checks.InputError, match="max_position_embeddings"):
        m.forward_batch(np.zeros((1, 500), np.int32), ["resid_post.0"])
    with pytest.raises(checks.InputError, match="no such local directory"):
        lm.LanguageModel.load(str(tmp_path / "nope"))
    with pytest.raises(checks.InputError, match="out_dtype"):
        m.forward_batch(batch.token_ids, ["resid_post.0"], out_dtype="int8")


def test_run_batches_and_describe(model_dirs, batch):
    m = lm.LanguageModel.load(model_dirs["gpt_neox"])
    whole = m.forward_batch(batch.token_ids, ["resid_post.0"])
    run = m.run(batch, ["blocks.0.hook_resid_post"], batch_size=2)
    np.testing.assert_allclose(run.acts["resid_post.0"], whole.acts["resid_post.0"], atol=1e-6)
    d = m.describe()
    assert d["n_layers"] == N_LAYERS and d["model_type"] == "gpt_neox" and not d["is_encoder"]
    assert d["tokenizer"]["vocab_size"] == 300
    assert lm.LanguageModel.load(model_dirs["bert"]).is_encoder


# -- random-init copies and tiny pairs ------------------------------------------------------------


def test_random_init_copy(model_dirs, batch, tmp_path):
    src = lm.LanguageModel.load(model_dirs["llama"])
    a = lm.random_init_copy(src, seed=5, out_dir=str(tmp_path / "rand"))
    b = lm.random_init_copy(model_dirs["llama"], seed=5)
    c = lm.random_init_copy(src, seed=6)
    sa, ss = a.model.state_dict(), src.model.state_dict()
    assert sa.keys() == ss.keys()
    assert all(sa[k].shape == ss[k].shape for k in sa)
    w = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(sa[w], b.model.state_dict()[w])
    assert not torch.equal(sa[w], c.model.state_dict()[w])
    assert not torch.equal(sa[w], ss[w])
    # the architecture's own initialiser: std matches the config's initializer_range
    init_range = src.config.initializer_range
    assert abs(float(sa[w].std()) - init_range) < 0.3 * init_range
    reloaded = lm.LanguageModel.load(str(tmp_path / "rand"))
    x = reloaded.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    y = a.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    np.testing.assert_array_equal(x, y)
    text.check_same_tokenizer(reloaded.tokenizer, src.tokenizer)


def test_tiny_model_pair(tmp_path, batch):
    pair = lm_tiny.make_tiny_model_pair(
        str(tmp_path / "pair"), arch="gpt_neox", vocab_size=300, train_steps=30, n_layers=2
    )
    a, b = lm.LanguageModel.load(pair.path_a), lm.LanguageModel.load(pair.path_b)
    text.check_same_tokenizer(a.tokenizer, b.tokenizer, names=("A", "B"))
    xa = a.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    xb = b.forward_batch(batch.token_ids, ["resid_post.1"]).acts["resid_post.1"]
    assert xa.shape == xb.shape and not np.allclose(xa, xb)
    again = lm_tiny.make_tiny_model_pair(
        str(tmp_path / "pair"), arch="gpt_neox", vocab_size=300, train_steps=30, n_layers=2
    )
    assert again == pair  # reused, not rebuilt


def test_tiny_training_lowers_the_loss(tok, batch):
    model = lm_tiny.build_tiny_model("gpt2", tok, seed=0, n_layers=1)
    ids = text.make_contexts(text.sample_documents(10), tok, 16).token_ids
    losses = lm_tiny.train_tiny_model(model, ids, steps=40, seed=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    # the starting loss is about log(vocab): an untrained model predicts near uniformly
    assert abs(losses[0] - np.log(300)) < 1.0


def test_mismatched_tokenizers_between_models_refused(tmp_path):
    tok_a = text.build_word_tokenizer(vocab_size=300)
    tok_b = text.build_word_tokenizer(vocab_size=350)
    with pytest.raises(text.TokenizerMismatchError, match="vocabulary"):
        text.check_same_tokenizer(tok_a, tok_b)


def test_loading_a_base_model_checkpoint(model_dirs, tmp_path, batch):
    # A checkpoint saved as a base model (no head) loads the same way.
    base = AutoModel.from_pretrained(model_dirs["gpt2"])
    base.save_pretrained(str(tmp_path / "base"))
    m = lm.LanguageModel.load(str(tmp_path / "base"), tokenizer=model_dirs["gpt2"])
    ref = lm.LanguageModel.load(model_dirs["gpt2"])
    np.testing.assert_array_equal(
        m.forward_batch(batch.token_ids, ["mlp_out.2"]).acts["mlp_out.2"],
        ref.forward_batch(batch.token_ids, ["mlp_out.2"]).acts["mlp_out.2"],
    )
    assert m.tokenizer is not None

"""Two activation caches of models with different tokenizers, paired through the alignment."""

import os
import types

import numpy as np
import pytest

from engine import checks
from models import activation_cache, lm, text, tiny_tokenizers
from models import alignment as al


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    paths = [
        tiny_tokenizers.make_tiny_model(str(root / "m_bpe"), "bpe", seed=0, vocab_size=300),
        tiny_tokenizers.make_tiny_model(
            str(root / "m_wp"), "wordpiece", arch="bert", seed=1, vocab_size=300
        ),
    ]
    docs = text.sample_documents(2)
    caches = []
    for i, p in enumerate(paths):
        with lm.quiet_transformers():
            model = lm.LanguageModel.load(p, device="cpu")
        ctx = text.make_contexts(docs, model.tokenizer, 32)
        cache = activation_cache.harvest(
            model,
            ctx,
            ["resid_post.0"],
            str(root / f"c{i}"),
            text_info={"special_tokens": "auto", "pad_tail": False},
            progress=False,
        )
        al.save_token_spans(cache.path, al.corpus_tokens(docs, model.tokenizer, ctx), docs)
        caches.append((model, cache, ctx))
    return root, docs, caches


def _flags(**kw):
    base = {
        "alignment": "auto",
        "alignment_pooling": "last",
        "alignment_dir": None,
        "text": "sample",
        "context_length": 32,
        "max_contexts": None,
    }
    base.update(kw)
    return types.SimpleNamespace(**base)


class _Run:
    def __init__(self, root):
        self.root = str(root)

    def path(self, *parts):
        return os.path.join(self.root, *parts)


@pytest.mark.parametrize("unit,pooling", [("shared_boundaries", "last"), ("words", "max")])
def test_caches_pair_through_the_alignment(harvested, tmp_path, unit, pooling, monkeypatch):
    from experiments.pipeline import aligned

    _root, docs, caches = harvested
    (ma, ca, _xa), (mb, cb, _xb) = caches
    # the pipeline reads --text; here the two chapters harvested above
    monkeypatch.setattr(text, "read_documents", lambda *a, **k: iter(docs))
    view = aligned.prepare(
        _Run(tmp_path),
        _flags(alignment=unit, alignment_pooling=pooling),
        ma,
        mb,
        cache_paths=(ca.path, cb.path),
    )
    assert view.alignment.unit == unit and len(view.alignment) > 50
    np.testing.assert_array_equal(view.contexts_b.token_ids, cb.token_ids())
    # pooled rows from in-memory own-token rows == rows read from the caches' memmaps
    _ids_a, acts_a = ca.read("resid_post.0")
    _ids_b, acts_b = cb.read("resid_post.0")
    src = al.AlignedSource(
        view.alignment,
        al.cache_gather(ca, "resid_post.0"),
        al.cache_gather(cb, "resid_post.0"),
        (ma.d_model, mb.d_model),
        block_rows=40,
    )
    rows = [np.concatenate(x) for x in zip(*src.open_at(0))]
    np.testing.assert_allclose(rows[1], view.pool("a", acts_a), rtol=1e-6)
    np.testing.assert_allclose(rows[2], view.pool("b", acts_b), rtol=1e-6)
    # the stored token spans point each closing row at the unit's end on both sides
    sa = np.load(os.path.join(ca.path, al.SPANS_FILE)).reshape(-1, 3)
    sb = np.load(os.path.join(cb.path, al.SPANS_FILE)).reshape(-1, 3)
    last_a, last_b = view.alignment.last_rows("a"), view.alignment.last_rows("b")
    assert (sa[last_a, 0] == view.alignment.units[:, 0]).all()
    assert (sb[last_b, 0] == view.alignment.units[:, 0]).all()
    if unit == "shared_boundaries":
        assert (sa[last_a, 2] == view.alignment.units[:, 2]).all()
        assert (sb[last_b, 2] == view.alignment.units[:, 2]).all()
    # BERT's [CLS]/[SEP] positions are never used
    special_b = np.isin(cb.token_ids(), text.special_token_ids(mb.tokenizer)).reshape(-1)
    assert not special_b[view.alignment.rows_b].any()
    # stored once, reused by a second call
    again = aligned.prepare(
        _Run(tmp_path),
        _flags(alignment=unit, alignment_pooling=pooling),
        ma,
        mb,
        cache_paths=(ca.path, cb.path),
    )
    np.testing.assert_array_equal(again.alignment.rows_b, view.alignment.rows_b)


def test_cache_of_other_text_is_refused(harvested, tmp_path, monkeypatch):
    from experiments.pipeline import aligned

    _root, docs, caches = harvested
    (ma, ca, _), (mb, cb, _) = caches
    monkeypatch.setattr(text, "read_documents", lambda *a, **k: iter(docs[::-1]))
    with pytest.raises(checks.InputError, match="cache_a"):
        aligned.prepare(_Run(tmp_path), _flags(), ma, mb, cache_paths=(ca.path, cb.path))


def test_own_token_stats_match_a_direct_encode(mesh):
    """Per-own-token density / mean (streamed, sharded, ragged last chunk) vs one encode."""
    import jax

    from experiments.pipeline import aligned
    from models import sae as sae_lib

    sae = sae_lib.init(
        jax.random.PRNGKey(0), sae_lib.SAEConfig(d_in=6, d_sae=10, activation="relu")
    )
    x = np.random.default_rng(0).normal(size=(301, 6)).astype(np.float32)
    st = aligned.own_token_stats(sae, x, mesh, chunk_size=64)
    z = np.asarray(sae.encode(x), np.float64)
    np.testing.assert_allclose(st.density, (z > 0).mean(0), atol=1e-6)
    np.testing.assert_allclose(st.mean, z.mean(0), rtol=1e-4, atol=1e-6)

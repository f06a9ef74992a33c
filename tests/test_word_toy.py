"""Known-truth word-level activations (models/word_toy.py) seen through two tokenizers."""

import numpy as np
import pytest

from models import alignment as al
from models import text, tiny_tokenizers, word_toy


@pytest.fixture(scope="module")
def setup():
    docs = text.sample_documents(2)
    out = {}
    for k in ("bpe", "wordpiece", "unigram"):
        tok = tiny_tokenizers.build_tokenizer(k, 300, docs)
        ctx = text.make_contexts(docs, tok, 32, pad_tail=True)
        out[k] = (tok, ctx, al.corpus_tokens(docs, tok, ctx))
    codes = word_toy.word_codes(docs, 16, 2, 0)
    return docs, out, codes


@pytest.mark.parametrize("kb", ["wordpiece", "unigram"])
@pytest.mark.parametrize("unit", ["shared_boundaries", "words"])
def test_noise_free_sides_agree_exactly_on_aligned_units(setup, kb, unit):
    """At a unit's closing token both sides carry the same word code (same text read), so
    undoing each side's orthogonal map gives identical rows: an independent check that units
    pair the same text and that causal scaling depends on characters, not tokens."""
    docs, sides, codes = setup
    d = 12
    dic = word_toy.unit_rows(16, d, 1)
    maps = {"a": word_toy.orthogonal(d, 2), "b": word_toy.orthogonal(d, 3)}
    acts = {}
    for s, k in (("a", "bpe"), ("b", kb)):
        _tok, ctx, corpus = sides[k]
        acts[s] = word_toy.side_activations(
            docs, corpus, ctx, codes, dic @ maps[s], noise=0.0, seed=0, jitter_seed=5
        )
    align = al.align_corpus(docs, sides["bpe"][2], sides[kb][2], unit=unit, pooling="last")
    view_rows = {}
    for s, k in (("a", "bpe"), ("b", kb)):
        gather = al.grid_gather(acts[s], sides[k][1].mask)
        ptr, rows = (align.ptr_a, align.rows_a) if s == "a" else (align.ptr_b, align.rows_b)
        view_rows[s] = al.pool(gather, ptr, rows, "last").astype(np.float64) @ maps[s].T
    np.testing.assert_allclose(view_rows["a"], view_rows["b"], atol=1e-5)
    assert np.abs(view_rows["a"]).sum(1).min() > 0 or unit == "shared_boundaries"


def test_token_codes_scale_with_the_share_of_the_word_read(setup):
    _docs, sides, codes = setup
    s = "In the beginning God created"
    tok = sides["wordpiece"][0]
    dt = al.token_spans(tok, s)
    tc = word_toy.token_codes(s, dt, codes, causal=True)
    for i in range(len(dt)):
        word = next(m for m in al.WORD_PATTERN.finditer(s) if m.start() <= dt.starts[i] < m.end())
        share = (dt.ends[i] - word.start()) / (word.end() - word.start())
        np.testing.assert_allclose(tc[i], share * codes.code(word.group()))
    full = word_toy.token_codes(s, dt, codes, causal=False)
    assert np.allclose(full[dt.ends == len(s)], tc[dt.ends == len(s)])


def test_random_token_embeddings_depend_only_on_the_token(setup):
    _docs, sides, _codes = setup
    tok, ctx, _ = sides["bpe"]
    x = word_toy.random_token_embeddings(ctx, len(tok.get_vocab()), 8, scale=1.0, noise=0.0, seed=0)
    ids = ctx.token_ids.reshape(-1)[ctx.mask.reshape(-1)]
    first = {}
    for i, t in enumerate(ids):
        first.setdefault(int(t), i)
        np.testing.assert_array_equal(x[i], x[first[int(t)]])

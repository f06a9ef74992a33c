"""Cross-tokenizer alignment (models/alignment.py): spans, units, corpus layout, pooling.

Real tokenizers of three algorithms (byte-level BPE, WordPiece, Unigram) are trained offline on
the shipped sample. Units are checked against brute-force references written independently
of the vectorised implementation (all-pairs scans over tokens and characters), including
hypothesis property tests on random strings with unicode and whitespace runs.
"""

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import checks
from models import alignment as al
from models import text, tiny_tokenizers

KINDS = ("bpe", "wordpiece", "unigram")
PAIRS = [("bpe", "wordpiece"), ("bpe", "unigram"), ("wordpiece", "unigram")]


@pytest.fixture(scope="module")
def toks():
    docs = text.sample_documents(12)
    return {k: tiny_tokenizers.build_tokenizer(k, 300, docs) for k in KINDS}


TRICKY = [
    "Hello  world,\tcafé naïve 東京 😀 in\n\nthe beginning's end.",
    "   leading spaces and trailing   ",
    "a",
    "",
    " \n\t ",
    "x.y,z!!! (quoted) “smart”",
    "AND GOD SAID, Let there be light: and there was light.\n\n\n",
]


# ------------------------------------------------------------------ brute-force references


def ref_closing_offsets(starts, ends):
    """Offsets e where some token ends and every token lies entirely on one side of e."""
    out = set()
    for e in set(ends.tolist()):
        if all(en <= e or s >= e for s, en in zip(starts.tolist(), ends.tolist())):
            out.add(e)
    return out


def real_tokens(d):
    return [i for i in range(len(d)) if d.ends[i] > d.starts[i]]


def check_shared_boundaries(s, a, b):
    du = al.align_document(s, a, b, "shared_boundaries")
    ra, rb = real_tokens(a), real_tokens(b)
    ref = sorted(
        ref_closing_offsets(a.starts[ra], a.ends[ra])
        & ref_closing_offsets(b.starts[rb], b.ends[rb])
    )
    assert du.spans[:, 1].tolist() == ref
    prev = 0
    seen = {"a": [], "b": []}
    for u, (lo, hi) in enumerate(du.spans.tolist()):
        assert lo == prev and hi > lo  # units tile the text up to the last one
        prev = hi
        for side, d, ptr, tok in (("a", a, du.ptr_a, du.tok_a), ("b", b, du.ptr_b, du.tok_b)):
            t = tok[ptr[u] : ptr[u + 1]]
            assert len(t) >= 1
            assert (d.starts[t] >= lo).all() and (d.ends[t] <= hi).all()
            assert d.ends[t[-1]] == hi  # the closing token ends exactly there
            seen[side].extend(t.tolist())
        # the same characters: both sides' tokens cover the same non-space characters of
        # the unit, except characters a tokenizer drops (normaliser), checked as a subset
        cov = []
        for d, ptr, tok in ((a, du.ptr_a, du.tok_a), (b, du.ptr_b, du.tok_b)):
            t = tok[ptr[u] : ptr[u + 1]]
            cov.append({c for i in t for c in range(d.starts[i], d.ends[i]) if not s[c].isspace()})
        assert cov[0] <= set(range(lo, hi)) and cov[1] <= set(range(lo, hi))
    # every real token is used at most once, in order, and all tokens up to the last unit
    for side, d, r in (("a", a, ra), ("b", b, rb)):
        assert seen[side] == sorted(set(seen[side]))
        assert seen[side] == [i for i in r if d.ends[i] <= prev]
    return du


def check_words(s, a, b):
    du = al.align_document(s, a, b, "words")
    expect, toks_ref = [], []
    for m in re.finditer(r"\w+|[^\w\s]+", s):
        ws, we = m.start(), m.end()
        ok, per = True, []
        for d in (a, b):
            inside = []
            for i in real_tokens(d):
                chars = [c for c in range(d.starts[i], d.ends[i]) if not s[c].isspace()]
                if not chars:
                    continue
                hit = [ws <= c < we for c in chars]
                if any(hit) and not all(hit):
                    ok = False
                if all(hit):
                    inside.append(i)
            covered = {c for i in inside for c in range(d.starts[i], d.ends[i])}
            if not inside or not set(range(ws, we)) <= covered:
                ok = False
            per.append(inside)
        if ok:
            expect.append((ws, we))
            toks_ref.append(per)
    assert [tuple(x) for x in du.spans.tolist()] == expect
    for u in range(len(expect)):
        assert du.tok_a[du.ptr_a[u] : du.ptr_a[u + 1]].tolist() == toks_ref[u][0]
        assert du.tok_b[du.ptr_b[u] : du.ptr_b[u + 1]].tolist() == toks_ref[u][1]
    n_words = len(re.findall(r"\w+|[^\w\s]+", s))
    assert len(expect) + sum(du.dropped.values()) == n_words
    return du


# ------------------------------------------------------------------------------- spans


@pytest.mark.parametrize("kind", KINDS)
def test_offsets_point_at_the_tokens_text(toks, kind):
    tok = toks[kind]
    for s in TRICKY + text.sample_documents(2):
        d = al.token_spans(tok, s)
        assert np.array_equal(d.ids, tok(s, add_special_tokens=False)["input_ids"])
        assert (d.starts <= d.ends).all() and (d.ends <= len(s)).all()
        assert (np.diff(d.starts) >= 0).all()


def test_decoding_fallback_matches_offsets_for_byte_level_bpe(toks):
    tok = toks["bpe"]
    for s in TRICKY + text.sample_documents(3):
        d = al.token_spans(tok, s)
        fs, fe = al.decode_spans(tok, s, d.ids)
        np.testing.assert_array_equal(fs, d.starts)
        np.testing.assert_array_equal(fe, d.ends)
    d2 = al.token_spans(tok, TRICKY[0], use_offsets=False)
    np.testing.assert_array_equal(d2.ends, al.token_spans(tok, TRICKY[0]).ends)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_decoding_fallback_refuses_lossy_decoders(toks, kind):
    with pytest.raises(checks.InputError, match="not lossless"):
        al.token_spans(toks[kind], TRICKY[0], use_offsets=False)


# ------------------------------------------------------------------------------- units


@pytest.mark.parametrize("ka,kb", PAIRS)
def test_units_on_tricky_and_sample_text(toks, ka, kb):
    for s in TRICKY + [text.sample_documents(1)[0][:1500]]:
        a, b = al.token_spans(toks[ka], s), al.token_spans(toks[kb], s)
        check_shared_boundaries(s, a, b)
        check_words(s, a, b)


def test_worked_example(toks):
    s = "Hello  world, the beginning's end."
    a, b = al.token_spans(toks["bpe"], s), al.token_spans(toks["wordpiece"], s)
    words = [s[lo:hi] for lo, hi in al.align_document(s, a, b, "words").spans]
    assert "Hello" in words and "world" in words and "end" in words
    # BPE's "'s" crosses the boundary between the words "'" and "s" only if it was learned
    sb = al.align_document(s, a, b, "shared_boundaries")
    assert sb.spans[-1, 1] == len(s)  # both end on the final "."
    assert sb.spans[0, 0] == 0


_ALPHABET = st.sampled_from(
    list("abcdefghij ABC")
    + [" ", "  ", "\t", "\n", "\n\n"]
    + ["   "]
    + list("é東京😀ß∑ﬁ")
    + list(".,'!?-–“”")
    + ["\u0301", "\x00"]
)
_TEXT = st.one_of(
    st.lists(_ALPHABET, max_size=40).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=_TEXT, pair=st.sampled_from(PAIRS))
def test_units_property(toks, s, pair):
    a, b = al.token_spans(toks[pair[0]], s), al.token_spans(toks[pair[1]], s)
    check_shared_boundaries(s, a, b)
    check_words(s, a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=_TEXT)
def test_same_tokenizer_every_token_is_a_unit(toks, s):
    tok = toks["bpe"]
    a = al.token_spans(tok, s)
    du = al.align_document(s, a, a, "tokens")
    assert du.tok_a.tolist() == real_tokens(a) == du.tok_b.tolist()
    # shared boundaries of a tokenization with itself: exactly its closing tokens
    sb = al.align_document(s, a, a, "shared_boundaries")
    assert sb.spans[:, 1].tolist() == sorted(
        ref_closing_offsets(a.starts[real_tokens(a)], a.ends[real_tokens(a)])
    )


def test_tokens_unit_refuses_different_tokenizations(toks):
    s = TRICKY[0]
    with pytest.raises(text.TokenizerMismatchError):
        al.align_document(
            s, al.token_spans(toks["bpe"], s), al.token_spans(toks["wordpiece"], s), "tokens"
        )
    with pytest.raises(checks.InputError, match="unit"):
        al.align_document(
            s, al.token_spans(toks["bpe"], s), al.token_spans(toks["bpe"], s), "sentences"
        )


# ------------------------------------------------------------------------------- corpus


def _corpus(toks, ka, kb, n_docs=4, ctx=24):
    docs = text.sample_documents(n_docs)
    sides = []
    for k in (ka, kb):
        c = text.make_contexts(docs, toks[k], ctx)
        sides.append((c, al.corpus_tokens(docs, toks[k], c)))
    return docs, sides


@pytest.mark.parametrize(
    "unit,pooling",
    [
        ("shared_boundaries", "last"),
        ("words", "last"),
        ("words", "mean"),
        ("shared_boundaries", "max"),
    ],
)
def test_corpus_rows_point_at_the_units_tokens(toks, unit, pooling):
    docs, ((ca, sa), (cb, sb)) = _corpus(toks, "wordpiece", "unigram")
    align = al.align_corpus(docs, sa, sb, unit=unit, pooling=pooling)
    assert len(align) > 100
    spans = {"a": sa.span_grid().reshape(-1, 3), "b": sb.span_grid().reshape(-1, 3)}
    special = {
        "a": np.isin(ca.token_ids, text.special_token_ids(toks["wordpiece"])),
        "b": np.isin(cb.token_ids, text.special_token_ids(toks["unigram"])),
    }
    for d, lo, hi, ra, rb in al.iter_units(align):
        assert docs[d][lo:hi].strip()
        for side, rows in (("a", ra), ("b", rb)):
            sp = spans[side][rows]
            assert (sp[:, 0] == d).all()
            for _, s0, e0 in sp:  # a token's span lies in the unit, up to its whitespace
                assert not docs[d][s0:lo].strip() and not docs[d][hi:e0].strip()
                if unit == "words":  # (shared boundaries may hold whitespace tokens)
                    assert docs[d][max(s0, lo) : min(e0, hi)].strip()
            assert not special[side].reshape(-1)[rows].any()  # specials never align
        if unit == "shared_boundaries":
            assert spans["a"][ra[-1], 2] == hi == spans["b"][rb[-1], 2]
        if pooling != "last":
            assert len(set((ra // 24).tolist())) == 1 and len(set((rb // 24).tolist())) == 1
    rep = align.report
    assert rep["units"] == len(align)
    assert 0.5 < rep["fraction_text_covered"] <= 1.0
    assert sum(rep["dropped_units"].values()) >= 0
    # the short tail of each document is not harvested: some units must be dropped for it
    assert rep["dropped_units"]["not_harvested"] > 0


def test_tokens_unit_over_a_corpus_is_every_text_token(toks):
    docs, ((ca, sa), (_cb, sb)) = _corpus(toks, "bpe", "bpe")
    align = al.align_corpus(docs, sa, sb, unit="tokens")
    flat_ids = ca.token_ids.reshape(-1)
    expect = np.flatnonzero(
        ca.mask.reshape(-1) & ~np.isin(flat_ids, text.special_token_ids(toks["bpe"]))
    )
    np.testing.assert_array_equal(np.sort(align.rows_a), expect)
    np.testing.assert_array_equal(align.rows_a, align.rows_b)
    assert align.report["fraction_positions_used"]["a"] == 1.0


def test_corpus_tokens_refuses_contexts_of_other_text(toks):
    docs = text.sample_documents(3)
    c = text.make_contexts(docs, toks["bpe"], 24)
    with pytest.raises(checks.InputError, match="does not hold"):
        al.corpus_tokens(docs[1:] + docs[:1], toks["bpe"], c)
    with pytest.raises(checks.InputError, match="does not hold"):
        al.corpus_tokens(docs, toks["bpe"], c, special_tokens="bos")


def test_save_load_roundtrip_and_pooling_reference(toks, tmp_path):
    docs, ((ca, sa), (cb, sb)) = _corpus(toks, "bpe", "wordpiece", n_docs=3)
    align = al.align_corpus(docs, sa, sb, unit="words", pooling="mean", text_info="sample")
    align.save(str(tmp_path / "al"))
    assert not any(f.endswith((".pkl", ".npz")) for f in os.listdir(tmp_path / "al"))
    back = al.Alignment.load(str(tmp_path / "al"))
    for f in ("units", "ptr_a", "rows_a", "ptr_b", "rows_b"):
        np.testing.assert_array_equal(getattr(back, f), getattr(align, f))
    assert back.unit == "words" and back.pooling == "mean" and back.report == align.report
    assert back.meta["tokenizer_a"]["vocab_sha256"] != back.meta["tokenizer_b"]["vocab_sha256"]

    rng = np.random.default_rng(0)
    grids = {s: rng.normal(size=(len(c), 24, 5)) for s, c in (("a", ca), ("b", cb))}
    masks = {"a": ca.mask, "b": cb.mask}
    gathers = {
        s: al.grid_gather(grids[s].reshape(-1, 5)[masks[s].reshape(-1)], masks[s]) for s in "ab"
    }
    for pooling in al.POOLINGS:
        src = al.AlignedSource(
            back.with_pooling(pooling), gathers["a"], gathers["b"], (5, 5), block_rows=37
        )
        blocks = list(src.open_at(0))
        ids = np.concatenate([b[0] for b in blocks])
        xa = np.concatenate([b[1] for b in blocks])
        xb = np.concatenate([b[2] for b in blocks])
        np.testing.assert_array_equal(ids, np.arange(len(back)))
        for u, (_d, _lo, _hi, ra, rb) in enumerate(al.iter_units(back)):
            for x, rows, s in ((xa, ra, "a"), (xb, rb, "b")):
                vals = grids[s].reshape(-1, 5)[rows].astype(np.float64)
                ref = {"last": vals[-1], "mean": vals.mean(0), "max": vals.max(0)}[pooling]
                np.testing.assert_allclose(x[u], ref, rtol=1e-5, atol=1e-6)
        # resume mid-way gives the same rows
        tail = np.concatenate([b[1] for b in src.open_at(50)])
        np.testing.assert_allclose(tail, xa[50:])


def test_unit_text_and_context(toks):
    docs, ((_ca, sa), (_cb, sb)) = _corpus(toks, "bpe", "unigram", n_docs=2)
    align = al.align_corpus(docs, sa, sb, unit="words")
    words = al.unit_text(docs, align.units)(np.arange(10))
    assert all(re.fullmatch(r"\w+|[^\w\s]+", w) for w in words)
    ctx = al.unit_context(docs, align.units)(5)
    assert ctx.endswith("[[" + words[5] + "]]")


def test_default_unit(toks):
    assert al.default_unit(toks["bpe"], toks["bpe"]) == "tokens"
    assert al.default_unit(toks["bpe"], toks["unigram"]) == "shared_boundaries"

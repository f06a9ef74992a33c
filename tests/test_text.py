"""Tests for models/text.py: documents, contexts inside documents, tokenizer agreement."""

import gzip
import json
import os
import sys
import types

import numpy as np
import pytest

from engine import checks
from models import text


@pytest.fixture(scope="module")
def tok():
    return text.build_word_tokenizer(vocab_size=400)


# -- documents ---------------------------------------------------------------------------------


def test_sample_is_small_public_domain_english():
    size = os.path.getsize(text.SAMPLE_PATH)
    assert 200_000 < size <= 1_000_000
    docs = text.sample_documents()
    assert len(docs) == 113  # one per chapter: 50 + 4 + 10 + 12 + 16 + 21
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].endswith("could not contain the books that should be written. Amen.")
    assert text.sample_documents(3) == docs[:3]


def test_txt_splits(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one two\nthree\n\n\nfour five\n\nsix\n", encoding="utf-8")
    assert list(text.read_documents(str(p))) == ["one two\nthree\n\n\nfour five\n\nsix\n"]
    assert list(text.read_documents(str(p), txt_split="paragraph")) == [
        "one two\nthree",
        "four five",
        "six",
    ]
    assert list(text.read_documents(str(p), txt_split="line")) == [
        "one two",
        "three",
        "four five",
        "six",
    ]
    with pytest.raises(checks.InputError, match="txt_split"):
        list(text.read_documents(str(p), txt_split="words"))


def test_jsonl_gz_directory_and_limits(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "   "}, {"text": "gamma", "id": 3}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zeta eta")
    (tmp_path / "ignored.csv").write_text("x")
    assert list(text.read_documents(str(tmp_path / "b.jsonl"))) == ["alpha beta", "gamma"]
    assert list(text.read_documents(str(tmp_path))) == ["alpha beta", "gamma", "zeta eta"]
    assert list(text.read_documents(str(tmp_path), max_documents=2)) == ["alpha beta", "gamma"]
    assert (
        list(text.read_documents([str(tmp_path / "c.txt.gz"), "sample"], max_documents=2))[0]
        == "zeta eta"
    )


def test_document_errors(tmp_path):
    with pytest.raises(checks.InputError, match="does not exist"):
        list(text.read_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(checks.InputError, match="unknown extension"):
        list(text.read_documents(str(tmp_path / "x.csv")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(checks.InputError, match=r"bad.jsonl:2: not valid JSON"):
        list(text.read_documents(str(bad)))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(checks.InputError, match="'text' field"):
        list(text.read_documents(str(nofield)))
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 5}\n')
    with pytest.raises(checks.InputError, match="expected a string"):
        list(text.read_documents(str(notstr)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(checks.InputError, match="no .txt/.jsonl"):
        list(text.read_documents(str(empty_dir)))


def test_hf_source_with_and_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(checks.InputError, match="datasets"):
        list(text.read_documents("hf:some/corpus@train"))
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first doc"}, {"text": ""}, {"text": "second doc"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(text.read_documents("hf:org/corpus:en@validation")) == ["first doc", "second doc"]
    assert calls == [("org/corpus", "en", "validation", True)]


# -- contexts ----------------------------------------------------------------------------------


def test_contexts_stay_inside_documents(tok):
    docs = text.sample_documents(6)
    ctx_len = 24
    c = text.make_contexts(docs, tok, ctx_len)
    bos = tok.bos_token_id
    assert c.token_ids.shape[1] == ctx_len and c.mask.all()
    assert (c.token_ids[:, 0] == bos).all()
    # Independent reference: each document's own ids cut into consecutive 23-token pieces.
    expected, expected_doc = [], []
    for d, doc in enumerate(docs):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for lo in range(0, len(ids) - (ctx_len - 1) + 1, ctx_len - 1):
            expected.append([bos] + ids[lo : lo + ctx_len - 1])
            expected_doc.append(d)
    np.testing.assert_array_equal(c.token_ids, np.asarray(expected))
    np.testing.assert_array_equal(c.doc_index, expected_doc)
    assert c.num_tokens == len(expected) * ctx_len


def test_pad_tail_masks_and_specials(tok):
    docs = ["in the beginning god created", "and god said"]
    c = text.make_contexts(docs, tok, 8, pad_tail=True)
    assert len(c) == 2
    np.testing.assert_array_equal(c.mask.sum(axis=1), [6, 4])  # BOS + words
    assert (c.token_ids[~c.mask] == tok.pad_token_id).all()
    none = text.make_contexts(docs, tok, 8, pad_tail=True, special_tokens="none")
    np.testing.assert_array_equal(none.token_ids[0, :5], c.token_ids[0, 1:6])
    cls_tok = text.build_word_tokenizer(vocab_size=400, special_tokens="cls_sep")
    cs = text.make_contexts(["a b c d e f g h i j"], cls_tok, 6, special_tokens="auto")
    assert (cs.token_ids[:, 0] == cls_tok.bos_token_id).all()
    assert (cs.token_ids[:, -1] == cls_tok.eos_token_id).all()
    with pytest.raises(checks.InputError, match="could be made"):
        text.make_contexts(docs, tok, 64)  # both documents shorter than one context
    with pytest.raises(checks.InputError, match="no room"):
        text.make_contexts(docs, cls_tok, 2)


def test_iter_contexts_blocks_limits_and_skip(tok):
    docs = text.sample_documents(4)
    full = text.make_contexts(docs, tok, 16)
    blocks = list(text.iter_contexts(docs, tok, 16, block_contexts=7, docs_per_batch=1))
    assert all(len(b) <= 7 for b in blocks)
    np.testing.assert_array_equal(text.Contexts.concat(blocks).token_ids, full.token_ids)
    limited = text.make_contexts(docs, tok, 16, max_contexts=10)
    np.testing.assert_array_equal(limited.token_ids, full.token_ids[:10])
    skipped = text.Contexts.concat(list(text.skip_contexts(iter(blocks), 12)))
    np.testing.assert_array_equal(skipped.token_ids, full.token_ids[12:])
    opened = text.Contexts.concat(list(text.context_factory(full)(5)))
    np.testing.assert_array_equal(opened.token_ids, full.token_ids[5:])


# -- tokenizer agreement -----------------------------------------------------------------------


def test_same_tokenizer_accepted_and_fingerprint_equal(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "t"))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    text.check_same_tokenizer(tok, again)
    fa, fb = text.tokenizer_fingerprint(tok), text.tokenizer_fingerprint(again)
    assert fa["vocab_sha256"] == fb["vocab_sha256"] and fa["template"] == fb["template"]
    assert fa["template"] == {"prefix": [tok.bos_token_id], "suffix": []}
    assert tok.unk_token_id not in text.special_token_ids(tok)
    assert {0, 2, 3} <= set(text.special_token_ids(tok))


def test_different_tokenizers_refused(tok):
    bigger = text.build_word_tokenizer(vocab_size=500)
    with pytest.raises(text.TokenizerMismatchError, match="vocabulary of 400 tokens"):
        text.check_same_tokenizer(tok, bigger, names=("pythia", "gpt2"))
    cased = text.build_word_tokenizer(vocab_size=400, lowercase=False)
    with pytest.raises(text.TokenizerMismatchError, match="tokenizers differ"):
        text.check_same_tokenizer(tok, cased)
    no_bos = text.build_word_tokenizer(vocab_size=400, special_tokens="none")
    with pytest.raises(text.TokenizerMismatchError, match="add_special_tokens=True"):
        text.check_same_tokenizer(tok, no_bos)
    assert issubclass(text.TokenizerMismatchError, ValueError)

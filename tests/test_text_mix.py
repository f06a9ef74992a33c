"""models/text.py: line-per-record files, corpora interleaved in a ratio, short documents
packed instead of dropped."""

import json

import numpy as np
import pytest

from engine.checks import InputError
from models import text


@pytest.fixture(scope="module")
def tok():
    return text.build_word_tokenizer(vocab_size=400, special_tokens="bos")


def test_interleave_ratio_is_exact_on_every_prefix():
    a = (f"a{i}" for i in range(1000))
    b = (f"b{i}" for i in range(1000))
    out = list(text.interleave_documents([a, b], [3, 1]))
    assert len(out) == 1000 + 333  # stops when A (the 3/4 share) runs out
    for n in (4, 10, 101, 1000):
        n_a = sum(d.startswith("a") for d in out[:n])
        assert abs(n_a - 0.75 * n) <= 1
    # within each corpus the order is kept
    assert [d for d in out if d.startswith("b")][:3] == ["b0", "b1", "b2"]
    assert out == list(
        text.interleave_documents(
            [(f"a{i}" for i in range(1000)), (f"b{i}" for i in range(1000))], [3, 1]
        )
    )
    with pytest.raises(InputError, match="weights"):
        list(text.interleave_documents([["x"], ["y"]], [1, 0]))


def test_read_mixture_of_line_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a1.txt").write_text("one fish\n\ntwo fish\nred fish\n")
    (tmp_path / "a2.txt").write_text("blue fish\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"body": f"record {i}"}) + "\n")
    docs = list(
        text.read_mixture(
            [[str(tmp_path / "a1.txt"), str(tmp_path / "a2.txt")], str(tmp_path / "b.jsonl")],
            [1, 1],
            txt_split="line",
            text_field="body",
        )
    )
    assert docs[:4] == ["one fish", "record 0", "two fish", "record 1"]
    assert docs[4:8] == ["red fish", "record 2", "blue fish", "record 3"]
    with pytest.raises(InputError, match="weights"):
        text.read_mixture(["a", "b"], [1.0])


def test_pack_keeps_every_token_of_short_documents(tok):
    docs = [
        f"the lord said unto {w} and it was good"
        for w in ("moses", "abraham", "ruth", "esther", "mark", "john")
    ] + [" ".join(["and the king said"] * 12)]
    ctx = 16
    dropped = text.make_contexts(docs, tok, ctx)  # short documents vanish
    packed = text.make_contexts(docs, tok, ctx, pack=True)
    body_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert all(len(ids) < ctx - 1 for ids in body_ids[:-1])
    assert len(dropped) == len(body_ids[-1]) // (ctx - 1)
    assert set(dropped.doc_index.tolist()) == {len(docs) - 1}
    eos = tok.eos_token_id
    real = [row[m][1:] for row, m in zip(packed.token_ids, packed.mask)]  # drop BOS
    assert all(row[0] == tok.bos_token_id for row in packed.token_ids)
    flat = [int(t) for r in real for t in r]
    # the long document's full pieces come first, intact; every other token follows
    long_ids = body_ids[-1]
    full = len(long_ids) // (ctx - 1) * (ctx - 1)
    n_full = full // (ctx - 1)
    # order of emission: full pieces of a document are written as they come, packed
    # contexts when they fill up; compare multisets of tokens (no token lost or invented)
    want = [t for ids in body_ids for t in ids] + [eos] * (len(docs) - 1)
    assert sorted(flat) == sorted(want)
    assert packed.num_tokens == len(want) + len(packed)  # + one BOS per context
    # full-length pieces of the long document stay in one document
    long_rows = [
        i
        for i in range(len(packed))
        if packed.doc_index[i] == len(docs) - 1 and packed.mask[i].all()
    ]
    assert len(long_rows) >= n_full
    # only the last packed context is padded
    assert packed.mask[:-1].all() and not packed.mask[-1].all()
    np.testing.assert_array_equal(packed.token_ids[~packed.mask], text.pad_id(tok))

"""Tests for models/activation_cache.py and models/activation_source.py."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from engine import accumulators, checks, streaming
from models import activation_cache as ac
from models import activation_source as asrc
from models import lm, lm_tiny, text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = ["resid_post.0", "mlp_out.1"]


def make_contexts(tokenizer):
    """60 contexts of 16 tokens from 12 short documents: padded tails in most documents."""
    return text.make_contexts(
        [d[:400] for d in text.sample_documents(12)], tokenizer, 16, pad_tail=True, max_contexts=60
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return lm_tiny.make_tiny_model_pair(
        str(root), arch="llama", vocab_size=300, n_layers=2, d_model=16
    )


@pytest.fixture(scope="module")
def model_a(pair):
    return lm.LanguageModel.load(pair.path_a)


@pytest.fixture(scope="module")
def contexts(model_a):
    # pad_tail: some contexts end in padding, so masks and ragged rows are exercised
    return make_contexts(model_a.tokenizer)


@pytest.fixture(scope="module")
def reference(model_a, contexts):
    """The model's activations from a plain in-memory run (float32)."""
    return model_a.run(contexts, HOOKS, batch_size=60)


@pytest.fixture(scope="module")
def cache32(model_a, contexts, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("c32") / "cache")
    return ac.harvest(
        model_a,
        contexts,
        HOOKS,
        path,
        batch_size=7,
        shard_contexts=25,
        progress=False,
        text_info={"source": "sample[:4]"},
    )


def _rows(ref, contexts, hook, exclude_special=False, special_ids=()):
    sel = contexts.mask.copy()
    if exclude_special:
        sel &= ~np.isin(contexts.token_ids, special_ids)
    return contexts.token_ids[sel], ref.acts[hook][sel]


# -- writing and reading back ------------------------------------------------------------------


def test_roundtrip_float32_and_metadata(cache32, contexts, reference, model_a):
    assert not contexts.mask.all() and len(np.unique(contexts.doc_index)) > 5
    assert [s["contexts"] for s in cache32.shards] == [25, 25, 10]
    assert cache32.num_tokens == contexts.num_tokens
    np.testing.assert_array_equal(cache32.token_ids(), contexts.token_ids)
    np.testing.assert_array_equal(cache32.mask(), contexts.mask)
    for hook in HOOKS:
        tok, acts = cache32.read(hook)
        want_tok, want = _rows(reference, contexts, hook)
        np.testing.assert_array_equal(tok, want_tok)
        np.testing.assert_allclose(acts, want, rtol=1e-6, atol=1e-6)
    meta = json.load(open(os.path.join(cache32.path, "metadata.json")))
    assert meta["complete"] and meta["token_count"] == contexts.num_tokens
    assert meta["model"]["name"] == model_a.name and meta["model"]["n_layers"] == 2
    assert meta["hookpoints"] == HOOKS and meta["context_length"] == 16
    assert meta["dtype"] == "float32" and meta["text"] == {"source": "sample[:4]"}
    assert meta["tokenizer"]["vocab_size"] == 300
    assert meta["hookpoint_aliases"]["resid_post.0"] == {
        "saelens": "blocks.0.hook_resid_post",
        "sparsify": "layers.0",
    }
    assert meta["special_ids"] == text.special_token_ids(model_a.tokenizer)
    assert sorted(os.listdir(cache32.path)) == sorted(
        ["metadata.json", "progress.json", "tokens", "mask"] + HOOKS
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage_is_exact_rounding(dtype, model_a, contexts, reference, tmp_path):
    cache = ac.harvest(
        model_a,
        contexts[:30],
        HOOKS,
        str(tmp_path / dtype),
        dtype=dtype,
        shard_contexts=16,
        progress=False,
    )
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    sel = contexts.mask[:30]
    want = reference.acts["mlp_out.1"][:30][sel].astype(np_dtype)
    native = cache.read("mlp_out.1", out_dtype="native")[1]
    assert native.dtype == np_dtype
    np.testing.assert_array_equal(native.view(np.uint16), want.view(np.uint16))
    as32 = cache.read("mlp_out.1")[1]
    assert as32.dtype == np.float32
    np.testing.assert_array_equal(as32, want.astype(np.float32))
    raw = np.load(os.path.join(cache.path, "mlp_out.1", "00000.npy"))
    assert raw.dtype == (np.float16 if dtype == "float16" else np.uint16)
    assert raw.nbytes == 16 * 16 * 16 * 2
    # blocks that span shards, padded (selected) rows and special tokens left out: the
    # float32 reader (bfloat16: widened straight from the file) equals the stored rows cast
    for excl, contiguous in ((False, False), (True, False), (False, True)):
        stored = cache.source(HOOKS, exclude_special=excl, out_dtype="native", block_rows=11)
        as32 = cache.source(HOOKS, exclude_special=excl, block_rows=11)
        if contiguous:  # the path of shards without padding: rows read as slices of the file
            stored._full = as32._full = [True] * len(cache.shards)
        assert as32.num_rows == stored.num_rows
        for lo, hi in ((0, stored.num_rows), (5, 40), (stored.num_rows - 3, stored.num_rows)):
            want_rows, got_rows = stored.read_rows(lo, hi), as32.read_rows(lo, hi)
            np.testing.assert_array_equal(got_rows[0], want_rows[0])
            for w, g in zip(want_rows[1:], got_rows[1:]):
                assert w.dtype == np_dtype and g.dtype == np.float32 and g.flags.owndata
                np.testing.assert_array_equal(g, w.astype(np.float32))
        blocks = [b[1] for b in as32.open_at(0)]
        assert [len(b) for b in blocks[:-1]] == [11] * (len(blocks) - 1)
        np.testing.assert_array_equal(
            np.concatenate(blocks), stored.read_rows(0, stored.num_rows)[1].astype(np.float32)
        )


def test_bfloat16_widening_every_bit_pattern():
    """The shift-based bfloat16 -> float32 widening equals ml_dtypes' cast on all 65,536 bit
    patterns (bitwise, NaN payloads and -0 included), across chunk boundaries and into a
    caller's buffer; float16 output and bad buffers too."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 127  # exponent all ones, mantissa nonzero, both signs
    # tiled 3.5 times (not a multiple of the widening step) and shaped like a block of rows
    tiled = np.concatenate([bits] * 3 + [bits[: 1 << 15]]).reshape(-1, 64)
    got = ac.bf16_bits_to_float32(tiled).reshape(-1)
    want_t = np.concatenate([want] * 3 + [want[: 1 << 15]])
    assert np.isnan(got[np.isnan(want_t)]).all()
    np.testing.assert_array_equal(got.view(np.uint32), want_t.view(np.uint32))
    out = np.full((1 << 16,), 7.0, np.float32)
    assert ac.bf16_bits_to_float32(bits.view(ml_dtypes.bfloat16), out=out) is out
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    # through the reader's conversion: float32 and float16 outputs
    np.testing.assert_array_equal(
        ac._to_out(bits, "bfloat16", "float32").view(np.uint32), want.view(np.uint32)
    )
    f16 = ac._to_out(bits, "bfloat16", "float16")
    want16 = want.astype(np.float16)
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(np.isnan(f16), np.isnan(want16))
    np.testing.assert_array_equal(f16[~nan], want16[~nan])
    with pytest.raises(checks.InputError, match="2-byte"):
        ac.bf16_bits_to_float32(np.zeros(4, np.float32))
    with pytest.raises(checks.InputError, match="out"):
        ac.bf16_bits_to_float32(bits, out=np.zeros(4, np.float32))


def test_kill_and_resume_gives_identical_cache(pair, cache32, tmp_path):
    """SIGKILL in the middle of shard 2, resume, compare with the uninterrupted cache."""
    path = str(tmp_path / "killed")
    script = textwrap.dedent(f"""
        import os, signal
        from models import activation_cache as ac, lm, text
        m = lm.LanguageModel.load({pair.path_a!r})
        ctx = text.make_contexts([d[:400] for d in text.sample_documents(12)], m.tokenizer,
                                 16, pad_tail=True, max_contexts=60)
        def on_batch(contexts_done, tokens_done):
            if contexts_done >= 35:   # shard 1 holds contexts 25..49: die half way through
                os.kill(os.getpid(), signal.SIGKILL)
        ac.harvest(m, ctx, {HOOKS!r}, {path!r}, batch_size=7, shard_contexts=25,
                   progress=False, text_info={{"source": "sample[:4]"}}, on_batch=on_batch)
    """)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    progress = json.load(open(os.path.join(path, "progress.json")))
    assert len(progress["shards"]) == 1  # shard 0 committed, shard 1 half written
    assert any(f.endswith(".tmp") for f in os.listdir(os.path.join(path, "resid_post.0")))
    with pytest.raises(checks.InputError, match="unfinished"):
        ac.ActivationCache(path)
    partial = ac.ActivationCache(path, allow_partial=True)
    assert partial.num_contexts == 25
    # Resume in this process (same settings) and compare every file with the reference.
    m = lm.LanguageModel.load(pair.path_a)
    ctx = make_contexts(m.tokenizer)
    resumed = ac.harvest(
        m,
        ctx,
        HOOKS,
        path,
        batch_size=7,
        shard_contexts=25,
        progress=False,
        text_info={"source": "sample[:4]"},
    )
    assert resumed.shards == cache32.shards
    for kind in ["tokens", "mask"] + HOOKS:
        for i in range(3):
            np.testing.assert_array_equal(resumed.memmap(kind, i), cache32.memmap(kind, i))
        assert not any(f.endswith(".tmp") for f in os.listdir(os.path.join(path, kind)))
    # A finished cache is returned as is by another harvest call with the same settings.
    again = ac.harvest(
        m,
        ctx,
        HOOKS,
        path,
        batch_size=7,
        shard_contexts=25,
        progress=False,
        text_info={"source": "sample[:4]"},
    )
    assert again.shards == cache32.shards


def test_resume_refuses_other_settings_or_other_text(model_a, contexts, tmp_path):
    path = str(tmp_path / "c")
    calls = []

    def stop_after_first_shard(done, _):
        calls.append(done)
        if done >= 10:
            raise KeyboardInterrupt  # an interrupted run leaves a partial cache

    with pytest.raises(KeyboardInterrupt):
        ac.harvest(
            model_a,
            contexts,
            ["resid_post.0"],
            path,
            batch_size=5,
            shard_contexts=5,
            progress=False,
            on_batch=stop_after_first_shard,
        )
    with pytest.raises(checks.InputError, match="dtype: cache has 'float32'"):
        ac.harvest(
            model_a,
            contexts,
            ["resid_post.0"],
            path,
            dtype="float16",
            batch_size=5,
            shard_contexts=5,
            progress=False,
        )
    with pytest.raises(checks.InputError, match="hookpoints"):
        ac.harvest(
            model_a,
            contexts,
            ["resid_post.1"],
            path,
            batch_size=5,
            shard_contexts=5,
            progress=False,
        )
    other = text.make_contexts(text.sample_documents(6)[3:], model_a.tokenizer, 16)
    with pytest.raises(checks.InputError, match="other tokens"):
        ac.harvest(
            model_a, other, ["resid_post.0"], path, batch_size=5, shard_contexts=5, progress=False
        )
    done = ac.harvest(
        model_a, contexts, ["resid_post.0"], path, batch_size=5, shard_contexts=5, progress=False
    )
    assert done.num_contexts == len(contexts)


def test_damaged_or_foreign_directories_refused(cache32, tmp_path):
    import shutil

    with pytest.raises(checks.InputError, match="no metadata.json"):
        ac.ActivationCache(str(tmp_path))
    copy = str(tmp_path / "copy")
    shutil.copytree(cache32.path, copy)
    f = os.path.join(copy, "mlp_out.1", "00001.npy")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(checks.InputError, match="00001.npy is truncated"):
        ac.ActivationCache(copy)
    os.remove(f)
    with pytest.raises(checks.InputError, match="00001.npy is missing"):
        ac.ActivationCache(copy)
    meta_path = os.path.join(copy, "metadata.json")
    meta = json.load(open(meta_path))
    meta["format"] = "something-else"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checks.InputError, match="format"):
        ac.ActivationCache(copy)
    with pytest.raises(checks.InputError, match="not in the cache"):
        cache32.source("resid_post.1")
    with pytest.raises(checks.InputError, match="out_dtype"):
        cache32.source("resid_post.0", out_dtype="int8")


# -- sources -----------------------------------------------------------------------------------


def test_source_positions_aliases_and_special_filter(cache32, contexts, reference, model_a):
    src = cache32.source(["blocks.0.hook_resid_post", "mlp_out.1"], block_rows=37)
    assert isinstance(src, asrc.ActivationSource)
    assert src.hookpoints == ("resid_post.0", "mlp_out.1") and src.widths == (16, 16)
    tok, a0 = _rows(reference, contexts, "resid_post.0")
    _, a1 = _rows(reference, contexts, "mlp_out.1")
    assert src.num_rows == tok.shape[0]
    for start in [0, 1, 399, 400, 401, src.num_rows - 3]:  # 400 = end of shard 0 (25 x 16)
        got = [np.concatenate(x) for x in zip(*src.open_at(start))]
        np.testing.assert_array_equal(got[0], tok[start:])
        np.testing.assert_allclose(got[1], a0[start:], atol=1e-6)
        np.testing.assert_allclose(got[2], a1[start:], atol=1e-6)
    assert list(src.open_at(src.num_rows)) == []
    ids = text.special_token_ids(model_a.tokenizer)
    st, sa = _rows(reference, contexts, "resid_post.0", exclude_special=True, special_ids=ids)
    ns = cache32.source("resid_post.0", exclude_special=True)
    assert ns.num_rows == st.shape[0] < tok.shape[0]
    got_t, got_a = cache32.read("resid_post.0", exclude_special=True)
    np.testing.assert_array_equal(got_t, st)
    np.testing.assert_allclose(got_a, sa, atol=1e-6)
    assert not np.isin(got_t, ids).any()


def test_chunkstream_resume(cache32):
    src = cache32.source("resid_post.0", block_rows=50)
    full = list(asrc.stream(src, 64))
    assert sum(c.num_valid for c in full) == src.num_rows
    assert full[-1].num_valid < 64 and not full[-1].mask.all()
    s = asrc.stream(src, 64)
    for _ in range(5):
        next(s)
    pos = s.position
    resumed = asrc.stream(src, 64, start=pos)
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        np.testing.assert_array_equal(a.arrays[1], b.arrays[1])
        np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("n", [1024, 1000])  # whole blocks only / a short last block
def test_shuffle_is_a_resumable_bounded_permutation(n):
    tok = np.arange(n) % 97
    ident = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.float32)  # col 0 = row index
    base = asrc.ArraySource(tok, ident, ["x"])
    src = asrc.ShuffledSource(base, seed=3, buffer_rows=64, block_rows=32)
    rows = [np.concatenate(x) for x in zip(*src.open_at(0))]
    where = rows[1][:, 0].astype(int)
    assert sorted(where) == list(range(n))  # a permutation of all rows
    assert not np.array_equal(where, np.arange(n))
    np.testing.assert_array_equal(rows[0], tok[where])  # tokens travel with their rows
    # Bounded buffer: each window of 64 shuffled rows comes from 2 blocks of 32 rows (with
    # n = 1000 the window holding the short block is shorter, so only check n = 1024).
    for lo in range(0, n - 64 if n == 1024 else 0, 64):
        assert np.unique(where[lo : lo + 64] // 32).shape[0] == 2
    # ... yet rows travel far: blocks are drawn from the whole source.
    assert np.abs(np.diff(where[: 64 * 8 : 64])).max() > 200
    again = [np.concatenate(x) for x in zip(*src.open_at(0))]
    np.testing.assert_array_equal(again[1], rows[1])  # deterministic
    for start in [1, 63, 64, 200, n - 1]:
        tail = [np.concatenate(x) for x in zip(*src.open_at(start))]
        np.testing.assert_array_equal(tail[1], rows[1][start:])
    assert list(src.open_at(n)) == []
    other = asrc.ShuffledSource(base, seed=4, buffer_rows=64, block_rows=32)
    assert not np.array_equal(np.concatenate([b[1] for b in other.open_at(0)]), rows[1])


def test_shuffled_cache_rows_are_the_cache_rows(cache32):
    tok, acts = cache32.read("resid_post.0")
    src = cache32.source("resid_post.0", shuffle_seed=3, shuffle_buffer=64, shuffle_block=32)
    s_tok, s_acts = [np.concatenate(x) for x in zip(*src.open_at(0))]
    both = np.concatenate([tok[:, None].astype(np.float32), acts], 1)
    s_both = np.concatenate([s_tok[:, None].astype(np.float32), s_acts], 1)
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(s_both, axis=0))
    assert s_both.shape == both.shape and not np.array_equal(s_both, both)
    tail = [np.concatenate(x) for x in zip(*src.open_at(101))]
    np.testing.assert_array_equal(tail[1], s_acts[101:])


def test_repeat_epochs_for_training(cache32):
    n = cache32.source("resid_post.0").num_rows
    src = cache32.source(
        "resid_post.0", shuffle_seed=0, repeat=True, shuffle_buffer=128, shuffle_block=64
    )
    assert src.num_rows is None
    stream = asrc.stream(src, 50)
    got = np.concatenate([next(stream).arrays[1] for _ in range(-(-2 * n // 50) + 1)])
    e0, e1 = got[:n], got[n : 2 * n]
    assert sorted(e0[:, 0].tolist()) == sorted(e1[:, 0].tolist())  # both full epochs
    assert not np.array_equal(e0, e1)  # a new order each epoch
    tail = next(iter(src.open_at(n + 10)))
    np.testing.assert_array_equal(tail[1][:5], e1[10:15])
    plain = cache32.source("resid_post.0", repeat=True, block_rows=100)
    first = [b[1] for _, b in zip(range(-(-n // 100) + 2), plain.open_at(0))]
    np.testing.assert_array_equal(np.concatenate(first)[n : n + 5], np.concatenate(first)[:5])


def test_paired_caches_of_two_models(pair, contexts, reference, cache32, tmp_path):
    m_b = lm.LanguageModel.load(pair.path_b)
    cache_b = ac.harvest(
        m_b, contexts, ["resid_post.1"], str(tmp_path / "b"), shard_contexts=40, progress=False
    )  # other shard size: still aligned
    zipped = ac.paired_source(cache32, "resid_post.0", cache_b, "resid_post.1", block_rows=90)
    tok, xa, xb = [np.concatenate(x) for x in zip(*zipped.open_at(0))]
    want_tok, want_a = _rows(reference, contexts, "resid_post.0")
    ref_b = m_b.run(contexts, ["resid_post.1"])
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(xa, want_a, atol=1e-6)
    np.testing.assert_allclose(xb, ref_b.acts["resid_post.1"][contexts.mask], atol=1e-6)
    sh = ac.paired_source(
        cache32,
        "resid_post.0",
        cache_b,
        "resid_post.1",
        shuffle_seed=1,
        shuffle_buffer=64,
        shuffle_block=32,
    )
    s_tok, s_a, s_b = [np.concatenate(x) for x in zip(*sh.open_at(0))]
    order = {(float(r[0]), float(r[1])): i for i, r in enumerate(xa)}
    idx = np.asarray([order[(float(r[0]), float(r[1]))] for r in s_a])
    np.testing.assert_array_equal(s_b, xb[idx])  # pairs stay paired under shuffling
    # Different text: refused.
    other = text.make_contexts(
        [d[:400] for d in text.sample_documents(24)[12:]],
        m_b.tokenizer,
        16,
        max_contexts=len(contexts),
        pad_tail=True,
    )
    cache_c = ac.harvest(m_b, other, ["resid_post.1"], str(tmp_path / "c"), progress=False)
    with pytest.raises(checks.InputError, match="different"):
        ac.paired_source(cache32, "resid_post.0", cache_c, "resid_post.1")
    # Different tokenizer: refused.
    tok_d = text.build_word_tokenizer(vocab_size=250)
    model_d = lm_tiny.build_tiny_model("llama", tok_d, seed=0, n_layers=1, d_model=16)
    lm_d = lm.LanguageModel(model_d, tok_d, name="d")
    ctx_d = text.make_contexts(text.sample_documents(4), tok_d, 16, max_contexts=10)
    cache_d = ac.harvest(lm_d, ctx_d, ["resid_post.0"], str(tmp_path / "d"), progress=False)
    with pytest.raises(text.TokenizerMismatchError, match="different tokenizers"):
        ac.paired_source(cache32, "resid_post.0", cache_d, "resid_post.0")


def test_live_and_array_sources_match_the_cache(model_a, contexts, cache32):
    live = asrc.LMSource(model_a, contexts, HOOKS, batch_size=9)
    cached = cache32.source(HOOKS)
    assert live.num_rows == cached.num_rows
    for start in [0, 17, 500]:
        a = [np.concatenate(x) for x in zip(*live.open_at(start))]
        b = [np.concatenate(x) for x in zip(*cached.open_at(start))]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-6)
    tok, acts = cache32.read("resid_post.0")
    arr = asrc.ArraySource(tok, acts, ["resid_post.0"], block_rows=100)
    z = asrc.ZipSource([arr, cache32.source("resid_post.0")])
    t, x, y = [np.concatenate(v) for v in zip(*z.open_at(3))]
    np.testing.assert_array_equal(x, y)
    bad = asrc.ArraySource(tok[::-1].copy(), acts, ["resid_post.0"])
    with pytest.raises(checks.InputError, match="token ids differ"):
        list(asrc.ZipSource([bad, arr]).open_at(0))
    with pytest.raises(checks.InputError, match="rows"):
        asrc.ZipSource([arr, asrc.ArraySource(tok[:5], acts[:5])])
    with pytest.raises(checks.InputError, match="non-finite"):
        asrc.ArraySource(tok, np.full_like(acts, np.nan))


class _ActsOnly:
    """Feeds (acts_a, acts_b) of (tokens, acts_a, acts_b) chunks to an accumulator."""

    def __init__(self, acc):
        self.acc = acc

    def init(self):
        return self.acc.init()

    def update(self, state, arrays, weights):
        return self.acc.update(state, arrays[1:], weights)

    def merge(self, a, b):
        return self.acc.merge(a, b)

    def merge_across(self, state, axis_name):
        return self.acc.merge_across(state, axis_name)

    def finalize(self, state):
        return self.acc.finalize(state)


def test_cache_stream_feeds_engine_accumulators(mesh, cache32):
    """The paired stream drives a sharded engine accumulator; compare with float64 numpy."""
    src = cache32.source(HOOKS, block_rows=100)
    stream = streaming.ChunkStream(src.open_at, 128, name="cache")
    acc = _ActsOnly(accumulators.CrossMoments(16, 16))
    state = accumulators.accumulate(acc, stream, mesh)
    mom = acc.finalize(state)
    _, x = cache32.read("resid_post.0")
    _, y = cache32.read("mlp_out.1")
    x, y = x.astype(np.float64), y.astype(np.float64)
    assert mom.count == x.shape[0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(mom.cov_xy, xc.T @ yc / x.shape[0], atol=1e-6)
    np.testing.assert_allclose(mom.mean_x, x.mean(0), atol=1e-6)


def test_harvest_experiment(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "experiments.harvest",
        f"--workdir={workdir}",
        "--model=tiny:gpt2",
        "--hookpoints=resid_post.0,blocks.1.hook_resid_pre",
        "--context_length=32",
        "--max_tokens=1000",
        "--shard_contexts=8",
        "--progress=false",
        "--text=sample",
    ]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["tokens"] == 32 * 32 and res["hookpoints"] == ["resid_post.0", "resid_pre.1"]
    cache = ac.ActivationCache(res["cache_dir"])
    assert cache.num_contexts == 32 and len(cache.shards) == 4
    spans = np.load(os.path.join(res["cache_dir"], "token_spans.npy"))  # --record_spans
    assert spans.shape == (32, 32, 3) and (spans[:, 0] == -1).all()  # BOS: no text
    assert (spans[:, 1:, 2] > spans[:, 1:, 1]).all()
    assert os.path.getsize(os.path.join(workdir, "plots", "norm_by_position.png")) > 1000
    for name in ("config.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(workdir, name))
    tok, a = cache.read("resid_post.0")
    _, b = cache.read("resid_pre.1")
    np.testing.assert_array_equal(a, b)  # the same residual stream, named twice


def test_harvest_models_checks_tokenizers_first(pair, model_a, contexts, tmp_path):
    m_b = lm.LanguageModel.load(pair.path_b)
    caches = ac.harvest_models(
        [model_a, m_b],
        contexts[:20],
        ["resid_post.1"],
        [str(tmp_path / "a"), str(tmp_path / "b")],
        progress=False,
    )
    z = ac.paired_source(caches[0], "resid_post.1", caches[1], "resid_post.1")
    assert z.num_rows == contexts[:20].num_tokens and z.widths == (16, 16)
    assert model_a.revision is None  # local directories have no hub revision
    tok_d = text.build_word_tokenizer(vocab_size=250)
    lm_d = lm.LanguageModel(
        lm_tiny.build_tiny_model("llama", tok_d, seed=0, n_layers=2, d_model=16),
        tok_d,
        name="other",
    )
    with pytest.raises(text.TokenizerMismatchError, match="other"):
        ac.harvest_models(
            [model_a, lm_d],
            contexts[:20],
            [["resid_post.1"], ["resid_post.0"]],
            [str(tmp_path / "c"), str(tmp_path / "d")],
            progress=False,
        )
    assert not os.path.exists(tmp_path / "c")  # refused before any work

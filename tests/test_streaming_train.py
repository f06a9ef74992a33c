"""Streaming SAE training (models/sae_train.py `source_stream`): from an activation cache and a
live model, with a bounded shuffle buffer, epochs, exact mid-epoch resume, bounded memory."""

import tracemalloc

import numpy as np
import pytest

from engine.checks import InputError
from models import activation_cache as ac
from models import activation_source as asrc
from models import lm, lm_tiny, text
from models import sae_train as st

HOOK = "resid_post.0"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return lm_tiny.make_tiny_model_pair(
        str(root), arch="llama", vocab_size=300, n_layers=1, d_model=16
    )


@pytest.fixture(scope="module")
def model(pair):
    return lm.LanguageModel.load(pair.path_a)


@pytest.fixture(scope="module")
def contexts(model):
    return text.make_contexts(
        [d[:400] for d in text.sample_documents(12)],
        model.tokenizer,
        16,
        pad_tail=True,
        max_contexts=48,
    )


@pytest.fixture(scope="module")
def cache(model, contexts, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "c")
    return ac.harvest(
        model, contexts, [HOOK], path, batch_size=8, shard_contexts=20, progress=False
    )


CFG = st.TrainConfig(
    d_sae=32, activation="topk", k=4, lr=3e-3, dead_tokens=200, lr_warmup_steps=3, lr_decay_frac=0.3
)


def _ordered_rows(shuffled_source, n):
    """The first ``n`` rows the shuffled source yields (the reference order)."""
    out, have = [], 0
    for block in shuffled_source.open_at(0):
        out.append(np.asarray(block[1], np.float32))
        have += out[-1].shape[0]
        if have >= n:
            break
    return np.concatenate(out)[:n]


def _params(saes):
    return [
        {f: np.asarray(getattr(s, f)) for f in ("W_enc", "b_enc", "W_dec", "b_dec")} for s in saes
    ]


def _assert_same(a, b):
    for pa, pb in zip(_params(a), _params(b)):
        for f in pa:
            np.testing.assert_array_equal(pa[f], pb[f], err_msg=f)


def test_cache_streaming_equals_in_memory_on_the_same_order(cache, mesh):
    """Streaming from the cache (bounded shuffle, > 1 epoch) is bit-identical to in-memory
    training fed the same rows in the same order: the batches are the same arrays."""
    source = cache.source(HOOK)
    batch, steps, buf, blk = 32, 40, 128, 16
    assert steps * batch > source.num_rows  # crosses an epoch boundary
    order = asrc.shuffled(source, 5, buffer_rows=buf, block_rows=blk, repeat=True)
    rows = _ordered_rows(order, steps * batch)
    # the order really is shuffled, and each epoch is a permutation of the cache's rows
    n = source.num_rows
    _, ref = cache.read(HOOK)
    assert not np.array_equal(rows[:n], ref)
    np.testing.assert_array_equal(np.sort(rows[:n], axis=0), np.sort(ref, axis=0))
    init = rows[:256]
    streamed = st.train_saes(
        source,
        [CFG, CFG.__class__(**{**CFG.to_dict(), "seed": 1})],
        steps=steps,
        batch_size=batch,
        mesh=mesh,
        data_seed=5,
        shuffle_buffer=buf,
        shuffle_block=blk,
        init_sample=init,
        log_every=10,
    )
    in_memory = st.train_saes(
        lambda s: rows[s * batch : (s + 1) * batch],
        [CFG, CFG.__class__(**{**CFG.to_dict(), "seed": 1})],
        steps=steps,
        batch_size=batch,
        mesh=mesh,
        init_sample=init,
        log_every=10,
    )
    _assert_same(streamed, in_memory)


def test_one_vs_four_devices_differ_only_by_gradient_sum_order(cache, mesh1, mesh4):
    """The same SAE trained from the same cache on 1 and on 4 devices: every batch holds the
    same rows (the stream does not depend on the mesh), so the only difference is the order of
    the cross-device gradient sum (a psum over the data axis): float32 rounding, below 1e-5
    of each weight array's scale after 16 steps (measured: about 2e-7). Several processes
    differ from one process the same way (tests/test_distributed.py; WORKSPACE.md, "Several
    processes")."""
    source = cache.source(HOOK)
    kw = dict(steps=16, batch_size=32, data_seed=3, shuffle_buffer=128, shuffle_block=16)
    one, four = (_params(st.train_saes(source, CFG, mesh=m, **kw)) for m in (mesh1, mesh4))
    for f in one[0]:
        a, b = one[0][f], four[0][f]
        rel = np.max(np.abs(a - b)) / np.max(np.abs(a))
        print(f"1 vs 4 devices, {f}: max |diff| / max |w| = {rel:.2e}")
        assert rel <= 1e-5, f
    # and training moved the weights far more than that (the bound is not vacuous)
    init = _params(st.train_saes(source, CFG, mesh=mesh1, **{**kw, "steps": 1}))[0]
    assert np.max(np.abs(one[0]["W_dec"] - init["W_dec"])) > 1e-3 * np.max(np.abs(init["W_dec"]))


def test_live_model_stream_equals_in_memory_on_the_same_order(model, contexts, mesh1):
    """A live forward pass (sequential source: window shuffle) trains like in-memory rows."""
    live = asrc.LMSource(model, contexts, HOOK, batch_size=5)
    batch, steps, buf = 16, 12, 96
    order = asrc.shuffled(live, 2, buffer_rows=buf, block_rows=16, repeat=True)
    assert isinstance(order, asrc.WindowShuffledSource)
    rows = _ordered_rows(order, steps * batch)
    streamed = st.train_saes(
        live,
        CFG,
        steps=steps,
        batch_size=batch,
        mesh=mesh1,
        data_seed=2,
        shuffle_buffer=buf,
        shuffle_block=16,
        init_sample=rows[:64],
    )
    in_memory = st.train_saes(
        lambda s: rows[s * batch : (s + 1) * batch],
        CFG,
        steps=steps,
        batch_size=batch,
        mesh=mesh1,
        init_sample=rows[:64],
    )
    _assert_same(streamed, in_memory)


@pytest.mark.parametrize("start", [0, 1, 37, 95, 96, 250, 431])
def test_window_shuffle_is_a_resumable_permutation(start):
    n = 250
    base = asrc.ArraySource(np.arange(n), np.arange(n, dtype=np.float32)[:, None] * [1, -1])

    class Sequential:  # hides random access: forces the window shuffle
        hookpoints, widths, num_rows = base.hookpoints, base.widths, n

        def open_at(self, s):
            return base.open_at(s)

        def describe(self):
            return {}

    src = asrc.shuffled(Sequential(), 3, buffer_rows=96, block_rows=7, repeat=True)
    full = np.concatenate([b[0] for _, b in zip(range(200), src.open_at(0))])
    for epoch in range(2):
        ep = full[epoch * n : (epoch + 1) * n]
        assert sorted(ep.tolist()) == list(range(n))
        # bounded: each window of 96 consecutive input rows stays a window
        for w in range(0, n, 96):
            assert sorted(ep[w : w + 96].tolist()) == list(range(w, min(n, w + 96)))
    assert not np.array_equal(full[:n], full[n : 2 * n])  # new permutation each epoch
    tail = np.concatenate([b[0] for _, b in zip(range(100), src.open_at(start))])
    np.testing.assert_array_equal(tail[:300], full[start : start + 300])


class _Interrupt(Exception):
    pass


def test_kill_and_resume_mid_epoch_is_exact(cache, tmp_path, mesh4):
    source = cache.source(HOOK)
    batch, steps = 32, 24
    kw = dict(
        steps=steps,
        batch_size=batch,
        mesh=mesh4,
        data_seed=1,
        shuffle_buffer=128,
        shuffle_block=16,
        log_every=1,
        checkpoint_every=5,
    )
    full = st.train_saes(source, CFG, workdir=str(tmp_path / "full"), **kw)

    def die(group, step, metrics):
        if step == 8:  # after the checkpoint at step 5: 160 of ~700 rows, mid-epoch
            raise _Interrupt

    with pytest.raises(_Interrupt):
        st.train_saes(source, CFG, workdir=str(tmp_path / "cut"), on_log=die, **kw)
    assert 5 * batch < source.num_rows
    resumed = st.train_saes(source, CFG, workdir=str(tmp_path / "cut"), **kw)
    _assert_same(full, resumed)


class _MemmapSource(asrc.RowSource):
    """A big on-disk array, read row range by row range; records every read."""

    def __init__(self, path, block_rows):
        self.arr = np.load(path, mmap_mode="r")
        self.hookpoints, self.widths = ("x",), (self.arr.shape[1],)
        self.block_rows = block_rows
        self.reads = []

    @property
    def num_rows(self):
        return self.arr.shape[0]

    def read_rows_stored(self, lo, hi):
        self.reads.append(hi - lo)
        return np.arange(lo, hi, dtype=np.int32), np.array(self.arr[lo:hi])


def test_buffer_bounds_memory(tmp_path, mesh1):
    """100 MB on disk, a 4096-row buffer: reads are whole blocks and the Python heap peak
    (tracemalloc sees numpy buffers) stays near the buffer, far below the data."""
    rows, d = 400_000, 64
    path = str(tmp_path / "big.npy")
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 50_000):
        mm[lo : lo + 50_000] = rng.standard_normal((50_000, d), np.float32)
    mm.flush()
    del mm
    cfg = st.TrainConfig(d_sae=64, activation="topk", k=4, lr=1e-3)
    init = rng.standard_normal((512, d)).astype(np.float32)
    kw = dict(
        steps=40,
        batch_size=256,
        mesh=mesh1,
        shuffle_buffer=4096,
        shuffle_block=512,
        init_sample=init,
        log_every=40,
    )
    st.train_saes(_MemmapSource(path, 512), cfg, **kw)  # compile outside the measurement
    src = _MemmapSource(path, 512)
    tracemalloc.start()
    st.train_saes(src, cfg, **kw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data_bytes = rows * d * 4
    buffer_bytes = 4096 * d * 4
    assert max(src.reads) <= 512
    # 40 * 256 = 10240 rows consumed: at most 3 windows of 4096 rows were read
    assert sum(src.reads) <= 3 * 4096
    assert peak < 8 * buffer_bytes, (peak, buffer_bytes)
    assert peak < data_bytes / 10


def test_epochs_and_short_run_warning(cache, mesh1, caplog):
    source = cache.source(HOOK)
    n = source.num_rows
    assert st.steps_for_epochs(2, n, 32) == -(-2 * n // 32)
    with caplog.at_level("WARNING"):
        st.train_saes(source, CFG, steps=3, batch_size=32, mesh=mesh1, log_every=3)
    assert any("less than one epoch" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        saes = st.train_saes(source, CFG, epochs=1.0, batch_size=32, mesh=mesh1, log_every=50)
    assert not any("less than one epoch" in r.getMessage() for r in caplog.records)
    assert saes[0].config.meta["trained_steps"] == -(-n // 32)
    with pytest.raises(InputError, match="steps or epochs"):
        st.train_saes(source, CFG, steps=3, epochs=1.0, batch_size=32, mesh=mesh1)
    with pytest.raises(InputError, match="column"):
        st.train_saes(source, CFG, steps=3, batch_size=32, mesh=mesh1, column=2)


@pytest.mark.parametrize(
    "warm,frac,shape",
    [
        (0, 0.0, "linear"),
        (5, 0.0, "linear"),
        (0, 0.3, "linear"),
        (4, 0.5, "linear"),
        (3, 0.4, "cosine"),
        (60, 0.5, "linear"),
    ],
)
def test_lr_schedule_closed_form(warm, frac, shape):
    n = 50
    cfg = st.TrainConfig(d_sae=8, lr_warmup_steps=warm, lr_decay_frac=frac, lr_decay=shape)
    sched = st.lr_schedule(cfg, n)
    s = np.arange(n, dtype=np.float64)
    ref = np.ones(n)
    if warm:
        ref = np.minimum(ref, (s + 1) / warm)
    if frac:
        d = max(1.0, frac * n)
        if shape == "linear":
            ref = np.minimum(ref, (n - s) / d)
        else:
            t = np.clip(s - (n - d), 0, d) / round(d)
            ref = np.minimum(ref, 0.5 * (1 + np.cos(np.pi * t)))
    got = np.asarray([float(sched(i)) for i in range(n)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="lr_decay"):
        st.TrainConfig(d_sae=8, k=2, lr_decay="step").validate()


@pytest.mark.slow
def test_train_sae_experiment_from_cache_records_the_data(cache, tmp_path, mesh1):
    import json

    from experiments import common, train_sae

    opts = common.default_values(train_sae.CONFIG)
    opts.update(
        progress=False,
        source="cache",
        cache_path=cache.path,
        d_sae=["32"],
        k=["4"],
        epochs=1.5,
        batch_size=32,
        shuffle_buffer=128,
        shuffle_block=16,
        eval_frac=0.2,
        eval_rows=100,
        exclude_special=True,
        log_every=5,
        lr_warmup_steps=2,
    )
    run = common.Run(workdir=str(tmp_path), mesh=mesh1)
    res = train_sae.run_train_sae(run, opts)
    data = json.load(open(tmp_path / "data.json"))
    n = cache.source(HOOK, exclude_special=True).num_rows
    assert data["exclude_special"] is True and data["eval_rows"] == 100
    assert data["train_rows"] == n - 100 and data["hookpoint"] == HOOK
    assert res["n_eval_rows"] == 100 and res["saes"][0]["fvu"] < 1.0
    meta = json.loads(
        res and open(tmp_path / "saes" / res["saes"][0]["label"] / "sae_config.json").read()
    )
    assert meta  # saved natively


@pytest.mark.slow
def test_train_sae_experiment_from_a_live_model(pair, tmp_path, mesh1):
    import json

    from experiments import common, train_sae

    (tmp_path / "a.txt").write_text("\n".join(f"line {i} of the first corpus" for i in range(80)))
    (tmp_path / "b.txt").write_text("\n".join(f"record {i} here" for i in range(80)))
    opts = common.default_values(train_sae.CONFIG)
    opts.update(
        progress=False,
        source="lm",
        model_path=pair.path_a,
        hookpoint=HOOK,
        lm_text=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        lm_text_weights=["3", "1"],
        lm_context_length=16,
        lm_max_contexts=40,
        d_sae=["32"],
        k=["4"],
        steps=6,
        batch_size=32,
        shuffle_buffer=128,
        shuffle_block=16,
        eval_rows=64,
        log_every=3,
        exclude_special=True,
    )
    (tmp_path / "run").mkdir()
    run = common.Run(workdir=str(tmp_path / "run"), mesh=mesh1)
    res = train_sae.run_train_sae(run, opts)
    data = json.load(open(tmp_path / "run" / "data.json"))
    assert data["kind"] == "lm" and data["text"]["weights"] == [3.0, 1.0]
    assert data["text"]["pack"] is True and data["exclude_special"] is True
    assert data["contexts"] == 40 and res["saes"][0]["l0"] > 0


def test_pipeline_streams_caches_without_loading_them(cache, tmp_path, mesh1):
    """experiments/pipeline: an SAE trained from a cache source and a feature pass fed by
    `cache_pair_stream` (chunks read from disk) equal their in-memory counterparts."""
    from engine import streaming
    from experiments.pipeline import features
    from experiments.pipeline import saes as saes_lib

    cfg = st.TrainConfig(d_sae=32, activation="topk", k=4, lr=3e-3)
    sae = saes_lib.train_or_load(
        cache.source(HOOK),
        cfg,
        steps=5,
        batch_size=32,
        data_seed=0,
        directory=str(tmp_path / "s"),
        mesh=mesh1,
        shuffle_buffer=128,
    )
    again = saes_lib.train_or_load(
        cache.source(HOOK),
        cfg,
        steps=5,
        batch_size=32,
        data_seed=0,
        directory=str(tmp_path / "s"),
        mesh=mesh1,
    )
    np.testing.assert_array_equal(np.asarray(sae.W_dec), np.asarray(again.W_dec))
    streamed = features.feature_pass(
        features.cache_pair_stream(cache, HOOK, cache, HOOK, 64),
        sae,
        sae,
        mesh1,
        memory_budget=1 << 30,
    )
    _, x = cache.read(HOOK)
    rows = np.arange(x.shape[0], dtype=np.int32)
    ref = features.feature_pass(
        streaming.ChunkStream((rows, x, x), 64), sae, sae, mesh1, memory_budget=1 << 30
    )
    np.testing.assert_array_equal(streamed.matches.a_match, ref.matches.a_match)
    np.testing.assert_allclose(streamed.matches.a_value, ref.matches.a_value, atol=1e-6)
    np.testing.assert_array_equal(streamed.stats_a.top_rows, ref.stats_a.top_rows)

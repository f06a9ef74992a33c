"""The language-model preset streamed end to end (issue 13): harvest -> activation caches ->
SAEs trained from the caches -> feature passes read chunk by chunk, equal to the in-memory run.

Unit level: `RowSubset` against a numpy gather, `CachedActs` reads slices only, an SAE
trained from a cache equals one trained from the same rows in memory (folds included) while
the cache is never read whole, and the memory/stream rule. End to end (slow): the same
universality run in memory and streamed gives the same comparisons.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from engine.checks import InputError
from experiments.pipeline import saes as saes_lib
from models import activation_cache as ac
from models import activation_source as asrc
from models import lm, lm_tiny, text
from models import sae_train as st

HOOK = "resid_post.0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmstream")
    pair = lm_tiny.make_tiny_model_pair(
        str(root / "m"), arch="llama", vocab_size=300, n_layers=1, d_model=16
    )
    with lm.quiet_transformers():
        model = lm.LanguageModel.load(pair.path_a)
    ctx = text.make_contexts(
        [d[:400] for d in text.sample_documents(12)],
        model.tokenizer,
        16,
        pad_tail=True,
        max_contexts=40,
    )
    return ac.harvest(
        model, ctx, [HOOK], str(root / "c"), batch_size=8, shard_contexts=15, progress=False
    )


@pytest.mark.parametrize("block", [1, 7, 64])
def test_row_subset_is_the_numpy_gather(block):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    base = asrc.ArraySource(np.arange(300), x, block_rows=block)
    rows = np.sort(rng.choice(300, 111, replace=False))
    sub = asrc.RowSubset(base, rows)
    assert sub.num_rows == 111
    for lo, hi in ((0, 111), (5, 6), (40, 97)):
        ids, got = sub.read_rows(lo, hi)
        np.testing.assert_array_equal(got, x[rows[lo:hi]])
        np.testing.assert_array_equal(ids, rows[lo:hi])
    streamed = np.concatenate([b[1] for b in sub.open_at(0)])
    np.testing.assert_array_equal(streamed, x[rows])
    shuffled = np.concatenate(
        [b[0] for b in asrc.shuffled(sub, 3, buffer_rows=32, block_rows=8).open_at(0)]
    )
    assert not np.array_equal(shuffled, rows)
    np.testing.assert_array_equal(np.sort(shuffled), rows)  # a permutation of the subset
    for bad in (rows[::-1], np.array([], np.int64), np.array([0, 300]), np.array([2, 2])):
        with pytest.raises(InputError, match="RowSubset"):
            asrc.RowSubset(base, bad)


def test_cached_acts_reads_only_slices(cache):
    _, ref = cache.read(HOOK)
    x = ac.CachedActs(cache, "layers.0")  # sparsify alias of resid_post.0
    assert x.hookpoint == HOOK and x.shape == ref.shape
    np.testing.assert_array_equal(x[3:17], ref[3:17])
    np.testing.assert_array_equal(x[:4096], ref)
    for bad in (5, slice(0, 10, 2), np.arange(3)):
        with pytest.raises(InputError, match="contiguous row slices"):
            x[bad]
    with pytest.raises(InputError, match="stay on disk"):
        np.asarray(x)
    y = ac.CachedActs(cache, HOOK, exclude_special=True)
    assert y.shape[0] == cache.metadata["token_count_non_special"] < x.shape[0]
    assert x.key() != y.key() and x.key() == ac.CachedActs(cache, HOOK).key()


@pytest.mark.parametrize("fold", [None, (1, 3)])
def test_sae_from_the_cache_equals_the_in_memory_one(cache, tmp_path, mesh1, monkeypatch, fold):
    """`saes.obtain` on `CachedActs` trains from the cache source without reading it whole,
    and gives exactly the SAE of the same rows held in memory (same shuffled batches)."""
    _, ref = cache.read(HOOK)
    monkeypatch.setattr(
        ac.ActivationCache,
        "read",
        lambda *a, **k: pytest.fail("the streamed path read the whole cache"),
    )
    recipe = st.TrainConfig(d_sae=32, activation="topk", k=4, lr=3e-3)
    role = saes_lib.Role("a", HOOK)
    kw = dict(
        user_seed=3,
        recipe=recipe,
        steps=12,
        batch_size=32,
        mesh=mesh1,
        fold=fold,
        shuffle_buffer=64,
    )
    streamed = saes_lib.obtain(role, ac.CachedActs(cache, HOOK), root=str(tmp_path / "s"), **kw)
    memory = saes_lib.obtain(role, ref, root=str(tmp_path / "m"), as_source=True, **kw)
    assert streamed.recipe["data"]["source"] == "cache"
    assert memory.recipe["data"]["source"] == "arrays"
    n = ref.shape[0]
    assert (
        streamed.recipe["rows"]
        == memory.recipe["rows"]
        == (n if fold is None else len(range(1, n, 3)))
    )
    for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(
            np.asarray(getattr(streamed.sae, f)), np.asarray(getattr(memory.sae, f)), err_msg=f
        )


def _flags(**kw):
    base = dict(
        lm_activations="auto", cache_a=None, cache_b=None, max_contexts=1000, context_length=100
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_memory_or_stream_rule():
    from experiments.pipeline import compare, lm_preset

    widths = [512, 768]
    need = lm_preset.activation_bytes(100_000, widths)
    assert need == 4 * 100_000 * (512 + 768 + 768)
    # auto: stream above a quarter of the budget
    assert not lm_preset.stream_mode(_flags(), None, widths, 4 * need, None)
    assert lm_preset.stream_mode(_flags(), None, widths, 4 * need - 4, None)
    assert lm_preset.stream_mode(_flags(cache_a="x", cache_b="y"), None, widths, 1 << 40, None)
    assert not lm_preset.stream_mode(_flags(lm_activations="memory"), None, widths, 1, None)
    assert lm_preset.stream_mode(_flags(lm_activations="stream"), None, widths, 1 << 40, None)
    view = object()  # different tokenizers: aligned units are pooled in memory
    assert not lm_preset.stream_mode(_flags(), view, widths, 1, None)
    with pytest.raises(compare.PipelineError, match="different tokenizers"):
        lm_preset.stream_mode(_flags(lm_activations="stream"), view, widths, 1, None)


def _universality(workdir, *flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.universality",
            f"--workdir={workdir}",
            "--noprogress",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_streamed_run_equals_the_in_memory_run(tmp_path):
    """One tiny layer cell (cross, both ceilings, random-init floor) in memory and streamed:
    the same SAEs and the same comparisons; the streamed run keeps no activation array."""
    common = (
        "--config=experiments/configs/universality_lm.py",
        "--hookpoints_a=resid_post.0",
        "--hookpoints_b=resid_post.1",
        "--max_contexts=12",
        "--context_length=32",
        "--sae_steps=30",
        "--sae_batch_size=64",
        "--num_permutations=20",
        "--metrics=svcca,cka",
        "--lm_exclude_special",
    )
    mem = _universality(tmp_path / "m", *common, "--lm_activations=memory")
    stm = _universality(tmp_path / "s", *common, "--lm_activations=stream")
    assert mem["activation_mode"]["mode"] == "memory"
    assert stm["activation_mode"]["mode"] == "stream"
    # structurally streamed: every SAE read a cache, no activation array in the step cache,
    # the caches hold the activations
    assert {s["recipe"]["data"]["source"] for s in stm["saes"]} == {"cache"}
    assert {s["recipe"]["data"]["source"] for s in mem["saes"]} == {"arrays"}
    assert not [f for f in os.listdir(tmp_path / "s" / "steps") if f.startswith("lm_acts")]
    assert [f for f in os.listdir(tmp_path / "m" / "steps") if f.startswith("lm_acts")]
    assert sorted(os.listdir(tmp_path / "s" / "activations")) == ["a", "b", "floor_b"]
    # special tokens left out on both: the row count is the caches' non-special tokens
    meta = json.loads((tmp_path / "s" / "activations" / "a" / "metadata.json").read_text())
    assert stm["tokens"] == mem["tokens"] == meta["token_count_non_special"]
    assert meta["token_count_non_special"] < meta["token_count"]
    # the same SAEs ...
    for a, b in zip(mem["saes"], stm["saes"]):
        assert a["key"] == b["key"] and a["seed"] == b["seed"]
    # ... and the same comparisons
    cm = {c["name"]: c for c in mem["comparisons"]}
    cs = {c["name"]: c for c in stm["comparisons"]}
    assert set(cm) == set(cs) and {c["kind"] for c in cm.values()} == {"cross", "ceiling", "floor"}
    for name in cm:
        assert cm[name]["n_pairs"] == cs[name]["n_pairs"], name
        assert cm[name]["pairs"]["a"] == cs[name]["pairs"]["a"], name
        assert cm[name]["pairs"]["b"] == cs[name]["pairs"]["b"], name
        np.testing.assert_allclose(
            cm[name]["pairs"]["value"], cs[name]["pairs"]["value"], atol=1e-6
        )
        for metric, v in cm[name]["metrics"].items():
            assert cs[name]["metrics"][metric]["score"] == pytest.approx(v["score"], abs=1e-6)

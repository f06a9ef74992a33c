"""The pipeline's feature pass under a memory budget (experiments/pipeline/features.py):
tiled (blocks of features, TopK codes in memory or on disk) equals the single pass."""

import numpy as np
import pytest

from engine import correlation, streaming
from engine.checks import InputError
from experiments.pipeline import features
from models import sae as sae_lib

D, ROWS = 12, 600


def _sae(seed, d_sae, activation, k=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_sae, D)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cfg = sae_lib.SAEConfig(d_in=D, d_sae=d_sae, activation=activation, k=k)
    return sae_lib.from_arrays(
        cfg, w.T.copy(), rng.normal(0, 0.1, d_sae).astype(np.float32), w, np.zeros(D, np.float32)
    )


def _stream(chunk=64):
    rng = np.random.default_rng(7)
    xa = rng.standard_normal((ROWS, D)).astype(np.float32)
    mix = np.eye(D) + 0.3 * rng.standard_normal((D, D))
    xb = (xa @ mix + 0.2 * rng.standard_normal((ROWS, D))).astype(np.float32)
    rows = np.arange(ROWS, dtype=np.int32)
    return streaming.ChunkStream((rows, xa, xb), chunk, name="pair")


def _same(a, b, tiled_corr_tol=2e-6):
    for side in ("stats_a", "stats_b"):
        sa, sb = getattr(a, side), getattr(b, side)
        for f in ("density", "mean", "std", "max", "top_values", "top_rows", "dead"):
            np.testing.assert_allclose(
                getattr(sa, f), getattr(sb, f), rtol=1e-6, atol=1e-7, err_msg=f"{side}.{f}"
            )
    ma, mb = a.matches, b.matches
    for s in ("a", "b"):
        np.testing.assert_allclose(
            getattr(ma, f"{s}_value"), getattr(mb, f"{s}_value"), atol=tiled_corr_tol
        )
        np.testing.assert_array_equal(getattr(ma, f"{s}_dead"), getattr(mb, f"{s}_dead"))
        # best partners agree wherever the runner-up is not within float32 noise
        same = getattr(ma, f"{s}_match") == getattr(mb, f"{s}_match")
        assert same.mean() > 0.97
    assert ma.mean_best_a == pytest.approx(mb.mean_best_a, abs=1e-6)


@pytest.mark.parametrize(
    "activation,n_dev",
    [
        ("topk", 1),
        pytest.param("topk", 4, marks=pytest.mark.slow),
        pytest.param("relu", 1, marks=pytest.mark.slow),
    ],
)
def test_tiled_pass_equals_single_pass(activation, n_dev, tmp_path):
    import jax

    from engine import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n_dev])
    k = 4 if activation == "topk" else 0
    fa, fb = 160, 200
    sae_a, sae_b = _sae(1, fa, activation, k), _sae(2, fb, activation, k)
    full = features.feature_pass(_stream(), sae_a, sae_b, mesh, memory_budget=1 << 34)
    assert full.corr is not None
    n_data = mesh.shape["data"]
    # a budget that fits a 160 x 100 block (plus chunk buffers and codes) but not 160 x 200
    reserved = 4 * 64 * (fa + fb) * 3
    budget = reserved + 4 * 160 * 100 * correlation.state_copies(n_data) + 8 * ROWS * 2 * k
    plan = features.plan_pass(
        fa,
        fb,
        n_data=n_data,
        memory_budget=budget,
        chunk_rows=64,
        rows=ROWS,
        k_a=k,
        k_b=k,
        sparse=activation == "topk",
        keep_matrix=True,
    )
    assert plan.tiled and plan.blocks > 1 and plan.tile_a * plan.tile_b <= 160 * 100
    tiled = features.feature_pass(
        _stream(), sae_a, sae_b, mesh, memory_budget=budget, checkpoint_dir=str(tmp_path / "ck")
    )
    assert tiled.corr is None
    _same(full, tiled)
    # the best matches are the float64 numpy argmax of the full correlation matrix
    s = _stream()
    xa, xb = s._arrays[1], s._arrays[2]
    za = np.asarray(sae_a.encode(xa), np.float64)
    zb = np.asarray(sae_b.encode(xb), np.float64)
    ok_a, ok_b = za.std(0) > 0, zb.std(0) > 0
    c = np.corrcoef(za[:, ok_a].T, zb[:, ok_b].T)[: ok_a.sum(), ok_a.sum() :]
    np.testing.assert_allclose(tiled.matches.a_value[ok_a], c.max(1), atol=2e-5)
    if n_dev > 1 or activation != "topk":
        return
    # a rerun resumes from the finished blocks and the codes on disk
    again = features.feature_pass(
        _stream(), sae_a, sae_b, mesh, memory_budget=budget, checkpoint_dir=str(tmp_path / "ck")
    )
    _same(tiled, again, tiled_corr_tol=0)


def test_codes_on_disk_equal_codes_in_memory(mesh1, tmp_path):
    sae_a, sae_b = _sae(1, 40, "topk", 4), _sae(2, 56, "topk", 3)
    mem = features.encode_codes(_stream(), sae_a, sae_b)
    disk = features.encode_codes(_stream(), sae_a, sae_b, directory=str(tmp_path / "c"))
    assert isinstance(disk[0], np.memmap) and disk[1].shape == (ROWS, 4)
    for x, y in zip(mem, disk):
        np.testing.assert_array_equal(x, np.asarray(y))
    # codes are the SAE's own TopK: densified they give encode()
    dense = np.zeros((ROWS, 40), np.float32)
    np.put_along_axis(dense, mem[1], mem[0], axis=1)
    np.testing.assert_allclose(
        dense, np.asarray(sae_a.encode(_stream()._arrays[1])), rtol=1e-6, atol=1e-6
    )


def test_plan_and_budget_errors():
    p = features.plan_pass(
        32768,
        32768,
        n_data=1,
        memory_budget=12 << 30,
        rows=1_000_000,
        k_a=32,
        k_b=32,
        chunk_rows=4096,
    )
    assert not p.tiled or p.state_bytes <= 12 << 30
    p = features.plan_pass(
        32768,
        32768,
        n_data=1,
        memory_budget=3 << 30,
        rows=1_000_000,
        k_a=32,
        k_b=32,
        chunk_rows=1024,
    )
    assert p.tiled and p.state_bytes <= 3 << 30 and p.blocks >= 2
    big = features.plan_pass(
        131072,
        131072,
        n_data=8,
        memory_budget=70 << 30,
        rows=10_000_000,
        k_a=64,
        k_b=64,
        chunk_rows=4096,
    )
    assert big.tiled and big.state_bytes <= 70 << 30
    with pytest.raises(InputError, match="memory budget"):
        features.plan_pass(1000, 1000, n_data=1, memory_budget=1000, chunk_rows=64)


def test_state_copies_per_memory():
    # simulated CPU devices share RAM: every device's state counts; GPUs hold their own
    assert correlation.state_copies(1) == 1 and correlation.state_copies(4) == 5
    assert correlation.state_copies(8, shared_memory=False) == 2
    shared = correlation.tiles_for_budget(131072, 131072, 40 << 30, n_data=8, sparse=True)
    own = correlation.tiles_for_budget(
        131072, 131072, 40 << 30, n_data=8, sparse=True, shared_memory=False
    )
    assert shared[0] * shared[1] * 4 * 9 <= 40 << 30
    assert own[0] * own[1] < 2**31 - 1 and own[0] * own[1] > shared[0] * shared[1]

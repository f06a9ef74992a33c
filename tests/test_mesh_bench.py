"""Mesh construction, batch sharding, and the benchmark helper's bookkeeping."""

import json

import jax
import numpy as np
import pytest

from engine import bench, checks
from engine import mesh as mesh_lib


def test_mesh_shapes():
    m = mesh_lib.make_mesh()
    assert m.axis_names == ("data", "feature") and m.shape["data"] == 4
    m = mesh_lib.make_mesh(data=2, feature=2)
    assert dict(m.shape) == {"data": 2, "feature": 2}
    with pytest.raises(ValueError, match="needs 8 devices"):
        mesh_lib.make_mesh(data=4, feature=2)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.make_mesh(feature=3)


def test_shard_batch_and_gather(mesh4):
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    xs = mesh_lib.shard_batch(mesh4, x)
    assert len(xs.sharding.device_set) == 4
    assert xs.addressable_shards[1].data.shape == (2, 3)
    np.testing.assert_array_equal(mesh_lib.gather(xs), x)
    with pytest.raises(ValueError, match="not divisible by the mesh data axis"):
        mesh_lib.shard_batch(mesh4, np.zeros((6, 3)))


def test_distributed_is_off_by_default():
    assert mesh_lib.maybe_initialize_distributed(False) is False


def test_bench_compare_counts_calls_and_ratio(tmp_path):
    calls = {"a": 0, "b": 0}

    def cand():
        calls["a"] += 1
        return jax.numpy.ones(3) * 2

    def base():
        calls["b"] += 1
        return np.ones(3)

    r = bench.compare(cand, base, repeats=4, warmup=2, name="t", work=100, work_unit="rows")
    assert calls == {"a": 6, "b": 6}
    assert len(r["candidate_s"]) == 4 and len(r["baseline_s"]) == 4
    assert r["speedup"] == pytest.approx(r["baseline_median_s"] / r["candidate_median_s"])
    assert r["candidate_rows_per_s"] == pytest.approx(100 / r["candidate_median_s"])
    doc = bench.report([r], str(tmp_path / "b.json"))
    on_disk = json.loads((tmp_path / "b.json").read_text())
    assert on_disk["results"][0]["name"] == "t" and "jax" in on_disk["env"]
    assert doc["env"]["cpu_count"] >= 1


def test_checks_messages():
    with pytest.raises(checks.InputError, match=r"acts: expected shape \(\*, 4\), got \(3, 5\)"):
        checks.check_shape("acts", np.zeros((3, 5)), (None, 4))
    with pytest.raises(checks.InputError, match="x has 3 rows but y has 4"):
        checks.check_rows_match("x", np.zeros((3, 1)), "y", np.zeros((4, 1)))

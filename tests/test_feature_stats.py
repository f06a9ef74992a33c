"""Per-feature statistics accumulator vs a numpy float64 reference, 1 and 4 devices."""

import numpy as np
import pytest

from engine import accumulators, checks, feature_stats, streaming


def sparse_acts(rng, rows=301, features=12):
    acts = np.maximum(rng.normal(size=(rows, features)) - 0.8, 0).astype(np.float32)
    acts[:, 3] = 0.0  # dead feature
    acts[:, 5] = 0.0
    acts[::2, 5] = 1.5  # fires at a constant value (not constant overall: 0 or 1.5)
    acts[:, 7] = np.round(acts[:, 7], 1)  # ties among top values
    return acts


def reference_top(acts, top_n):
    rows = []
    for f in range(acts.shape[1]):
        order = sorted(range(len(acts)), key=lambda r: (-acts[r, f], r))
        keep = [r for r in order[:top_n] if acts[r, f] > 0]
        rows.append(keep + [-1] * (top_n - len(keep)))
    return np.array(rows)


def test_matches_numpy_reference(rng, mesh):
    acts = sparse_acts(rng)
    ids = np.arange(len(acts), dtype=np.int32)
    acc = feature_stats.FeatureStatsAccumulator(acts.shape[1], top_n=5)
    state = accumulators.accumulate(acc, streaming.ChunkStream((acts, ids), 32), mesh)
    st = acc.finalize(state)
    a64 = acts.astype(np.float64)
    np.testing.assert_allclose(st.density, (a64 > 0).mean(0))
    np.testing.assert_allclose(st.mean, a64.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.std, a64.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.max, a64.max(0), rtol=1e-6)
    np.testing.assert_array_equal(st.top_rows, reference_top(acts, 5))
    assert st.dead.tolist() == [f == 3 for f in range(12)]
    assert st.constant[3] and not st.constant[5]


def test_all_rows_masked_is_an_error():
    acc = feature_stats.FeatureStatsAccumulator(4)
    with pytest.raises(checks.InputError, match="no rows"):
        acc.finalize(acc.init())
    with pytest.raises(checks.InputError, match=r"acts \[rows, 4\]"):
        acc.update(acc.init(), (np.zeros((3, 5)), np.arange(3)), np.ones(3))


def topk_codes(rng, rows, features, k):
    """TopK codes (distinct indices per row, ties and some non-positive values) and their
    dense ``[rows, features]`` form."""
    idx = np.stack([rng.choice(features, k, replace=False) for _ in range(rows)]).astype(np.int32)
    vals = np.round(rng.exponential(1.0, (rows, k)), 1).astype(np.float32)  # ties
    vals[rng.random((rows, k)) < 0.1] = 0.0
    idx[:, 0] = np.where(rng.random(rows) < 0.5, 2, idx[:, 0])  # feature 2 fires often
    for r in range(rows):  # keep indices distinct after the overwrite
        row = idx[r]
        dup = [j for j in range(1, k) if row[j] == row[0]]
        for j in dup:
            row[j] = next(f for f in range(features) if f not in row)
    dense = np.zeros((rows, features), np.float32)
    dense[np.arange(rows)[:, None], idx] = vals
    return vals, idx, dense


def test_sparse_codes_match_numpy_reference_and_dense(rng, mesh):
    """From TopK codes: the float64 reference of the densified codes, and exactly the dense
    accumulator's top rows / dead / firing counts (1 and 4 devices, padded last chunk)."""
    features, k, rows = 40, 4, 203
    vals, idx, dense = topk_codes(rng, rows, features, k)
    ids = np.arange(rows, dtype=np.int32)
    acc = feature_stats.SparseFeatureStatsAccumulator(features, top_n=5)
    st = acc.finalize(
        accumulators.accumulate(acc, streaming.ChunkStream((vals, idx, ids), 32), mesh)
    )
    a64 = dense.astype(np.float64)
    np.testing.assert_allclose(st.density, (a64 > 0).mean(0))
    np.testing.assert_allclose(st.mean, a64.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.std, a64.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st.max, a64.max(0), rtol=1e-6)
    np.testing.assert_array_equal(st.top_rows, reference_top(dense, 5))
    np.testing.assert_allclose(
        st.top_values,
        np.where(
            reference_top(dense, 5) >= 0,
            np.take_along_axis(a64, np.maximum(reference_top(dense, 5), 0).T, 0).T,
            0.0,
        ),
        rtol=1e-6,
    )
    assert st.dead.tolist() == (a64.max(0) <= 0).tolist()
    dacc = feature_stats.FeatureStatsAccumulator(features, top_n=5)
    ref = dacc.finalize(
        accumulators.accumulate(dacc, streaming.ChunkStream((dense, ids), 32), mesh)
    )
    np.testing.assert_array_equal(st.top_rows, ref.top_rows)
    np.testing.assert_array_equal(st.dead, ref.dead)
    np.testing.assert_array_equal(st.constant, ref.constant)
    # a feature absent from no row (always selected) has max = its largest value, not 0
    always = np.full((rows, 1), 7, np.int32)
    v = np.abs(rng.normal(size=(rows, 1))).astype(np.float32) + 0.5
    one = feature_stats.SparseFeatureStatsAccumulator(8, top_n=2)
    s1 = one.finalize(
        accumulators.accumulate(one, streaming.ChunkStream((v, always, ids), 32), mesh)
    )
    assert s1.max[7] == pytest.approx(float(v.max())) and s1.max[0] == 0.0
    assert s1.dead[:7].all() and not s1.dead[7]


@pytest.mark.parametrize("capacity", [3, 1])
def test_sparse_top_rows_prefilter_and_its_fallback(rng, mesh, monkeypatch, capacity):
    """Chunks with many entries per kept slot pre-filter the entries before sorting them
    (`feature_stats._sparse_top`); capacity 1 overflows it, so the full sort runs instead.
    Either way the top rows (ties by row, a feature confined to one row group) equal the
    float64 reference of the densified codes."""
    monkeypatch.setattr(feature_stats, "PREFILTER_CAPACITY", capacity)
    features, k, rows, top_n = 12, 4, 500, 2
    vals, idx, dense = topk_codes(rng, rows, features, k)
    # feature 5 only in rows r % 4 == 0 (one of the 2 * top_n row groups), with ties
    in_group = np.arange(rows) % 4 == 0
    for r in range(rows):
        if in_group[r] and 5 not in idx[r]:
            idx[r, 1] = 5
        elif not in_group[r] and 5 in idx[r]:
            idx[r, list(idx[r]).index(5)] = next(f for f in range(6, features) if f not in idx[r])
    dense = np.zeros((rows, features), np.float32)
    dense[np.arange(rows)[:, None], idx] = vals
    ids = np.arange(rows, dtype=np.int32) + 7
    acc = feature_stats.SparseFeatureStatsAccumulator(features, top_n=top_n)
    st = acc.finalize(
        accumulators.accumulate(acc, streaming.ChunkStream((vals, idx, ids), 256), mesh)
    )
    want = reference_top(dense, top_n)
    np.testing.assert_array_equal(st.top_rows, np.where(want >= 0, want + 7, -1))
    np.testing.assert_allclose(st.max, dense.astype(np.float64).max(0), rtol=1e-6)

"""Per-feature statistics accumulator vs a numpy float64 reference, 1 and 4 devices."""

import numpy as np
import pytest

from engine import accumulators, checks, feature_stats, streaming


def sparse_acts(rng, rows=301, features=12):
    acts = np.maximum(rng.normal(size=(rows, features)) - 0.8, 0).astype(np.float32)
    acts[:, 3] = 0.0          # dead feature
    acts[:, 5] = 0.0
    acts[::2, 5] = 1.5       # fires at a constant value (not constant overall: 0 or 1.5)
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

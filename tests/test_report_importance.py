"""Importance reaches the paired-feature browser: `importance.annotate_feature_table` writes
each feature's attribution into the comparison's feature table, and the report's data carry it
as the pair table's importance column (issues 16 and 19)."""

import json

import numpy as np
import pytest

from engine import checks
from experiments.pipeline import html_report, results
from experiments.pipeline import importance as importance_lib


def _table(n_a, n_b):
    def rows(n):
        return [
            {"feature": f, "density": 0.1, "max": 1.0, "status": "kept", "top_tokens": []}
            for f in range(n)
        ]

    return {"a": rows(n_a), "b": rows(n_b)}


def test_importance_written_into_table_and_read_by_report(tmp_path, rng):
    path = tmp_path / "cross.json"
    path.write_text(json.dumps(_table(5, 3)))
    sa, sb = rng.normal(size=5), rng.normal(size=3)
    assert importance_lib.annotate_feature_table(str(path), {"a": sa, "b": sb})
    table = json.loads(path.read_text())
    np.testing.assert_allclose([r["importance"] for r in table["a"]], sa)
    np.testing.assert_allclose([r["importance"] for r in table["b"]], sb)
    data = html_report._comparison_data(results.KeptPairs((0,), (1,), (0.5,)), table)
    np.testing.assert_allclose(data["features"]["a"]["importance"], sa)
    np.testing.assert_allclose(data["features"]["b"]["importance"], sb)
    # Without importance the column is absent (the report hides it).
    plain = html_report._comparison_data(results.KeptPairs((), (), ()), _table(2, 2))
    assert plain["features"]["a"]["importance"] is None


def test_importance_length_mismatch_is_one_line(tmp_path):
    path = tmp_path / "cross.json"
    path.write_text(json.dumps(_table(4, 4)))
    with pytest.raises(checks.InputError, match="4 features on side a, importance has 3"):
        importance_lib.annotate_feature_table(str(path), {"a": np.ones(3)})
    assert not importance_lib.annotate_feature_table(str(tmp_path / "none.json"), {})

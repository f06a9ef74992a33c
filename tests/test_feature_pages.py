"""Per-feature pages (contexts with per-token activations, histograms, logit effects, drop
reasons) against float64 numpy references, and the filter trace against the filter counts."""

import json

import jax
import numpy as np

from engine import streaming
from experiments.pipeline import feature_pages, filters
from models import sae as sae_lib


def _sae(seed, d_in, d_sae, activation, k=0):
    cfg = sae_lib.SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, input_scale=1.3)
    sae = sae_lib.init(jax.random.PRNGKey(seed), cfg)
    rng = np.random.default_rng(seed)
    return sae.replace(
        b_enc=jax.numpy.asarray(rng.normal(0, 0.3, d_sae), jax.numpy.float32),
        b_dec=jax.numpy.asarray(rng.normal(0, 0.1, d_in), jax.numpy.float32),
    )


def _encode64(sae, x):
    """Float64 reference of the SAE encoder (relu, or relu then the k largest per row)."""
    p = {k: np.asarray(v, np.float64) for k, v in sae.to_numpy().items()}
    pre = (x * sae.config.input_scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    z = np.maximum(pre, 0.0)
    if sae.config.activation == "topk":
        kth = np.sort(z, axis=1)[:, -sae.config.k][:, None]
        z = np.where(z >= kth, z, 0.0)
    return z


def test_pages_match_direct_encode():
    rng = np.random.default_rng(0)
    n, seg_len, top_n = 301, 37, 4
    xa = rng.normal(size=(n, 6)).astype(np.float32)
    xb = rng.normal(size=(n, 5)).astype(np.float32)
    sae_a, sae_b = _sae(1, 6, 12, "topk", k=3), _sae(2, 5, 9, "relu")
    za, zb = _encode64(sae_a, xa.astype(np.float64)), _encode64(sae_b, xb.astype(np.float64))
    segments = np.arange(n) // seg_len
    step = {"rows": n}
    for s, z in (("a", za), ("b", zb)):
        top = np.argsort(-z, axis=0, kind="stable")[:top_n].T  # [F, top_n]
        top = np.where(np.take_along_axis(z.T, top, 1) > 0, top, -1)
        step[f"{s}_top_rows"], step[f"{s}_max"] = top, z.max(0)
    src = feature_pages.PageSource(
        token_text=lambda r: [f"t{int(i)}" for i in r], segments=segments, before=3, after=2, bins=7
    )
    stream = streaming.ChunkStream((np.arange(n, dtype=np.int32), xa, xb), 64)
    out = feature_pages.compute(stream, sae_a, sae_b, step, src)
    for s, z in (("a", za), ("b", zb)):
        rows, vals = out[f"{s}_ctx_rows"], out[f"{s}_ctx_values"]
        assert rows.shape == (z.shape[1], top_n, 6)
        for f in range(z.shape[1]):
            for c in range(top_n):
                r0 = step[f"{s}_top_rows"][f, c]
                for p, off in enumerate(range(-3, 3)):
                    r = r0 + off
                    inside = r0 >= 0 and 0 <= r < n and segments[r] == segments[r0]
                    assert rows[f, c, p] == (r if inside else -1)
                    if inside:
                        np.testing.assert_allclose(vals[f, c, p], z[r, f], rtol=1e-4, atol=1e-4)
        hist = out[f"{s}_hist"]
        ref = np.stack(
            [
                np.histogram(z[:, f][z[:, f] > 0], bins=7, range=(0, max(z[:, f].max(), 1e-30)))[0]
                for f in range(z.shape[1])
            ]
        )
        assert hist.sum() == (z > 0).sum()
        assert np.abs(hist - ref).sum() <= 2  # float32 vs float64 at a bin edge


def test_single_token_contexts_without_segments():
    top = np.array([[5, 0, -1]])
    w = feature_pages.context_windows(top, 10, None, before=4, after=4)
    assert w.tolist() == [[[5], [0], [-1]]]


def test_logit_effects_match_explicit_product():
    rng = np.random.default_rng(1)
    w, u = rng.normal(size=(37, 8)), rng.normal(size=(29, 8))
    out = feature_pages.logit_effects(w, u, n=5, bins=6, block=16)
    logits = w @ u.T
    np.testing.assert_array_equal(out["pos_ids"], np.argsort(-logits, axis=1)[:, :5])
    np.testing.assert_array_equal(out["neg_ids"], np.argsort(logits, axis=1)[:, :5])
    np.testing.assert_allclose(out["pos_values"], -np.sort(-logits, axis=1)[:, :5], rtol=1e-5)
    for f in range(37):
        ref, _ = np.histogram(logits[f], bins=6)
        assert np.abs(out["hist_heights"][f] - ref).sum() <= 2
        assert out["hist_heights"][f].sum() == 29


def test_trace_filters_and_drop_reasons():
    # A0-B0 0.9 kept; A1-B0 0.8 loses one-to-one; A2-B1 0.05 below threshold;
    # A3-B2 0.5 where B2 is non-concept; A4 dead.
    cand = filters.Pairs(
        np.array([0, 1, 2, 3, 4]), np.array([0, 0, 1, 2, 3]), np.array([0.9, 0.8, 0.05, 0.5, 0.7])
    )
    invalid_a = np.array([False, False, False, False, True])
    invalid_b = np.zeros(4, bool)
    tokens_a = [["cat"], ["dog"], ["sun"], ["moon"], ["x"]]
    tokens_b = [["cat"], ["sky"], [".", ","], ["tree"]]
    cfg = filters.FilterConfig()
    kept, counts, dropped = filters.trace_filters(
        cand,
        cfg,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    assert dropped.tolist() == ["", "one_to_one", "threshold", "non_concept", "dead_constant"]
    assert kept.a.tolist() == [0] and counts["after_threshold"] == 1
    steps = list(counts)
    for prev, cur in zip(steps, steps[1:]):
        assert counts[prev] - counts[cur] == (dropped == cur[len("after_") :]).sum()
    same, _ = filters.apply_filters(
        cand,
        cfg,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    assert same.a.tolist() == kept.a.tolist()
    nc_b = filters.non_concept_features(tokens_b, cfg)
    rows = feature_pages.drop_reasons(
        5,
        "a",
        cand,
        dropped,
        invalid_a,
        invalid_a,
        filters.non_concept_features(tokens_a, cfg),
        0.1,
    )
    assert [r["drop"] for r in rows] == [
        "",
        "one_to_one",
        "threshold",
        "partner_non_concept",
        "dead",
    ]
    assert rows[0]["status"] == "kept" and rows[0]["partner"] == 0
    assert rows[1]["partner"] == 0 and "B#0" in rows[1]["reason"]
    rows_b = feature_pages.drop_reasons(4, "b", cand, dropped, invalid_b, invalid_b, nc_b, 0.1)
    assert [r["drop"] for r in rows_b] == ["", "threshold", "non_concept", "partner_dead_constant"]


def test_export_layout(tmp_path):
    rng = np.random.default_rng(2)
    n, f = 40, 3
    token_ids = rng.integers(0, 9, n)
    top = np.array([[10, 3, -1], [0, 39, 20], [-1, -1, -1]])
    rows = feature_pages.context_windows(top, n, np.arange(n) // 20, 2, 2)
    vals = rng.uniform(0, 1, rows.shape).astype(np.float32)
    step = {
        "a_top_rows": top,
        "a_max": np.array([2.0, 3.0, 0.0]),
        "a_density": np.array([0.1, 0.2, 0.0]),
    }
    pages = {"a_ctx_rows": rows, "a_ctx_values": vals, "a_hist": rng.integers(0, 5, (f, 4))}
    src = feature_pages.PageSource(token_text=lambda r: [f"w{token_ids[i]}" for i in r])
    table = [{"feature": i, "status": "kept"} for i in range(f)]
    feats = feature_pages.export_features("a", step, pages, src, table)
    for i, feat in enumerate(feats):
        assert len(feat["freq_hist_data_bar_heights"]) == len(feat["freq_hist_data_bar_values"])
        assert len(feat["activations"]) == int((top[i] >= 0).sum())
        for c, act in enumerate(feat["activations"]):
            q = act["qualifying_token_index"]
            assert act["tokens"][q] == f"w{token_ids[top[i, c]]}"
            p = list(rows[i, c]).index(top[i, c])
            assert abs(act["values"][q] - vals[i, c, p]) < 1e-4
            assert len(act["tokens"]) == len(act["values"]) == int((rows[i, c] >= 0).sum())
    # Row 39 is the last row: no token after it; row 20 starts a segment: none before it.
    assert len(feats[1]["activations"][1]["tokens"]) == 3
    assert feats[1]["activations"][2]["qualifying_token_index"] == 0
    paths = feature_pages.write_export(
        str(tmp_path), "cross", "a", feats, {"kind": "cross"}, per_batch=2
    )
    assert len(paths) == 2
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [b["first"] for b in index["batches"]] == [0, 2]
    back = json.loads((tmp_path / "a" / "batch-1.json").read_text())
    assert back["layout"] == feature_pages.EXPORT_LAYOUT and back["features"] == feats[2:]

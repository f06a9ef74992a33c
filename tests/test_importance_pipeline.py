"""Importance-restricted / weighted / decile comparisons and the both-fire table
(experiments/pipeline/importance.py) on a toy with planted important and unimportant features."""

import numpy as np
import pytest

from engine import checks
from experiments.pipeline import importance as pimp


def _planted(seed=0, n=160, d=12, noise=0.05):
    """Pairs whose important half shares geometry across models and whose unimportant half
    does not: A's rows x, B's rows = x Q + noise for important pairs, independent otherwise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    important = np.zeros(n, bool)
    important[rng.permutation(n)[: n // 2]] = True
    y = np.where(
        important[:, None], x @ q + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d))
    )
    imp_a = np.where(important, 1.0 + rng.random(n), 0.01 * rng.random(n))
    imp_b = np.where(important, 1.0 + rng.random(n), 0.01 * rng.random(n))
    # pairs in a scrambled order, feature ids != pair index
    perm_a, perm_b = rng.permutation(n), rng.permutation(n)
    w_a = np.empty_like(x)
    w_b = np.empty_like(y)
    w_a[perm_a] = x
    w_b[perm_b] = y
    ia = np.empty(n)
    ib = np.empty(n)
    ia[perm_a] = imp_a
    ib[perm_b] = imp_b
    return w_a, w_b, perm_a, perm_b, ia, ib, important


CFG = pimp.ImportanceCompareConfig(
    top_k=80, bins=4, metrics=("cka", "rsa_pearson", "rsa_spearman"), num_permutations=50, seed=0
)


@pytest.mark.slow
def test_restriction_and_weighting_find_the_planted_difference(mesh1):
    w_a, w_b, a, b, ia, ib, important = _planted()
    out = pimp.restricted_comparisons(w_a, w_b, a, b, ia, ib, CFG, mesh1)
    top, bottom, everything = out["top_k"], out["bottom_k"], out["all"]
    # k = 80 = the planted important half: exactly those pairs (and the other half) remain
    assert top["pairs"] == 80 and bottom["pairs"] == 80
    for metric in ("cka", "rsa_pearson"):
        t = top["metrics"][metric]
        bo = bottom["metrics"][metric]
        assert t["excess"] > 0.5 and t["p"] < 0.05  # shared geometry found
        assert abs(bo["excess"]) < 4 * bo["null_std"]  # unimportant: chance level
        assert t["excess"] > everything["metrics"][metric]["excess"] + 0.2
        w = out["weighted"]["metrics"][metric]
        assert w["excess"] > everything["metrics"][metric]["excess"] + 0.2
        assert w["null_method"] == "loop"  # the null ran under the same weights
    assert "rsa_spearman" in out["weighted"]["skipped"]  # takes no row weights


def test_restricted_null_permutes_within_the_restriction(mesh1):
    """The top-k null equals a null computed by hand on the restricted rows only."""
    from engine import similarity

    w_a, w_b, a, b, ia, ib, _ = _planted(1)
    keep = pimp.top_k_mask(ia, ib, a, b, 60)
    assert 0 < keep.sum() < 60
    got = pimp.score_pairs(w_a[a[keep]], w_b[b[keep]], CFG, mesh1)["metrics"]["cka"]
    # the same permutations of the restricted rows alone (unpadded: null_size = their count)
    want = similarity.evaluate(
        w_a[a][keep],
        w_b[b][keep],
        ("cka",),
        num_permutations=50,
        seed=0,
        mesh=mesh1,
        null_size=int(keep.sum()),
    )["metrics"]["cka"]
    assert got["null_method"] == "batched-padded"
    assert got["null_mean"] == pytest.approx(want["null_mean"], rel=1e-5)
    assert got["null_std"] == pytest.approx(want["null_std"], rel=1e-4)
    # by hand: the k most important on each side
    top_a = set(np.argsort(-ia[np.unique(a)])[:60].tolist())
    top_a = set(np.unique(a)[list(top_a)].tolist())
    top_b = set(np.unique(b)[np.argsort(-ib[np.unique(b)])[:60]].tolist())
    want_keep = np.array([(ai in top_a) and (bi in top_b) for ai, bi in zip(a, b)])
    np.testing.assert_array_equal(keep, want_keep)


def test_weights_are_geometric_means():
    w = pimp.pair_weights(
        np.array([1.0, 4.0, 9.0]),
        np.array([4.0, 1.0, 1.0]),
        np.array([0, 1, 2]),
        np.array([0, 1, 2]),
    )
    np.testing.assert_allclose(w, np.array([2.0, 2.0, 3.0]) / (7.0 / 3.0))
    with pytest.raises(checks.InputError):
        pimp.pair_weights(np.array([-1.0]), np.array([1.0]), np.array([0]), np.array([0]))


def test_decile_curve_rises_with_importance(mesh1):
    w_a, w_b, a, b, ia, ib, important = _planted(2)
    curve = pimp.decile_curve(w_a, w_b, a, b, ia, CFG, mesh1)
    assert [c["n"] for c in curve] == [40, 40, 40, 40]
    assert all(curve[i]["hi"] <= curve[i + 1]["lo"] for i in range(3))
    ex = [c["metrics"]["cka"]["excess"] for c in curve]
    # the two lower bins hold the unimportant half: chance; the two upper ones are shared
    assert max(ex[:2]) < 0.15 and min(ex[2:]) > 0.5


def test_both_fire_table_planted(tmp_path):
    rng = np.random.default_rng(3)
    n, c = 40, 12
    a, b = rng.permutation(n), rng.permutation(n)
    by_a = rng.random((n, c)) * 0.1
    by_b = rng.random((n, c)) * 0.1
    # the first 20 pairs are important for the same class on both sides
    for i in range(20):
        cls = i % c
        by_a[a[i], cls] = 5.0 + i
        by_b[b[i], cls] = 5.0 + i
    t = pimp.both_fire_table(a, b, by_a, by_b, np.arange(c) + 100, top_m=2, n_shuffles=300, seed=0)
    # by hand: top-2 members per class
    ma = np.zeros((n, c), bool)
    mb = np.zeros((n, c), bool)
    for k in range(c):
        ma[np.argsort(-by_a[:, k])[:2], k] = True
        mb[np.argsort(-by_b[:, k])[:2], k] = True
    both = (ma[a] & mb[b]).any(1)
    assert t["fraction_both"] == pytest.approx(both.mean())
    assert t["fraction_both"] >= 0.5
    assert t["fraction_both_null_mean"] < 0.2 and t["p"] < 0.01
    assert t["per_class"][0]["token"] in {str(100 + k) for k in range(c)}
    with pytest.raises(checks.InputError, match="same predicted tokens"):
        pimp.both_fire_table(a, b, by_a, by_b[:, :5], np.arange(c))


def test_plot_and_lines(tmp_path, mesh1):
    w_a, w_b, a, b, ia, ib, _ = _planted(4)
    cfg = pimp.ImportanceCompareConfig(top_k=40, bins=3, metrics=("cka",), num_permutations=20)
    curve = pimp.decile_curve(w_a, w_b, a, b, ia, cfg, mesh1)
    path = tmp_path / "d.png"
    pimp.plot_deciles({"cross": curve, "ceiling": curve}, "cka", str(path))
    assert path.stat().st_size > 1000
    lines = pimp.splice_lines(
        [
            {
                "label": "A resid_post.0",
                "ce_loss_recovered": 0.3,
                "ce_loss_recovered_mean": 0.2,
                "delta_loss": 1.0,
                "kl_div": 0.5,
                "ce_clean": 3.0,
                "ce_zero": 4.0,
                "n_positions": 10,
                "objective": "next-token",
            },
            {
                "label": "B resid_post.0",
                "ce_loss_recovered": 0.9,
                "ce_loss_recovered_mean": 0.8,
                "delta_loss": 0.1,
                "kl_div": 0.05,
                "ce_clean": 3.0,
                "ce_zero": 4.0,
                "n_positions": 10,
                "objective": "next-token",
            },
            {
                "label": "B resid_post.1",
                "ce_loss_recovered": 0.1,
                "ce_loss_recovered_mean": 0.8,
                "delta_loss": 0.001,
                "kl_div": 0.05,
                "ce_clean": 3.0,
                "ce_zero": 3.001,
                "n_positions": 10,
                "objective": "next-token",
            },
        ]
    )
    warnings = [ln for ln in lines if "WARNING" in ln]
    assert len(warnings) == 1 and "A resid_post.0" in warnings[0]
    notes = [ln for ln in lines if "ill-conditioned" in ln]
    assert len(notes) == 1 and "B resid_post.1" in notes[0]


@pytest.mark.slow
def test_importance_entry_point_offline(tmp_path, mesh1):
    """experiments/importance.py end to end on a tiny model with a freshly trained SAE."""
    import json
    import os

    from experiments import importance as entry

    s = entry.Settings(
        tiny_train_steps=20,
        max_contexts=12,
        context_length=16,
        batch_size=4,
        sae_steps=40,
        n_classes=8,
        n_ablate=5,
        ablate_contexts=4,
        progress=False,
    )
    res = entry.run(s, str(tmp_path), mesh1)
    m = res["splice"]
    assert m["n_positions"] > 0 and np.isfinite(m["ce_clean"])
    assert m["ce_loss_recovered"] == pytest.approx(
        (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"])
    )
    feats = json.load(open(tmp_path / "features.json"))
    assert len(feats) == res["sae"]["d_sae"] == 4 * 32
    top = res["importance"]["top_features"]
    assert [r["attribution"] for r in top] == sorted((r["attribution"] for r in top), reverse=True)
    assert "promoted" in top[0] and len(top[0]["promoted"]) == s.top_n
    assert res["importance"]["ablation_check"]["n"] == 5
    for name in ("ablation_vs_attribution.png", "importance_hist.png", "attribution_vs_dle.png"):
        assert os.path.getsize(tmp_path / "plots" / name) > 1000
    again = entry.run(s, str(tmp_path), mesh1)  # resumes from the finished checkpoints
    assert again["splice"] == res["splice"]


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cka", "rsa_pearson"])
def test_padded_null_equals_unpadded(metric, mesh1, mesh4):
    """One compiled null for many row counts: padding the kernel (engine.nulls.padded_null)
    gives the unpadded values under the same permutations, on 1 and 4 devices, and those
    values are the metric recomputed on the permuted rows by hand."""
    from engine import nulls, similarity

    rng = np.random.default_rng(5)
    n, r = 19, 12
    x = rng.normal(size=(n, 5))
    y = x @ rng.normal(size=(5, 4)) + 0.5 * rng.normal(size=(n, 4))
    _, make_kernel = similarity.get(metric).prepare(x, y, None, mesh1)
    kernel = make_kernel()
    obs, exact = nulls.padded_null(kernel, n, r, seed=3, mesh=mesh1)
    for size, mesh in ((n, mesh4), (64, mesh1), (64, mesh4)):
        o, null = nulls.padded_null(kernel, size, r, seed=3, mesh=mesh)
        np.testing.assert_allclose(null, exact, rtol=1e-5, atol=1e-6)
        assert o == pytest.approx(obs, rel=1e-5)
    perms = nulls.prefix_permutations(n, r, seed=3, size=64)
    np.testing.assert_array_equal(perms[:, n:], np.broadcast_to(np.arange(n, 64), (r, 64 - n)))
    assert all(sorted(p[:n]) == list(range(n)) for p in perms)
    np.testing.assert_array_equal(perms[:, :n], nulls.prefix_permutations(n, r, seed=3))
    by_hand = [similarity.score(metric, x, y[p[:n]]) for p in perms]
    np.testing.assert_allclose(exact, by_hand, rtol=1e-4, atol=1e-5)
    assert obs == pytest.approx(similarity.score(metric, x, y), rel=1e-4)
    # through the pipeline: the restricted score uses the padded null
    out = pimp.score_pairs(
        x, y, pimp.ImportanceCompareConfig(metrics=(metric,), num_permutations=r), mesh1
    )
    assert out["metrics"][metric]["null_method"] == "batched-padded"

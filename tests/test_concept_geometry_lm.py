"""Concept geometry on transformers models and their SAEs (experiments/pipeline/geometry_lm.py).

Known truth: tiny GPT-NeoX models whose embedding tables put the weekday and month tokens on
circles (models/planted_lm.py); at ``resid_pre.0`` the activations are those embedding rows, so
SAEs trained on them must yield a circular family in both models and a significant cross-model
comparison; the unplanted control (random directions, independent models) must not be
circular.
"""

import json
import os

import numpy as np
import pytest

from engine import checks
from experiments import common
from experiments.pipeline import concept_family as cf
from experiments.pipeline import geometry_lm
from models import planted_lm

# -- selection rule and items ----------------------------------------------------------------


def test_selection_rule_matches_reference():
    rng = np.random.default_rng(0)
    codes = np.maximum(rng.standard_normal((200, 6)), 0)
    items = np.full(200, -1)
    items[:30] = rng.integers(0, 3, 30)
    codes[items >= 0, 0] += 3.0  # feature 0 concentrates on the items
    codes[items < 0, 0] = 0.0
    codes[:, 1] = 0.0  # silent
    codes[items >= 0, 2] = 0.0
    codes[:2, 2] = 0.0
    codes[items >= 0, 3] = 0.0
    codes[0, 3] = 50.0  # one huge hit: concentrated but too few hits
    items[0] = 1
    on = items >= 0
    sel = cf.select(codes.sum(0), codes[on], tau=0.5, min_hits=3)
    # Reference: explicit loops in float64.
    expect = []
    for f in range(6):
        tot = sum(float(codes[r, f]) for r in range(200))
        mass = sum(float(codes[r, f]) for r in range(200) if items[r] >= 0)
        hits = sum(1 for r in range(200) if items[r] >= 0 and codes[r, f] > 0)
        if tot > 0 and mass / tot >= 0.5 and hits >= 3:
            expect.append(f)
        assert sel.hits[f] == hits
        assert sel.concentration[f] == pytest.approx(mass / tot if tot > 0 else 0.0)
    assert sel.members.tolist() == expect and 0 in expect and 3 not in expect
    prof = cf.item_profile(codes[on], items[on], 3)
    for i in range(3):
        np.testing.assert_allclose(prof[i], codes[items == i].mean(0))
    concept = cf.Concept("x", ("a", "b", "c"), 3)
    per = cf.features_per_item(prof, np.asarray([0, 4]), concept)
    assert sum(v["preferring"] for v in per.values()) == 2


def test_items_matched_by_token_strings():
    days = cf.make_concept("days")
    assert days.name == "Days of week" and days.period == 7 and days.items[0] == "monday"
    toks = ["ĠMonday", "▁sunday", "Mon", "mondays", "FRIDAY", "##tuesday", "x"]
    assert cf.label_rows(toks, days).tolist() == [0, 6, -1, -1, 4, 1, -1]
    food = cf.make_concept("Food")
    assert food.period is None and "bread" in food.items
    with pytest.raises(checks.InputError, match="not a built-in group"):
        cf.make_concept("Nope")


def test_builtin_scripts_and_named_groups_need_no_file(tmp_path):
    """Scripts (Unicode blocks), topic lists and 'Arabic food' resolve by name alone."""
    from experiments.configs import feature_geometry as fg_config
    from experiments.pipeline import concepts

    arabic = cf.make_concept("arabic")
    assert arabic.name == "Arabic script" and arabic.items == ("Arabic script",)
    assert arabic.period is None
    toks = ["Ġمرحبا", "▁كتاب", "Привет", "Ωμέγα", "hello", "٣٣", ",", "abcكتاب", "ﻻ", "Arabic"]
    # Reference: every letter's code point inside U+0600-06FF or the presentation forms.
    expect = [
        0
        if (letters := [c for c in concepts.normalize_token(t) if c.isalpha()])
        and all(0x0600 <= ord(c) <= 0x06FF or 0xFB50 <= ord(c) <= 0xFEFF for c in letters)
        else -1
        for t in toks
    ]
    assert expect == [0, 0, -1, -1, -1, -1, -1, -1, 0, -1]
    assert cf.label_rows(toks, arabic).tolist() == expect
    assert cf.label_rows(toks, cf.make_concept("Cyrillic")).tolist() == [-1, -1, 0] + [-1] * 7
    greek = cf.make_concept("greek script")
    assert cf.label_rows(toks, greek).tolist() == [-1] * 3 + [0] + [-1] * 6
    food = cf.make_concept("Arabic food")
    assert food.script is None and "falafel" in food.items
    falafel = food.items.index("falafel")
    assert cf.label_rows(["ĠFalafel", "falafels"], food).tolist() == [falafel, -1]
    # A script group works where keyword sets do (feature membership, topic rows, row masks).
    groups = concepts.resolve_groups(["Arabic script", "Arabic food", "Food", "cyrillic"])
    assert list(groups) == ["Arabic script", "Arabic food", "Food", "Cyrillic script"]
    got = concepts.assign_features([["x", "ĠКот"], ["Ġخبز"], ["bread"]], groups, top_n=2)
    assert {g: v.tolist() for g, v in got.items()} == {
        "Arabic script": [1],
        "Arabic food": [],
        "Food": [2],
        "Cyrillic script": [0],
    }
    assert cf.matching_rows(["a", "خبز", "bread", "hummus"], list(groups.values())).tolist() == [
        False,
        True,
        True,
        True,
    ]
    assert concepts.describe_group(groups["Arabic script"]).startswith("Arabic script: letters")
    assert list(concepts.resolve_groups()) == list(concepts.BUILTIN)  # defaults unchanged
    # The experiment's settings accept them with no --concepts_file ...
    values = common.default_values(fg_config)
    values.update(
        workdir=str(tmp_path / "run"),
        families=["Days of week", "Arabic script"],
        group_concepts=["Arabic script", "Arabic food", "Food", "Cyrillic", "Greek"],
        topic="Arabic script",
    )
    common.validate(values, common.rules_of(fg_config))
    # ... and an unknown family is one line naming it and listing the built-ins.
    values["families"] = ["Klingon script"]
    with pytest.raises(common.ConfigError) as e:
        common.validate(values, common.rules_of(fg_config))
    msg = str(e.value)
    assert "\n" not in msg and "'Klingon script'" in msg and "Arabic script" in msg


def test_planted_embeddings_are_circles():
    vocab = {w: i for i, w in enumerate(planted_lm.DAYS + planted_lm.MONTHS + ("bread",))}
    a = 0.5
    E = planted_lm.planted_embeddings(vocab, 32, planted=True, seed=3, circle_offset=a)
    for items in (planted_lm.DAYS, planted_lm.MONTHS):
        C = E[[vocab[w] for w in items]].astype(np.float64)
        m = len(items)
        i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        np.testing.assert_allclose(
            C @ C.T, a * a + (1 - a * a) * np.cos(2 * np.pi * (i - j) / m), atol=1e-5
        )
    D = E[[vocab[w] for w in planted_lm.DAYS]].astype(np.float64)
    M = E[[vocab[w] for w in planted_lm.MONTHS]].astype(np.float64)
    # The two circles' planes are orthogonal (only their centres may correlate).
    Dc, Mc = D - D.mean(0), M - M.mean(0)
    assert np.abs(Dc @ Mc.T).max() < 1e-5
    ctrl = planted_lm.planted_embeddings(vocab, 32, planted=False, seed=3, circle_offset=a)
    C = ctrl[[vocab[w] for w in planted_lm.DAYS]].astype(np.float64)
    s = np.linalg.svd(C - C.mean(0), compute_uv=False) ** 2
    assert s[:2].sum() / s.sum() < 0.7  # not a plane
    docs = planted_lm.planted_corpus(30, seed=1)
    words = " ".join(docs).split()
    counts = [words.count(d) for d in planted_lm.DAYS]
    assert max(counts) - min(counts) <= 1  # balanced item frequencies


# -- end to end ------------------------------------------------------------------------------


def _cfg(**kw):
    c = dict(
        seed=0,
        sae_width=0,
        sae_k=4,
        sae_steps=200,
        sae_batch=256,
        sae_lr=3e-3,
        sae_dead_tokens=25600,
        graph_k=2,
        graph_threshold=0.5,
        min_size=2,
        max_size=0,
        spectral_clusters=0,
        n_null=200,
        alpha=0.01,
        chunk_size=1024,
        plots=True,
        progress=False,
        model_a="planted",
        model_b="planted",
        lm_planted=True,
        lm_shared=True,
        hookpoint_a="resid_pre.0",
        hookpoint_b=None,
        sae_a=None,
        sae_b=None,
        cache_a=None,
        cache_b=None,
        text="planted",
        max_documents=0,
        max_contexts=120,
        context_length=32,
        lm_batch_size=16,
        sae_expansion=4,
        families=["Days of week", "Months"],
        group_concepts=[
            "Days of week",
            "Months",
            "Food",
            "Numbers",
            "Nature",
            "People/Roles",
            "Emotions",
        ],
        concepts_file=None,
        topic="Food",
        templates=True,
        family_tau=0.5,
        family_min_hits=3,
        spectral_max_features=4096,
    )
    c.update(kw)
    return c


@pytest.mark.slow
def test_planted_pair_family_circular_and_shared(tmp_path, mesh1):
    run = common.Run(workdir=str(tmp_path), mesh=mesh1)
    res = geometry_lm.run_lm(run, _cfg())
    run.write_results(res)
    full = res["full_corpus"]
    assert res["selection_rule"]["tau"] == 0.5 and res["selection_rule"]["min_hits"] == 3
    for fam in ("Days of week", "Months"):
        e = full["families"][fam]
        for s in "ab":
            m = e[f"model_{s}"]
            assert m["found"] and m["family"]["n"] >= 3
            assert m["templates"]["item_token_matched"] == 1.0
            per = m["family"]["features_per_item"]
            assert set(per) == set(cf.CYCLES[fam])
            assert sum(v["preferring"] for v in per.values()) == m["family"]["n"]
            rc = m["reconstruction_circularity"]
            assert rc["score"] > 0.9 and rc["p"] < 0.01, (fam, s, rc["score"], rc["p"])
            assert "cluster_graph" in m or m["family"]["n"] == 0
        cm = e["cross_model"]
        assert cm["items_in_both"] == len(cf.CYCLES[fam])
        assert cm["ordering_agreement"]["p"] < 0.01 and cm["rsa"]["p"] < 0.01, fam
    # The topic control is restricted to the Food documents: fewer rows, same analysis.
    tc = res["topic_control"]
    assert tc["topic"] == "Food"
    assert all(0 < t < f for t, f in zip(tc["tokens_topic"], tc["tokens_full"]))
    assert set(tc["families"]) == {"Days of week", "Months"}
    for name in ("circle_daysofweek.png", "circle_months.png"):
        assert os.path.getsize(os.path.join(run.plots_dir, name)) > 1000
    if full["group_distances"] is not None:
        assert os.path.getsize(os.path.join(run.plots_dir, "group_distances.png")) > 1000
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["corpus"] for x in lines] == ["full_corpus", "topic_control"]


@pytest.mark.slow
def test_unplanted_control_is_not_circular(tmp_path, mesh1):
    run = common.Run(workdir=str(tmp_path), mesh=mesh1)
    res = geometry_lm.run_lm(
        run,
        _cfg(
            lm_planted=False,
            lm_shared=False,
            plots=False,
            families=["Days of week"],
            templates=False,
        ),
    )
    e = res["full_corpus"]["families"]["Days of week"]
    for s in "ab":
        m = e[f"model_{s}"]
        assert m["found"]  # the tokens are still distinct: a family exists
        for key in ("reconstruction_circularity", "decoder_circularity"):
            if m[key] is not None:
                assert m[key]["p"] > 0.01, (s, key, m[key])
    # Independent geometries: the cross-model comparisons stay at chance.
    cm = e["cross_model"]
    if "rsa" in cm:
        assert cm["rsa"]["p"] > 0.01 and cm["ordering_agreement"]["p"] > 0.01, cm
    gd = res["full_corpus"]["group_distances"]
    if gd is not None:
        assert gd["rsa"]["p"] > 0.01, gd["rsa"]


@pytest.mark.slow
def test_activation_caches_give_the_live_results(tmp_path, mesh1):
    """Caches harvested from the same contexts reproduce the live run (same SAEs, reused)."""
    from models import activation_cache, lm, text

    cfg = _cfg(
        families=["Days of week"],
        plots=False,
        n_null=100,
        max_contexts=60,
        group_concepts=["Days of week", "Months", "Food", "Numbers"],
    )
    run = common.Run(workdir=str(tmp_path / "run"), mesh=mesh1)
    geometry_lm.run_lm(run, cfg)  # trains the SAEs (kept in memory for this run)
    # Both compared runs read the SAEs back from disk (`saes.obtain` finds them finished).
    live = geometry_lm.run_lm(run, cfg)
    pair = planted_lm.make_planted_lm_pair(run.path("planted_models"))
    docs = list(text.read_documents(pair.corpus))
    caches = []
    for side, path in (("a", pair.path_a), ("b", pair.path_b)):
        model = lm.LanguageModel.load(path)
        ctx = text.make_contexts(docs, model.tokenizer, 32, max_contexts=60)
        activation_cache.harvest(
            model, ctx, ["resid_pre.0"], str(tmp_path / f"cache_{side}"), progress=False
        )
        caches.append(str(tmp_path / f"cache_{side}"))
    cached = geometry_lm.run_lm(run, dict(cfg, cache_a=caches[0], cache_b=caches[1]))
    assert "activation cache" in cached["sides"]["a"]["activations"]
    assert cached["sides"]["a"]["sae"]["seed"] == live["sides"]["a"]["sae"]["seed"]
    for s in "ab":
        got = cached["full_corpus"]["families"]["Days of week"][f"model_{s}"]
        want = live["full_corpus"]["families"]["Days of week"][f"model_{s}"]
        assert got["family"]["members"] == want["family"]["members"]
        assert got["corpus"]["item_rows"] == want["corpus"]["item_rows"] > 0
        assert got["reconstruction_circularity"]["score"] == pytest.approx(
            want["reconstruction_circularity"]["score"], abs=1e-6
        )
    assert cached["full_corpus"]["group_features"] == live["full_corpus"]["group_features"]

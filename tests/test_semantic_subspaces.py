"""Semantic subspaces (issue 8): keyword rules, in-group pairing, planted toy, tiny LM pair.

End-to-end runs use one simulated device (`mesh1`): 4 simulated devices under heavy load have
hit XLA collective rendezvous timeouts in SAE training.
"""

import json
import os
import types

import numpy as np
import pytest

from engine import checks
from experiments import common
from experiments.pipeline import concepts, subspace_runner, subspaces

# -- keyword matching ------------------------------------------------------------------------


def test_matching_rule_markers_case_whitespace_whole_token():
    food = concepts.resolve_groups(["food"])["Food"]
    for tok in ("bread", "Bread", "BREAD", "Ġbread", "▁Bread", "##bread", "  bread\n", "Ġ Bread "):
        assert concepts.token_matches(tok, food), tok
    for tok in ("breads", "bread,", "Ġbre", "brea", "shortbread", "bread-crumb", "", "Ġ"):
        assert not concepts.token_matches(tok, food), tok
    # Keywords are normalised the same way as tokens.
    g = concepts.make_group("G", ["ĠMonday", " ▁TUESDAY ", "##wed"])
    assert g == frozenset({"monday", "tuesday", "wed"})


def test_group_names_aliases_and_builtins():
    assert set(concepts.BUILTIN) == {
        "Time",
        "Calendar",
        "Months",
        "Days of week",
        "Emotions",
        "Countries",
        "Nature",
        "People/Roles",
        "Biology",
        "Food",
        "Numbers",
    }
    assert concepts.canonical_name("days_of_week") == "Days of week"
    assert concepts.canonical_name("PEOPLE") == "People/Roles"
    assert concepts.canonical_name("people/roles") == "People/Roles"
    assert list(concepts.resolve_groups()) == list(concepts.BUILTIN)


def test_user_lists_json_and_text(tmp_path):
    pj = tmp_path / "g.json"
    pj.write_text(json.dumps({"Planets": ["Mars", "ĠVenus"], "Food": ["kebab"]}))
    groups = concepts.resolve_groups(None, str(pj))
    assert groups == {"Planets": frozenset({"mars", "venus"}), "Food": frozenset({"kebab"})}
    # Built-ins named alongside a file: the file's group replaces the built-in of that name.
    both = concepts.resolve_groups(["Food", "Months"], str(pj))
    assert both["Food"] == frozenset({"kebab"}) and "january" in both["Months"]
    pt = tmp_path / "g.txt"
    pt.write_text("# my groups\nScripts: arabic, latin  cyrillic\n\nMetals: gold,iron\n")
    assert concepts.load_user_groups(str(pt)) == {
        "Scripts": frozenset({"arabic", "latin", "cyrillic"}),
        "Metals": frozenset({"gold", "iron"}),
    }


def test_assign_features_top_n_and_invalid():
    groups = {
        "Food": concepts.make_group("Food", ["bread", "wine"]),
        "Days": concepts.make_group("Days", ["monday"]),
    }
    top = [["Ġbread", "x", "y"], ["x", "y", "Monday"], ["x", "y", "z", "wine"], ["wine"], []]
    out = concepts.assign_features(top, groups, top_n=3)
    assert out["Food"].tolist() == [0, 3] and out["Days"].tolist() == [1]
    out = concepts.assign_features(top, groups, top_n=4, valid=np.array([1, 1, 1, 0, 1], bool))
    assert out["Food"].tolist() == [0, 2]


# -- bad input -------------------------------------------------------------------------------


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_messages(tmp_path):
    with pytest.raises(checks.InputError) as e:
        concepts.make_group("Empty", [])
    assert "empty keyword list" in _one_line(e)
    with pytest.raises(checks.InputError) as e:
        concepts.make_group("Blank", ["  ", "Ġ"])
    assert "empty keyword list" in _one_line(e)
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"Planets": []}))
    with pytest.raises(checks.InputError) as e:
        concepts.resolve_groups(None, str(p))
    assert "'Planets'" in _one_line(e) and "empty keyword list" in str(e.value)
    with pytest.raises(checks.InputError) as e:
        concepts.resolve_groups(["Food", "Planets"])
    assert "unknown concept group 'Planets'" in _one_line(e)
    with pytest.raises(checks.InputError) as e:
        concepts.make_group("Phrases", ["ice cream"])
    assert "several words" in _one_line(e)
    with pytest.raises(checks.InputError) as e:
        concepts.load_user_groups(str(tmp_path / "missing.json"))
    assert "no such file" in _one_line(e)
    bad = tmp_path / "bad.txt"
    bad.write_text("no colon here\n")
    with pytest.raises(checks.InputError) as e:
        concepts.load_user_groups(str(bad))
    assert "line 1" in _one_line(e)
    step = {"corr": np.eye(3)}
    with pytest.raises(checks.InputError) as e:
        subspaces.group_pairs(step, np.array([], np.int64), np.array([0, 1]), group="Months")
    assert "group 'Months': no feature of SAE A" in _one_line(e)


# -- in-group pairing ------------------------------------------------------------------------


def _reference_group_pairs(corr, ma, mb):
    """Independent definition: all (a, best b in group) and (best a in group, b) proposals,
    then repeatedly take the highest-valued proposal whose two features are both free."""
    props = {}
    for a in ma:
        b = max(mb, key=lambda j: (corr[a, j], -j))
        props[(a, b)] = corr[a, b]
    for b in mb:
        a = max(ma, key=lambda i: (corr[i, b], -i))
        props[(a, b)] = corr[a, b]
    kept, used_a, used_b = [], set(), set()
    for (a, b), _v in sorted(props.items(), key=lambda t: (-t[1], t[0][0], t[0][1])):
        if a not in used_a and b not in used_b:
            kept.append((a, b))
            used_a.add(a)
            used_b.add(b)
    return sorted(kept)


def test_group_pairs_match_reference_and_ignore_outside_features():
    rng = np.random.default_rng(0)
    corr = rng.uniform(-0.2, 0.6, size=(30, 25))
    ma, mb = np.array([2, 5, 7, 11, 20]), np.array([1, 3, 4, 9])
    corr[2, 0] = 0.99  # the best partner of 2 overall lies outside the group
    got = subspaces.group_pairs({"corr": corr}, ma, mb)
    assert sorted(zip(got.a.tolist(), got.b.tolist())) == _reference_group_pairs(corr, ma, mb)
    assert set(got.a) <= set(ma) and set(got.b) <= set(mb)
    assert len(set(got.a)) == len(got) and len(set(got.b)) == len(got)
    np.testing.assert_allclose(got.value, corr[got.a, got.b])
    thr = subspaces.group_pairs({"corr": corr}, ma, mb, threshold=0.4)
    assert np.all(thr.value >= 0.4) and len(thr) == int(np.sum(got.value >= 0.4))


# -- planted toy -----------------------------------------------------------------------------


def _flags(**kw):
    base = dict(
        seed=0,
        toy_d=64,
        toy_n_tokens=4096,
        toy_group_size=12,
        toy_dictionary="truth",
        sae_k=4,
        sae_width=0,
        sae_steps=100,
        sae_batch=128,
        sae_lr=3e-3,
        progress=False,
        concepts=[],
        concepts_file=None,
        topic="Food",
        metrics=["svcca", "cka", "rsa_spearman", "mutual_knn"],
        num_permutations=200,
        min_pairs=3,
        threshold=-1.0,
        member_top_n=5,
        random_draws=5,
        knn_k=5,
        alpha=0.01,
        chunk_size=1024,
        preset="toy",
        cache_a=None,
        cache_b=None,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_planted_toy_groups_found_significant_where_shared(tmp_path, mesh1):
    run = common.Run(workdir=str(tmp_path), mesh=mesh1)
    fl = _flags(
        concepts=["Days of week", "Food", "Countries", "Months"],
        metrics=["cka", "rsa_spearman"],
        random_draws=3,
    )
    res = subspace_runner.main(run, fl)
    planted = res["data"]["planted_groups"]
    g = res["groups"]
    # Membership: exactly the planted features join their group (truth dictionary).
    for name in ("Days of week", "Food", "Countries"):
        assert g[name]["n_features_a"] == len(planted[name]) <= g[name]["n_features_b"]
        assert set(g[name]["pairs"]["a"]) <= set(planted[name])
        assert g[name]["n_pairs"] >= len(planted[name]) - 2
        assert g[name]["status"] == "scored"
    for name in ("Days of week", "Food"):
        # Same codes and geometry: in-group pairing recovers feature i <-> feature i
        # (unshared groups of B may gain a few strays through the truth encoder's interference).
        assert g[name]["n_features_b"] == len(planted[name])
        assert g[name]["pairs"]["a"] == g[name]["pairs"]["b"]
        assert sorted(g[name]["pairs"]["a"]) == sorted(planted[name])
    assert g["Months"]["status"] == "skipped" and "no feature" in g["Months"]["skip_reason"]
    assert res["skipped"] == {"Months": g["Months"]["skip_reason"]}
    for name in ("Days of week", "Food"):  # shared geometry
        for m in ("cka", "rsa_spearman"):
            assert g[name]["metrics"][m]["p"] < 0.01, (name, m)
        assert g[name]["metrics"]["rsa_spearman"]["score"] > 0.8
    for name in ("Countries",):  # not shared
        assert g[name]["metrics"]["rsa_spearman"]["p"] > 0.01, name
        assert abs(g[name]["metrics"]["rsa_spearman"]["score"]) < 0.3
    for name in ("Days of week", "Food", "Countries"):
        ri = g[name]["random_init"]
        assert ri["status"] == "scored" and ri["metrics"]["rsa_spearman"]["p"] > 0.01
        rs = g[name]["random_subsets"]
        assert rs["draws"] == 3 and set(rs["metrics"]) == set(fl.metrics)
    # Topic control on the Food documents: fewer tokens, every group present.
    tc = res["topic_control"]
    assert tc["topic"] == "Food" and 0 < tc["tokens_topic"] < tc["tokens_full"]
    assert set(tc["groups"]) == set(g)
    d = tc["groups"]["Food"]["metrics"]["rsa_spearman"]
    assert d["difference"] == pytest.approx(d["topic"] - d["full"])
    assert res["significant"]["rsa_spearman"] == ["Days of week", "Food"]
    assert os.path.exists(os.path.join(run.plots_dir, "groups_vs_null.png"))
    with open(run.path("results.json")) as f:
        assert json.load(f)["counts"] == {"scored": 3, "skipped": 1}


def test_topic_rows_are_whole_documents():
    docs = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    toks = ["a", "Ġbread", "b", "c", "d", "e", "WINE", "f"]
    sel = subspace_runner.topic_rows(docs, toks, concepts.make_group("F", ["bread", "wine"]))
    assert sel.tolist() == [True, True, True, False, False, True, True, True]


# -- tiny transformers pair ------------------------------------------------------------------


def test_tiny_lm_pair_end_to_end(tmp_path, mesh1):
    run = common.Run(workdir=str(tmp_path), mesh=mesh1)
    fl = _flags(
        preset="lm",
        model_a=None,
        model_b=None,
        lm_train_steps=0,
        hookpoint_a="resid_post.0",
        hookpoint_b=None,
        sae_a=None,
        sae_b=None,
        text="sample",
        max_documents=20,
        max_contexts=64,
        context_length=32,
        sae_steps=100,
        sae_width=96,
        random_draws=3,
        metrics=["svcca", "mutual_knn"],
        concepts=["People/Roles", "Nature", "Months"],
    )
    res = subspace_runner.main(run, fl)
    g = res["groups"]
    assert set(g) == {"People/Roles", "Nature", "Months"}
    assert res["data"]["tokens"] == 64 * 31  # BOS removed from each context
    assert res["tokens"] == res["data"]["tokens"]
    ps = []
    for _name, e in g.items():
        assert e["n_features_a"] <= 96 and e["n_pairs"] <= min(e["n_features_a"], e["n_features_b"])
        if e["status"] == "scored":
            assert e["n_pairs"] >= 3 and set(e["metrics"]) == set(fl.metrics)
            ps += [r["p"] for r in e["metrics"].values()]
        else:
            assert e["skip_reason"]
    assert g["Months"]["status"] == "skipped"  # no month name among 1000 KJV words used
    assert res["counts"]["scored"] >= 1
    # Two random models: null-like. With 200 permutations p >= 1/201; allow the expected
    # rate of p < 0.01 plus slack, never a wall of significance.
    ps = np.asarray(ps)
    assert np.all((ps > 0) & (ps <= 1))
    assert np.mean(ps < 0.01) <= 0.35, ps
    assert "topic_control" in res and res["topic_control"]["topic"] == "Food"

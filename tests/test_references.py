"""Seeds per SAE role, reference points per cell, loaded-SAE ceilings/floors, replicates.

Unit level (no subprocess): `experiments.pipeline.saes` and `experiments.pipeline.references`
on tiny arrays with a few training steps. End-to-end runs of the CLI are in
tests/test_universality.py.
"""

import dataclasses
import itertools
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from engine import checks
from experiments.pipeline import references, results, saes
from models import sae as sae_lib
from models import sae_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_roles():
    """Every role a 2x2 grid with 3 replicates, ceilings, floors and a 3-point sweep has."""
    roles = []
    for cond in ("", "k=4", "k=8", "k=16"):
        for side in ("a", "b"):
            for hp in ("resid_post.0", "resid_post.1"):
                roles += [saes.Role(side, hp, "main", r, cond) for r in range(3)]
                roles.append(saes.Role(side, hp, "ceiling", 0, cond))
                roles.append(saes.Role(f"{side}~random", hp, "floor", 0, cond))
        roles.append(saes.Role("control", "toy", "main", 0, cond))
    return roles


def test_role_seeds_are_distinct_and_differ_between_streams():
    roles = run_roles()
    for user_seed in (0, 1, 12345):
        seeds = [saes.role_seeds(user_seed, r) for r in roles]
        inits = [s[0] for s in seeds]
        datas = [s[1] for s in seeds]
        assert len(set(inits)) == len(roles)
        assert len(set(datas)) == len(roles)
        assert all(i != d for i, d in seeds)
        assert all(0 <= v < 2**31 - 1 for v in inits + datas)
    # The user seed changes every SAE's seeds.
    a = {saes.role_seeds(0, r) for r in roles}
    b = {saes.role_seeds(1, r) for r in roles}
    assert not a & b


def test_role_seeds_do_not_depend_on_python_hash_randomisation():
    code = (
        "from experiments.pipeline import saes; "
        "print(saes.role_seeds(7, saes.Role('b', 'resid_post.3', 'ceiling', 2, 'k=8')))"
    )
    outs = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": ROOT}
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code],
                env=env,
                cwd=ROOT,
                text=True,
                capture_output=True,
                check=True,
            ).stdout
        )
    assert len(outs) == 1
    assert outs.pop().strip() == str(
        saes.role_seeds(7, saes.Role("b", "resid_post.3", "ceiling", 2, "k=8"))
    )


def _side_sae(key_side, seed, data_seed):
    sae = sae_lib.init(
        jax.random.PRNGKey(0), sae_lib.SAEConfig(d_in=4, d_sae=8, activation="topk", k=2)
    )
    return saes.SideSAE(saes.Role(key_side, "h"), sae, "trained here", seed, data_seed)


def test_shared_seeds_are_refused():
    saes.check_distinct_seeds(
        [
            _side_sae("a", 1, 2),
            _side_sae("b", 3, 4),
            _side_sae("c", None, None),
            _side_sae("d", None, None),
        ]
    )
    with pytest.raises(checks.InputError, match="share the init seed 1"):
        saes.check_distinct_seeds([_side_sae("a", 1, 2), _side_sae("b", 1, 4)])
    with pytest.raises(checks.InputError, match="share the data seed 2"):
        saes.check_distinct_seeds([_side_sae("a", 1, 2), _side_sae("b", 3, 2)])


def _toy_acts(n=1024, d=12, f=24, seed=0):
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(f, d))
    codes = rng.exponential(size=(n, f)) * (rng.random((n, f)) < 0.1)
    return (codes @ dictionary).astype(np.float32)


def _training(tmp_path, mesh, steps=30, d_sae=24, k=3):
    return references.Training(
        recipe=lambda side, hp, d_in: sae_train.TrainConfig(
            d_sae=d_sae, activation="topk", k=k, lr=3e-3
        ),
        steps=steps,
        batch_size=128,
        root=str(tmp_path / "saes"),
        mesh=mesh,
        user_seed=0,
    )


def _same_index_fraction(w_a, w_b):
    """Fraction of A's decoder rows whose best-cosine partner in B has the same index."""
    a = w_a / np.linalg.norm(w_a, axis=1, keepdims=True)
    b = w_b / np.linalg.norm(w_b, axis=1, keepdims=True)
    return float(np.mean(np.abs(a @ b.T).argmax(1) == np.arange(len(a))))


def test_two_sides_on_identical_data_never_share_init_or_data_order(tmp_path, mesh1):
    """The failure of issue 12: side A and side B trained with one seed and one data order
    on the same activations give the same SAE, feature i paired with feature i. With role
    seeds the two SAEs (and the ceiling's) differ and the same-index fraction is at chance."""
    acts = _toy_acts()
    side_a = references.SideSpec("a", {"h": acts})
    side_b = references.SideSpec("b", {"h": acts})
    planner = references.Planner(
        references.RefSettings(floor=False), _training(tmp_path, mesh1), multi_cell=False
    )
    planner.cell(side_a, "h", side_b, "h")
    specs = planner.specs()
    assert [s.kind for s in specs] == ["cross", "ceiling", "ceiling"]
    every = list(planner.saes.values())
    assert len(every) == 4
    assert len({s.seed for s in every}) == 4 and len({s.data_seed for s in every}) == 4
    for spec in specs:
        assert spec.sae_a.seed != spec.sae_b.seed
        assert spec.sae_a.data_seed != spec.sae_b.data_seed
        wa, wb = (np.asarray(s.sae.W_dec, np.float64) for s in (spec.sae_a, spec.sae_b))
        assert not np.allclose(wa, wb)
        # 24 features: chance of the same index is 1/24 per row; identical SAEs give 1.
        assert _same_index_fraction(wa, wb) < 0.3, spec.name
    # The initialisations differ too (not only the trained results).
    inits = {saes.role_seeds(0, s.role)[0] for s in every}
    keys = [np.asarray(jax.random.PRNGKey(i)).tolist() for i in inits]
    assert len({tuple(k) for k in keys}) == 4
    # The seeds are recorded beside each SAE.
    for s in every:
        rec = s.record()
        assert rec["seed"] == s.seed and rec["recipe"]["config"]["seed"] == s.seed
        assert rec["recipe"]["data_seed"] == s.data_seed


def test_replicates_plan_and_disjoint_folds(tmp_path, mesh1):
    acts = _toy_acts(n=600)
    side_a = references.SideSpec("a", {"h": acts})
    side_b = references.SideSpec("b", {"h": acts * 2})
    planner = references.Planner(
        references.RefSettings(replicates=3, replicate_data="subset"),
        _training(tmp_path, mesh1, steps=3),
        multi_cell=False,
    )
    planner.cell(side_a, "h", side_b, "h", floor_acts=lambda side, hp: acts[::-1].copy())
    specs = planner.specs()
    kinds = [s.kind for s in specs]
    assert kinds.count("cross") == 9 and kinds.count("ceiling") == 6
    assert kinds.count("floor") == 1
    assert sorted(s.name for s in specs if s.kind == "cross") == sorted(
        f"cross:r{i}-r{j}" for i in range(3) for j in range(3)
    )
    # Ceilings are the within-side replicate pairs: no extra SAE.
    assert not any(s.role.kind == "ceiling" for s in planner.saes.values())
    # Folds: disjoint, covering every row once per side.
    rows = [saes._subset_rows(600, None, (r, 3), 0) for r in range(3)]
    assert sum(len(r) for r in rows) == 600
    assert len(np.unique(np.concatenate(rows))) == 600
    mains = [s for s in planner.saes.values() if s.role.kind == "main"]
    assert sorted(s.recipe["rows"] for s in mains) == [200] * 6


def _loaded(d_in, d_sae, k, seed=0, activation="topk"):
    cfg = sae_lib.SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation=activation,
        k=k,
        metadata=(("l1_coeff", 2.5),) if activation == "relu" else (),
    )
    return sae_lib.init(jax.random.PRNGKey(seed), cfg)


def test_loaded_saes_get_matched_ceiling_and_floor(tmp_path, mesh1):
    acts = _toy_acts()
    sae_a, sae_b = _loaded(12, 20, 2), _loaded(12, 28, 5, seed=1)
    second_b = _loaded(12, 28, 5, seed=2)
    side_a = references.SideSpec("a", {"h": acts}, loaded={"h": ("/pub/a", sae_a)})
    side_b = references.SideSpec(
        "b",
        {"h": acts},
        loaded={"h": ("/pub/b", sae_b)},
        loaded_ceiling={"h": ("/pub/b2", second_b)},
    )
    planner = references.Planner(
        references.RefSettings(), _training(tmp_path, mesh1, 5), multi_cell=False
    )
    planner.cell(side_a, "h", side_b, "h", floor_acts=lambda side, hp: acts[::-1].copy())
    by_key = planner.saes
    ceil_a = by_key["a/h/ceiling0"]
    assert ceil_a.source == "trained here" and "lower bound" in ceil_a.note
    assert (ceil_a.sae.config.d_sae, ceil_a.sae.config.k) == (20, 2)  # not the recipe's 24/3
    ceil_b = by_key["b/h/ceiling0"]
    assert ceil_b.source == "/pub/b2" and ceil_b.sae is second_b
    floor = by_key["b_random/h/floor0"]
    assert (floor.sae.config.d_sae, floor.sae.config.k) == (28, 5)  # B's loaded SAE
    kinds = {s.name: s.kind for s in planner.specs()}
    assert kinds == {
        "cross": "cross",
        "ceiling_a": "ceiling",
        "ceiling_b": "ceiling",
        "floor": "floor",
    }
    # A loaded side cannot be replicated.
    bad = references.Planner(
        references.RefSettings(replicates=2), _training(tmp_path, mesh1, 5), multi_cell=False
    )
    with pytest.raises(checks.InputError, match="loaded SAEs"):
        bad.cell(side_a, "h", side_b, "h")


def test_matching_config_copies_architecture_width_and_sparsity():
    template = sae_train.TrainConfig(d_sae=64, activation="topk", k=8, lr=1e-3, l1_coeff=5.0)
    m = saes.matching_config(_loaded(6, 40, 7, activation="batchtopk"), template)
    assert (m.activation, m.d_sae, m.k, m.lr) == ("batchtopk", 40, 7, 1e-3)
    m = saes.matching_config(_loaded(6, 30, 0, activation="relu"), template)
    assert (m.activation, m.d_sae, m.l1_coeff) == ("relu", 30, 2.5)
    # JumpReLU: the loaded thresholds (raw units) become the trainer's initial threshold in
    # normalised units: inputs scaled by sqrt(d) / mean ||x||.
    jr = _loaded(6, 10, 0, activation="jumprelu")
    jr = dataclasses.replace(jr, threshold=jax.numpy.full((10,), 0.3))
    x = np.random.default_rng(0).normal(size=(500, 6)) * 4.0
    m = saes.matching_config(jr, template, x)
    expected = 0.3 * math.sqrt(6) / np.linalg.norm(x, axis=1).mean()
    assert m.activation == "jumprelu" and m.d_sae == 10
    assert m.jumprelu_init_threshold == pytest.approx(expected, rel=1e-6)  # float32 thresholds


def _metric(score, null_mean, null_std):
    return results.MetricResult(
        score=score,
        null_mean=null_mean,
        null_std=null_std,
        p=0.5,
        z=(score - null_mean) / null_std,
        excess=score - null_mean,
    )


def _comp(kind, score, std=0.02, null=0.5, **labels):
    """A typed comparison result carrying one CKA score (the parts a summary reads)."""
    return results.ComparisonResult(
        name=f"{kind}{labels}",
        labels=results.Labels(kind=kind, **labels),
        n_features=(8, 8),
        tokens=100,
        pairing=results.Pairing("correlation", 0.5, 0.5, (), 0, 0, 0, 0),
        filters=results.FilterFunnel((("candidates", 8),)),
        n_pairs=8,
        pairs=results.KeptPairs(tuple(range(8)), tuple(range(8)), (1.0,) * 8),
        top_pairs=(),
        metrics={"cka": _metric(score, null, std)},
        same_index=results.SameIndex(0, 8, 0.0, 0.125, 1.0, False),
    )


def test_fraction_of_the_way_only_when_ceiling_and_floor_are_separated():
    cell = {"cell": "A.h~B.h", "hookpoint_a": "h", "hookpoint_b": "h", "condition": ""}
    ceil = dict(side="a", hookpoint="h", condition="")
    # Null data: floor, cross and ceiling all within the nulls' spread (0.02).
    null_like = [
        _comp("cross", 0.49, **cell),
        _comp("ceiling", 0.505, **ceil),
        _comp("floor", 0.51, **cell),
    ]
    e = references.summarise(null_like)[0].metrics["cka"]
    assert e.fraction_excess.value is None
    assert e.fraction.value is None
    assert "not separated" in e.fraction_excess.note
    # Separated: ceiling 0.9, floor 0.5, cross 0.8 -> 75 % of the way.
    real = [_comp("cross", 0.8, **cell), _comp("ceiling", 0.9, **ceil), _comp("floor", 0.5, **cell)]
    e = references.summarise(real)[0].metrics["cka"]
    assert e.fraction_excess.value == pytest.approx(0.75)
    assert e.fraction.value == pytest.approx(0.75)
    spread = math.sqrt(0.02**2 + 0.02**2)
    assert e.fraction_excess.separation.spread == pytest.approx(spread)
    # Just inside 2 spreads: refused; just outside: given.
    for gap, given in ((1.9 * spread, False), (2.1 * spread, True)):
        comps = [
            _comp("cross", 0.5 + gap / 2, **cell),
            _comp("ceiling", 0.5 + gap, **ceil),
            _comp("floor", 0.5, **cell),
        ]
        frac = references.summarise(comps)[0].metrics["cka"].fraction_excess.value
        assert (frac is not None) == given
        if given:
            assert frac == pytest.approx(0.5)


def test_every_cell_gets_its_own_reference_points():
    comps = []
    for ha, hb in itertools.product(("h0", "h1"), ("g0", "g1")):
        cell = {"cell": f"A.{ha}~B.{hb}", "hookpoint_a": ha, "hookpoint_b": hb, "condition": ""}
        comps += [_comp("cross", 0.7, **cell), _comp("floor", 0.5, **cell)]
    for side, hp, score in (
        ("a", "h0", 0.9),
        ("a", "h1", 0.8),
        ("b", "g0", 0.95),
        ("b", "g1", 0.85),
    ):
        comps.append(_comp("ceiling", score, side=side, hookpoint=hp, condition=""))
    cells = references.summarise(comps)
    assert [c.cell for c in cells] == ["A.h0~B.g0", "A.h0~B.g1", "A.h1~B.g0", "A.h1~B.g1"]
    ceilings = {
        ("h0", "g0"): (0.9, 0.95),
        ("h0", "g1"): (0.9, 0.85),
        ("h1", "g0"): (0.8, 0.95),
        ("h1", "g1"): (0.8, 0.85),
    }
    for c in cells:
        a, b = ceilings[(c.hookpoint_a, c.hookpoint_b)]
        e = c.metrics["cka"]
        assert e.ceiling_a == pytest.approx(a) and e.ceiling_b == pytest.approx(b)
        assert e.ceiling == pytest.approx((a + b) / 2)
        assert e.fraction.value == pytest.approx(0.2 / ((a + b) / 2 - 0.5))


def test_cross_below_within_tests_against_exact_values():
    # x entirely below y: exact one-sided Mann-Whitney p = 1 / C(n+m, n).
    x, y = [0.1, 0.2], [0.5, 0.6, 0.7]
    assert references.mann_whitney_less(x, y) == pytest.approx(1 / math.comb(5, 2))
    assert references.permutation_less(x, y, 1000, 0) == pytest.approx(1 / math.comb(5, 2))
    # Reversed: p = 1 (every split is at most the observed difference).
    assert references.mann_whitney_less(y, x) == pytest.approx(1.0)
    assert references.permutation_less(y, x, 1000, 0) == pytest.approx(1.0)
    # Random permutations (more splits than n_perm) agree with the exact enumeration.
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 9), rng.normal(0.8, 1, 6)
    exact = references.permutation_less(x, y, 10**6, 0)
    approx = references.permutation_less(x, y, 4000, 1)
    assert abs(exact - approx) < 0.02
    assert references.mann_whitney_less([0.1], [0.2]) is None


def test_parse_sweep():
    conds = references.parse_sweep("k=4,8,16")
    assert [c.label for c in conds] == ["k=4", "k=8", "k=16"]
    base = sae_train.TrainConfig(d_sae=64, k=32)
    assert conds[0].apply(base, 16).k == 4
    assert references.parse_sweep("expansion=2")[0].apply(base, 16).d_sae == 32
    assert references.parse_sweep("subset=0.5")[0].subset == 0.5
    assert references.parse_sweep(None) == [references.Condition()]
    for bad in ("k", "width=4", "k=4,x", "k=0", "subset=2", "k=2.5", "k=4,4"):
        with pytest.raises(checks.InputError, match="--sweep"):
            references.parse_sweep(bad)
    with pytest.raises(checks.InputError, match="--replicate_data=subset"):
        references.RefSettings(replicate_data="subset").validate()
    with pytest.raises(checks.InputError, match="--ceiling_sides"):
        references.RefSettings(ceiling_sides=("c",)).validate()

"""Pair filters: best-pair one-to-one (not first met), non-concept tokens, counts."""

import numpy as np

from experiments.pipeline import filters


def brute_force_greedy(a, b, v):
    """Reference: repeatedly take the globally best remaining pair."""
    remaining = list(zip(a, b, v))
    out = []
    while remaining:
        best = max(remaining, key=lambda t: (t[2], -t[0], -t[1]))
        out.append(best)
        remaining = [t for t in remaining if t[0] != best[0] and t[1] != best[1]]
    return sorted(out)


def test_one_to_one_keeps_the_best_pair_not_the_first():
    # Lan et al.'s version would keep (0, 0, 0.2) because it is met first.
    p = filters.Pairs(np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([0.2, 0.9, 0.5]))
    kept = filters.one_to_one_best(p)
    assert sorted(zip(kept.a.tolist(), kept.b.tolist())) == [(1, 0), (2, 1)]


def test_one_to_one_matches_brute_force(rng):
    for _ in range(20):
        n = 15
        a = rng.integers(0, 6, n)
        b = rng.integers(0, 6, n)
        v = rng.uniform(size=n)
        kept = filters.one_to_one_best(filters.Pairs(a, b, v))
        got = sorted(zip(kept.a.tolist(), kept.b.tolist(), kept.value.tolist()))
        assert got == brute_force_greedy(a.tolist(), b.tolist(), v.tolist())
        assert len(set(kept.a)) == len(kept) and len(set(kept.b)) == len(kept)


def test_non_concept_tokens():
    for tok in [",", " ", "Ġ.", "\n", "<|endoftext|>", "[CLS]", "...", "▁", "--"]:
        assert filters.is_non_concept_token(tok), tok
    for tok in ["Monday", "Ġcat", "▁Paris", "##ing", "f12", "3"]:
        assert not filters.is_non_concept_token(tok), tok


def test_apply_filters_counts_each_step():
    pairs = filters.Pairs(
        np.array([0, 1, 2, 3, 3]), np.array([0, 1, 2, 3, 0]), np.array([0.9, 0.8, 0.05, 0.7, 0.95])
    )
    invalid_a = np.array([False, True, False, False])
    invalid_b = np.zeros(4, bool)
    tokens_a = [["cat", "dog"], ["x"], ["sun"], [",", ".", "!"]]
    tokens_b = [["cat"], ["y"], ["moon"], ["tree"]]
    kept, counts = filters.apply_filters(
        pairs,
        filters.FilterConfig(),
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    assert counts == {
        "candidates": 5,
        "after_dead_constant": 4,
        "after_non_concept": 2,
        "after_one_to_one": 2,
        "after_threshold": 1,
    }
    assert kept.a.tolist() == [0] and kept.b.tolist() == [0]
    shared_cfg = filters.FilterConfig(require_shared_token=True, threshold=None)
    kept, _ = filters.apply_filters(
        pairs,
        shared_cfg,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=tokens_a,
        top_tokens_b=tokens_b,
    )
    assert kept.a.tolist() == [0]  # (2, 2) has no shared top token

"""Pair filters of the universality pipeline, each switchable and counted.

A pairing is three aligned arrays ``(a, b, value)``: feature ``a[i]`` of SAE A is paired with
feature ``b[i]`` of SAE B with score ``value[i]`` (activation correlation or decoder cosine).
Filters, in pipeline order (Lan et al. 2024, arXiv 2410.06981, with the pitfalls fixed):

1. dead / constant features (zero variance: correlation undefined) are dropped;
2. non-concept features: a feature whose top activating tokens are dominated by punctuation,
   whitespace or special tokens (BOS/EOS/PAD...; list configurable) is dropped; optionally the
   two features' top-token sets must intersect (Lan et al.'s rule);
3. one-to-one: every feature keeps only its BEST pair (Lan et al. kept the first met);
4. threshold: value >= threshold (default 0.1).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence

import numpy as np

DEFAULT_SPECIAL = (
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "[CLS]",
    "[SEP]",
    "[PAD]",
    "[UNK]",
    "[MASK]",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<none>",
)


@dataclasses.dataclass
class Pairs:
    """Aligned feature pairs with their scores."""

    a: np.ndarray
    b: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(len(self.a))

    def keep(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.a[mask], self.b[mask], self.value[mask])


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    drop_dead: bool = True
    non_concept: bool = True
    max_bad_fraction: float = 0.5  # "dominated": more than this share of top tokens is bad
    require_shared_token: bool = False
    top_tokens: int = 5
    one_to_one: bool = True
    threshold: float | None = 0.1
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL


def is_non_concept_token(token: str, special: Sequence[str] = DEFAULT_SPECIAL) -> bool:
    """Whitespace, punctuation/symbols only, or a special token."""
    if token in special:
        return True
    stripped = token.replace("Ġ", "").replace("▁", "").replace("Ċ", "").replace("##", "")
    stripped = stripped.strip()
    if not stripped:
        return True
    return all(unicodedata.category(ch)[0] in "PS" for ch in stripped)


def non_concept_features(top_tokens: Sequence[Sequence[str]], cfg: FilterConfig) -> np.ndarray:
    """Bool per feature: its top tokens are dominated by non-concept tokens (or it has none)."""
    out = np.zeros(len(top_tokens), bool)
    for f, tokens in enumerate(top_tokens):
        tokens = list(tokens)[: cfg.top_tokens]
        if not tokens:
            out[f] = True
            continue
        bad = sum(is_non_concept_token(t, cfg.special_tokens) for t in tokens)
        out[f] = bad / len(tokens) > cfg.max_bad_fraction
    return out


def one_to_one_mask(pairs: Pairs) -> np.ndarray:
    """Bool per pair: kept by `one_to_one_best`."""
    order = np.lexsort((pairs.b, pairs.a, -pairs.value))
    used_a, used_b, keep = set(), set(), np.zeros(len(pairs), bool)
    for i in order:
        a, b = int(pairs.a[i]), int(pairs.b[i])
        if a in used_a or b in used_b:
            continue
        used_a.add(a)
        used_b.add(b)
        keep[i] = True
    return keep


def one_to_one_best(pairs: Pairs) -> Pairs:
    """Keeps, greedily by descending value, pairs whose two features are both still free.

    Every feature ends in at most one pair, and a pair is dropped only for a better one
    (ties broken by lower A then B index, deterministic).
    """
    return pairs.keep(one_to_one_mask(pairs))


def apply_filters(
    pairs: Pairs,
    cfg: FilterConfig,
    *,
    invalid_a: np.ndarray,
    invalid_b: np.ndarray,
    top_tokens_a: Sequence[Sequence[str]] | None,
    top_tokens_b: Sequence[Sequence[str]] | None,
) -> tuple[Pairs, dict]:
    """Runs the filters in order; returns the kept pairs and the count after each step.

    Args:
      invalid_a / invalid_b: per-feature bool, dead or constant.
      top_tokens_a / top_tokens_b: per-feature top-activating token strings (None disables
        the non-concept filter, e.g. when no token strings exist).
    """
    kept, counts, _ = trace_filters(
        pairs,
        cfg,
        invalid_a=invalid_a,
        invalid_b=invalid_b,
        top_tokens_a=top_tokens_a,
        top_tokens_b=top_tokens_b,
    )
    return kept, counts


def trace_filters(
    pairs: Pairs,
    cfg: FilterConfig,
    *,
    invalid_a: np.ndarray,
    invalid_b: np.ndarray,
    top_tokens_a: Sequence[Sequence[str]] | None,
    top_tokens_b: Sequence[Sequence[str]] | None,
) -> tuple[Pairs, dict, np.ndarray]:
    """`apply_filters` that also says, per candidate pair, which filter dropped it.

    Returns ``(kept, counts, dropped_by)``: ``dropped_by[i]`` is the name of the step that
    removed candidate ``i`` (``"dead_constant"``, ``"non_concept"``, ``"one_to_one"``,
    ``"threshold"``), or ``""`` when it was kept; the step names are the ``counts`` keys
    without their ``after_`` prefix.
    """
    counts = {"candidates": len(pairs)}
    dropped_by = np.full(len(pairs), "", dtype=object)
    alive = np.arange(len(pairs))

    def step(name: str, keep: np.ndarray) -> None:
        nonlocal pairs, alive
        dropped_by[alive[~keep]] = name
        pairs, alive = pairs.keep(keep), alive[keep]
        counts[f"after_{name}"] = len(pairs)

    if cfg.drop_dead:
        step("dead_constant", ~invalid_a[pairs.a] & ~invalid_b[pairs.b])
    if cfg.non_concept and top_tokens_a is not None and top_tokens_b is not None:
        bad_a = non_concept_features(top_tokens_a, cfg)
        bad_b = non_concept_features(top_tokens_b, cfg)
        keep = ~bad_a[pairs.a] & ~bad_b[pairs.b]
        if cfg.require_shared_token:
            shared = np.array(
                [
                    bool(
                        set(top_tokens_a[a][: cfg.top_tokens])
                        & set(top_tokens_b[b][: cfg.top_tokens])
                    )
                    for a, b in zip(pairs.a, pairs.b)
                ],
                bool,
            )
            keep &= shared if len(shared) else keep
        step("non_concept", keep)
    if cfg.one_to_one:
        step("one_to_one", one_to_one_mask(pairs))
    if cfg.threshold is not None:
        step("threshold", pairs.value >= cfg.threshold)
    return pairs, counts, dropped_by

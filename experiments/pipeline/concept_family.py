"""Finding a concept family (weekdays, months, numbers, topic words) in a real SAE.

Selection rule (recorded in results.json by `selection_rule`): feature ``f`` joins the family of
concept ``C`` on a set of rows when

* ``concentration(f) = sum of f's activation on rows whose token is an item of C / sum of f's
  activation on all rows >= tau`` (default 0.5: at least half of what the feature does, it
  does on the concept's tokens), and
* ``f`` fires (activation > 0) on at least ``min_hits`` item rows.

It is measured on the corpus (all non-special tokens) and, for concepts with templates, on
templated prompts ("It happened on a {Monday}.": every token of the prompts counts towards
the total; the item word's last token is the item row); the family is the union of the two
selections, each feature recorded with the source(s) that selected it. Item tokens are matched
with the semantic-subspace rule (`experiments.pipeline.concepts.normalize_token`: sub-word
markers, case and surrounding space ignored, whole-token equality), so a day name split into
several BPE pieces is found by the templates only (their item row is its last piece).

Per family feature: its mean activation on each item's rows (the item profile), its preferred
item (argmax), and per item the number of family features preferring it and of those active on
it (mean activation >= half the feature's largest item mean): "multiple features for
February" shows up as a count above 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from engine import checks
from experiments.pipeline import concepts

#: Ordered items of the cyclic concepts (circularity needs the order; abbreviations are left
#: out so the order is well defined).
CYCLES: dict[str, tuple[str, ...]] = {"Days of week": concepts._DAYS, "Months": concepts._MONTHS}

#: Templated prompts per cyclic concept; ``{}`` is the item, capitalised.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Days of week": (
        "It happened on a {}.",
        "See you on {} morning.",
        "The shop is closed every {}.",
        "We met last {} at noon.",
        "On {} the market opens early.",
        "Her birthday falls on a {} this year.",
    ),
    "Months": (
        "It happened in {}.",
        "The festival is held every {}.",
        "We moved there last {}.",
        "In {} the weather turns.",
        "The report is due at the end of {}.",
        "She was born in {} of that year.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept: its items (normalised words; ordered when cyclic) and cycle period.

    A script concept (``script`` set, `concepts.SCRIPTS`) has one item, its name: every token
    written in the script is a row of that item.
    """

    name: str
    items: tuple[str, ...]
    period: int | None  # cyclic concepts: len(items); None otherwise
    script: concepts.ScriptGroup | None = None

    @property
    def matcher(self) -> concepts.Group:
        """What a normalised token is tested against: the item words, or the script."""
        return self.script if self.script is not None else frozenset(self.items)

    def item_of(self, token: str) -> int:
        """Index of the item ``token`` matches (`concepts.normalize_token`), else -1."""
        norm = concepts.normalize_token(token)
        if self.script is not None:
            return 0 if norm in self.script else -1
        return self.items.index(norm) if norm in self.items else -1


def group_concept(name: str, group: concepts.Group) -> Concept:
    """The (unordered) concept of one resolved group: keywords, or a script."""
    if isinstance(group, concepts.ScriptGroup):
        return Concept(name, (name,), None, script=group)
    return Concept(name, tuple(sorted(group)), None)


def make_concept(name: str, groups: dict | None = None) -> Concept:
    """A built-in cyclic concept (Days of week, Months), a selected or built-in keyword or
    script group (unordered); an unknown name raises a one-line `concepts.ConceptError`."""
    try:
        canon = concepts.canonical_name(name)
    except concepts.ConceptError:
        canon = name
    if canon in CYCLES:
        return Concept(canon, tuple(CYCLES[canon]), len(CYCLES[canon]))
    pool = dict(groups or {})
    if canon not in pool and canon in concepts.builtin_names():
        pool[canon] = concepts.builtin_group(canon)
    if canon not in pool:
        raise concepts.ConceptError(
            f"concept {name!r}: not a built-in group nor a user group; built-in: "
            f"{concepts.builtin_names()}"
        )
    return group_concept(canon, pool[canon])


def label_rows(tokens: Sequence[str], concept: Concept) -> np.ndarray:
    """``[rows]`` item index of every row's token (-1: not an item)."""
    cache: dict[str, int] = {}
    out = np.empty(len(tokens), np.int64)
    for r, t in enumerate(tokens):
        if t not in cache:
            cache[t] = concept.item_of(t)
        out[r] = cache[t]
    return out


def matching_rows(tokens: Sequence[str], matchers: Sequence[concepts.Group]) -> np.ndarray:
    """``[rows]`` bool: the row's token matches any of the groups (keywords or scripts)."""
    cache: dict[str, bool] = {}
    out = np.empty(len(tokens), bool)
    for r, t in enumerate(tokens):
        if t not in cache:
            norm = concepts.normalize_token(t)
            cache[t] = any(norm in m for m in matchers)
        out[r] = cache[t]
    return out


def selection_rule(tau: float, min_hits: int) -> dict:
    return {
        "rule": "feature f joins the family when (activation mass of f on the concept's "
        "item tokens) / (activation mass of f on all tokens) >= tau and f fires "
        "on >= min_hits item tokens; measured on the corpus and on templated "
        "prompts separately; family = union",
        "tau": float(tau),
        "min_hits": int(min_hits),
        "item_match": "concepts.normalize_token whole-token equality; templates: the "
        "item word's last token",
    }


@dataclasses.dataclass
class Selection:
    """Which features concentrate on a concept's items over one set of rows."""

    members: np.ndarray  # selected feature indices
    concentration: np.ndarray  # [F] share of activation mass on item rows (0 when silent)
    hits: np.ndarray  # [F] item rows where the feature fires
    item_rows: int  # rows that hold an item

    def summary(self) -> dict:
        return {
            "members": self.members.tolist(),
            "n": int(self.members.size),
            "item_rows": int(self.item_rows),
            "concentration": [float(self.concentration[f]) for f in self.members],
        }


def select(total_mass: np.ndarray, item_codes: np.ndarray, tau: float, min_hits: int) -> Selection:
    """The selection rule (module docstring) from the per-feature activation mass over all
    rows (``total_mass [F]``) and the codes of the item rows (``item_codes [n_items, F]``)."""
    total = np.asarray(total_mass, np.float64)
    codes = np.asarray(item_codes, np.float64)
    if codes.ndim != 2 or codes.shape[1] != total.shape[0]:
        raise checks.InputError(f"item_codes: expected [rows, {total.shape[0]}], got {codes.shape}")
    on = codes.sum(0)
    conc = np.divide(on, total, out=np.zeros_like(on), where=total > 0)
    hits = (codes > 0).sum(0)
    members = np.flatnonzero((conc >= tau) & (hits >= min_hits) & (total > 0))
    return Selection(members, conc, hits, int(codes.shape[0]))


def item_profile(codes: np.ndarray, items: np.ndarray, m: int) -> np.ndarray:
    """``[m, F]`` mean activation of every feature on each item's rows (0 for absent items)."""
    codes = np.asarray(codes, np.float64)
    out = np.zeros((m, codes.shape[1]))
    for i in range(m):
        sel = items == i
        if sel.any():
            out[i] = codes[sel].mean(0)
    return out


def features_per_item(profile: np.ndarray, family: np.ndarray, concept: Concept) -> dict:
    """Per item: family features preferring it, and family features active on it."""
    if family.size == 0:
        return {}
    P = profile[:, family]  # [m, n_family]
    pref = np.argmax(P, axis=0)
    peak = P.max(axis=0)
    active = P >= 0.5 * np.maximum(peak, 1e-30)[None, :]
    return {
        item: {"preferring": int(np.sum(pref == i)), "active": int(active[i].sum())}
        for i, item in enumerate(concept.items)
    }

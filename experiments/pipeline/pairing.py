"""The one registry of pairing rules: how candidate pairs of features (A's, B's) are proposed.

A rule is ``propose(step, sae_a, sae_b, mesh) -> filters.Pairs``: ``step`` holds the feature
pass of the comparison (`compare._pass_arrays`: per-feature statistics ``a_density``,
``a_top_rows``..., the best activation-correlation partner of every feature ``m_a_match`` /
``m_a_value`` / ``m_b_match`` / ``m_b_value`` (-1 when none), and ``corr`` when the full
correlation matrix was kept); the filters (`filters.trace_filters`) then run on whatever it
proposes, so a rule only proposes. ``Pairs.value`` is what the threshold filter and the
best-pair one-to-one step compare (higher = better).

| name | rule |
| --- | --- |
| correlation | each feature's best activation-correlation partner, both directions (once) |
| decoder | one-to-one matching of decoder rows by cosine (`engine.matching`; SAEs of one width) |

A new rule is one file with its ``propose`` function plus one `register` call (below, next to
these two, or in the file itself when it is imported before the run); ``--pairing`` lists the
registered names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from engine import checks
from experiments.pipeline import filters

if TYPE_CHECKING:  # the flag module imports this registry: keep it free of jax at import
    from models import sae as sae_lib

Propose = Callable[[Mapping[str, np.ndarray], "sae_lib.SAE", "sae_lib.SAE", object], filters.Pairs]


@dataclasses.dataclass(frozen=True)
class PairingRule:
    """A registered pairing rule (see the module docstring)."""

    name: str
    description: str
    propose: Propose


RULES: dict[str, PairingRule] = {}


def register(rule: PairingRule) -> PairingRule:
    """Adds ``rule`` under its name (a name already taken is refused)."""
    if rule.name in RULES:
        raise checks.InputError(f"pairing rule {rule.name!r} is already registered")
    RULES[rule.name] = rule
    return rule


def names() -> list[str]:
    return sorted(RULES)


def get(name: str) -> PairingRule:
    """The rule called ``name`` (`InputError` listing the registered names otherwise)."""
    if name not in RULES:
        raise checks.InputError(
            f"--pairing: unknown pairing rule {name!r}; expected one of {names()}"
        )
    return RULES[name]


def correlation(
    step: Mapping[str, np.ndarray], sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, mesh
) -> filters.Pairs:
    """Each feature's best activation-correlation partner, proposed from both sides."""
    del sae_a, sae_b, mesh
    a_ids = np.flatnonzero(step["m_a_match"] >= 0)
    b_ids = np.flatnonzero(step["m_b_match"] >= 0)
    a = np.concatenate([a_ids, step["m_b_match"][b_ids]]).astype(np.int64)
    b = np.concatenate([step["m_a_match"][a_ids], b_ids]).astype(np.int64)
    v = np.concatenate([step["m_a_value"][a_ids], step["m_b_value"][b_ids]])
    # Each direction proposes its best partner; keep one copy of pairs found twice.
    _, first = np.unique(np.stack([a, b]), axis=1, return_index=True)
    first = np.sort(first)
    return filters.Pairs(a[first], b[first], v[first].astype(np.float64))


def decoder(
    step: Mapping[str, np.ndarray], sae_a: sae_lib.SAE, sae_b: sae_lib.SAE, mesh
) -> filters.Pairs:
    """One-to-one matching of the decoder rows by cosine (both SAEs read one space)."""
    from engine import matching

    del step
    if sae_a.config.d_in != sae_b.config.d_in:
        raise checks.InputError(
            f"--pairing=decoder: decoder-cosine pairing needs SAEs of the "
            f"same width, got d_in {sae_a.config.d_in} and "
            f"{sae_b.config.d_in}; use --pairing=correlation"
        )
    m = matching.match(a=np.asarray(sae_a.W_dec), b=np.asarray(sae_b.W_dec), mesh=mesh)
    return filters.Pairs(
        np.asarray(m.rows, np.int64), np.asarray(m.cols, np.int64), np.asarray(m.values, np.float64)
    )


register(
    PairingRule("correlation", "best activation-correlation partner, both directions", correlation)
)
register(PairingRule("decoder", "one-to-one decoder-cosine matching (same d_in)", decoder))

"""Distances between named concept groups of features, compared across two models.

The "Arabic script vs Arabic food" question (docs/references.md, "Concept features and
geometry"): within each model, the cosine distances between the decoder rows of named feature
groups; across models, the RSA of the two distance matrices (`engine.rsa.mantel`) with a
permutation null over B's group labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from engine import checks, nulls, rsa

EXACT_LIMIT = nulls.EXACT_LIMIT


@dataclasses.dataclass
class GroupDistanceResult:
    """Within-model distances between named feature groups, compared across two models."""

    names: list
    dist_a: np.ndarray
    dist_b: np.ndarray
    rsa: nulls.NullSummary
    linkage: str

    def to_json(self) -> dict:
        return {
            "groups": list(self.names),
            "linkage": self.linkage,
            "rsa": self.rsa.to_json(),
            "dist_a": self.dist_a.tolist(),
            "dist_b": self.dist_b.tolist(),
        }


def group_distances(
    groups: Mapping[str, np.ndarray], *, linkage: str = "average", model: str = "model"
) -> tuple[list, np.ndarray]:
    """``[G, G]`` cosine distances between feature groups of one model.

    ``linkage="average"``: ``1 - mean cos(u, v)`` over members ``u`` of one group and ``v``
    of the other; ``"centroid"``: ``1 - cos`` of the groups' mean unit vectors.

    Args:
      groups: name -> ``[n_g, d]`` vectors (decoder rows) of that group's features.
      linkage: ``"average"`` or ``"centroid"``.
      model: used in error messages.
    """
    if linkage not in ("average", "centroid"):
        raise checks.InputError(f"linkage: unknown {linkage!r}; expected 'average' or 'centroid'")
    names = list(groups)
    units = []
    width = None
    for name in names:
        V = np.asarray(groups[name], np.float64)
        if V.ndim != 2 or V.shape[0] == 0:
            raise checks.InputError(
                f"group {name!r} in {model} has no features (expected "
                f"[n_g >= 1, d] vectors, got shape {V.shape})"
            )
        if width is not None and V.shape[1] != width:
            raise checks.InputError(
                f"group {name!r} in {model}: width {V.shape[1]} differs "
                f"from the other groups' {width}"
            )
        width = V.shape[1]
        checks.check_finite(f"group {name!r} in {model}", V)
        norms = np.linalg.norm(V, axis=1)
        if np.any(norms <= 1e-12 * max(1.0, norms.max())):
            raise checks.InputError(f"group {name!r} in {model}: zero vector(s) (cosine undefined)")
        units.append(V / norms[:, None])
    G = len(names)
    D = np.zeros((G, G))
    cents = [u.mean(0) for u in units]
    for i in range(G):
        for j in range(i + 1, G):
            if linkage == "average":
                sim = float(np.mean(units[i] @ units[j].T))
            else:
                sim = float(
                    cents[i]
                    @ cents[j]
                    / max(np.linalg.norm(cents[i]) * np.linalg.norm(cents[j]), 1e-300)
                )
            D[i, j] = D[j, i] = 1.0 - sim
    return names, D


def group_distance_rsa(
    groups_a: Mapping[str, np.ndarray],
    groups_b: Mapping[str, np.ndarray],
    *,
    linkage: str = "average",
    num_permutations: int = 1000,
    seed: int = 0,
    exact_limit: int = EXACT_LIMIT,
) -> GroupDistanceResult:
    """Are the distances between concept groups alike in two models?

    RSA (Spearman) of the two models' group distance matrices (`group_distances`) with a
    Mantel null permuting B's group labels. With ``G`` groups at most ``G!`` distinct
    reassignments exist, so p cannot fall below ``1 / G!`` (see ``rsa.min_p``): use >= 5
    groups for p < 0.01.

    Args:
      groups_a / groups_b: name -> ``[n_g, d]`` decoder rows, the same names in both models
        (the order of ``groups_a`` is used).

    Raises:
      InputError: fewer than 3 groups, names missing on either side, an empty group.
    """
    missing_b = [g for g in groups_a if g not in groups_b]
    missing_a = [g for g in groups_b if g not in groups_a]
    if missing_a or missing_b:
        raise checks.InputError(
            f"group_distance_rsa: unknown group name(s): missing in model "
            f"B {missing_b}, missing in model A {missing_a}; both models "
            f"need the same groups"
        )
    if len(groups_a) < 3:
        raise checks.InputError(
            f"group_distance_rsa: {len(groups_a)} group(s); need at least "
            f"3 (3 distances) to compare distance matrices"
        )
    names, D_a = group_distances(groups_a, linkage=linkage, model="model A")
    _, D_b = group_distances({g: groups_b[g] for g in names}, linkage=linkage, model="model B")
    rsa_res = rsa.mantel(
        D_a,
        D_b,
        num_permutations=num_permutations,
        seed=seed,
        exact_limit=exact_limit,
        names=("model A group distances", "model B group distances"),
    )
    return GroupDistanceResult(names=names, dist_a=D_a, dist_b=D_b, rsa=rsa_res, linkage=linkage)

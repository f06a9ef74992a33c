"""Toy data with a planted circular feature family, for two "models" (ground truth returned).

The setting of Engels et al. 2024 in miniature (docs/references.md, "Concept features and
geometry"): a dictionary of unit feature directions in ``d`` dims in which one family of
``m`` concept features (the days of the week, m = 7, or the months, m = 12) lies on a circle
in a 2-D plane, in cyclic order, lifted off the origin along a shared offset direction::

    f_i = sqrt(1 - a^2) (cos(2 pi i / m) u + sin(2 pi i / m) v) + a c,   i = 0 .. m-1

(``u, v, c`` orthonormal, ``a = circle_offset``; neighbouring items then have cosine
``(1 - a^2) cos(2 pi / m) + a^2``, above Engels et al.'s 0.5 graph threshold). With
``circle_unique = s > 0`` each item also gets its own unit direction ``w_i`` orthogonal to
``u, v, c``: ``f_i <- sqrt(1 - s^2) f_i + s w_i`` (still unit norm; the circle is then the
items' top-2 PCs, not their whole span, as in real models' token representations). The other
features are ``n_groups`` named groups of ``group_size`` features spread around random group
centroids (clusters without circular order, the "concept groups" of the relative-distance
question) and ``n_other`` independent random directions.

Data ("tokens"): sparse non-negative codes shared by both models (the same tokens): a row
holds at most one concept item (a token is one day), with probability ``concept_rate``, at a
magnitude uniform on [``concept_min_magnitude``, 1] (default 0.5); every other feature fires
independently with probability ``k_active / n_features`` at a magnitude uniform on [0, 1].
Each model's activations are ``codes @ atoms + noise``.

Two models: model B's atoms are model A's rotated by a random orthogonal matrix ``Q``
(``atoms_b = atoms_a @ Q``) plus a small perturbation ``b_perturb`` (renormalised), so every
angle between features is shared while no coordinate is. Controls:

* ``planted=False``: the concept items are independent random directions (no circle) and are
  not lifted to a shared offset;
* ``shared=False``: model B draws ALL its atoms independently (nothing shared across models
  but the token statistics). The acceptance control "unplanted" is
  ``planted=False, shared=False``.

Feature indices are shuffled (one permutation, the same in both models), so nothing may rely
on the concept features being first. Every array is host numpy; the whole pair is a function
of ``seed``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import checks

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
CONCEPTS = {"days": DAYS, "months": MONTHS}
#: Names of the planted non-circular groups (the "relative distances" question).
GROUP_NAMES = (
    "Arabic script",
    "Arabic food",
    "Food",
    "Numbers",
    "Emotions",
    "Countries",
    "Nature",
    "People",
)


@dataclasses.dataclass
class PlantedPair:
    """Two models' activations on the same tokens, with the ground truth.

    Attributes:
      acts_a / acts_b: ``[n_tokens, d]`` float32 activations of model A / B.
      atoms_a / atoms_b: ``[n_features, d]`` unit feature directions (ground-truth decoders).
      codes: ``[n_tokens, n_features]`` float32 shared sparse codes.
      token_ids: ``[n_tokens]`` int: the row's concept item's token when one is active (the
        token IS that word), else the token of its strongest feature, 0 (``"<none>"``) when no
        feature fires. Feature ``j``'s token is ``feature_tokens[j]``.
      vocab: token strings; ``vocab[feature_tokens[j]]`` names feature ``j``.
      feature_tokens: ``[n_features]`` int token id of each feature (``j``'s own word).
      concept: ``"days"`` / ``"months"`` / ``"circle"``; ``concept_items``: the item names in
        cyclic order; ``concept_features``: ``[m]`` feature index of each item, in order.
      groups: group name -> feature indices (the concept family included under its name).
      rotation: ``[d, d]`` orthogonal Q with ``atoms_b ~ atoms_a @ Q`` (None unless shared).
      plane: ``[3, d]`` rows ``u, v, c`` of the circle in model A (None unless planted).
      planted / shared: the control switches; description: what is shared, in words.
    """

    acts_a: np.ndarray
    acts_b: np.ndarray
    atoms_a: np.ndarray
    atoms_b: np.ndarray
    codes: np.ndarray
    token_ids: np.ndarray
    vocab: list
    feature_tokens: np.ndarray
    concept: str
    concept_items: tuple
    concept_features: np.ndarray
    groups: dict
    rotation: np.ndarray | None
    plane: np.ndarray | None
    planted: bool
    shared: bool
    description: dict

    @property
    def n_features(self) -> int:
        return int(self.atoms_a.shape[0])

    @property
    def period(self) -> int:
        return len(self.concept_items)

    def concept_token_ids(self) -> np.ndarray:
        """Token ids of the concept items, in cyclic order."""
        return self.feature_tokens[self.concept_features]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))[None, :]  # Haar-distributed


def _atoms(
    rng: np.random.Generator,
    *,
    d: int,
    m: int,
    planted: bool,
    circle_offset: float,
    circle_unique: float,
    n_groups: int,
    group_size: int,
    group_spread: float,
    n_other: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Atoms in canonical layout: [circle items (m), groups (n_groups * size), others]."""
    if planted:
        basis = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # u, v, c orthonormal
        phi = 2 * np.pi * np.arange(m) / m
        ring = np.cos(phi)[:, None] * basis[0] + np.sin(phi)[:, None] * basis[1]
        circle = np.sqrt(1 - circle_offset**2) * ring + circle_offset * basis[2]
        if circle_unique > 0:
            # Each item's own direction (orthogonal to the circle's span): the items no longer
            # lie in one 3-D subspace, as token representations in real models do not.
            own = rng.normal(size=(m, d))
            own = _unit(own - (own @ basis.T) @ basis)
            circle = np.sqrt(1 - circle_unique**2) * circle + circle_unique * own
    else:
        basis = None
        circle = _unit(rng.normal(size=(m, d)))
    parts = [circle]
    for _ in range(n_groups):
        centre = _unit(rng.normal(size=d))
        parts.append(_unit(centre + group_spread * rng.normal(size=(group_size, d)) / np.sqrt(d)))
    parts.append(_unit(rng.normal(size=(n_other, d))))
    return np.concatenate(parts).astype(np.float64), basis


def make_planted_pair(
    seed: int = 0,
    *,
    d: int = 64,
    concept: str | int = "days",
    n_groups: int = 6,
    group_size: int = 4,
    n_other: int = 64,
    n_tokens: int = 8192,
    k_active: float = 3.0,
    concept_rate: float = 0.3,
    planted: bool = True,
    shared: bool = True,
    circle_offset: float = 0.8,
    concept_min_magnitude: float = 0.5,
    circle_unique: float = 0.0,
    group_spread: float = 0.6,
    noise: float = 0.01,
    b_perturb: float = 0.05,
) -> PlantedPair:
    """Builds the two models' data (see the module docstring).

    Args:
      seed: everything is a function of it.
      d: width of both models' activations.
      concept: ``"days"`` (7 items), ``"months"`` (12) or an int ``m`` >= 3 (items
        ``"item0"..``).
      n_groups: planted non-circular feature groups (named from `GROUP_NAMES`, then
        ``"group<i>"``), each of ``group_size`` features.
      n_other: independent random features.
      n_tokens: rows.
      k_active: mean number of active non-concept features per row.
      concept_rate: probability that a row holds a concept item.
      planted: put the concept items on a circle (False: random directions).
      shared: model B is a rotation of model A (False: independent atoms).
      circle_offset: ``a``, the lift of the circle off the origin (0 <= a < 1).
      circle_unique: ``s``, weight of each item's own random direction orthogonal to the
        circle's span: ``f_i = sqrt(1 - s^2) f_i^circle + s w_i`` (0: the items span 3 dims,
        where no encoder tells an item from its neighbours cheaply; see
        experiments/configs/feature_geometry.py). Neighbouring cosines scale by ``1 - s^2``.
      concept_min_magnitude: a concept item's magnitude is uniform on [this, 1] (0 < x <= 1).
        Below the neighbouring items' cosine, a weak item and its strong neighbour give the same
        projection on the item's direction (see experiments/configs/feature_geometry.py).
      group_spread: spread of a group's members around its centroid (0 = identical).
      noise: std of the Gaussian noise added to the activations.
      b_perturb: std of the perturbation of model B's atoms (relative; 0 = exact rotation).
    """
    if isinstance(concept, str):
        if concept not in CONCEPTS:
            raise checks.InputError(
                f"concept: unknown name {concept!r}; expected one of "
                f"{sorted(CONCEPTS)} or an item count"
            )
        items = CONCEPTS[concept]
    else:
        m = checks.check_positive_int("concept (item count)", concept, minimum=3)
        items = tuple(f"item{i}" for i in range(m))
        concept = "circle"
    m = len(items)
    checks.check_positive_int("d", d, minimum=3)
    checks.check_positive_int("n_groups", n_groups, minimum=0)
    checks.check_positive_int("group_size", group_size)
    checks.check_positive_int("n_other", n_other, minimum=0)
    checks.check_positive_int("n_tokens", n_tokens, minimum=2)
    if not 0 <= circle_offset < 1:
        raise checks.InputError(f"circle_offset must be in [0, 1), got {circle_offset}")
    if not 0 <= circle_unique < 1:
        raise checks.InputError(f"circle_unique must be in [0, 1), got {circle_unique}")
    if not 0 < concept_min_magnitude <= 1:
        raise checks.InputError(
            f"concept_min_magnitude must be in (0, 1], got {concept_min_magnitude}"
        )
    if not 0 < concept_rate <= 1:
        raise checks.InputError(f"concept_rate must be in (0, 1], got {concept_rate}")
    for name, value in (
        ("noise", noise),
        ("b_perturb", b_perturb),
        ("group_spread", group_spread),
        ("k_active", k_active),
    ):
        checks.check_non_negative(name, value)
    rng = np.random.default_rng(seed)
    kw = dict(
        d=d,
        m=m,
        planted=planted,
        circle_offset=circle_offset,
        circle_unique=circle_unique,
        n_groups=n_groups,
        group_size=group_size,
        group_spread=group_spread,
        n_other=n_other,
    )
    atoms_a, plane = _atoms(rng, **kw)
    n_features = atoms_a.shape[0]
    if shared:
        rotation = _random_orthogonal(rng, d)
        atoms_b = _unit(
            atoms_a @ rotation + b_perturb * rng.normal(size=atoms_a.shape) / np.sqrt(d)
        )
    else:
        rotation = None
        atoms_b, _ = _atoms(rng, **kw)

    # One shuffle of feature indices, the same in both models.
    perm = rng.permutation(n_features)  # canonical feature perm[j] -> index j
    inv = np.argsort(perm)  # canonical i sits at index inv[i]
    atoms_a, atoms_b = atoms_a[perm], atoms_b[perm]
    canon_groups = {"concept": np.arange(m)}
    names = [GROUP_NAMES[g] if g < len(GROUP_NAMES) else f"group{g}" for g in range(n_groups)]
    for g, name in enumerate(names):
        canon_groups[name] = m + g * group_size + np.arange(group_size)
    concept_features = inv[np.arange(m)]

    # Vocabulary: 0 = "<none>", then one word per feature.
    feature_names = [None] * n_features
    for i, item in enumerate(items):
        feature_names[concept_features[i]] = item
    for name in names:
        for r, c in enumerate(canon_groups[name]):
            feature_names[inv[c]] = f"{name}:{r}"
    other_idx = inv[m + n_groups * group_size + np.arange(n_other)]
    for r, j in enumerate(other_idx):
        feature_names[j] = f"f{r}"
    vocab = ["<none>"] + feature_names
    feature_tokens = np.arange(1, n_features + 1)

    # Codes: concept items exclusive per row; the rest independent.
    n_rest = n_features - m
    p_rest = min(1.0, k_active / max(n_rest, 1))
    codes = np.zeros((n_tokens, n_features), np.float64)
    rest = np.setdiff1d(np.arange(n_features), concept_features)
    on = rng.random((n_tokens, n_rest)) < p_rest
    codes[:, rest] = np.where(on, rng.random((n_tokens, n_rest)), 0.0)
    has_item = rng.random(n_tokens) < concept_rate
    which = rng.integers(0, m, n_tokens)
    rows = np.flatnonzero(has_item)
    codes[rows, concept_features[which[rows]]] = rng.uniform(concept_min_magnitude, 1.0, len(rows))
    strongest = np.argmax(codes, axis=1)
    token_ids = np.where(codes.max(axis=1) > 0, feature_tokens[strongest], 0)
    token_ids[rows] = feature_tokens[concept_features[which[rows]]]

    acts_a = codes @ atoms_a + noise * rng.normal(size=(n_tokens, d))
    acts_b = codes @ atoms_b + noise * rng.normal(size=(n_tokens, d))
    groups = {concept: concept_features}
    groups.update({name: np.sort(inv[canon_groups[name]]) for name in names})
    description = {
        "what": "two toy models on the same tokens (shared sparse codes)",
        "concept": concept,
        "items": list(items),
        "planted_circle": bool(planted),
        "shared_geometry": (
            f"model B atoms = model A atoms @ random rotation (+ perturbation {b_perturb})"
        )
        if shared
        else "independent atoms in model B",
        "groups": {k: len(v) for k, v in groups.items()},
        "n_features": int(n_features),
        "d": int(d),
        "n_tokens": int(n_tokens),
        "token_rule": "a row's token is its concept item if one fires, else its strongest "
        "feature's word, else <none>",
    }
    return PlantedPair(
        acts_a=acts_a.astype(np.float32),
        acts_b=acts_b.astype(np.float32),
        atoms_a=atoms_a.astype(np.float32),
        atoms_b=atoms_b.astype(np.float32),
        codes=codes.astype(np.float32),
        token_ids=token_ids.astype(np.int64),
        vocab=vocab,
        feature_tokens=feature_tokens,
        concept=concept,
        concept_items=tuple(items),
        concept_features=concept_features.astype(np.int64),
        groups=groups,
        rotation=rotation,
        plane=plane,
        planted=bool(planted),
        shared=bool(shared),
        description=description,
    )

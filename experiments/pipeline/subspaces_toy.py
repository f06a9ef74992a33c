"""Toy setting of the semantic-subspace experiment: planted concept groups, some shared.

Built on `models.planted` (two "models" on the same tokens, model B's atoms = model A's
rotated by a random orthogonal Q, plus named feature groups and the days of the week on a
circle). Changes, all made here so `models.planted` stays the circular-feature toy:

* vocabulary: every feature of planted group g is named by a real keyword of the built-in
  concept list `TOY_GROUPS[g]` (Food, Numbers, Emotions, Countries, Nature, People/Roles),
  chosen among the words that belong to no other built-in list, so the keyword rule of
  `experiments.pipeline.concepts` finds exactly the planted members; the circle items are
  Monday..Sunday (groups "Days of week" and "Calendar");
* shared vs not shared: groups in ``shared`` keep B = A @ Q (their within-group geometry is
  the same in both models); every other group gets fresh model-B atoms (a new random cluster
  of the same spread): same tokens, same codes, unrelated geometry. So a correct analysis
  finds every group, and calls the shared ones significant and the others not;
* random-init model: a third side with the same codes through independent random unit atoms
  (no group structure), standing for an SAE of a randomly initialised network;
* documents and a topic: rows are cut into documents of ``doc_len`` rows; a ``topic_fraction``
  of documents is "about" ``topic`` (default Food), and the topic group's features fire only
  in those documents. ``topic_rows`` marks the rows of the topic documents (the one-topic
  subset of the control).

Tokens: a row's token is the word of its strongest feature (``<none>`` when none fires), and
that feature's value is then multiplied by ``token_boost`` (the token's own feature fires
strongly, its context features weakly). Unlike `models.planted` a day does not take precedence.
So a feature's top-activating tokens are its own word rather than words that happen to
co-occur with it, and the membership rule finds the planted groups (with a few strays, as on
real data).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import checks
from experiments.pipeline import concepts
from models import planted
from models import sae as sae_lib

TOY_GROUPS = ("Food", "Numbers", "Emotions", "Countries", "Nature", "People/Roles")
DEFAULT_SHARED = ("Days of week", "Food", "Numbers", "Emotions")


def unique_words(group: str) -> list[str]:
    """Keywords of a built-in group that are in no other built-in list (stable order)."""
    others = set()
    for name, words in concepts.BUILTIN.items():
        if name != group:
            others.update(concepts.normalize_token(w) for w in words)
    out = []
    for w in concepts.BUILTIN[group]:
        n = concepts.normalize_token(w)
        if n not in others and n not in out and not n.isdigit():
            out.append(n)
    return out


@dataclasses.dataclass
class ConceptToy:
    """Three sides on the same tokens, and the ground truth (host numpy).

    Attributes:
      acts_a / acts_b / acts_r: ``[n_tokens, d]`` activations of model A, model B and the
        random-init model.
      atoms_a / atoms_b / atoms_r: ``[n_features, d]`` unit ground-truth directions.
      codes: ``[n_tokens, n_features]`` shared sparse codes.
      token_ids: ``[n_tokens]``; vocab: strings; doc_ids: ``[n_tokens]`` document of a row.
      groups: concept group name -> planted feature indices ("Days of week" = the circle).
      shared: names of the groups whose geometry model B shares.
      topic: topic group; topic_rows: ``[n_tokens]`` bool, rows of the topic's documents.
    """

    acts_a: np.ndarray
    acts_b: np.ndarray
    acts_r: np.ndarray
    atoms_a: np.ndarray
    atoms_b: np.ndarray
    atoms_r: np.ndarray
    codes: np.ndarray
    token_ids: np.ndarray
    vocab: list
    doc_ids: np.ndarray
    groups: dict
    shared: tuple
    topic: str
    topic_rows: np.ndarray
    description: dict

    def token_text(self, rows) -> list[str]:
        return [self.vocab[int(self.token_ids[int(r)])] for r in rows]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_concept_toy(
    seed: int = 0,
    *,
    d: int = 64,
    group_size: int = 12,
    n_other: int = 48,
    n_tokens: int = 16384,
    k_active: float = 3.0,
    concept_rate: float = 0.2,
    group_spread: float = 1.0,
    noise: float = 0.01,
    shared: tuple[str, ...] = DEFAULT_SHARED,
    doc_len: int = 64,
    token_boost: float = 2.0,
    topic: str = "Food",
    topic_fraction: float = 0.5,
) -> ConceptToy:
    """Builds the toy (module docstring); everything is a function of ``seed``."""
    group_size = checks.check_positive_int("group_size", group_size, minimum=3)
    doc_len = checks.check_positive_int("doc_len", doc_len)
    known = ("Days of week",) + TOY_GROUPS
    for name in tuple(shared) + (topic,):
        if name not in known:
            raise checks.InputError(f"toy group {name!r}: expected one of {list(known)}")
    if not 0 < topic_fraction <= 1:
        raise checks.InputError(f"topic_fraction must be in (0, 1], got {topic_fraction}")
    words = {g: unique_words(g) for g in TOY_GROUPS}
    short = {g: len(w) for g, w in words.items() if len(w) < group_size}
    if short:
        raise checks.InputError(f"group_size={group_size} exceeds the unique keywords of {short}")
    pair = planted.make_planted_pair(
        seed,
        d=d,
        concept="days",
        n_groups=len(TOY_GROUPS),
        group_size=group_size,
        n_other=n_other,
        n_tokens=n_tokens,
        k_active=k_active,
        concept_rate=concept_rate,
        group_spread=group_spread,
        noise=0.0,
        shared=True,
    )
    rng = np.random.default_rng([seed, 8])
    groups = {"Days of week": np.asarray(pair.concept_features, np.int64)}
    for name, toy in zip(planted.GROUP_NAMES, TOY_GROUPS):
        groups[toy] = np.asarray(pair.groups[name], np.int64)
    atoms_a = pair.atoms_a.astype(np.float64)
    atoms_b = pair.atoms_b.astype(np.float64)
    for name, idx in groups.items():
        if name in shared:
            continue
        if name == "Days of week":
            atoms_b[idx] = _unit(rng.normal(size=(len(idx), d)))
        else:  # a new cluster of the same spread: a group, but with unrelated geometry
            centre = _unit(rng.normal(size=d))
            atoms_b[idx] = _unit(
                centre + group_spread * rng.normal(size=(len(idx), d)) / np.sqrt(d)
            )
    atoms_r = _unit(rng.normal(size=atoms_a.shape))

    codes = pair.codes.astype(np.float64)
    doc_ids = np.arange(n_tokens) // doc_len
    n_docs = int(doc_ids[-1]) + 1
    topic_docs = rng.random(n_docs) < topic_fraction
    topic_rows = topic_docs[doc_ids]
    codes[np.ix_(~topic_rows, groups[topic])] = 0.0
    feature_tokens = np.arange(1, codes.shape[1] + 1)
    strongest = np.argmax(codes, 1)
    fired = codes.max(1) > 0
    token_ids = np.where(fired, feature_tokens[strongest], 0)
    # The token's own feature fires at token_boost x its value (context features do not), so
    # a feature's top-activating rows are the rows of its own word.
    live = np.flatnonzero(fired)
    codes[live, strongest[live]] *= token_boost

    vocab = list(pair.vocab)
    for toy in TOY_GROUPS:
        for r, f in enumerate(groups[toy]):
            vocab[feature_tokens[f]] = words[toy][r]

    def acts(atoms, k):
        noise_rng = np.random.default_rng([seed, 9, k])
        return (codes @ atoms + noise * noise_rng.normal(size=(n_tokens, d))).astype(np.float32)

    description = {
        "what": "planted concept groups (models.planted, relabelled with keyword words)",
        "groups": {g: len(v) for g, v in groups.items()},
        "shared_geometry": list(shared),
        "not_shared": [g for g in groups if g not in shared],
        "random_init": "same codes through independent random unit atoms",
        "token_boost": token_boost,
        "topic": topic,
        "topic_fraction_rows": float(topic_rows.mean()),
        "doc_len": doc_len,
        "n_features": int(codes.shape[1]),
        "d": d,
        "n_tokens": n_tokens,
    }
    return ConceptToy(
        acts_a=acts(atoms_a, 0),
        acts_b=acts(atoms_b, 1),
        acts_r=acts(atoms_r, 2),
        atoms_a=atoms_a.astype(np.float32),
        atoms_b=atoms_b.astype(np.float32),
        atoms_r=atoms_r.astype(np.float32),
        codes=codes.astype(np.float32),
        token_ids=token_ids.astype(np.int64),
        vocab=vocab,
        doc_ids=doc_ids,
        groups=groups,
        shared=tuple(shared),
        topic=topic,
        topic_rows=topic_rows,
        description=description,
    )


def truth_sae(atoms: np.ndarray, k: int = 4, name: str = "truth") -> sae_lib.SAE:
    """A TopK "SAE" whose dictionary is the ground truth (encoder = decoder transposed).

    Fast stand-in for a trained SAE (tests, ``--toy_dictionary=truth``): the same pipeline
    runs on it, only the dictionary is known instead of learned.
    """
    atoms = np.asarray(atoms, np.float32)
    f, d = atoms.shape
    cfg = sae_lib.SAEConfig(d_in=d, d_sae=f, activation="topk", k=k, metadata=(("source", name),))
    return sae_lib.from_arrays(
        cfg, atoms.T, np.zeros(f, np.float32), atoms, np.zeros(d, np.float32), name=name
    )

"""Tiny transformers models with planted concept geometry in their activations (offline).

Known truth for the language-model path of the concept-geometry experiment
(`experiments.feature_geometry --config=experiments/configs/feature_geometry_lm.py`): a
word-level tokenizer is trained (``tokenizers``,
`models.text.build_word_tokenizer`) on a synthetic corpus (`planted_corpus`: sentences with
weekday and month names, food, numbers, nature and people words, plus the shipped sample),
and a tiny GPT-NeoX model is built from a config with its input embedding table SET so that:

* ``planted=True``: the weekday tokens lie on a circle,
  ``e_i = s * (a c + sqrt(1 - a^2) (cos(2 pi i / 7) u + sin(2 pi i / 7) v))`` with ``u, v``
  orthonormal and orthogonal to the centre direction ``c``, and the months on another circle
  (period 12) in an orthogonal plane; other tokens are random directions, those of a concept
  group (Food, Numbers, ...) sharing a group direction (``e = s unit(w g + sqrt(1 - w^2) r)``,
  ``w = group_weight``); the group directions and the circles' centres are drawn in one 3-D
  subspace, so the distances between groups differ clearly;
* ``planted=False`` (the control): weekdays and months are ``unit(a c + sqrt(1 - a^2) r)`` with
  random ``r``: the same group structure and centre, no circle.

Two models of a pair share geometry when built with the same ``geometry_seed`` (model B's
table is model A's times a random orthogonal matrix drawn from ``rotation_seed``: every cosine
is preserved) and do not when the geometry seeds differ. Hookpoint ``resid_pre.0`` (the input of
block 0, HF ``hidden_states[0]``) is exactly the embedding row of each token for GPT-NeoX
(rotary positions, no position embedding; dropout off in eval), so the planted geometry is in
the activations the SAEs see. Deeper hookpoints mix in attention and keep it only partly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from engine import checks

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
GROUP_WORDS = {
    "Food": (
        "bread",
        "wine",
        "honey",
        "milk",
        "cheese",
        "soup",
        "rice",
        "apples",
        "meat",
        "butter",
    ),
    "Numbers": ("two", "three", "four", "five", "six", "eight", "nine", "ten", "twenty", "hundred"),
    "Nature": (
        "river",
        "mountain",
        "forest",
        "rain",
        "snow",
        "garden",
        "stone",
        "sea",
        "valley",
        "cloud",
    ),
    "People/Roles": (
        "farmer",
        "teacher",
        "doctor",
        "soldier",
        "captain",
        "stranger",
        "neighbour",
        "queen",
        "prince",
        "shepherd",
    ),
    "Emotions": (
        "joy",
        "sorrow",
        "anger",
        "fear",
        "hope",
        "despair",
        "delight",
        "grief",
        "laughter",
        "pity",
    ),
}
_DAY_SENTENCES = (
    "it happened on a {} .",
    "see you on {} morning .",
    "the market opens on {} .",
    "we rested on {} and worked the next day .",
    "every {} the bells ring .",
)
_MONTH_SENTENCES = (
    "it happened in {} .",
    "the harvest ends in {} .",
    "we travel every {} .",
    "in {} the days grow long .",
)
_GROUP_SENTENCES = (
    "the {} was near the {} .",
    "a {} and a {} came along .",
    "they spoke of {} and {} all evening .",
)


def planted_corpus(n_documents: int = 300, seed: int = 0) -> list[str]:
    """Synthetic documents mixing weekday/month sentences with concept-word sentences.

    Each document has 6 sentences: 2 about a weekday, 2 about a month, 2 with two words of a
    concept group; every third document is about food (its group sentences use Food words
    only), so a topic-restricted control has a subset to use. Items and group words are drawn
    in shuffled rounds (every item once per round), so every weekday (month, word of a group)
    is equally frequent: SAEs give frequent tokens their own features and let rare ones share,
    and the two models see the same text, so unequal item frequencies could give the SAEs of
    two unrelated models shared structure; a balanced corpus keeps that out of the known
    truth.
    """
    rng = np.random.default_rng(seed)
    groups = list(GROUP_WORDS)
    pools: dict[str, list] = {}

    def draw(key: str, items) -> str:
        pool = pools.setdefault(key, [])
        if not pool:
            pool.extend(rng.permutation(len(items)).tolist())
        return items[pool.pop()]

    docs = []
    for d in range(int(n_documents)):
        food_doc = d % 3 == 0
        sents = []
        for j in range(6):
            kind = j % 3
            if kind == 0:
                sents.append(
                    _DAY_SENTENCES[rng.integers(len(_DAY_SENTENCES))].format(draw("days", DAYS))
                )
            elif kind == 1:
                sents.append(
                    _MONTH_SENTENCES[rng.integers(len(_MONTH_SENTENCES))].format(
                        draw("months", MONTHS)
                    )
                )
            else:
                g = "Food" if food_doc else groups[1 + (d + j) % (len(groups) - 1)]
                words = [draw(g, GROUP_WORDS[g]), draw(g, GROUP_WORDS[g])]
                sents.append(_GROUP_SENTENCES[rng.integers(len(_GROUP_SENTENCES))].format(*words))
        order = rng.permutation(len(sents))
        docs.append(" ".join(sents[i] for i in order))
    return docs


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T  # [k, d] orthonormal rows


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_embeddings(
    vocab: dict,
    d: int,
    *,
    planted: bool,
    seed: int,
    circle_offset: float = 0.5,
    group_weight: float = 0.6,
    scale: float = 1.0,
) -> np.ndarray:
    """``[V, d]`` embedding table (module docstring); ``vocab`` maps token string -> id."""
    if d < 8:
        raise checks.InputError(f"d_model={d}: planted circles need at least 8 dimensions")
    if not 0.0 <= circle_offset < 1.0:
        raise checks.InputError(f"circle_offset={circle_offset}: expected in [0, 1)")
    rng = np.random.default_rng(seed)
    V = max(vocab.values()) + 1
    E = _unit(rng.standard_normal((V, d)))
    # Orthonormal directions: the two circle planes (u, v, u', v') and a 3-D subspace in which
    # the group directions and the circles' centres lie. Drawn in 3-D, their cosines spread
    # over [-1, 1], so the groups sit at clearly different distances (a structure to compare).
    basis = _orthonormal(rng, d, 7)
    names = list(GROUP_WORDS) + ["days", "months"]
    gdirs = _unit(rng.standard_normal((len(names), 3))) @ basis[4:]
    for gi, words in enumerate(GROUP_WORDS.values()):
        for w in words:
            if w in vocab:
                t = vocab[w]
                E[t] = _unit(group_weight * gdirs[gi] + np.sqrt(1 - group_weight**2) * E[t])
    r = np.sqrt(1 - circle_offset**2)
    for k, (items, (u, v)) in enumerate(((DAYS, basis[0:2]), (MONTHS, basis[2:4]))):
        c = gdirs[len(GROUP_WORDS) + k]
        m = len(items)
        for i, w in enumerate(items):
            if w not in vocab:
                continue
            if planted:
                ang = 2 * np.pi * i / m
                E[vocab[w]] = circle_offset * c + r * (np.cos(ang) * u + np.sin(ang) * v)
            else:  # the control: the same group structure, no circle
                t = vocab[w]
                E[t] = _unit(circle_offset * c + r * E[t])
    return (scale * E).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PlantedLMPair:
    """Paths of the two planted models (and of the corpus they were built on)."""

    path_a: str
    path_b: str
    corpus: str  # .jsonl of the planted corpus (``--text``)
    planted: bool
    shared: bool


def make_planted_lm_pair(
    out_dir: str,
    *,
    planted: bool = True,
    shared: bool = True,
    seed: int = 0,
    d_model: int = 32,
    n_layers: int = 1,
    n_documents: int = 300,
    circle_offset: float = 0.5,
    group_weight: float = 0.6,
) -> PlantedLMPair:
    """Two tiny GPT-NeoX models (one tokenizer) with planted (or control) embedding geometry.

    ``shared``: B's table is A's rotated (same geometry); otherwise B's geometry has its own
    seed. Rebuilding with the same arguments reuses ``out_dir``.
    """
    import torch

    from models import lm as lm_lib
    from models import lm_tiny, text

    recipe = {
        "planted": bool(planted),
        "shared": bool(shared),
        "seed": int(seed),
        "d_model": int(d_model),
        "n_layers": int(n_layers),
        "n_documents": int(n_documents),
        "circle_offset": float(circle_offset),
        "group_weight": float(group_weight),
        "version": 3,
    }
    paths = [os.path.join(out_dir, "model_a"), os.path.join(out_dir, "model_b")]
    corpus = os.path.join(out_dir, "corpus.jsonl")
    recipe_path = os.path.join(out_dir, "planted_pair.json")
    out = PlantedLMPair(paths[0], paths[1], corpus, bool(planted), bool(shared))
    if os.path.exists(recipe_path):
        with open(recipe_path, encoding="utf-8") as f:
            if json.load(f) == recipe:
                return out
    os.makedirs(out_dir, exist_ok=True)
    docs = planted_corpus(n_documents, seed)
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tok = text.build_word_tokenizer(docs + text.sample_documents(40), vocab_size=600)
    vocab = tok.get_vocab()
    E_a = planted_embeddings(
        vocab,
        d_model,
        planted=planted,
        seed=seed,
        circle_offset=circle_offset,
        group_weight=group_weight,
    )
    if shared:
        Q, _ = np.linalg.qr(np.random.default_rng(seed + 7919).standard_normal((d_model, d_model)))
        E_b = (E_a @ Q).astype(np.float32)
    else:
        E_b = planted_embeddings(
            vocab,
            d_model,
            planted=planted,
            seed=seed + 104729,
            circle_offset=circle_offset,
            group_weight=group_weight,
        )
    for i, (E, path) in enumerate(zip((E_a, E_b), paths)):
        model = lm_tiny.build_tiny_model(
            "gpt_neox", tok, seed + i, d_model=d_model, n_layers=n_layers
        )
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(torch.as_tensor(E))
        with lm_lib.quiet_transformers():
            model.save_pretrained(path)
        tok.save_pretrained(path)
    with open(recipe_path, "w", encoding="utf-8") as f:
        json.dump(recipe, f)
    return out

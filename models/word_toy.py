"""Known-truth activations defined on words, seen through different tokenizers.

A toy of superposition (Elhage et al. 2022, "Toy Models of Superposition", arXiv 2209.10652)
whose features live at the word level, so that two "models" with different tokenizers share
ground truth that no token-by-token comparison can see:

* every word type (`models.alignment.WORD_PATTERN`) has a sparse code over ``n_features``
  shared features (``k_word`` active, magnitudes in [0.5, 1.5]);
* the features are directions of a shared dictionary ``D [n_features, d]``; a side sees them
  through its own random orthogonal map ``M`` (``features = D @ M``), like two models whose
  residual bases differ;
* each side's activation at one of its own tokens is its word's code through that side's
  features, scaled by the share of the word read so far (a causal model knows the whole word
  only at its last token; ``causal=False`` gives every token the full code), plus Gaussian
  noise; whitespace-only and special tokens carry noise only. A token that spans several words
  takes the last one.

`random_token_embeddings` is the random-init floor: activations that depend only on the token
id through a random embedding table (what a randomly initialised model's early layers carry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

from engine import checks
from models import alignment as al
from models import text as text_lib

Seed: TypeAlias = int | np.integer | Sequence[int]  # what `numpy.random.default_rng` takes


@dataclasses.dataclass(frozen=True)
class WordCodes:
    """Sparse codes of word types: ``codes[i]`` is the code of ``types[i]``."""

    types: tuple[str, ...]
    codes: np.ndarray  # [n_types, n_features] float64
    index: dict

    def code(self, word: str) -> np.ndarray:
        return self.codes[self.index[word]]


def word_codes(documents: Sequence[str], n_features: int, k_word: int, seed: int) -> WordCodes:
    """A code for every word type of ``documents`` (types sorted, so the draw is stable)."""
    n_features = checks.check_positive_int("n_features", n_features)
    k_word = checks.check_positive_int("k_word", k_word)
    if k_word > n_features:
        raise checks.InputError(f"k_word={k_word} exceeds n_features={n_features}")
    types = sorted({m.group() for d in documents for m in al.WORD_PATTERN.finditer(d)})
    rng = np.random.default_rng([seed, 7])
    codes = np.zeros((len(types), n_features))
    for i in range(len(types)):
        idx = rng.choice(n_features, k_word, replace=False)
        codes[i, idx] = rng.uniform(0.5, 1.5, k_word)
    return WordCodes(tuple(types), codes, {t: i for i, t in enumerate(types)})


def unit_rows(n: int, d: int, seed: Seed) -> np.ndarray:
    """``[n, d]`` random unit-norm rows."""
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def orthogonal(d: int, seed: Seed) -> np.ndarray:
    """A random ``d x d`` orthogonal matrix (QR of a Gaussian, sign-fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def occurrence_jitter(n_words: int, n_features: int, seed: Seed, spread: float) -> np.ndarray:
    """``[n_words, n_features]`` magnitudes in ``[1 - spread, 1 + spread]`` per occurrence.

    Drawn from the word occurrence (document seed, position), so both sides see the same
    value: the truth is "this occurrence of the word carries feature f this strongly". It
    decorrelates the features of frequent words, which an SAE would otherwise learn as one
    combined direction (feature absorption), without breaking the word-level sharing.
    """
    return np.random.default_rng(seed).uniform(1 - spread, 1 + spread, (n_words, n_features))


def token_codes(
    document: str,
    doc_tokens: al.DocTokens,
    codes: WordCodes,
    *,
    causal: bool = True,
    jitter: np.ndarray | None = None,
) -> np.ndarray:
    """``[n_tokens, n_features]``: the code each token of one document carries.

    ``jitter``: optional ``[n_words, n_features]`` per-occurrence magnitudes (multiplied in).
    """
    n_f = codes.codes.shape[1]
    out = np.zeros((len(doc_tokens), n_f))
    words = [(m.start(), m.end(), m.group()) for m in al.WORD_PATTERN.finditer(document)]
    if not words or not len(doc_tokens):
        return out
    w_start = np.asarray([w[0] for w in words])
    w_end = np.asarray([w[1] for w in words])
    real = doc_tokens.ends > doc_tokens.starts
    cs, ce = al._core_spans(document, doc_tokens.starts, doc_tokens.ends)
    for t in np.flatnonzero(real & (ce > cs)):
        w = int(np.searchsorted(w_start, ce[t] - 1, side="right")) - 1
        if w < 0 or ce[t] - 1 >= w_end[w]:
            continue  # the token's last character is in no word (cannot happen: \S is a word)
        scale = (ce[t] - w_start[w]) / (w_end[w] - w_start[w]) if causal else 1.0
        out[t] = scale * codes.code(words[w][2]) * (1.0 if jitter is None else jitter[w])
    return out


def side_activations(
    documents: Sequence[str],
    corpus: al.CorpusTokens,
    contexts: text_lib.Contexts,
    codes: WordCodes,
    features: np.ndarray,
    *,
    noise: float,
    seed: Seed,
    causal: bool = True,
    jitter_seed: Seed | None = None,
    jitter_spread: float = 0.8,
) -> np.ndarray:
    """Activations of one side at its own unmasked context positions, in grid order.

    ``jitter_seed``: per-occurrence magnitudes (`occurrence_jitter`, seeded by
    ``(jitter_seed, document)``; give both sides the same seed). Returns ``[mask.sum(), d]``
    float32 rows (the layout `models.alignment.grid_gather` reads).
    """
    d = features.shape[1]
    n_f = codes.codes.shape[1]
    grid = np.zeros((corpus.num_contexts * corpus.context_length, d))
    for i, (doc, dt, g) in enumerate(zip(documents, corpus.docs, corpus.grid)):
        jit = None
        if jitter_seed is not None:
            n_words = sum(1 for _ in al.WORD_PATTERN.finditer(doc))
            jit = occurrence_jitter(
                n_words, n_f, [*np.atleast_1d(jitter_seed).tolist(), i], jitter_spread
            )
        tc = token_codes(doc, dt, codes, causal=causal, jitter=jit)
        ok = g >= 0
        grid[g[ok]] = tc[ok] @ features
    grid += noise * np.random.default_rng(seed).normal(size=grid.shape)
    return grid[contexts.mask.reshape(-1)].astype(np.float32)


def random_token_embeddings(
    contexts: text_lib.Contexts, vocab_size: int, d: int, *, scale: float, noise: float, seed: Seed
) -> np.ndarray:
    """Random-init floor: a random embedding of each token id (+ noise), masked rows."""
    rng = np.random.default_rng(seed)
    table = scale * unit_rows(vocab_size, d, rng.integers(1 << 31))
    ids = contexts.token_ids.reshape(-1)[contexts.mask.reshape(-1)]
    x = table[ids] + noise * rng.normal(size=(ids.shape[0], d))
    return x.astype(np.float32)

"""One-to-one matching of two feature sets: Hungarian (exact), greedy (scalable), one_to_one.

Paulo & Belrose 2025 (arXiv 2501.16615) pair the latents of two SAEs with the Hungarian
algorithm on decoder cosine similarity; Lan et al. 2024 keep one pair per feature after
activation-correlation matching (see docs/references.md, "Feature pairing across two
SAEs"). This module provides:

* `hungarian`: the optimal assignment (maximum total score) by
  `scipy.optimize.linear_sum_assignment` on a dense score matrix. Its cost grows like
  n^2.5-n^3: measured on this project's 2-core CPU, random 4096 x 4096 scores take ~6 s and
  structured (noisy-copy) cosines ~0.6 s; 8192 x 8192 random ~40 s and 512 MiB of float64.
  `match(method="auto")` uses it up to ``HUNGARIAN_MAX_ELEMENTS`` = 4096 * 4096 entries.
* `greedy` / `greedy_edges`: repeatedly take the best remaining pair whose two features are
  both free. On a dense matrix it runs in vectorised rounds of mutual-best pairs (each round
  matches every pair that is the best of its row and of its column among the free ones; this
  is exactly the sequential greedy result, Preis 1999); on an edge list (e.g. the top-k
  candidates of `engine.pairwise.max_cosine`) it needs only O(E log E) time and O(E) memory;
  `greedy_streamed` repeats that on the unmatched features until all are matched, so it
  scales to 131k x 131k dictionaries that no dense matrix can hold.
  Greedy is a 1/2-approximation in the worst case; on the similarity matrices of this
  project it is close to optimal. Measured gap (seeded; rerun with
  ``experiments/bench_similarity.py --only=matching``, asserted loosely in
  tests/test_matching.py): dictionaries of 1024 atoms in d = 64 where half of B are noisy
  copies of atoms of A (noise 1.5-3.5 x the signal) and half pure noise: greedy reaches
  97.9-99.0 % of the Hungarian total (n = 1024 and 2048), and recovers the planted pairs at
  least as often as Hungarian (n = 1024: 93 % vs 92 %, 40 % vs 39 %, 16 % vs 15 % at noise
  1.5 / 2.5 / 3.5); on i.i.d. uniform scores (no structure, the adversarial case) 98.7 % at
  n = 256, 99.5 % at n = 1024, 99.7 % at n = 2048. `greedy_streamed` (top-8 candidate
  rounds, no dense matrix) is within 0.1 % of dense greedy and finds the same planted pairs.
* `one_to_one`: resolves candidate pairs (e.g. each feature's best match in both directions)
  into a one-to-one set keeping the BEST pair for each feature (unlike Lan et al.'s filter,
  which keeps the first pair met). It is `greedy_edges` on the candidate pairs.

Ties: pairs are ordered by score (descending), then row, then column (ascending), so greedy
results are deterministic and equal to the sequential definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import optimize

from engine import checks

HUNGARIAN_MAX_ELEMENTS = 4096 * 4096


@dataclasses.dataclass
class Matching:
    """A one-to-one set of pairs ``(rows[i], cols[i])`` with their scores, sorted by row."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    method: str

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def total(self) -> float:
        return float(np.sum(self.values))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.size else 0.0

    def threshold(self, min_value: float) -> Matching:
        """Only the pairs with score >= ``min_value``."""
        keep = self.values >= min_value
        return Matching(self.rows[keep], self.cols[keep], self.values[keep], self.method)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "size": self.size, "total": self.total, "mean": self.mean}


def _sorted(rows, cols, values, method) -> Matching:
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    return Matching(
        rows[order],
        np.asarray(cols, np.int64)[order],
        np.asarray(values, np.float64)[order],
        method,
    )


def _check_scores(scores) -> np.ndarray:
    s = checks.as_float_matrix("scores", scores)
    if s.shape[1] == 0:
        raise checks.InputError("scores: expected at least 1 column, got 0")
    return np.asarray(s, np.float64)


def hungarian(
    scores, *, maximize: bool = True, max_elements: int = HUNGARIAN_MAX_ELEMENTS
) -> Matching:
    """Optimal one-to-one assignment of a dense ``[n_a, n_b]`` score matrix (scipy).

    Matches ``min(n_a, n_b)`` pairs maximising (or minimising) the total score.

    Raises:
      InputError: non-finite scores, or more than ``max_elements`` entries (pass a larger
        limit explicitly to accept the O(n^3) time, or use `greedy`).
    """
    s = _check_scores(scores)
    if s.size > max_elements:
        raise checks.InputError(
            f"hungarian: {s.shape[0]} x {s.shape[1]} scores exceed max_elements={max_elements}"
            " (O(n^3) time); use greedy/greedy_edges or raise max_elements"
        )
    r, c = optimize.linear_sum_assignment(s, maximize=maximize)
    return _sorted(r, c, s[r, c], "hungarian")


def greedy(scores, *, maximize: bool = True) -> Matching:
    """Greedy one-to-one matching of a dense score matrix (best free pair first).

    Vectorised rounds: every pair that is the best of its row and of its column among the
    free rows/columns is taken (such pairs are exactly the ones the sequential greedy takes
    next); when a round takes few pairs, the rest is finished sequentially over the sorted
    remaining entries. Same result as the sequential definition, ties by (row, column).
    """
    s = _check_scores(scores)
    s = s if maximize else -s
    n_a, n_b = s.shape
    free_r = np.ones(n_a, bool)
    free_c = np.ones(n_b, bool)
    row_parts: list[np.ndarray] = []
    col_parts: list[np.ndarray] = []
    work = s
    while free_r.any() and free_c.any():
        r_idx = np.flatnonzero(free_r)
        c_idx = np.flatnonzero(free_c)
        sub = work[np.ix_(r_idx, c_idx)]
        best_c = np.argmax(sub, axis=1)  # first max: lowest column
        best_r = np.argmax(sub, axis=0)  # first max: lowest row
        mutual = best_r[best_c] == np.arange(r_idx.size)
        got = np.flatnonzero(mutual)
        row_parts.append(r_idx[got])
        col_parts.append(c_idx[best_c[got]])
        free_r[r_idx[got]] = False
        free_c[c_idx[best_c[got]]] = False
        remaining = min(free_r.sum(), free_c.sum())
        if remaining and got.size < max(1, remaining // 100):
            # Few mutual pairs per round (chain-like scores): finish sequentially.
            r_idx = np.flatnonzero(free_r)
            c_idx = np.flatnonzero(free_c)
            rr, cc = np.meshgrid(r_idx, c_idx, indexing="ij")
            m = _greedy_sorted(rr.ravel(), cc.ravel(), work[rr, cc].ravel())
            row_parts.append(m[0])
            col_parts.append(m[1])
            break
    rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
    cols = np.concatenate(col_parts) if col_parts else np.zeros(0, np.int64)
    return _sorted(rows, cols, np.asarray(scores, np.float64)[rows, cols], "greedy")


def _greedy_sorted(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sequential greedy over edges in (value desc, row asc, col asc) order."""
    order = np.lexsort((cols, rows, -values))
    used_r: set[int] = set()
    used_c: set[int] = set()
    out_r, out_c = [], []
    for r, c in zip(rows[order].tolist(), cols[order].tolist()):
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        out_r.append(r)
        out_c.append(c)
    return np.asarray(out_r, np.int64), np.asarray(out_c, np.int64)


def greedy_edges(rows, cols, values, *, maximize: bool = True) -> Matching:
    """Greedy one-to-one matching over an edge list (candidate pairs and their scores).

    Duplicate ``(row, col)`` pairs are allowed (the best score is kept). Features absent from
    the list, or whose candidates were all taken, stay unmatched.
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    values = np.asarray(values, np.float64)
    if rows.ndim != 1 or rows.shape != cols.shape or rows.shape != values.shape:
        raise checks.InputError(
            f"greedy_edges: rows, cols, values must be 1-D of one length, "
            f"got {rows.shape}, {cols.shape}, {values.shape}"
        )
    if not (np.issubdtype(rows.dtype, np.integer) and np.issubdtype(cols.dtype, np.integer)):
        if rows.size:
            raise checks.InputError("greedy_edges: rows and cols must be integer indices")
    checks.check_finite("greedy_edges values", values)
    if rows.size and (rows.min() < 0 or cols.min() < 0):
        raise checks.InputError(
            "greedy_edges: negative row/col index (unmatched markers such "
            "as -1 must be dropped first)"
        )
    v = values if maximize else -values
    r, c = _greedy_sorted(rows.astype(np.int64), cols.astype(np.int64), v)
    if r.size:
        # Score of each chosen pair: the best (greedy took the best copy first).
        best: dict[tuple[int, int], float] = {}
        for rr, cc, vv in zip(rows.tolist(), cols.tolist(), v.tolist()):
            key = (rr, cc)
            if key not in best or vv > best[key]:
                best[key] = vv
        vals = np.asarray([best[(a, b)] for a, b in zip(r.tolist(), c.tolist())])
        vals = vals if maximize else -vals
    else:
        vals = np.zeros(0)
    return _sorted(r, c, vals, "greedy_edges")


def one_to_one(rows, cols, values) -> Matching:
    """Keeps the best pair for each feature among candidate pairs (higher score is better).

    E.g. ``rows = arange(n_a), cols = best match in B`` plus the reverse direction: when
    several features of A chose the same feature of B, the pair with the highest score wins
    and the others are dropped (Lan et al. keep the first pair met; this keeps the best).
    """
    m = greedy_edges(rows, cols, values)
    m.method = "one_to_one"
    return m


def candidate_edges(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs from an `engine.pairwise.PairwiseResult`: every row of A with its
    top-k rows of B, and every row of B with its top-k rows of A (duplicates allowed)."""
    n_a, k_a = result.a_topk_indices.shape
    n_b, k_b = result.b_topk_indices.shape
    rows = np.concatenate([np.repeat(np.arange(n_a), k_a), result.b_topk_indices.ravel()])
    cols = np.concatenate([result.a_topk_indices.ravel(), np.repeat(np.arange(n_b), k_b)])
    vals = np.concatenate([result.a_topk_values.ravel(), result.b_topk_values.ravel()])
    return rows, cols, np.asarray(vals, np.float64)


def greedy_streamed(
    a, b, mesh=None, *, k: int = 8, max_dense: int = 1 << 22, max_rounds: int = 64
) -> Matching:
    """Greedy one-to-one cosine matching of two large dictionaries without a dense matrix.

    Rounds: the top-k cosine candidates of every remaining row (both directions, streamed by
    `engine.pairwise.max_cosine`) are matched by `greedy_edges`; the matched rows and columns
    are removed and the rest goes to the next round, until the remaining problem has at most
    ``max_dense`` entries, which is finished by dense `greedy`. Every round matches at least
    the best remaining pair, and most rows in the first round (their partner is among their
    top-k), so the result is a complete matching (``min(n_a, n_b)`` pairs) like Hungarian's.
    Pair scores are the float64 cosines.
    """
    from engine import pairwise

    a, b = pairwise._validate_pair(a, b)
    k = checks.check_positive_int("greedy_streamed k", k)
    left_a = np.arange(a.shape[0])
    left_b = np.arange(b.shape[0])
    row_parts: list[np.ndarray] = []
    col_parts: list[np.ndarray] = []
    for _ in range(max_rounds):
        if not (left_a.size and left_b.size):
            break
        if left_a.size * left_b.size <= max_dense:
            s = pairwise.cosine_matrix(
                a[left_a], b[left_b], mesh, max_elements=left_a.size * left_b.size
            )
            m = greedy(np.asarray(s, np.float64))
        else:
            res = pairwise.max_cosine(
                a[left_a], b[left_b], mesh, k=min(k, left_a.size, left_b.size)
            )
            m = greedy_edges(*candidate_edges(res))
        row_parts.append(left_a[m.rows])
        col_parts.append(left_b[m.cols])
        left_a = np.setdiff1d(left_a, left_a[m.rows], assume_unique=True)
        left_b = np.setdiff1d(left_b, left_b[m.cols], assume_unique=True)
    rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
    cols = np.concatenate(col_parts) if col_parts else np.zeros(0, np.int64)
    an = np.asarray(a[rows], np.float64)
    bn = np.asarray(b[cols], np.float64)
    vals = np.einsum("nd,nd->n", an, bn) / (np.linalg.norm(an, axis=1) * np.linalg.norm(bn, axis=1))
    return _sorted(rows, cols, vals, "greedy_streamed")


def match(
    scores=None,
    *,
    a=None,
    b=None,
    mesh=None,
    method: str = "auto",
    k: int = 8,
    min_value: float | None = None,
    hungarian_max: int = HUNGARIAN_MAX_ELEMENTS,
) -> Matching:
    """One-to-one matching from a score matrix or from two dictionaries (cosine).

    Args:
      scores: ``[n_a, n_b]`` scores (higher is better), or None when ``a``/``b`` are given.
      a, b: dictionaries ``[n_a, d]``, ``[n_b, d]``: scores are their cosine similarities.
      mesh: device mesh for the cosine computation.
      method: "hungarian" (optimal), "greedy" (dense greedy on a score matrix; for
        dictionaries larger than ``hungarian_max`` entries, `greedy_streamed` on top-k
        candidates), or "auto" (Hungarian up to ``hungarian_max`` entries, else greedy).
      k: candidates per feature and round for `greedy_streamed`.
      min_value: drop matched pairs scoring below this.
      hungarian_max: the largest matrix (entries) "auto" gives to the Hungarian algorithm
        and "greedy" builds densely.

    Returns:
      A `Matching`.
    """
    if method not in ("auto", "hungarian", "greedy"):
        raise checks.InputError(f"match: method must be auto|hungarian|greedy, got {method!r}")
    if (scores is None) == (a is None or b is None):
        raise checks.InputError("match: pass either scores or both a and b")
    if scores is None:
        from engine import pairwise  # local: pairwise pulls in the jitted kernels

        n_a, n_b = np.shape(a)[0], np.shape(b)[0]
        if method == "hungarian" or n_a * n_b <= hungarian_max:
            scores = pairwise.cosine_matrix(a, b, mesh, max_elements=max(n_a * n_b, 1))
        else:
            m = greedy_streamed(a, b, mesh, k=k, max_dense=max(hungarian_max, 1))
            return m if min_value is None else m.threshold(min_value)
    s = _check_scores(scores)
    if method == "hungarian":
        m = hungarian(s, max_elements=max(s.size, hungarian_max))
    elif method == "auto" and s.size <= hungarian_max:
        m = hungarian(s, max_elements=hungarian_max)
    else:
        m = greedy(s)
    return m if min_value is None else m.threshold(min_value)


def quality_gap(candidate: Matching, reference: Matching) -> dict[str, float]:
    """How close a matching is to a reference (usually Hungarian) on the same scores.

    Returns ``total_ratio`` (candidate total / reference total), ``mean_gap`` (difference
    of mean pair scores) and ``pair_agreement`` (fraction of the reference's pairs also in
    the candidate).
    """
    ref = set(zip(reference.rows.tolist(), reference.cols.tolist()))
    cand = set(zip(candidate.rows.tolist(), candidate.cols.tolist()))
    return {
        "total_ratio": candidate.total / reference.total if reference.total else 1.0,
        "mean_gap": reference.mean - candidate.mean,
        "pair_agreement": len(ref & cand) / max(len(ref), 1),
        "candidate_size": candidate.size,
        "reference_size": reference.size,
    }

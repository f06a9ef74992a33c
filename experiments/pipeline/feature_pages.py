"""Per-feature pages of one comparison: what a person needs to judge whether a pair is one concept.

For each feature of both SAEs of a comparison this computes, in one extra pass over the
comparison's token stream (the feature pass keeps only each feature's top rows):

* its top-activating contexts with the feature's activation at EVERY token of the context
  (a window of ``before`` tokens before and ``after`` after the top token, never crossing a
  context boundary), as in the max-activating-example views of Bricken et al. 2023
  ("Towards Monosemanticity", transformer-circuits.pub) and SAEDashboard / Neuronpedia;
* a histogram of its non-zero activations (``bins`` equal bins on ``(0, max]``);
* when an unembedding is given, its top promoted and suppressed tokens, ``W_dec[f] @ W_U^T``
  (the direct logit effect with the final norm ignored, the approximation those dashboards use)
  and a histogram of those logit effects;
* why it is not in a kept pair (`drop_reasons`), from `filters.trace_filters`.

The result is written as a per-feature JSON export in the layout of SAEDashboard's
``NeuronpediaRunner`` batch files (the files Neuronpedia imports feature pages from; see
`write_export`), so the same files can be read by feature-page tools and by
`experiments.pipeline.html_report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from engine import mesh as mesh_lib
from engine import metrics_io
from experiments.pipeline import filters as filters_lib
from models import sae as sae_lib

EXPORT_LAYOUT = "saedashboard-neuronpedia-batch/v1"
FEATURES_PER_BATCH = 128


@dataclasses.dataclass(frozen=True)
class PageSource:
    """What the pages need beyond the SAEs and the stream.

    Attributes:
      token_text: token strings of stream rows.
      segments: ``[rows]`` id of the context each row belongs to; None when rows are
        independent samples (toy data): contexts are then the single top token.
      before / after: context window around the top token.
      unembed_a / unembed_b: ``[vocab, d_in]`` unembedding of each side's model (None: no
        promoted tokens).
      vocab: string of each unembedding row.
      n_logits: promoted / suppressed tokens kept.
      bins: activation-histogram bins.
    """

    token_text: Callable[[np.ndarray], Sequence[str]]
    segments: np.ndarray | None = None
    before: int = 8
    after: int = 4
    unembed_a: np.ndarray | None = None
    unembed_b: np.ndarray | None = None
    vocab: Sequence[str] | None = None
    n_logits: int = 10
    bins: int = 20


def context_windows(
    top_rows: np.ndarray, n_rows: int, segments: np.ndarray | None, before: int, after: int
) -> np.ndarray:
    """``[F, N, before + 1 + after]`` row ids around each top row (-1: outside the context)."""
    if segments is None:
        before = after = 0
    offs = np.arange(-before, after + 1)
    rows = top_rows[:, :, None].astype(np.int64) + offs
    valid = (top_rows[:, :, None] >= 0) & (rows >= 0) & (rows < n_rows)
    if segments is not None:
        seg = np.asarray(segments)
        valid &= seg[np.clip(rows, 0, n_rows - 1)] == seg[np.maximum(top_rows, 0)][:, :, None]
    return np.where(valid, rows, -1)


@jax.jit
def _encode(sae: sae_lib.SAE, x):
    return sae.encode(x)


def _side_pass_state(windows: np.ndarray, bins: int, n_features: int):
    flat = windows.reshape(-1)
    where = np.flatnonzero(flat >= 0)
    order = where[np.argsort(flat[where], kind="stable")]
    return {
        "order": order,
        "sorted_rows": flat[order],
        "feature": (order // (windows.shape[1] * windows.shape[2])).astype(np.int64),
        "values": np.zeros(flat.shape, np.float32),
        "hist": np.zeros(n_features * bins, np.int64),
    }


def page_pass(
    stream,
    saes: tuple[sae_lib.SAE, sae_lib.SAE],
    windows: tuple[np.ndarray, ...],
    maxes: tuple[np.ndarray, ...],
    bins: int,
    progress: bool = False,
) -> list[dict]:
    """One pass over ``(row_ids, acts_a, acts_b)`` chunks: window activations and histograms.

    Returns per side ``{"values": [F, N, L] activations at the window rows, "hist": [F,
    bins] counts of non-zero activations in equal bins on (0, max_f]}``.
    """
    states = [_side_pass_state(w, bins, s.config.d_sae) for w, s in zip(windows, saes)]
    it = stream
    if progress:
        from tqdm import tqdm

        it = tqdm(stream, desc="feature pages", unit="chunk")
    for chunk in it:
        n = chunk.num_valid
        row_ids = np.asarray(chunk.arrays[0])[:n].astype(np.int64)
        if n == 0:
            continue
        lo, hi = int(row_ids[0]), int(row_ids[-1]) + 1
        if hi - lo != n:
            raise ValueError("feature pages: stream row ids must be consecutive positions")
        for side, (sae, st, mx) in enumerate(zip(saes, states, maxes)):
            # Encode the full (padded) chunk: one compiled shape for every chunk.
            z = np.asarray(_encode(sae, np.asarray(chunk.arrays[side + 1])))[:n]
            i0, i1 = np.searchsorted(st["sorted_rows"], [lo, hi])
            if i1 > i0:
                st["values"][st["order"][i0:i1]] = z[
                    st["sorted_rows"][i0:i1] - lo, st["feature"][i0:i1]
                ]
            r, f = np.nonzero(z > 0)
            scale = np.where(mx[f] > 0, mx[f], 1.0)
            b = np.minimum((z[r, f] / scale * bins).astype(np.int64), bins - 1)
            st["hist"] += np.bincount(f * bins + b, minlength=st["hist"].size)
    return [
        {"values": st["values"].reshape(w.shape), "hist": st["hist"].reshape(-1, bins)}
        for st, w in zip(states, windows)
    ]


def logit_effects(
    w_dec: np.ndarray, unembed: np.ndarray, n: int, bins: int, block: int = 1024
) -> dict:
    """Top promoted / suppressed vocabulary rows of ``w_dec @ unembed.T`` and a histogram.

    Computed in blocks of ``block`` features so that ``[F, vocab]`` is never held at once.
    """
    w = np.asarray(w_dec, np.float32)
    u = np.asarray(unembed, np.float32)
    n = min(n, u.shape[0])
    out = {
        k: []
        for k in ("pos_ids", "pos_values", "neg_ids", "neg_values", "hist_heights", "hist_values")
    }
    for s in range(0, w.shape[0], block):
        logits = w[s : s + block] @ u.T  # [block, vocab]
        pos = np.argpartition(-logits, n - 1, axis=1)[:, :n]
        pos = np.take_along_axis(pos, np.argsort(-np.take_along_axis(logits, pos, 1), 1), 1)
        neg = np.argpartition(logits, n - 1, axis=1)[:, :n]
        neg = np.take_along_axis(neg, np.argsort(np.take_along_axis(logits, neg, 1), 1), 1)
        out["pos_ids"].append(pos)
        out["pos_values"].append(np.take_along_axis(logits, pos, 1))
        out["neg_ids"].append(neg)
        out["neg_values"].append(np.take_along_axis(logits, neg, 1))
        lo, hi = logits.min(1, keepdims=True), logits.max(1, keepdims=True)
        width = np.where(hi > lo, hi - lo, 1.0)
        idx = np.minimum(((logits - lo) / width * bins).astype(np.int64), bins - 1)
        heights = np.zeros((logits.shape[0], bins), np.int64)
        np.add.at(
            heights, (np.repeat(np.arange(logits.shape[0]), logits.shape[1]), idx.reshape(-1)), 1
        )
        out["hist_heights"].append(heights)
        out["hist_values"].append(lo + width * (np.arange(bins) + 0.5) / bins)
    return {k: np.concatenate(v) for k, v in out.items()}


def compute(
    stream,
    sae_a: sae_lib.SAE,
    sae_b: sae_lib.SAE,
    step: dict,
    src: PageSource,
    progress: bool = False,
) -> dict:
    """Page arrays of both sides (flat dict of numpy arrays, for the step cache)."""
    n_rows = int(step["rows"])
    saes = (sae_a, sae_b)
    windows = tuple(
        context_windows(step[f"{s}_top_rows"], n_rows, src.segments, src.before, src.after)
        for s in "ab"
    )
    maxes = tuple(np.asarray(step[f"{s}_max"], np.float32) for s in "ab")
    sides = page_pass(stream, saes, windows, maxes, src.bins, progress)
    out = {}
    for s, w, side, sae, unembed in zip("ab", windows, sides, saes, (src.unembed_a, src.unembed_b)):
        out[f"{s}_ctx_rows"] = w.astype(np.int64)
        out[f"{s}_ctx_values"] = side["values"]
        out[f"{s}_hist"] = side["hist"]
        if unembed is not None:
            # Decoder rows live in the SAE's normalised input space: divide by input_scale.
            eff = logit_effects(
                np.asarray(sae.W_dec) / sae.config.input_scale, unembed, src.n_logits, src.bins
            )
            out.update({f"{s}_logit_{k}": v for k, v in eff.items()})
    return out


def drop_reasons(
    n_features: int,
    side: str,
    cand: filters_lib.Pairs,
    dropped_by: np.ndarray,
    invalid: np.ndarray,
    dead: np.ndarray,
    non_concept: np.ndarray | None,
    threshold: float | None,
) -> list[dict]:
    """Per feature of one side: kept or not, its partner and, when dropped, why.

    Each entry: ``status`` ("kept" | "dropped"), ``partner``, ``partner_value``, ``drop`` (a
    code: "", "dead", "constant", "non_concept", "no_candidate", "partner_dead_constant",
    "partner_non_concept", "one_to_one", "threshold") and ``reason`` (a sentence).

    A kept feature's partner is its kept pair's; a dropped feature's is the partner of its best
    candidate pair (highest value), and the reason is the filter that removed that pair, or the
    feature's own state (dead, constant, non-concept) when that is what excluded it.
    """
    other = "b" if side == "a" else "a"
    mine = cand.a if side == "a" else cand.b
    theirs = cand.b if side == "a" else cand.a
    best = np.full(n_features, -1)
    # Kept pairs first, then by value: the first candidate seen per feature is its best.
    order = np.lexsort((-cand.value, dropped_by != ""))
    for i in order[::-1]:
        best[mine[i]] = i
    out = []
    for f in range(n_features):
        i = int(best[f])
        entry = {
            "status": "kept" if i >= 0 and dropped_by[i] == "" else "dropped",
            "partner": int(theirs[i]) if i >= 0 else None,
            "partner_value": float(cand.value[i]) if i >= 0 else None,
        }
        if entry["status"] == "kept":
            code, reason = "", ""
        elif dead[f]:
            code, reason = "dead", "dead (never fired)"
        elif invalid[f]:
            code, reason = "constant", "constant (zero variance)"
        elif non_concept is not None and non_concept[f]:
            code, reason = (
                "non_concept",
                "non-concept: top tokens are punctuation/whitespace/special",
            )
        elif i < 0:
            code, reason = "no_candidate", "no candidate pair"
        else:
            code = dropped_by[i]
            partner = f"{other.upper()}#{int(theirs[i])}"
            reason = {
                "dead_constant": f"best partner {partner} is dead or constant",
                "non_concept": (f"best partner {partner} is non-concept (or no shared top token)"),
                "one_to_one": f"best partner {partner} kept a better pair (one-to-one)",
                "threshold": (f"best value {cand.value[i]:.3f} below the threshold {threshold}"),
            }.get(code, code)
            code = {
                "dead_constant": "partner_dead_constant",
                "non_concept": "partner_non_concept",
            }.get(code, code)
        entry["drop"], entry["reason"] = code, reason
        out.append(entry)
    return out


def _r(x, nd=4):
    return float(round(float(x), nd))


def export_features(
    side: str, step: dict, pages: dict, src: PageSource, table: list[dict]
) -> list[dict]:
    """Per-feature dicts in the SAEDashboard ``NeuronpediaRunner`` batch layout.

    Keys per feature (names and meaning as in that layout): ``feature_index``,
    ``frac_nonzero``, ``activations`` (list of ``{"tokens", "values",
    "qualifying_token_index"}``: the top-activating contexts, the top token's index in
    ``tokens``), ``pos_str`` / ``pos_values`` / ``neg_str`` / ``neg_values`` (top promoted /
    suppressed tokens; empty without an unembedding), ``freq_hist_data_bar_heights`` /
    ``freq_hist_data_bar_values`` (histogram of non-zero activations: counts and bin centres,
    PARALLEL arrays of equal length), ``logits_hist_data_bar_heights`` /
    ``logits_hist_data_bar_values`` (histogram of the logit effects over the vocabulary), and
    ``maxActApprox``. Added for this project under ``"universality"``: density, mean, max,
    dead, top tokens, pair status, partner and drop reason (the `table` row).
    """
    rows, values = pages[f"{side}_ctx_rows"], pages[f"{side}_ctx_values"]
    top_rows = step[f"{side}_top_rows"]
    used = np.unique(rows[rows >= 0])
    strings = dict(zip(used.tolist(), src.token_text(used))) if used.size else {}
    hist = pages[f"{side}_hist"]
    bins = hist.shape[1]
    has_logits = f"{side}_logit_pos_ids" in pages
    vocab = src.vocab

    def tok(i):
        return str(vocab[i]) if vocab is not None and i < len(vocab) else f"<{i}>"

    out = []
    for f in range(rows.shape[0]):
        mx = float(step[f"{side}_max"][f])
        acts = []
        for c in range(rows.shape[1]):
            if top_rows[f, c] < 0:
                continue
            keep = rows[f, c] >= 0
            r = rows[f, c][keep]
            q = int(np.flatnonzero(rows[f, c] == top_rows[f, c])[0]) - int(np.argmax(keep))
            acts.append(
                {
                    "tokens": [strings[int(x)] for x in r],
                    "values": [_r(v) for v in values[f, c][keep]],
                    "qualifying_token_index": q,
                }
            )
        width = mx / bins if mx > 0 else 1.0 / bins
        feat = {
            "feature_index": f,
            "frac_nonzero": _r(step[f"{side}_density"][f], 6),
            "maxActApprox": _r(mx),
            "activations": acts,
            "freq_hist_data_bar_heights": hist[f].tolist(),
            "freq_hist_data_bar_values": [_r(width * (i + 0.5)) for i in range(bins)],
            "pos_str": [],
            "pos_values": [],
            "neg_str": [],
            "neg_values": [],
            "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [],
        }
        if has_logits:
            p = f"{side}_logit_"
            feat.update(
                {
                    "pos_str": [tok(int(i)) for i in pages[p + "pos_ids"][f]],
                    "pos_values": [_r(v) for v in pages[p + "pos_values"][f]],
                    "neg_str": [tok(int(i)) for i in pages[p + "neg_ids"][f]],
                    "neg_values": [_r(v) for v in pages[p + "neg_values"][f]],
                    "logits_hist_data_bar_heights": pages[p + "hist_heights"][f].tolist(),
                    "logits_hist_data_bar_values": [_r(v) for v in pages[p + "hist_values"][f]],
                }
            )
        feat["universality"] = table[f]
        out.append(feat)
    return out


def write_export(
    directory: str,
    comparison: str,
    side: str,
    features: list[dict],
    meta: dict,
    per_batch: int = FEATURES_PER_BATCH,
) -> list[str]:
    """Writes ``directory/<side>/batch-<k>.json`` files of ``per_batch`` features each.

    Each file is ``{"layout", "comparison", "side", ...meta, "features": [...]}`` with the
    features of `export_features`, as SAEDashboard's ``NeuronpediaRunner`` writes its
    ``batch-<k>.json`` files; ``directory/<side>/index.json`` lists the batches and the
    feature range of each.
    """
    root = os.path.join(directory, side)
    if not mesh_lib.is_primary():  # several processes: process 0 alone writes
        return [
            os.path.join(root, f"batch-{k}.json") for k in range(-(-len(features) // per_batch))
        ]
    paths, index = [], []
    for k, s in enumerate(range(0, len(features), per_batch)):
        path = os.path.join(root, f"batch-{k}.json")
        batch = features[s : s + per_batch]
        page = {"layout": EXPORT_LAYOUT, "comparison": comparison, "side": side, **meta}
        metrics_io.write_text(path, json.dumps({**page, "features": batch}, separators=(",", ":")))
        paths.append(path)
        index.append(
            {"batch": k, "file": f"batch-{k}.json", "first": s, "last": s + len(batch) - 1}
        )
    metrics_io.write_text(
        os.path.join(root, "index.json"),
        json.dumps(
            {
                "layout": EXPORT_LAYOUT,
                "comparison": comparison,
                "side": side,
                "n_features": len(features),
                "per_batch": per_batch,
                **meta,
                "batches": index,
            },
            indent=1,
        ),
    )
    return paths

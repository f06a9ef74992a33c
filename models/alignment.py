"""Aligning two tokenizations of the same text: character spans, alignment units, pooling.

Two models with different tokenizers (GPT-2 vs Pythia, Llama-2 vs Llama-3, BERT cased vs
uncased) read the same documents but cut them into different tokens, so their activation rows
are not the same positions. This module pairs them through the text itself, in the spirit of
cross-tokenizer alignment in model-stitching and ensembling work (e.g. Minixhofer et al. 2024,
"Zero-Shot Tokenizer Transfer", arXiv 2405.07883; Xu et al. 2024, "Bridging the Gap between
Different Vocabularies for LLM Ensemble", arXiv 2404.09492, which align on shared token
boundaries).

Character spans
---------------
Every token keeps the half-open character span ``[start, end)`` of the document it came from
(`token_spans`): fast tokenizers report it (``return_offsets_mapping=True``, offsets into the
original, un-normalised text). For a tokenizer without offsets the fallback `decode_spans`
decodes incrementally: token ``i`` ends where the decoded prefix ``ids[:i+1]`` ends in the text;
a token that decodes to an incomplete UTF-8 character (byte-level BPE) ends where the next one
completes it. The fallback needs a lossless decoder (``decode(encode(text)) == text``, true of
byte-level BPE; not of lower-casing WordPiece or ``<unk>``-producing vocabularies) and raises
`checks.InputError` otherwise. Special tokens (BOS/CLS/SEP/pad...) have no span and never align.

Alignment units (``unit``)
--------------------------
* ``tokens``: the same tokenizer on both sides; every text token is its own unit (today's
  behaviour). Different token ids raise `text.TokenizerMismatchError`.
* ``shared_boundaries``: a unit ends at each character offset where BOTH tokenizations end a
  token (a "closing" offset: every earlier token ends at or before it and every later token
  starts at or after it; byte pieces of one character share its span and only the last one
  closes). A causal model at that token has read exactly the same text as the other one (up to
  where each context began), so the activations are the cleanest comparison. Each unit uses the
  token that closes it on each side (``pooling="last"``; ``mean``/``max`` pool the unit's
  tokens). Units get longer where the tokenizations disagree; none of the text is dropped.
* ``words``: the text's words under the documented pre-tokenisation rule `WORD_PATTERN`
  (``\\w+|[^\\w\\s]+``: runs of word characters, runs of other non-space characters; the rule
  of Hugging Face's ``Whitespace`` pre-tokenizer). A word aligns on a side when that side's
  tokens, with surrounding whitespace trimmed, tile it exactly (no token straddles its edge);
  the side's row is the word's last token (``last``, right for causal models) or the mean / max
  over its tokens. Words are the natural unit of ground truth defined on words, and of encoder
  models (pool over the word's pieces), but lose words that a tokenizer merges with a
  neighbour (GPT-2's ``'s``, ``.\\n``).

What is dropped, and why (counted in the report): ``not_harvested`` (a token the unit needs is
in no context, e.g. a document's short tail), ``context_cut`` (``mean``/``max``: the unit's
tokens fall in two contexts), ``token_straddles_word`` and ``chars_not_covered`` (``words``:
a side's tokens cross the word's edge, or leave some of its characters without a token, e.g.
characters a normaliser removed).

Storage (`Alignment.save` / `Alignment.load`; no pickle, plain ``.npy`` + JSON)::

    alignment.json   format, version, unit, pooling, context lengths, tokenizer fingerprints,
                     text description, sha256 of the documents, the report
    units.npy        [U, 3] int64: document, char start, char end of each unit
    a_ptr.npy        [U + 1] int64: unit u uses a_rows[a_ptr[u]:a_ptr[u + 1]]
    a_rows.npy       [N_a] int64: grid positions of side A (context * context_length + position)
    b_ptr.npy, b_rows.npy   the same for side B

Grid positions address the ``[contexts, context_length]`` layout of an activation cache (or of
`models.lm.LanguageModel.run`), so an alignment computed once per corpus pairs any two caches
of the two tokenizers over that text (`AlignedSource`). The last row of a unit is its closing
token; pooling is chosen when rows are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine import checks
from models import activation_source as src_lib
from models import text as text_lib

if TYPE_CHECKING:
    from models.activation_cache import ActivationCache

FORMAT = "sae-universality-alignment"
VERSION = 1
UNITS = ("tokens", "shared_boundaries", "words")
POOLINGS = ("last", "mean", "max")
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")
DROP_REASONS = ("not_harvested", "context_cut", "token_straddles_word", "chars_not_covered")


# --------------------------------------------------------------------------------------------
# Character spans of one document
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocTokens:
    """One document's tokens (no special tokens) and their character spans ``[start, end)``."""

    ids: np.ndarray  # [n] int64
    starts: np.ndarray  # [n] int64
    ends: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def token_spans(
    tokenizer: text_lib.Tokenizer, text: str, *, use_offsets: bool | None = None
) -> DocTokens:
    """Token ids of ``text`` (without special tokens) and each token's character span.

    Fast tokenizers' offset mappings are used when present (``use_offsets`` None or True);
    otherwise (or with ``use_offsets=False``) `decode_spans` decodes incrementally.
    """
    fast = bool(getattr(tokenizer, "is_fast", False))
    if use_offsets is None:
        use_offsets = fast
    if use_offsets:
        if not fast:
            raise checks.InputError(
                f"tokenizer {type(tokenizer).__name__}: no offset mapping "
                "(not a fast tokenizer); use the decoding fallback"
            )
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], np.int64)
        off = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        return DocTokens(ids, off[:, 0].copy(), off[:, 1].copy())
    ids = np.asarray(
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], np.int64
    )
    starts, ends = decode_spans(tokenizer, text, ids)
    return DocTokens(ids, starts, ends)


def decode_spans(
    tokenizer: text_lib.Tokenizer, text: str, ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Character spans by incremental decoding (the fallback for tokenizers without offsets).

    Token ``i`` ends where the decoded text up to it ends in ``text``. Decoding restarts from an
    anchor token every few tokens, so the cost stays linear in the document; the anchor's own
    decoded text is subtracted, which also handles sentencepiece-style decoders that drop the
    first token's leading space. A token whose decoded prefix ends in U+FFFD (an incomplete
    UTF-8 character of byte-level BPE) waits for the token that completes the character; all
    of them then get that character's span, as fast tokenizers' offset mappings do.

    Raises:
      InputError: the decoder is not lossless on this text (the decoded prefix leaves the
        text, e.g. lower-casing or ``<unk>``); use a fast tokenizer's offsets then.
    """
    ids = [int(i) for i in ids]
    n = len(ids)
    starts = np.zeros(n, np.int64)
    ends = np.zeros(n, np.int64)
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    pos = 0  # characters consumed by the tokens so far
    anchor = -1  # -1: decode from the first token
    anchor_text = ""
    pending: list[int] = []  # tokens of an unfinished character

    def lossy(detail: str) -> checks.InputError:
        return checks.InputError(
            f"tokenizer {type(tokenizer).__name__}: decoding is not lossless on this text "
            f"({detail}); character spans need a fast tokenizer with offset mappings"
        )

    for i in range(n):
        lo = max(anchor, 0)
        piece = tokenizer.decode(ids[lo : i + 1], **kw)
        if piece.endswith("\ufffd"):
            pending.append(i)
            continue
        if anchor < 0:
            if text.startswith(piece):
                end = len(piece)
            else:
                lead = len(text) - len(text.lstrip(" "))
                if not (lead and text[lead:].startswith(piece)):
                    raise lossy(f"decoded {piece[:30]!r}, text {text[:30]!r}")
                end = lead + len(piece)
        else:
            if not piece.startswith(anchor_text):
                raise lossy(f"decoded {piece[:30]!r} does not extend {anchor_text!r}")
            rest = piece[len(anchor_text) :]
            a_end = int(ends[anchor])
            if text[a_end : a_end + len(rest)] != rest:
                raise lossy(
                    f"at char {a_end}: decoded {rest[:30]!r}, text {text[a_end : a_end + 30]!r}"
                )
            end = a_end + len(rest)
        for j in pending + [i]:
            starts[j], ends[j] = pos, end
        pending = []
        pos = end
        single = tokenizer.decode(ids[i : i + 1], **kw)
        if i - lo >= 8 and "\ufffd" not in single:
            anchor, anchor_text = i, single
    for j in pending:
        starts[j] = ends[j] = pos
    if len(text[pos:].strip()):
        raise lossy(f"decoded text covers {pos} of {len(text)} characters")
    return starts, ends


def _closing(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Bool per token: it closes a clean boundary at ``ends[t]`` (module docstring)."""
    if len(ends) == 0:
        return np.zeros(0, bool)
    cummax = np.maximum.accumulate(ends)
    revmin = np.minimum.accumulate(starts[::-1])[::-1]
    next_min = np.concatenate([revmin[1:], [np.iinfo(np.int64).max]])
    return (cummax == ends) & (next_min >= ends)


def _opening(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Bool per token: it opens a clean boundary at ``starts[t]``."""
    if len(starts) == 0:
        return np.zeros(0, bool)
    revmin = np.minimum.accumulate(starts[::-1])[::-1]
    cummax = np.maximum.accumulate(ends)
    prev_max = np.concatenate([[np.iinfo(np.int64).min], cummax[:-1]])
    return (revmin == starts) & (prev_max <= starts)


def _core_spans(text: str, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spans with leading / trailing whitespace trimmed (empty when all whitespace)."""
    n = len(text)
    space = np.fromiter((c.isspace() for c in text), bool, n)
    idx = np.arange(n + 1)
    # nxt[i]: first non-space index >= i (n if none); prv[i]: 1 + last non-space index < i
    nxt = np.where(np.concatenate([~space, [True]]), idx, n + 1)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    nxt = np.minimum(nxt, n)
    prv = np.where(np.concatenate([[True], ~space]), idx, -1)
    prv = np.maximum.accumulate(prv)
    cs = np.minimum(nxt[np.clip(starts, 0, n)], ends)
    ce = np.maximum(prv[np.clip(ends, 0, n)], cs)
    return cs, ce


def _covered(n_chars: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Bool per character: inside some token span."""
    diff = np.zeros(n_chars + 1, np.int64)
    ok = ends > starts
    np.add.at(diff, starts[ok], 1)
    np.add.at(diff, ends[ok], -1)
    return np.cumsum(diff[:-1]) > 0


@dataclasses.dataclass(frozen=True)
class DocUnits:
    """Units of one document: char spans and each side's token indices (CSR)."""

    spans: np.ndarray  # [U, 2] int64
    ptr_a: np.ndarray  # [U + 1]
    tok_a: np.ndarray  # token indices into side A's DocTokens
    ptr_b: np.ndarray
    tok_b: np.ndarray
    dropped: dict  # reason -> count (alignment-level reasons)


def align_document(text: str, a: DocTokens, b: DocTokens, unit: str) -> DocUnits:
    """Units of one document (module docstring); tokens with empty spans are never used."""
    if unit not in UNITS:
        raise checks.InputError(f"unit: expected one of {UNITS}, got {unit!r}")
    dropped = {r: 0 for r in DROP_REASONS}
    real_a = np.flatnonzero(a.ends > a.starts)
    real_b = np.flatnonzero(b.ends > b.starts)
    if unit == "tokens":
        if not (np.array_equal(a.ids, b.ids) and np.array_equal(a.starts, b.starts)):
            raise text_lib.TokenizerMismatchError(
                "alignment unit 'tokens' needs identical tokenizations; the two tokenizers "
                "split this text differently (use 'shared_boundaries' or 'words')"
            )
        spans = np.stack([a.starts[real_a], a.ends[real_a]], 1)
        ptr = np.arange(len(real_a) + 1, dtype=np.int64)
        return DocUnits(
            spans, ptr, real_a.astype(np.int64), ptr.copy(), real_a.astype(np.int64), dropped
        )
    if unit == "shared_boundaries":
        sides = []
        for real in (real_a, real_b):
            d = a if real is real_a else b
            s, e = d.starts[real], d.ends[real]
            close = np.flatnonzero(_closing(s, e))
            sides.append((real, e, close))
        shared = np.intersect1d(sides[0][1][sides[0][2]], sides[1][1][sides[1][2]])
        csr = []
        for real, e, close in sides:
            # the token (index into `real`) closing each shared offset; a unit holds the
            # tokens after the previous shared offset's closing token, up to its own
            last = close[np.searchsorted(e[close], shared)]
            first = np.concatenate([[0], last[:-1] + 1]).astype(np.int64)
            ptr = np.concatenate([[0], np.cumsum(last + 1 - first)]).astype(np.int64)
            tok = (
                np.concatenate([real[f : l + 1] for f, l in zip(first, last)])
                if len(shared)
                else np.zeros(0, np.int64)
            ).astype(np.int64)
            csr.append((ptr, tok))
        spans = (
            np.stack([np.concatenate([[0], shared[:-1]]), shared], 1).astype(np.int64)
            if len(shared)
            else np.zeros((0, 2), np.int64)
        )
        return DocUnits(spans, csr[0][0], csr[0][1], csr[1][0], csr[1][1], dropped)
    # words
    words = [(m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]
    n = len(text)
    per_side = []
    for d in (a, b):
        real = np.flatnonzero(d.ends > d.starts)
        cs, ce = _core_spans(text, d.starts[real], d.ends[real])
        keep = ce > cs
        real, cs, ce = real[keep], cs[keep], ce[keep]
        per_side.append(
            (
                real,
                cs,
                ce,
                set(cs[_opening(cs, ce)].tolist()),
                set(ce[_closing(cs, ce)].tolist()),
                _covered(n, cs, ce),
            )
        )
    spans, ranges_a, ranges_b = [], [], []
    for ws, we in words:
        ok = True
        for _real, _cs, _ce, opens, closes, _cov in per_side:
            if ws not in opens or we not in closes:
                ok = False
        if not ok:
            dropped["token_straddles_word"] += 1
            continue
        rngs = []
        for _real, cs, ce, _opens, _closes, _cov in per_side:
            lo = int(np.searchsorted(cs, ws, side="left"))
            hi = int(np.searchsorted(ce, we, side="right"))
            rngs.append((lo, hi))
        if not all(per_side[k][5][ws:we].all() for k in (0, 1)) or any(hi <= lo for lo, hi in rngs):
            dropped["chars_not_covered"] += 1
            continue
        spans.append((ws, we))
        ranges_a.append(per_side[0][0][rngs[0][0] : rngs[0][1]])
        ranges_b.append(per_side[1][0][rngs[1][0] : rngs[1][1]])

    def csr(parts):
        ptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        tok = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return ptr, tok

    pa, ta = csr(ranges_a)
    pb, tb = csr(ranges_b)
    sp = np.asarray(spans, np.int64).reshape(-1, 2)
    return DocUnits(sp, pa, ta, pb, tb, dropped)


# --------------------------------------------------------------------------------------------
# A corpus: documents laid out in contexts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusTokens:
    """One tokenizer's view of a corpus: per-document spans and where each token was run.

    Attributes:
      docs: `DocTokens` per document.
      grid: per document, ``[n]`` int64 grid position (context * context_length + position)
        of each token, -1 when no context holds it.
      context_length: positions per context.
      num_contexts: contexts in the grid.
      fingerprint: `text.tokenizer_fingerprint` of the tokenizer (JSON-able).
    """

    docs: tuple[DocTokens, ...]
    grid: tuple[np.ndarray, ...]
    context_length: int
    num_contexts: int
    fingerprint: dict

    def span_grid(self) -> np.ndarray:
        """``[contexts, context_length, 3]`` int64: (document, char start, char end) of every
        position; -1 on special tokens and padding. Stored beside an activation cache as
        ``token_spans.npy`` so its top-activating rows can be shown as text."""
        out = np.full((self.num_contexts * self.context_length, 3), -1, np.int64)
        for d, (doc, g) in enumerate(zip(self.docs, self.grid)):
            ok = g >= 0
            out[g[ok], 0] = d
            out[g[ok], 1] = doc.starts[ok]
            out[g[ok], 2] = doc.ends[ok]
        return out.reshape(self.num_contexts, self.context_length, 3)


def corpus_tokens(
    documents: Sequence[str],
    tokenizer: text_lib.Tokenizer,
    contexts: text_lib.Contexts,
    *,
    special_tokens: str = "auto",
    use_offsets: bool | None = None,
) -> CorpusTokens:
    """Spans of every document and the grid position of each token in ``contexts``.

    ``contexts`` must come from `text.iter_contexts` / `text.make_contexts` over exactly these
    ``documents`` with this tokenizer and ``special_tokens`` (checked: every placed token id
    must equal the document's token at that place).
    """
    prefix, suffix = text_lib.special_template(tokenizer, special_tokens)
    ctx = contexts.context_length
    body = ctx - len(prefix) - len(suffix)
    docs = tuple(token_spans(tokenizer, d, use_offsets=use_offsets) for d in documents)
    grid = [np.full(len(d), -1, np.int64) for d in docs]
    piece = {}
    for c in range(len(contexts)):
        d = int(contexts.doc_index[c])
        if not 0 <= d < len(docs):
            raise checks.InputError(
                f"contexts: context {c} comes from document {d}, but only "
                f"{len(docs)} documents were given"
            )
        k = piece.get(d, 0)
        piece[d] = k + 1
        lo = k * body
        n_real = int(contexts.mask[c].sum()) - len(prefix) - len(suffix)
        idx = np.arange(lo, lo + n_real)
        if (
            n_real < 0
            or idx[-1:].max(initial=-1) >= len(docs[d])
            or not np.array_equal(
                contexts.token_ids[c, len(prefix) : len(prefix) + n_real], docs[d].ids[idx]
            )
        ):
            raise checks.InputError(
                f"contexts: context {c} does not hold document {d}'s tokens {lo}..{lo + n_real}"
                f"; the contexts must be made by text.iter_contexts from these documents with "
                f"this tokenizer and special_tokens={special_tokens!r}"
            )
        grid[d][idx] = c * ctx + len(prefix) + np.arange(n_real)
    return CorpusTokens(
        docs, tuple(grid), ctx, len(contexts), text_lib.tokenizer_fingerprint(tokenizer)
    )


SPANS_FILE = "token_spans.npy"


def save_token_spans(cache_dir: str, corpus: CorpusTokens, documents: Sequence[str]) -> str:
    """Writes ``token_spans.npy`` ([contexts, context_length, 3] int64: document, char start,
    char end; -1 on special tokens and padding) and ``token_spans.json`` (document count and
    sha256) beside an activation cache, so its rows can be shown and aligned as text later.
    """
    from engine import metrics_io

    path = os.path.join(cache_dir, SPANS_FILE)
    np.save(path, corpus.span_grid(), allow_pickle=False)
    metrics_io.write_json(
        os.path.join(cache_dir, "token_spans.json"),
        {
            "format": FORMAT + "-token-spans",
            "version": VERSION,
            "documents": len(documents),
            "documents_sha256": documents_sha256(documents),
            "layout": "[contexts, context_length, 3] int64: document, char start, char end "
            "(-1: special token or padding)",
        },
    )
    return path


def documents_sha256(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Aligned units of a corpus and the grid rows of both sides (module docstring)."""

    unit: str
    pooling: str
    units: np.ndarray  # [U, 3] int64 (document, char start, char end)
    ptr_a: np.ndarray
    rows_a: np.ndarray
    ptr_b: np.ndarray
    rows_b: np.ndarray
    report: dict
    meta: dict

    def __len__(self) -> int:
        return int(self.units.shape[0])

    def last_rows(self, side: str) -> np.ndarray:
        """The closing token's grid position of every unit on ``side`` ('a' | 'b')."""
        ptr, rows = (self.ptr_a, self.rows_a) if side == "a" else (self.ptr_b, self.rows_b)
        return rows[ptr[1:] - 1]

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for name in ("units", "ptr_a", "rows_a", "ptr_b", "rows_b"):
            np.save(
                os.path.join(directory, f"{_FILES[name]}.npy"),
                getattr(self, name),
                allow_pickle=False,
            )
        from engine import metrics_io

        metrics_io.write_json(
            os.path.join(directory, "alignment.json"),
            {
                "format": FORMAT,
                "version": VERSION,
                "unit": self.unit,
                "pooling": self.pooling,
                "num_units": len(self),
                "report": self.report,
                **self.meta,
            },
        )

    @staticmethod
    def load(directory: str) -> Alignment:
        path = os.path.join(directory, "alignment.json")
        if not os.path.exists(path):
            raise checks.InputError(f"{directory} is not an alignment (no alignment.json)")
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            raise checks.InputError(
                f"{path}: format {meta.get('format')!r} version "
                f"{meta.get('version')}, expected {FORMAT!r} <= {VERSION}"
            )
        arrays = {
            name: np.load(os.path.join(directory, f"{_FILES[name]}.npy"), allow_pickle=False)
            for name in ("units", "ptr_a", "rows_a", "ptr_b", "rows_b")
        }
        unit, pooling, report = meta.pop("unit"), meta.pop("pooling"), meta.pop("report")
        for k in ("format", "version", "num_units"):
            meta.pop(k, None)
        al = Alignment(unit=unit, pooling=pooling, report=report, meta=meta, **arrays)
        if al.units.shape != (meta_units := al.ptr_a.shape[0] - 1, 3) or (
            al.ptr_b.shape[0] - 1 != meta_units
        ):
            raise checks.InputError(f"{directory}: alignment arrays disagree in length")
        return al

    def with_pooling(self, pooling: str) -> Alignment:
        check_pooling(pooling)
        return dataclasses.replace(self, pooling=pooling)


_FILES = {
    "units": "units",
    "ptr_a": "a_ptr",
    "rows_a": "a_rows",
    "ptr_b": "b_ptr",
    "rows_b": "b_rows",
}


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise checks.InputError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    return pooling


def align_corpus(
    documents: Sequence[str],
    side_a: CorpusTokens,
    side_b: CorpusTokens,
    *,
    unit: str,
    pooling: str = "last",
    text_info: object = None,
) -> Alignment:
    """Aligns two tokenizations of ``documents`` laid out in their contexts (module docstring).

    Units whose needed tokens are not in a context (``not_harvested``) or, for ``mean`` /
    ``max`` pooling, fall in two contexts (``context_cut``) are dropped and counted.
    """
    if unit not in UNITS:
        raise checks.InputError(f"alignment unit: expected one of {UNITS}, got {unit!r}")
    check_pooling(pooling)
    if len(side_a.docs) != len(documents) or len(side_b.docs) != len(documents):
        raise checks.InputError(
            f"align_corpus: {len(documents)} documents but the sides hold "
            f"{len(side_a.docs)} and {len(side_b.docs)}"
        )
    units, parts_a, parts_b, ptrs_a, ptrs_b = [], [], [], [0], [0]
    dropped = {r: 0 for r in DROP_REASONS}
    per_doc = np.zeros(len(documents), np.int64)
    nonspace_total = covered = 0
    for d, doc in enumerate(documents):
        du = align_document(doc, side_a.docs[d], side_b.docs[d], unit)
        for r, c in du.dropped.items():
            dropped[r] += c
        ga, gb = side_a.grid[d], side_b.grid[d]
        space = np.fromiter((ch.isspace() for ch in doc), bool, len(doc))
        nonspace_total += int((~space).sum())
        cum_ns = np.concatenate([[0], np.cumsum(~space)])
        for u in range(du.spans.shape[0]):
            ra = ga[du.tok_a[du.ptr_a[u] : du.ptr_a[u + 1]]]
            rb = gb[du.tok_b[du.ptr_b[u] : du.ptr_b[u + 1]]]
            if pooling == "last":
                ra, rb = ra[-1:], rb[-1:]
            if (ra < 0).any() or (rb < 0).any():
                dropped["not_harvested"] += 1
                continue
            if (
                len(set((ra // side_a.context_length).tolist())) > 1
                or len(set((rb // side_b.context_length).tolist())) > 1
            ):
                dropped["context_cut"] += 1
                continue
            lo, hi = int(du.spans[u, 0]), int(du.spans[u, 1])
            units.append((d, lo, hi))
            parts_a.append(ra)
            parts_b.append(rb)
            ptrs_a.append(ptrs_a[-1] + len(ra))
            ptrs_b.append(ptrs_b[-1] + len(rb))
            per_doc[d] += 1
            covered += int(cum_ns[hi] - cum_ns[lo])
    cat = lambda p: np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64)
    rows_a, rows_b = cat(parts_a), cat(parts_b)

    def tokens_in_grid(side):
        return int(sum(int((g >= 0).sum()) for g in side.grid))

    ta, tb = tokens_in_grid(side_a), tokens_in_grid(side_b)
    report = {
        "unit": unit,
        "pooling": pooling,
        "documents": len(documents),
        "units": len(units),
        "units_per_document": {
            "mean": float(per_doc.mean()) if len(per_doc) else 0.0,
            "min": int(per_doc.min()) if len(per_doc) else 0,
            "max": int(per_doc.max()) if len(per_doc) else 0,
        },
        "text_chars_non_space": int(nonspace_total),
        "covered_chars_non_space": int(covered),
        "fraction_text_covered": covered / nonspace_total if nonspace_total else 0.0,
        "dropped_units": dropped,
        "text_tokens_in_contexts": {"a": ta, "b": tb},
        "positions_used": {"a": int(np.unique(rows_a).size), "b": int(np.unique(rows_b).size)},
        "fraction_positions_used": {
            "a": np.unique(rows_a).size / ta if ta else 0.0,
            "b": np.unique(rows_b).size / tb if tb else 0.0,
        },
        "special_positions": "never aligned (no character span)",
    }
    meta = {
        "context_length": {"a": side_a.context_length, "b": side_b.context_length},
        "num_contexts": {"a": side_a.num_contexts, "b": side_b.num_contexts},
        "tokenizer_a": side_a.fingerprint,
        "tokenizer_b": side_b.fingerprint,
        "documents_sha256": documents_sha256(documents),
        "text": text_info,
    }
    return Alignment(
        unit=unit,
        pooling=pooling,
        units=np.asarray(units, np.int64).reshape(-1, 3),
        ptr_a=np.asarray(ptrs_a, np.int64),
        rows_a=rows_a,
        ptr_b=np.asarray(ptrs_b, np.int64),
        rows_b=rows_b,
        report=report,
        meta=meta,
    )


def default_unit(tokenizer_a: text_lib.Tokenizer, tokenizer_b: text_lib.Tokenizer) -> str:
    """``tokens`` when the two tokenizers are identical, else ``shared_boundaries``."""
    try:
        text_lib.check_same_tokenizer(tokenizer_a, tokenizer_b, max_texts=8)
        return "tokens"
    except text_lib.TokenizerMismatchError:
        return "shared_boundaries"


# --------------------------------------------------------------------------------------------
# Pooled rows
# --------------------------------------------------------------------------------------------


def pool(
    gather: Callable[[np.ndarray], np.ndarray],
    ptr: np.ndarray,
    rows: np.ndarray,
    pooling: str,
    lo: int = 0,
    hi: int | None = None,
) -> np.ndarray:
    """``[hi - lo, d]`` float32: each unit's rows (read by ``gather(grid_positions)``) pooled.

    ``last`` takes each unit's closing row; ``mean`` / ``max`` reduce over the unit's rows.
    """
    check_pooling(pooling)
    hi = len(ptr) - 1 if hi is None else hi
    p = ptr[lo : hi + 1]
    if pooling == "last":
        return np.asarray(gather(rows[p[1:] - 1]), np.float32)
    x = np.asarray(gather(rows[p[0] : p[-1]]), np.float32)
    starts = (p[:-1] - p[0]).astype(np.int64)
    if x.shape[0] == 0:
        return np.zeros((hi - lo, x.shape[1]), np.float32)
    if pooling == "mean":
        return np.add.reduceat(x, starts, axis=0) / np.diff(p)[:, None].astype(np.float32)
    return np.maximum.reduceat(x, starts, axis=0)


def grid_gather(acts: np.ndarray, mask: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``gather(grid_positions)`` over rows kept from a ``[contexts, length]`` grid by ``mask``.

    ``acts`` holds the masked rows in order (what the pipeline keeps after a forward pass).
    """
    flat = np.asarray(mask).reshape(-1)
    row_of = np.cumsum(flat) - 1

    def gather(grid_pos: np.ndarray) -> np.ndarray:
        if not flat[grid_pos].all():
            raise checks.InputError("alignment: a unit uses a masked (padding) position")
        return acts[row_of[grid_pos]]

    return gather


def cache_gather(cache: ActivationCache, hookpoint: str) -> Callable[[np.ndarray], np.ndarray]:
    """``gather(grid_positions)`` reading one hookpoint of an `ActivationCache` (memmaps)."""
    from models import activation_cache as ac

    hp = cache.check_hookpoints(hookpoint)[0]
    counts = np.asarray([int(s["contexts"]) for s in cache.shards], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    L = cache.context_length

    def gather(grid_pos: np.ndarray) -> np.ndarray:
        grid_pos = np.asarray(grid_pos, np.int64)
        ctx, pos = np.divmod(grid_pos, L)
        shard = np.searchsorted(offsets, ctx, side="right") - 1
        out = np.zeros((grid_pos.shape[0], cache.widths[hp]), np.float32)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            mm = cache.memmap(hp, int(s))
            raw = np.asarray(mm[ctx[sel] - offsets[s], pos[sel]])
            out[sel] = ac._to_out(raw, cache.dtype, "float32")
        return out

    return gather


class AlignedSource(src_lib.RowSource):
    """Rows are aligned units: ``(unit_ids [b] int32, pooled_a [b, d_a], pooled_b [b, d_b])``.

    The feature pass, correlation pairing, layer grid, ceiling and floor consume it exactly
    like a `ZipSource` of one tokenizer (the "token id" column holds the unit index).

    Args:
      alignment: an `Alignment` (its ``pooling`` is used).
      gather_a / gather_b: ``gather(grid_positions) -> [n, d]`` of each side (`grid_gather`,
        `cache_gather`).
      widths: ``(d_a, d_b)``.
    """

    def __init__(
        self,
        alignment: Alignment,
        gather_a,
        gather_b,
        widths: tuple[int, int],
        *,
        names: tuple[str, str] = ("a", "b"),
        block_rows: int = 8192,
        repeat: bool = False,
    ):
        if len(alignment) == 0:
            raise checks.InputError(
                "AlignedSource: the alignment holds no units (see its report for what was dropped)"
            )
        self.alignment = alignment
        self.gathers = (gather_a, gather_b)
        self.hookpoints = tuple(names)
        self.widths = tuple(int(w) for w in widths)
        self.block_rows = checks.check_positive_int("block_rows", block_rows)
        self.repeat = repeat

    @property
    def num_rows(self) -> int:
        return len(self.alignment)

    def read_rows_stored(self, lo: int, hi: int) -> src_lib.Rows:
        self._check_range(lo, hi)
        al = self.alignment
        xa = pool(self.gathers[0], al.ptr_a, al.rows_a, al.pooling, lo, hi)
        xb = pool(self.gathers[1], al.ptr_b, al.rows_b, al.pooling, lo, hi)
        return np.arange(lo, hi, dtype=np.int32), xa, xb

    def describe(self) -> dict:
        return {
            "kind": "aligned",
            "unit": self.alignment.unit,
            "pooling": self.alignment.pooling,
            "num_rows": self.num_rows,
            "report": self.alignment.report,
        }


def unit_text(
    documents: Sequence[str], units: np.ndarray, *, strip: bool = True
) -> Callable[[np.ndarray], list[str]]:
    """``text(unit_indices) -> [str]``: each unit's characters (the non-concept filter's and
    the feature tables' view of a unit when the tokenizers differ)."""

    def text_of(idx: np.ndarray) -> list[str]:
        out = []
        for u in np.asarray(idx).reshape(-1):
            d, lo, hi = (int(v) for v in units[int(u)])
            s = documents[d][lo:hi]
            out.append(s.strip() if strip else s)
        return out

    return text_of


def unit_context(
    documents: Sequence[str], units: np.ndarray, before: int = 40
) -> Callable[[int], str]:
    """``context(unit) -> str``: up to ``before`` characters of text, then the unit in [[ ]]."""

    def context(u: int) -> str:
        d, lo, hi = (int(v) for v in units[int(u)])
        doc = documents[d]
        return doc[max(0, lo - before) : lo] + "[[" + doc[lo:hi] + "]]"

    return context


def iter_units(alignment: Alignment) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """``(doc, start, end, rows_a, rows_b)`` per unit (tests, inspection)."""
    for u in range(len(alignment)):
        d, lo, hi = (int(v) for v in alignment.units[u])
        yield (
            d,
            lo,
            hi,
            alignment.rows_a[alignment.ptr_a[u] : alignment.ptr_a[u + 1]],
            alignment.rows_b[alignment.ptr_b[u] : alignment.ptr_b[u + 1]],
        )

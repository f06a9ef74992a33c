"""Models with different tokenizers in the universality pipeline: aligned units of text.

`prepare` decides the alignment unit (``--alignment``; default ``auto``: ``tokens`` when the
two tokenizers are identical, which keeps today's token-by-token pipeline, else
``shared_boundaries``), lays the text out in each model's own contexts, computes the
`models.alignment.Alignment` once and stores it under ``--alignment_dir`` (default
``WORKDIR/alignment/<unit>``; an existing one for the same documents and tokenizers is reused),
and returns an `AlignedView` that the LM preset uses at a few hook points:

* each model runs on its own contexts, and its SAEs are trained on its own tokens (as published
  SAEs are);
* the feature pass, correlation pairing, layer grid, ceiling and floor read aligned rows
  (`AlignedView.pool`: each unit's closing token, or mean / max over its tokens with
  ``--alignment_pooling``), so they run unchanged;
* top-activating "tokens" are the units' text spans: the non-concept filter judges the text
  (punctuation / whitespace spans) instead of token ids, and per-feature tables show contexts
  as text;
* `AlignedView.annotate_features` adds each feature's density and mean activation per own
  token next to the per-aligned-unit values of the feature pass.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from engine import accumulators, feature_stats, metrics_io, streaming
from experiments import common
from experiments.pipeline import results
from models import alignment as al
from models import text as text_lib

# Its flags (--alignment, --alignment_pooling, --alignment_dir) are defined in
# `experiments.pipeline.lm_preset`, which the entry point imports before parsing: this module
# starts JAX, so it is imported only when a run needs it.


def choose_unit(requested: str, tokenizer_a, tokenizer_b) -> str:
    """The unit to use; ``tokens`` with different tokenizers raises TokenizerMismatchError."""
    if requested == "auto":
        return al.default_unit(tokenizer_a, tokenizer_b)
    if requested == "tokens":
        text_lib.check_same_tokenizer(tokenizer_a, tokenizer_b)
    return requested


@dataclasses.dataclass
class AlignedView:
    """Everything the LM preset needs to run on aligned units (module docstring)."""

    alignment: al.Alignment
    documents: list
    contexts_a: text_lib.Contexts
    contexts_b: text_lib.Contexts

    def pool(self, side: str, acts: np.ndarray) -> np.ndarray:
        """``[units, d]``: side ``a`` / ``b`` activations (own masked rows, in order) pooled."""
        ctx = self.contexts_a if side == "a" else self.contexts_b
        gather = al.grid_gather(acts, ctx.mask)
        ptr, rows = (
            (self.alignment.ptr_a, self.alignment.rows_a)
            if side == "a"
            else (self.alignment.ptr_b, self.alignment.rows_b)
        )
        return al.pool(gather, ptr, rows, self.alignment.pooling)

    def token_text(self, rows: np.ndarray) -> list[str]:
        """Text of aligned units (stands for token strings: filters, tables)."""
        return al.unit_text(self.documents, self.alignment.units)(rows)

    def context_text(self, row: int) -> str:
        return al.unit_context(self.documents, self.alignment.units)(row)

    def annotate_features(
        self, path: str, sae_a, sae_b, acts_a: np.ndarray, acts_b: np.ndarray, mesh, chunk_size: int
    ) -> dict:
        """Adds per-own-token density / mean to a feature table; returns a summary.

        The table's ``density`` / ``mean`` come from the feature pass over aligned units; the
        new ``density_own_token`` / ``mean_own_token`` are over each model's own tokens.
        """
        own = {
            "a": own_token_stats(sae_a, acts_a, mesh, chunk_size),
            "b": own_token_stats(sae_b, acts_b, mesh, chunk_size),
        }
        summary = {}
        table = common.load_json(path) if os.path.exists(path) else None
        for side, st in own.items():
            if table is not None:
                for row in table[side]:
                    f = row["feature"]
                    row["density_per_unit"] = row["density"]
                    row["density_own_token"] = float(st.density[f])
                    row["mean_own_token"] = float(st.mean[f])
            summary[side] = {
                "mean_density_own_token": float(st.density.mean()),
                "dead_own_token": int(st.dead.sum()),
            }
        if table is not None:
            summary["a"]["mean_density_per_unit"] = float(
                np.mean([r["density"] for r in table["a"]])
            )
            summary["b"]["mean_density_per_unit"] = float(
                np.mean([r["density"] for r in table["b"]])
            )
            metrics_io.write_json(path, table)
        return summary


def own_token_stats(sae, acts: np.ndarray, mesh, chunk_size: int) -> feature_stats.FeatureStats:
    """Per-feature statistics of one SAE over its own model's token rows (streamed)."""
    acc = feature_stats.FeatureStatsAccumulator(int(sae.config.d_sae), 1)
    rows = np.arange(acts.shape[0], dtype=np.int32)
    stream = streaming.ChunkStream(
        (np.asarray(acts, np.float32), rows), chunk_size, name="own tokens"
    )
    state = accumulators.accumulate(
        acc, stream, mesh, params=sae, transform=lambda p, x, r: (p.encode(x), r)
    )
    return acc.finalize(state)


def _contexts(
    docs, tokenizer, ctx_len, max_contexts, special_tokens="auto", pad_tail=False
) -> text_lib.Contexts:
    return text_lib.make_contexts(
        docs,
        tokenizer,
        ctx_len,
        max_contexts=max_contexts,
        special_tokens=special_tokens,
        pad_tail=pad_tail,
    )


def _check_same(contexts: text_lib.Contexts, cache, flag: str) -> None:
    from engine import checks

    ids = cache.token_ids()
    if ids.shape != contexts.token_ids.shape or not np.array_equal(ids, contexts.token_ids):
        raise checks.InputError(
            f"{flag}={cache.path}: its token ids are not the contexts of "
            "--text under this model's tokenizer (harvest it from the same "
            "text, context length and special-token setting)"
        )


def prepare(run, settings, lm_a, lm_b, *, cache_paths=None) -> AlignedView | None:
    """The aligned view, or None when both tokenizers are identical and ``tokens`` is used.

    With ``cache_paths`` (two activation caches), each side's contexts are rebuilt from ``--text``
    with the cache's recorded context length, special-token mode and context count, and must
    equal the cache's token ids.
    """
    from experiments.pipeline import lm_preset

    unit = choose_unit(settings.alignment, lm_a.tokenizer, lm_b.tokenizer)
    if unit == "tokens":
        return None
    docs_all = lm_preset.read_text(settings)
    caches = None
    if cache_paths is not None:
        from models import activation_cache

        caches = [activation_cache.ActivationCache(p) for p in cache_paths]
    if caches is None:
        docs = list(docs_all)
        # Tails are padded (masked), not dropped: no text is lost at document ends.
        ca = _contexts(
            docs, lm_a.tokenizer, settings.context_length, settings.max_contexts, pad_tail=True
        )
        used = int(ca.doc_index.max()) + 1
        docs = docs[:used]
        if settings.max_contexts and len(ca) >= settings.max_contexts:
            # A's last document was cut by --max_contexts: cut its text where A stopped, so
            # that B reads exactly the same text (not a longer stretch it cannot align).
            prefix, suffix = text_lib.special_template(lm_a.tokenizer)
            last = used - 1
            n_tok = int(
                sum(
                    int(ca.mask[c].sum()) - len(prefix) - len(suffix)
                    for c in np.flatnonzero(ca.doc_index == last)
                )
            )
            spans = al.token_spans(lm_a.tokenizer, docs[last])
            docs[last] = docs[last][: int(spans.ends[n_tok - 1])]
            ca = _contexts(docs, lm_a.tokenizer, settings.context_length, None, pad_tail=True)
        # B reads the same documents (its contexts may be more or fewer than A's).
        cb = _contexts(docs, lm_b.tokenizer, settings.context_length, None, pad_tail=True)
    else:
        docs = list(docs_all)
        ctxs = []
        for cache, lm_, flag in zip(caches, (lm_a, lm_b), ("--cache_a", "--cache_b")):
            info = cache.metadata.get("text") or {}
            c = _contexts(
                docs,
                lm_.tokenizer,
                cache.context_length,
                cache.num_contexts,
                info.get("special_tokens", "auto"),
                bool(info.get("pad_tail", False)),
            )
            _check_same(c, cache, flag)
            ctxs.append(c)
        ca, cb = ctxs
        used = int(max(ca.doc_index.max(), cb.doc_index.max())) + 1
        docs = docs[:used]
    directory = settings.alignment_dir or run.path("alignment", unit)
    align = None
    if os.path.exists(os.path.join(directory, "alignment.json")):
        old = al.Alignment.load(directory)
        same = (
            old.unit == unit
            and old.meta.get("documents_sha256") == al.documents_sha256(docs)
            and old.meta.get("num_contexts") == {"a": len(ca), "b": len(cb)}
            and old.meta.get("tokenizer_a", {}).get("vocab_sha256")
            == text_lib.tokenizer_fingerprint(lm_a.tokenizer)["vocab_sha256"]
        )
        if same:
            align = old.with_pooling(settings.alignment_pooling)
            logging.info("reusing the alignment in %s", directory)
    if align is None:
        cache_info = None if caches is None else [c.path for c in caches]
        side_a = al.corpus_tokens(docs, lm_a.tokenizer, ca)
        side_b = al.corpus_tokens(docs, lm_b.tokenizer, cb)
        align = al.align_corpus(
            docs,
            side_a,
            side_b,
            unit=unit,
            pooling=settings.alignment_pooling,
            text_info={"text": settings.text, "caches": cache_info},
        )
        align.save(directory)
    rep = align.report
    print(
        f"alignment {unit} ({align.pooling}): {rep['units']} units, "
        f"{rep['fraction_text_covered']:.1%} of the text covered, positions used "
        f"A {rep['fraction_positions_used']['a']:.1%} / B "
        f"{rep['fraction_positions_used']['b']:.1%}, dropped {rep['dropped_units']} "
        f"({directory})"
    )
    return AlignedView(alignment=align, documents=docs, contexts_a=ca, contexts_b=cb)


def poolers(view: AlignedView | None):
    """``(pool_a, pool_b)``: own-token rows -> rows of the comparison (identity for tokens)."""
    if view is None:
        return (lambda x: x), (lambda x: x)
    return (lambda x: view.pool("a", x)), (lambda x: view.pool("b", x))


def after_comparison(
    view: AlignedView | None,
    comp: results.ComparisonResult,
    run,
    sae_a,
    sae_b,
    acts_a: np.ndarray,
    acts_b: np.ndarray,
    settings,
) -> results.ComparisonResult:
    """``comp`` with the per-own-token statistics next to the per-unit ones (also written
    into its feature table); ``comp`` itself when rows are tokens."""
    if view is None:
        return comp
    path = os.path.join(run.path("features"), f"{comp.name}.json")
    return dataclasses.replace(
        comp,
        feature_density=view.annotate_features(
            path, sae_a, sae_b, acts_a, acts_b, run.mesh, settings.chunk_size
        ),
        rows_are=f"aligned units ({view.alignment.unit}, {view.alignment.pooling})",
    )


def describe(view: AlignedView | None) -> dict:
    """The alignment part of results.json."""
    if view is None:
        return {"unit": "tokens", "note": "identical tokenizers: rows are the same tokens"}
    return {
        "unit": view.alignment.unit,
        "pooling": view.alignment.pooling,
        "report": view.alignment.report,
        "contexts": {"a": len(view.contexts_a), "b": len(view.contexts_b)},
    }

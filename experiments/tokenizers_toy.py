"""Known truth across tokenizers: do aligned units recover features shared at the word level?

Two sides share ground-truth features defined on words (`models.word_toy`: every word type has
a sparse code over a shared dictionary; each side sees it through its own random orthogonal
map, at its own tokens, scaled by how much of the word it has read, plus noise) but tokenise
the text differently (``--tokenizer_a`` / ``--tokenizer_b``: byte-level BPE, WordPiece,
Unigram, trained offline on the shipped sample). SAEs are trained on each side's own tokens;
the comparisons run the universality pipeline's steps (`experiments.pipeline.compare`) on:

* ``same_tokenizer``: side B generated under A's tokenizer, rows = identical tokens (the
  upper reference: what alignment cannot lose);
* ``cross.<unit>.<pooling>``: side B under its own tokenizer, rows = aligned units (each of
  ``--units``);
* ``control``: a side B that shares nothing (its own codes and dictionary), aligned with the
  first unit;
* ``floor``: a random-init side B (a random embedding of each of its token ids), aligned with
  the first unit;
* ``ceiling``: side A against itself with another SAE seed and data order.

Reported per comparison: pairs kept, the fraction of true features recovered (pairs joining
the SAE features of the same true feature, `compare.truth_scores`), metric scores against
their random-pairing nulls, and, per unit, the alignment report (text covered, positions used)
and the loss relative to ``same_tokenizer``. Plots: ``plots/units.png`` (recovery and metric
excess per comparison), ``plots/null_*.png``, ``plots/matched_correlations.png``.

Command (about 10 minutes on 2 shared CPU cores)::

    python -m experiments.tokenizers_toy --workdir=runs/tokenizers_toy \\
        --tokenizer_a=bpe --tokenizer_b=wordpiece

Rerunning with the same workdir reuses trained SAEs and finished steps.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import common
from experiments.configs import tokenizers_toy as CONFIG  # noqa: N812  (the config module)


def _plot(comps: list, path: str, settings) -> None:
    from experiments.pipeline import report

    plt = report._plt()
    names = [c.name for c in comps]
    rec = [np.nan if c.truth is None else c.truth.fraction_true_pairs_recovered for c in comps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(range(len(names)), rec, color="tab:blue")
    axes[0].set_ylabel("fraction of true features recovered")
    axes[0].set_ylim(0, 1.05)
    metrics = sorted({m for c in comps for m in c.metrics})
    width = 0.8 / max(1, len(metrics))
    for i, m in enumerate(metrics):
        vals = [c.metrics[m].excess if m in c.metrics else np.nan for c in comps]
        sig = [m in c.metrics and c.metrics[m].p < 0.01 for c in comps]
        xs = np.arange(len(names)) + (i - (len(metrics) - 1) / 2) * width
        bars = axes[1].bar(xs, vals, width, label=m)
        for b, s in zip(bars, sig):
            if s:
                axes[1].text(b.get_x() + b.get_width() / 2, b.get_height(), "*", ha="center")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_ylabel("excess over random-pairing null")
    axes[1].set_title("* p < 0.01", fontsize=9)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    fig.suptitle(f"word-level known truth, {settings.tokenizer_a} vs {settings.tokenizer_b}")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def run(run_, settings) -> dict:
    from engine import streaming
    from experiments.pipeline import aligned, compare, filters, report
    from experiments.pipeline import results as results_lib
    from experiments.pipeline import saes as saes_lib
    from experiments.pipeline.stepcache import StepCache
    from models import alignment as al
    from models import sae_train, text, tiny_tokenizers, word_toy

    if settings.tokenizer_a == settings.tokenizer_b:
        raise compare.PipelineError(
            "--tokenizer_a and --tokenizer_b must differ (the "
            "same-tokenizer case is the built-in reference)"
        )
    specs = []
    for u in settings.units:
        unit, _, pooling = u.partition(":")
        if unit not in ("shared_boundaries", "words") or pooling not in al.POOLINGS:
            raise compare.PipelineError(
                f"--units: {u!r}; expected shared_boundaries|words :last|mean|max"
            )
        specs.append((unit, pooling))
    docs = text.sample_documents(settings.max_documents)
    toks = {
        s: tiny_tokenizers.build_tokenizer(k, settings.vocab_size)
        for s, k in (("a", settings.tokenizer_a), ("b", settings.tokenizer_b))
    }
    ctx = {
        s: text.make_contexts(docs, t, settings.context_length, pad_tail=True)
        for s, t in toks.items()
    }
    corpus = {s: al.corpus_tokens(docs, toks[s], ctx[s]) for s in "ab"}

    seed = settings.seed
    codes = word_toy.word_codes(docs, settings.n_features, settings.k_word, seed)
    codes_ctrl = word_toy.word_codes(docs, settings.n_features, settings.k_word, seed + 100)
    dictionary = word_toy.unit_rows(settings.n_features, settings.d, [seed, 1])
    feats_a = dictionary @ word_toy.orthogonal(settings.d, [seed, 2])
    feats_b = dictionary @ word_toy.orthogonal(settings.d, [seed, 3])
    feats_ctrl = word_toy.unit_rows(settings.n_features, settings.d, [seed, 4])
    gen = lambda side, c, f, s: word_toy.side_activations(
        docs,
        corpus[side],
        ctx[side],
        c,
        f,
        noise=settings.noise,
        seed=[seed, s],
        causal=settings.causal,
        jitter_seed=None if settings.jitter <= 0 else [seed, 20 + (c is codes_ctrl)],
        jitter_spread=settings.jitter,
    )
    acts = {
        "a": gen("a", codes, feats_a, 10),
        "b_same": gen("a", codes, feats_b, 11),
        "b": gen("b", codes, feats_b, 11),
        "control": gen("b", codes_ctrl, feats_ctrl, 12),
    }
    scale = float(np.median(np.linalg.norm(acts["b"], axis=1)))
    acts["floor"] = word_toy.random_token_embeddings(
        ctx["b"],
        len(toks["b"].get_vocab()),
        settings.d,
        scale=scale,
        noise=settings.noise,
        seed=[seed, 13],
    )

    def train(name, x, s):
        cfg = sae_train.TrainConfig(
            d_sae=settings.n_features, activation="topk", k=settings.sae_k, lr=3e-3, seed=s
        )
        return saes_lib.train_or_load(
            x,
            cfg,
            steps=settings.sae_steps,
            batch_size=settings.sae_batch_size,
            data_seed=s,
            directory=run_.path("saes", name),
            mesh=run_.mesh,
            progress=settings.progress,
            metadata={"side": name},
        )

    saes = {"a": train("a", acts["a"], seed), "a_ceiling": train("a_ceiling", acts["a"], seed + 1)}
    for name in ("b_same", "b", "control", "floor"):
        saes[name] = train(name, acts[name], seed)

    cfg = compare.CompareConfig(
        filters=filters.FilterConfig(threshold=settings.threshold),
        metrics=tuple(settings.metrics),
        num_permutations=settings.num_permutations,
        seed=seed,
    )
    cache = StepCache(run_.path("steps"))
    ident = np.arange(settings.n_features)
    truth = lambda fb: {
        "features_a": feats_a,
        "features_b": fb,
        "true_match": ident,
        "recoverable": np.ones(settings.n_features, bool),
        "min_cos": 0.9,
    }

    def stream(xa, xb):
        rows = np.arange(xa.shape[0], dtype=np.int32)
        return lambda: streaming.ChunkStream((rows, xa, xb), settings.chunk_size, name="rows")

    def one(name, kind, xa, xb, sae_b, text_fn, context_fn, tr, extra=None):
        comp = compare.run_comparison(
            name,
            stream(xa, xb),
            saes["a"],
            sae_b,
            text_fn,
            run_.mesh,
            cfg,
            cache,
            ckpt_root=run_.path("checkpoints"),
            truth=tr,
            progress=settings.progress,
            labels=results_lib.Labels(kind=kind, label=name, **(extra or {})),
            context_text=context_fn,
            features_dir=run_.path("features"),
        )
        return comp

    # identical tokens: the alignment is the identity over A's text tokens
    same = al.align_corpus(docs, corpus["a"], corpus["a"], unit="tokens")
    same_view = aligned.AlignedView(same, docs, ctx["a"], ctx["a"])
    comps = [
        one(
            "same_tokenizer",
            "same_tokenizer",
            same_view.pool("a", acts["a"]),
            same_view.pool("b", acts["b_same"]),
            saes["b_same"],
            same_view.token_text,
            same_view.context_text,
            truth(feats_b),
            {"alignment": same.report},
        )
    ]
    views = {}
    for unit, pooling in specs:
        path = run_.path("alignment", f"{unit}.{pooling}")  # stored once, reused
        if os.path.exists(os.path.join(path, "alignment.json")):
            align = al.Alignment.load(path)
        else:
            align = al.align_corpus(
                docs,
                corpus["a"],
                corpus["b"],
                unit=unit,
                pooling=pooling,
                text_info={"sample_documents": len(docs)},
            )
            align.save(path)
        view = aligned.AlignedView(align, docs, ctx["a"], ctx["b"])
        views[(unit, pooling)] = view
        comps.append(
            one(
                f"cross.{unit}.{pooling}",
                "cross",
                view.pool("a", acts["a"]),
                view.pool("b", acts["b"]),
                saes["b"],
                view.token_text,
                view.context_text,
                truth(feats_b),
                {"alignment": align.report},
            )
        )
        # density / mean per own token next to the per-unit values of the feature pass
        comps[-1] = dataclasses.replace(
            comps[-1],
            feature_density=view.annotate_features(
                os.path.join(run_.path("features"), f"{comps[-1].name}.json"),
                saes["a"],
                saes["b"],
                acts["a"],
                acts["b"],
                run_.mesh,
                settings.chunk_size,
            ),
        )
    view = views[specs[0]]
    xa = view.pool("a", acts["a"])
    comps.append(
        one(
            "control",
            "control",
            xa,
            view.pool("b", acts["control"]),
            saes["control"],
            view.token_text,
            view.context_text,
            truth(feats_ctrl),
        )
    )
    comps.append(
        one(
            "floor",
            "floor",
            xa,
            view.pool("b", acts["floor"]),
            saes["floor"],
            view.token_text,
            view.context_text,
            None,
        )
    )
    comps.append(
        one(
            "ceiling",
            "ceiling",
            same_view.pool("a", acts["a"]),
            same_view.pool("a", acts["a"]),
            saes["a_ceiling"],
            same_view.token_text,
            same_view.context_text,
            truth(feats_a),
        )
    )

    base = comps[0]
    losses = {}
    for c in comps[1 : 1 + len(specs)]:
        entry = {
            "recovered": c.truth.fraction_true_pairs_recovered,
            "recovered_same_tokenizer": base.truth.fraction_true_pairs_recovered,
            "rows": c.tokens,
            "rows_same_tokenizer": base.tokens,
            "fraction_text_covered": c.labels.alignment["fraction_text_covered"],
            "fraction_positions_used": c.labels.alignment["fraction_positions_used"],
        }
        for m, r in c.metrics.items():
            if m in base.metrics:
                entry[f"{m}_excess"] = r.excess
                entry[f"{m}_excess_same_tokenizer"] = base.metrics[m].excess
        losses[c.name] = entry
    results = {
        "experiment": "tokenizers_toy",
        "tokenizers": {
            "a": settings.tokenizer_a,
            "b": settings.tokenizer_b,
            "vocab_size": settings.vocab_size,
        },
        "data": {
            "documents": len(docs),
            "word_types": len(codes.types),
            "tokens": {s: int(ctx[s].mask.sum()) for s in "ab"},
            "contexts": {s: len(ctx[s]) for s in "ab"},
            "n_features": settings.n_features,
            "d": settings.d,
            "k_word": settings.k_word,
            "noise": settings.noise,
            "causal": settings.causal,
        },
        "comparisons": [c.to_json() for c in comps],
        "loss_vs_same_tokenizer": losses,
        "summary": [report.verdict(c) for c in comps],
    }
    for c in comps:
        if c.metrics:
            report.plot_nulls(c.name, c.metrics, os.path.join(run_.plots_dir, f"null_{c.name}.png"))
    report.plot_matched_correlations(
        comps, os.path.join(run_.plots_dir, "matched_correlations.png")
    )
    _plot(comps, os.path.join(run_.plots_dir, "units.png"), settings)
    run_.write_results(results)
    print(report.summary_table(comps))
    print(
        f"{'comparison':<28} {'rows':>7} {'pairs':>5} {'recovered':>9}  "
        + "  ".join(f"{m:>12}" for m in settings.metrics)
    )
    for c in comps:
        rec = None if c.truth is None else c.truth.fraction_true_pairs_recovered
        cells = []
        for m in settings.metrics:
            r = c.metrics[m] if m in c.metrics else None
            cells.append(f"{r.excess:+.3f} p{r.p:.3f}" if r else f"{'-':>12}")
        print(
            f"{c.name:<28} {c.tokens:>7} {c.n_pairs:>5} "
            f"{'' if rec is None else f'{rec:.2f}':>9}  " + "  ".join(cells)
        )
    print(f"results: {run_.path('results.json')}\nplots:   {run_.plots_dir}")
    return results


def body(run_, settings) -> None:
    """The experiment behind `common.entry` (settings checked, workdir fingerprinted)."""
    run(run_, settings)


def _errors():
    from experiments.pipeline import runner

    return runner.USER_ERRORS


if __name__ == "__main__":
    common.entry("tokenizers_toy", body, CONFIG, errors=_errors)

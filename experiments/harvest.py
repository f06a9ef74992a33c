"""Harvest a language model's activations at chosen hookpoints into an on-disk cache.

Runs a transformers model (local directory, hub name when reachable, or a tiny random model
built on the spot) over text cut into fixed-length contexts inside documents, and streams the
activations of every requested hookpoint to ``--cache_dir`` (default ``WORKDIR/cache``) in
shards, with a tqdm bar in tokens (its rate is tokens/s). Killed runs resume: rerun the same
command. Read the cache back with ``models.activation_cache.ActivationCache``.

Several processes (each runs the model on its own shards of the text, process 0 writes the
metadata, metrics, results and plots; see models/activation_cache.py)::

    launch/cpu_multiprocess.sh 2 1 experiments.harvest --workdir=/tmp/harvest_mp \
        --model=tiny:gpt_neox --hookpoints=resid_post.0 --shard_contexts=16

Demo (no downloads; a tiny random GPT-NeoX and the shipped KJV sample)::

    python -m experiments.harvest --workdir=/tmp/harvest_demo --model=tiny:gpt_neox \
        --hookpoints=resid_post.0,resid_post.1 --context_length=64

Real model::

    python -m experiments.harvest --workdir=runs/pythia70m_l3 --model=/models/pythia-70m \
        --hookpoints=resid_post.3 --text=/data/pile_sample.jsonl --max_tokens=10000000 \
        --dtype=float16 --batch_size=32

Writes ``config.json``, ``metrics.jsonl`` (tokens, seconds, tokens/s), ``results.json``
(cache path and metadata summary), ``token_spans.npy`` beside the cache (document and character
span of every position, for aligning models with different tokenizers; ``--norecord_spans``
skips it) and ``plots/norm_by_position.png`` (mean activation norm per
context position and hookpoint: BOS / attention-sink outliers show up at position 0).
"""

from __future__ import annotations

import math
import os
import time

from absl import logging

from experiments import common
from experiments.configs import harvest as CONFIG  # noqa: N812  (the config module)


def _model_path(run, settings) -> str:
    if not settings.model.startswith("tiny:"):
        return settings.model
    from engine import mesh as mesh_lib
    from models import lm, lm_tiny

    arch = settings.model.split(":", 1)[1]
    path = run.path("tiny_model")
    # Several processes: process 0 builds and saves the model, the others load its copy.
    if mesh_lib.is_primary() and not os.path.exists(os.path.join(path, "config.json")):
        from models import text

        tok = text.build_word_tokenizer(
            vocab_size=2000, special_tokens="cls_sep" if arch == "bert" else "bos"
        )
        model = lm_tiny.build_tiny_model(
            arch,
            tok,
            settings.seed,
            d_model=64,
            n_layers=2,
            max_len=max(128, settings.context_length),
        )
        with lm.quiet_transformers():
            model.save_pretrained(path)
        tok.save_pretrained(path)
    mesh_lib.barrier(f"tiny model {path}")
    return path


def _plot_norms(cache, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    n_ctx = min(cache.num_contexts, 256)
    mask = cache.mask()[:n_ctx]
    for hp in cache.hookpoints:
        acts = np.asarray(cache.memmap(hp, 0)[:n_ctx])
        if cache.dtype == "bfloat16":
            acts = (acts.astype(np.uint32) << 16).view(np.float32)
        norms = np.linalg.norm(acts.astype(np.float32), axis=-1)
        m = mask[: norms.shape[0]]
        mean = (norms * m).sum(0) / np.maximum(m.sum(0), 1)
        ax.plot(np.arange(mean.shape[0]), mean, label=hp)
    ax.set_xlabel("position in context")
    ax.set_ylabel("mean L2 norm")
    ax.set_yscale("log")
    ax.set_title(f"{os.path.basename(str(cache.model.get('name')))}: activation norm by position")
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def _is_local(name: str) -> bool:
    return CONFIG.is_local(name)


def _data(settings) -> dict:
    out = {
        f"text.{i}": t
        for i, t in enumerate(settings.text)
        if t != "sample" and not t.startswith("hf:")
    }
    if _is_local(settings.model):
        out["model"] = settings.model
    if settings.tokenizer and os.path.isdir(settings.tokenizer):
        out["tokenizer"] = settings.tokenizer
    return out


def body(run, settings):
    from engine import metrics_io
    from models import activation_cache, lm, text

    model_path = _model_path(run, settings)
    model = lm.LanguageModel.load(
        model_path,
        revision=settings.revision,
        dtype=settings.model_dtype,
        device=settings.device,
        tokenizer=settings.tokenizer,
    )
    if model.tokenizer is None:
        raise common.ConfigError(f"--model {model_path} has no tokenizer; pass --tokenizer")
    ctx_len = settings.context_length
    max_contexts = math.ceil(settings.max_tokens / ctx_len) if settings.max_tokens else None
    sources = list(settings.text)
    weights = [float(w) for w in settings.text_weights] or None

    def open_at(start: int):
        docs = text.read_mixture(
            sources, weights, text_field=settings.text_field, txt_split=settings.txt_split
        )
        blocks = text.iter_contexts(
            docs,
            model.tokenizer,
            ctx_len,
            special_tokens=settings.special_tokens,
            pad_tail=settings.pad_tail,
            pack=settings.pack,
            max_contexts=max_contexts,
        )
        return text.skip_contexts(blocks, start)

    cache_dir = settings.cache_dir or run.path("cache")
    text_info = {
        "sources": text.describe_source(sources),
        "text_field": settings.text_field,
        "txt_split": settings.txt_split,
        "special_tokens": settings.special_tokens,
        "pad_tail": settings.pad_tail,
        "pack": settings.pack,
        "weights": weights,
    }
    writer = metrics_io.MetricWriter(run.metrics_path)
    t0 = time.perf_counter()
    state = {"last": t0, "start_tokens": None}

    def on_batch(contexts_done: int, tokens_done: int) -> None:
        now = time.perf_counter()
        if state["start_tokens"] is None:
            state["start_tokens"] = tokens_done
        if now - state["last"] >= 5.0:  # one line every few seconds, step = contexts done
            state["last"] = now
            writer.write(
                contexts_done,
                {
                    "tokens": tokens_done,
                    "tokens_per_s": (tokens_done - state["start_tokens"]) / (now - t0),
                },
            )

    cache = activation_cache.harvest(
        model,
        open_at,
        settings.hookpoints,
        cache_dir,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        shard_contexts=settings.shard_contexts or None,
        max_contexts=max_contexts,
        num_contexts=max_contexts,
        text_info=text_info,
        progress=settings.progress,
        on_batch=on_batch,
    )
    from engine import mesh as mesh_lib

    primary = mesh_lib.is_primary()  # several processes: process 0 alone writes files
    if settings.record_spans and primary:
        from models import alignment

        docs = list(
            text.read_documents(
                sources, text_field=settings.text_field, txt_split=settings.txt_split
            )
        )
        ctxs = text.make_contexts(
            docs,
            model.tokenizer,
            ctx_len,
            special_tokens=settings.special_tokens,
            pad_tail=settings.pad_tail,
            max_contexts=cache.num_contexts,
        )
        used = docs[: int(ctxs.doc_index.max()) + 1]
        alignment.save_token_spans(
            cache_dir,
            alignment.corpus_tokens(
                used, model.tokenizer, ctxs, special_tokens=settings.special_tokens
            ),
            used,
        )
    seconds = time.perf_counter() - t0
    tokens = cache.num_tokens
    new_tokens = tokens - (state["start_tokens"] or tokens)
    writer.write(
        cache.num_contexts,
        {
            "tokens": tokens,
            "seconds_this_run": seconds,
            "tokens_per_s": new_tokens / max(seconds, 1e-9),
        },
    )
    logging.info("%s: %d tokens (%d this run) in %.1f s", cache, tokens, new_tokens, seconds)
    if primary:
        _plot_norms(cache, os.path.join(run.plots_dir, "norm_by_position.png"))
    run.write_results(
        {
            "cache_dir": os.path.abspath(cache_dir),
            "model": cache.model,
            "hookpoints": list(cache.hookpoints),
            "tokens": tokens,
            "contexts": cache.num_contexts,
            "context_length": cache.context_length,
            "dtype": cache.dtype,
            "seconds_this_run": seconds,
            "shards": len(cache.shards),
        }
    )


if __name__ == "__main__":
    common.entry("harvest", body, CONFIG, data=_data)

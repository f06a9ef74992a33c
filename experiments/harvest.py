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

from absl import flags, logging

from experiments import common

FLAGS = flags.FLAGS
common.define_common_flags()
flags.adopt_module_key_flags(common)   # --help lists the common flags too
flags.DEFINE_string("model", "tiny:gpt_neox",
                    "Local model directory, hub name, or tiny:ARCH (a tiny random model of "
                    "gpt_neox | gpt2 | llama | bert | gemma2 built in WORKDIR/tiny_model).")
flags.DEFINE_string("revision", None, "Hub revision of --model.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory/name (default: the model's).")
flags.DEFINE_list("hookpoints", ["resid_post.0"],
                  "Hookpoints: resid_pre.L | resid_post.L | attn_out.L | mlp_out.L (also "
                  "SAELens blocks.L.hook_resid_post or sparsify layers.L; negative L from end).")
flags.DEFINE_list("text", ["sample"], "Text: .txt/.jsonl files or folders, 'sample' (shipped "
                  "KJV sample), or hf:NAME[:CONFIG][@SPLIT] when `datasets` is installed.")
flags.DEFINE_string("text_field", "text", "JSON field of the text (.jsonl, datasets).")
flags.DEFINE_enum("txt_split", "file", ["file", "paragraph", "line"],
                  "How a .txt file splits into documents.")
flags.DEFINE_integer("context_length", 128, "Tokens per context (special tokens included).")
flags.DEFINE_enum("special_tokens", "auto", ["auto", "bos", "none"],
                  "Special tokens per context: the tokenizer's own, BOS only, or none.")
flags.DEFINE_bool("pad_tail", False, "Keep each document's short last piece (padded, masked).")
flags.DEFINE_bool("pack", False, "Pack documents (and last pieces) shorter than a context "
                  "together, EOS-separated, instead of dropping them.")
flags.DEFINE_list("text_weights", [], "With several --text corpora: interleave them in this "
                  "ratio (by documents), e.g. 0.7,0.3.")
flags.DEFINE_integer("max_tokens", 0, "Stop after about this many tokens (0: all the text).")
flags.DEFINE_integer("batch_size", 8, "Contexts per forward pass.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Storage dtype.")
flags.DEFINE_enum("model_dtype", "float32", ["float32", "float16", "bfloat16"],
                  "Compute dtype of the model.")
flags.DEFINE_string("device", None, "torch device (default: cuda if available, else cpu).")
flags.DEFINE_integer("shard_contexts", 0, "Contexts per shard (0: about 128 MiB per "
                     "hookpoint and shard).")
flags.DEFINE_string("cache_dir", None, "Cache directory (default WORKDIR/cache).")
flags.DEFINE_integer("seed", 0, "Seed of the tiny model (tiny:ARCH only).")
flags.DEFINE_bool("record_spans", True, "Also write token_spans.npy beside the cache: the "
                  "document and character span of every position (models/alignment.py), "
                  "needed to pair caches of models with different tokenizers. Holds the "
                  "documents in memory while it runs; turn off for corpora larger than RAM.")


def _model_path(run) -> str:
    if not FLAGS.model.startswith("tiny:"):
        return FLAGS.model
    from engine import mesh as mesh_lib
    from models import lm, lm_tiny
    arch = FLAGS.model.split(":", 1)[1]
    path = run.path("tiny_model")
    # Several processes: process 0 builds and saves the model, the others load its copy.
    if mesh_lib.is_primary() and not os.path.exists(os.path.join(path, "config.json")):
        from models import text
        tok = text.build_word_tokenizer(vocab_size=2000,
                                        special_tokens="cls_sep" if arch == "bert" else "bos")
        model = lm_tiny.build_tiny_model(arch, tok, FLAGS.seed, d_model=64, n_layers=2,
                                         max_len=max(128, FLAGS.context_length))
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
        m = mask[:norms.shape[0]]
        mean = (norms * m).sum(0) / np.maximum(m.sum(0), 1)
        ax.plot(np.arange(mean.shape[0]), mean, label=hp)
    ax.set_xlabel("position in context")
    ax.set_ylabel("mean L2 norm")
    ax.set_yscale("log")
    ax.set_title(f"{os.path.basename(str(cache.model.get('name')))}: activation norm by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isdir(name)


RULES = (
    common.Hookpoints(("hookpoints",)),
    common.Check(("hookpoints",), lambda v: bool(v["hookpoints"]),
                 "--hookpoints: expected at least one hookpoint"),
    common.Num(("context_length",), lo=2, integer=True),
    common.Num(("batch_size",), lo=1, integer=True),
    common.Num(("max_tokens", "shard_contexts", "seed"), lo=0, integer=True),
    common.Check(("model",), lambda v: not v["model"].startswith("tiny:") or
                 v["model"].split(":", 1)[1] in ("gpt_neox", "gpt2", "llama", "bert", "gemma2"),
                 "--model={model}: tiny:ARCH takes ARCH in gpt_neox, gpt2, llama, bert, gemma2"),
    common.Check(("model",), lambda v: v["model"].startswith("tiny:") or
                 not _is_local(v["model"]) or os.path.isdir(os.path.expanduser(v["model"])),
                 "--model={model}: no such local model directory"),
    common.Check(("text",), lambda v: bool(v["text"]), "--text: expected at least one source"),
    common.Path(("text",), kind="any", special=("sample",), prefixes=("hf:",)),
    common.Check(("cache_dir",), lambda v: not v["cache_dir"] or not os.path.isfile(
        v["cache_dir"]), "--cache_dir={cache_dir}: is a file, expected a directory"),
)


def _data(flags_) -> dict:
    out = {f"text.{i}": t for i, t in enumerate(flags_.text)
           if t != "sample" and not t.startswith("hf:")}
    if _is_local(flags_.model):
        out["model"] = flags_.model
    if flags_.tokenizer and os.path.isdir(flags_.tokenizer):
        out["tokenizer"] = flags_.tokenizer
    return out


def body(run, flags_):
    del flags_
    from engine import metrics_io
    from models import activation_cache, lm, text

    model_path = _model_path(run)
    model = lm.LanguageModel.load(model_path, revision=FLAGS.revision, dtype=FLAGS.model_dtype,
                                  device=FLAGS.device, tokenizer=FLAGS.tokenizer)
    if model.tokenizer is None:
        raise common.ConfigError(f"--model {model_path} has no tokenizer; pass --tokenizer")
    ctx_len = FLAGS.context_length
    max_contexts = math.ceil(FLAGS.max_tokens / ctx_len) if FLAGS.max_tokens else None
    sources = list(FLAGS.text)
    weights = [float(w) for w in FLAGS.text_weights] or None

    def open_at(start: int):
        docs = text.read_mixture(sources, weights, text_field=FLAGS.text_field,
                                 txt_split=FLAGS.txt_split)
        blocks = text.iter_contexts(docs, model.tokenizer, ctx_len,
                                    special_tokens=FLAGS.special_tokens,
                                    pad_tail=FLAGS.pad_tail, pack=FLAGS.pack,
                                    max_contexts=max_contexts)
        return text.skip_contexts(blocks, start)

    cache_dir = FLAGS.cache_dir or run.path("cache")
    text_info = {"sources": text.describe_source(sources), "text_field": FLAGS.text_field,
                 "txt_split": FLAGS.txt_split, "special_tokens": FLAGS.special_tokens,
                 "pad_tail": FLAGS.pad_tail, "pack": FLAGS.pack, "weights": weights}
    writer = metrics_io.MetricWriter(run.metrics_path)
    t0 = time.perf_counter()
    state = {"last": t0, "start_tokens": None}

    def on_batch(contexts_done: int, tokens_done: int) -> None:
        now = time.perf_counter()
        if state["start_tokens"] is None:
            state["start_tokens"] = tokens_done
        if now - state["last"] >= 5.0:  # one line every few seconds, step = contexts done
            state["last"] = now
            writer.write(contexts_done, {"tokens": tokens_done, "tokens_per_s":
                                         (tokens_done - state["start_tokens"]) / (now - t0)})

    cache = activation_cache.harvest(
        model, open_at, FLAGS.hookpoints, cache_dir, dtype=FLAGS.dtype,
        batch_size=FLAGS.batch_size, shard_contexts=FLAGS.shard_contexts or None,
        max_contexts=max_contexts, num_contexts=max_contexts, text_info=text_info,
        progress=FLAGS.progress, on_batch=on_batch)
    from engine import mesh as mesh_lib
    primary = mesh_lib.is_primary()    # several processes: process 0 alone writes files
    if FLAGS.record_spans and primary:
        from models import alignment
        docs = list(text.read_documents(sources, text_field=FLAGS.text_field,
                                        txt_split=FLAGS.txt_split))
        ctxs = text.make_contexts(docs, model.tokenizer, ctx_len,
                                  special_tokens=FLAGS.special_tokens, pad_tail=FLAGS.pad_tail,
                                  max_contexts=cache.num_contexts)
        used = docs[:int(ctxs.doc_index.max()) + 1]
        alignment.save_token_spans(cache_dir, alignment.corpus_tokens(
            used, model.tokenizer, ctxs, special_tokens=FLAGS.special_tokens), used)
    seconds = time.perf_counter() - t0
    tokens = cache.num_tokens
    new_tokens = tokens - (state["start_tokens"] or tokens)
    writer.write(cache.num_contexts, {"tokens": tokens, "seconds_this_run": seconds,
                                      "tokens_per_s": new_tokens / max(seconds, 1e-9)})
    logging.info("%s: %d tokens (%d this run) in %.1f s", cache, tokens, new_tokens, seconds)
    if primary:
        _plot_norms(cache, os.path.join(run.plots_dir, "norm_by_position.png"))
    run.write_results({"cache_dir": os.path.abspath(cache_dir), "model": cache.model,
                       "hookpoints": list(cache.hookpoints), "tokens": tokens,
                       "contexts": cache.num_contexts, "context_length": cache.context_length,
                       "dtype": cache.dtype, "seconds_this_run": seconds,
                       "shards": len(cache.shards)})


if __name__ == "__main__":
    common.entry("harvest", body, RULES, data=_data)

"""Benchmark: activation harvesting (tokens/s) and activation-cache reads (GB/s).

Harvest (per model size, per hookpoint depth):

* candidate ``lm``: `models.lm.LanguageModel.forward_batch` (forward hooks at the requested
  hookpoint, forward stopped after it, numpy out);
* baseline ``hf_hidden_states``: the naive way, a full ``model(..., output_hidden_states=True)``
  under ``torch.inference_mode`` and ``hidden_states[L + 1].numpy()``.
* ``to_disk``: the whole `models.activation_cache.harvest` (forward + shard files on disk)
  against the in-memory candidate loop over the same contexts: the cost of writing.

Peer and why: ``hf_hidden_states`` is what a researcher writes with transformers (the one
documented way to get every layer's residual stream); a forward hook that stops the forward
is the candidate's own trick, so the peer is the strongest simple approach without it. For
reads, raw ``np.load`` of the same files is the floor any reader pays.

Models are built from configs with random weights (speed does not depend on the weights):
``tiny`` (GPT-NeoX, d 64, 2 blocks), ``small`` (GPT-NeoX with Pythia-14m's shape: d 128,
6 blocks, 4 heads, MLP 512) and, without ``--hv_quick``, ``medium`` (Pythia-70m's shape: d 512,
6 blocks, 8 heads, MLP 2048). Vocabulary 2000 (the LM head is never run, so its size does not
matter here). Batches of ``--hv_batch_size`` contexts of ``--hv_context_length`` tokens.

Cache reads: a float32 and a bfloat16 cache of ``--hv_read_mb`` MB (the embedding output of a
d-1024 model, cheap to harvest) read through `CacheSource.open_at` (float32 out) against
``np.load`` of the same shard files (raw bytes, no conversion). Both run warm, from the page
cache (the first warm-up pass loads it), so this measures the reader's overhead over raw file
reads, not the disk. A shuffled read (64k-row buffer) is reported beside them.

Both sides get the same thread budget (``--threads``) and alternate repetitions
(`engine.bench.compare`). Run::

    python -m experiments.bench_harvest --out=runs/bench/harvest.json
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("hv_batch_size", 8, "Contexts per forward pass.")
flags.DEFINE_integer("hv_context_length", 128, "Tokens per context.")
flags.DEFINE_integer("hv_batches", 4, "Forward passes per timed repetition.")
flags.DEFINE_integer("hv_read_mb", 128, "Size of the cache read in the read benchmark (MB).")
flags.DEFINE_bool("hv_quick", False, "Skip the medium model (smoke run).")
flags.DEFINE_string("hv_device", None, "torch device (default cuda if available).")
common.define_bench_flags()

SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_mlp=256),
    "small": dict(d_model=128, n_layers=6, n_heads=4, d_mlp=512),  # pythia-14m shape
    "medium": dict(d_model=512, n_layers=6, n_heads=8, d_mlp=2048),  # pythia-70m shape
}


def _model(size: str, tok, max_len: int):
    from models import lm, lm_tiny

    cfg = dict(SIZES[size])
    raw = lm_tiny.build_tiny_model("gpt_neox", tok, seed=0, max_len=max_len, **cfg)
    return lm.LanguageModel(raw.base_model, tok, name=f"gpt_neox-{size}", device=FLAGS.hv_device)


def _harvest_results(bench, tok, contexts) -> list[dict]:
    import numpy as np
    import torch

    from models import activation_cache

    results = []
    sizes = ["tiny", "small"] + ([] if FLAGS.hv_quick else ["medium"])
    n_ctx = FLAGS.hv_batch_size * FLAGS.hv_batches
    ctxs = contexts[:n_ctx]
    tokens = ctxs.num_tokens
    for size in sizes:
        model = _model(size, tok, FLAGS.hv_context_length)
        # an early hookpoint (the forward stops there) and the last block (no early stop)
        for layer in sorted({min(1, model.n_layers - 2), model.n_layers - 1}):
            hp = f"resid_post.{layer}"

            def candidate(model=model, hp=hp):
                out = None
                for lo in range(0, n_ctx, FLAGS.hv_batch_size):
                    part = ctxs[lo : lo + FLAGS.hv_batch_size]
                    out = model.forward_batch(part.token_ids, [hp], attention_mask=part.mask)
                return out.acts[hp]

            def baseline(model=model, layer=layer):
                out = None
                for lo in range(0, n_ctx, FLAGS.hv_batch_size):
                    part = ctxs[lo : lo + FLAGS.hv_batch_size]
                    with torch.inference_mode():
                        hs = model.model(
                            input_ids=torch.as_tensor(part.token_ids, device=model.device).long(),
                            attention_mask=torch.as_tensor(part.mask, device=model.device).long(),
                            output_hidden_states=True,
                            use_cache=False,
                        ).hidden_states
                    out = hs[layer + 1].float().cpu().numpy()
                return out

            if layer < model.n_layers - 1:  # same values (hidden_states[-1] is normed)
                diff = float(np.abs(candidate() - baseline()).max())
            else:
                diff = None
            r = bench.compare(
                candidate,
                baseline,
                repeats=FLAGS.repeats,
                warmup=1,
                name=f"harvest {size} {hp}: lm vs hf_hidden_states",
                work=tokens,
                work_unit="tokens",
            )
            r.update(
                {
                    "kind": "harvest",
                    "size": size,
                    "hookpoint": hp,
                    **SIZES[size],
                    "baseline": "hf_hidden_states",
                    "tokens_per_repeat": tokens,
                    "batch_size": FLAGS.hv_batch_size,
                    "context_length": FLAGS.hv_context_length,
                    "max_abs_diff_vs_baseline": diff,
                }
            )
            results.append(r)
        tmp = tempfile.mkdtemp(prefix="bench_harvest_")
        hp = f"resid_post.{model.n_layers - 1}"

        def to_disk(model=model, hp=hp, tmp=tmp):
            path = os.path.join(tmp, "cache")
            shutil.rmtree(path, ignore_errors=True)
            return activation_cache.harvest(
                model, ctxs, [hp], path, batch_size=FLAGS.hv_batch_size, progress=False
            ).num_tokens

        def in_memory(model=model, hp=hp):
            return model.run(ctxs, [hp], batch_size=FLAGS.hv_batch_size).acts[hp]

        r = bench.compare(
            to_disk,
            in_memory,
            repeats=FLAGS.repeats,
            warmup=1,
            name=f"harvest {size} {hp}: to disk vs in memory",
            work=tokens,
            work_unit="tokens",
        )
        r.update(
            {
                "kind": "harvest_to_disk",
                "size": size,
                "hookpoint": hp,
                **SIZES[size],
                "baseline": "in_memory",
                "tokens_per_repeat": tokens,
            }
        )
        results.append(r)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _read_results(bench, tok, contexts) -> list[dict]:
    import numpy as np

    from models import activation_cache, lm, lm_tiny

    d = 1024
    raw = lm_tiny.build_tiny_model(
        "gpt_neox",
        tok,
        seed=0,
        d_model=d,
        n_layers=1,
        n_heads=8,
        d_mlp=64,
        max_len=FLAGS.hv_context_length,
    )
    model = lm.LanguageModel(raw.base_model, tok, name="gpt_neox-d1024-embeddings", device="cpu")
    results = []
    tmp = tempfile.mkdtemp(prefix="bench_read_")
    try:
        for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
            n_tokens = FLAGS.hv_read_mb * 2**20 // (d * itemsize)
            n_ctx = min(len(contexts), max(1, n_tokens // FLAGS.hv_context_length))
            path = os.path.join(tmp, dtype)
            cache = activation_cache.harvest(
                model,
                contexts[:n_ctx],
                ["resid_pre.0"],
                path,
                dtype=dtype,
                batch_size=64,
                progress=False,
                shard_contexts=max(1, n_ctx // 4),
            )
            files = [
                os.path.join(path, "resid_pre.0", f"{i:05d}.npy") for i in range(len(cache.shards))
            ]
            nbytes = sum(np.load(f, mmap_mode="r").nbytes for f in files)

            def baseline(files=files):
                total = 0.0
                for f in files:
                    total += float(np.load(f)[0, 0, 0])
                return total

            # blocks own their memory (the reader copies out of the memory map), so touching
            # one value per block is enough to count the whole read
            out_dtypes = ["float32"] + (["native"] if dtype != "float32" else [])
            for out_dtype in out_dtypes:
                src = cache.source("resid_pre.0", block_rows=16384, out_dtype=out_dtype)

                def candidate(src=src):
                    total = 0.0
                    for block in src.open_at(0):
                        total += float(block[1][0, 0])
                    return total

                r = bench.compare(
                    candidate,
                    baseline,
                    repeats=FLAGS.repeats,
                    warmup=1,
                    name=f"cache read {dtype} -> {out_dtype} vs np.load raw",
                    work=nbytes / 1e9,
                    work_unit="GB_file",
                )
                r.update(
                    {
                        "kind": "cache_read",
                        "dtype": dtype,
                        "out_dtype": out_dtype,
                        "file_bytes": nbytes,
                        "rows": src.num_rows,
                        "d": d,
                        "baseline": "np.load raw files",
                    }
                )
                results.append(r)
            shuffled = cache.source(
                "resid_pre.0", shuffle_seed=0, shuffle_buffer=1 << 16, shuffle_block=1024
            )

            def shuffled_read(shuffled=shuffled):
                total = 0.0
                for block in shuffled.open_at(0):
                    total += float(block[1][0, 0])
                return total

            r = bench.compare(
                shuffled_read,
                baseline,
                repeats=FLAGS.repeats,
                warmup=1,
                name=f"cache read {dtype} shuffled -> float32 vs np.load raw",
                work=nbytes / 1e9,
                work_unit="GB_file",
            )
            r.update(
                {
                    "kind": "cache_read_shuffled",
                    "dtype": dtype,
                    "file_bytes": nbytes,
                    "rows": src.num_rows,
                    "d": d,
                    "baseline": "np.load raw files",
                    "shuffle_buffer_rows": 1 << 16,
                    "shuffle_block_rows": 1024,
                }
            )
            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv):
    del argv
    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    import torch

    torch.set_num_threads(FLAGS.threads)
    from models import text

    tok = text.build_word_tokenizer(vocab_size=2000)
    docs = text.sample_documents()
    contexts = text.make_contexts(docs, tok, FLAGS.hv_context_length)
    results = _harvest_results(bench, tok, contexts)
    # the read benchmark needs more contexts than the sample has at long context lengths:
    # repeat the sample's contexts (content does not matter for read speed)
    import numpy as np

    reps = -(-(FLAGS.hv_read_mb * 2**20 // 2048) // max(1, contexts.num_tokens)) + 1
    many = text.Contexts.concat([contexts] * reps)
    many = text.Contexts(many.token_ids, many.mask, np.arange(len(many)))
    results += _read_results(bench, tok, many)
    for r in results:
        r["thread_budget"] = budget
        if r["kind"].startswith("harvest"):
            print(
                f"{r['name']}: {r['candidate_tokens_per_s']:,.0f} vs "
                f"{r['baseline_tokens_per_s']:,.0f} tokens/s ({r['speedup']:.2f}x)"
            )
        else:
            print(
                f"{r['name']}: {r['candidate_GB_file_per_s']:.2f} vs "
                f"{r['baseline_GB_file_per_s']:.2f} GB/s ({r['speedup']:.2f}x)"
            )
    bench.report(results, common.bench_out("harvest"))


if __name__ == "__main__":
    app.run(main)

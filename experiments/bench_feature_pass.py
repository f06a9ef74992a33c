"""Measure the pipeline's feature pass at scale: time and peak memory, synthetic TopK codes.

The pass of experiments/pipeline/features.py for two TopK SAEs has three parts: encoding
(``tokens x d_in x F`` multiply-adds per side; not measured here: it is the SAE's forward and
is the same in any implementation), per-feature statistics, and the feature-by-feature
activation correlation, which dominates memory (``F_a x F_b`` float32 sums) and time. This
script measures the last two (statistics both from the codes, as the pass computes them, and
densified, as it did before: ``stats_sparse_seconds`` / ``stats_seconds``) over synthetic TopK
codes (``k`` distinct features per token per
side, B's features a fixed permutation of A's on half the entries, so true pairs exist),
generated chunk by chunk (deterministic per chunk, so memory holds one chunk; like codes read
from disk), with the tiling that `features.plan_pass` picks for ``--bfp_memory_budget_gb``.

Peer: none in this script (it measures time and peak memory of the pass at scales where a
simple script runs out of memory). The peers of its parts are timed elsewhere, interleaved:
the sparse correlation against scipy.sparse CSR ``A.T @ B`` (`experiments.bench_similarity`,
section ``correlation``: the strongest simple peer, a compiled sparse-sparse product that
touches only the ``tokens * k_a * k_b`` nonzero products, as the candidate does), and the
whole feature pass inside one comparison against a NumPy/torch/scipy script
(`experiments.bench_e2e`, its end-to-end twin).

Peak memory is this process's maximum resident set size (``resource.getrusage``; run under
``/usr/bin/time -v`` to cross-check). Example (the three sizes of issue 13)::

    python -m experiments.bench_feature_pass --bfp_features=1536 --bfp_tokens=200000 --out=a.json
    python -m experiments.bench_feature_pass --bfp_features=16384 --bfp_tokens=1000000 --out=b.json
    python -m experiments.bench_feature_pass --bfp_features=32768 --bfp_tokens=1000000 --out=c.json
    python -m experiments.bench_feature_pass --bfp_features=32768 --bfp_tokens=1000000 \\
        --bfp_memory_budget_gb=3 --out=c_tiled.json
"""

from __future__ import annotations

import json
import os
import resource
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("bfp_features", 1536, "Features per side.")
flags.DEFINE_integer("bfp_tokens", 200_000, "Tokens streamed.")
flags.DEFINE_integer("bfp_k", 32, "Active features per token and side.")
flags.DEFINE_integer("bfp_chunk", 4096, "Rows per streamed chunk.")
flags.DEFINE_float(
    "bfp_memory_budget_gb",
    0.0,
    "GiB the pass may use (0: half the machine's memory, the pipeline's default).",
)
flags.DEFINE_bool("bfp_skip_stats", False, "Time only the correlation pass.")
common.define_bench_flags()


def synthetic_codes(n_tokens: int, n_features: int, k: int, chunk: int, seed: int = 0):
    """``open_at(start) -> blocks (vals_a, idx_a, vals_b, idx_b)``, one chunk at a time."""
    import numpy as np

    stride = n_features // k
    perm = np.random.default_rng([seed, 1]).permutation(n_features)

    def block(c: int):
        rng = np.random.default_rng([seed, c])
        rows = min(chunk, n_tokens - c * chunk)
        off = rng.integers(0, n_features, (rows, 1))
        idx_a = (off + np.arange(k) * stride + rng.integers(0, stride, (rows, k))) % n_features
        # distinct within a row: k slots of width n_features // k, one id per slot
        vals_a = rng.exponential(1.0, (rows, k)).astype(np.float32)
        # B's feature perm[i] is A's feature i, with value noise, absent on half the tokens
        keep = rng.random((rows, k)) < 0.5
        idx_b = perm[idx_a]
        vals_b = np.where(keep, vals_a * rng.uniform(0.8, 1.2, (rows, k)), 0.0).astype(np.float32)
        return vals_a, idx_a.astype(np.int32), vals_b, idx_b.astype(np.int32)

    def open_at(start: int):
        c0 = start // chunk
        for c in range(c0, -(-n_tokens // chunk)):
            b = block(c)
            skip = start - c * chunk if c == c0 else 0
            yield tuple(x[skip:] for x in b)

    return open_at


def main(argv) -> int:
    del argv
    args = FLAGS
    out_path = common.bench_out("feature_pass")
    from engine import bench

    budget_info = bench.set_thread_budget(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engine import accumulators, correlation, feature_stats, streaming
    from engine import mesh as mesh_lib
    from experiments.pipeline import features

    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    f, n, k = args.bfp_features, args.bfp_tokens, args.bfp_k
    budget = None if args.bfp_memory_budget_gb <= 0 else int(args.bfp_memory_budget_gb * (1 << 30))
    plan = features.plan_pass(
        f,
        f,
        n_data=1,
        memory_budget=budget,
        sparse=True,
        chunk_rows=args.bfp_chunk,
        rows=n,
        k_a=k,
        k_b=k,
        mesh=mesh,
    )
    open_at = synthetic_codes(n, f, k, args.bfp_chunk)
    stream = streaming.ChunkStream(open_at, args.bfp_chunk, name="codes", check_finite=False)
    out = {
        "features": f,
        "tokens": n,
        "k": k,
        "chunk": args.bfp_chunk,
        **budget_info,
        "plan": plan.__dict__,
        "rss_start_gb": _rss_gb(),
    }

    def with_rows(start):
        pos = start
        for b in open_at(start):
            yield (np.arange(pos, pos + b[0].shape[0], dtype=np.int32),) + b
            pos += b[0].shape[0]

    # Per-feature statistics as the pipeline computes them for TopK pairs: from the codes
    # (feature_stats.SparseFeatureStatsAccumulator, O(rows * k) per chunk).
    acc_s = accumulators.Combined(
        {
            "a": (feature_stats.SparseFeatureStatsAccumulator(f, 10), (1, 2, 0)),
            "b": (feature_stats.SparseFeatureStatsAccumulator(f, 10), (3, 4, 0)),
        }
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    state = accumulators.accumulate(
        acc_s,
        streaming.ChunkStream(with_rows, args.bfp_chunk, name="sparse stats", check_finite=False),
        mesh,
    )
    acc_s.finalize(state)
    out["stats_sparse_seconds"] = time.perf_counter() - t0
    out["stats_sparse_cpu_seconds"] = time.process_time() - cpu0
    del state
    out["rss_after_sparse_stats_gb"] = _rss_gb()

    if not args.bfp_skip_stats:
        # Per-feature statistics from the codes densified per chunk on device (the dense
        # accumulator: what the pass did before the sparse one, O(rows * F) per chunk).
        acc = accumulators.Combined(
            {
                "a": (feature_stats.FeatureStatsAccumulator(f, 10), (1, 0)),
                "b": (feature_stats.FeatureStatsAccumulator(f, 10), (2, 0)),
            }
        )

        def dense(params, rows, va, ia, vb, ib):
            za = (
                jnp.zeros((va.shape[0], f), jnp.float32)
                .at[jnp.arange(va.shape[0])[:, None], ia]
                .set(va)
            )
            zb = (
                jnp.zeros((vb.shape[0], f), jnp.float32)
                .at[jnp.arange(vb.shape[0])[:, None], ib]
                .set(vb)
            )
            return rows, za, zb

        s2 = streaming.ChunkStream(with_rows, args.bfp_chunk, name="stats", check_finite=False)
        t0, cpu0 = time.perf_counter(), time.process_time()
        state = accumulators.accumulate(acc, s2, mesh, transform=dense)
        acc.finalize(state)
        out["stats_seconds"] = time.perf_counter() - t0
        out["stats_cpu_seconds"] = time.process_time() - cpu0
        del state
        out["rss_after_stats_gb"] = _rss_gb()

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    m = correlation.correlate(
        stream, f, f, mesh, sparse=True, tile_a=plan.tile_a, tile_b=plan.tile_b
    )
    out["correlation_seconds"] = time.perf_counter() - t0
    out["correlation_cpu_seconds"] = time.process_time() - cpu0
    out["mean_best_a"] = float(m.mean_best_a)
    out["peak_rss_gb"] = _rss_gb()
    out["load_average"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))
    return 0


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


if __name__ == "__main__":
    app.run(main)

"""Fraction of the accelerator's peak reached by the GEMM-bound kernels (issue 18).

For each kernel, achieved FLOP/s = its multiply-add count x 2 / wall time (after a compiling
warm-up, blocked on the result), divided by the device's dense peak at that precision
(``PEAKS`` by ``jax.devices()[0].device_kind``, or ``--gpu_peak_tflops``). Peer: the raw
``jnp.dot`` of the same shape and precision in the same process (what the hardware gives a
single GEMM; interleaved), so the ratio kernel / GEMM says what the kernel's extra work costs.
It is the strongest simple peer because every GEMM-bound kernel here is at best one GEMM of
that shape: nothing simple can beat it, and the vendor peak is the absolute roof.

Kernels: the raw GEMM at bf16 / TF32 (precision DEFAULT) / float32 (HIGHEST);
`engine.pairwise.max_cosine` (both directions, exact float64 refinement) at DEFAULT and
HIGHEST; the dense correlation GEMM (``chunk x F`` by ``chunk x F`` per chunk, as the dense
path of `engine.correlation`); CCA statistics (`engine.paired_stats.pair_stats`). Goal: >= 50 %
of the bf16 peak for the GEMM-bound kernels.

On CPU the peak is unknown (fractions are omitted) and the sizes should be small::

    python -m experiments.bench_gpu --gpu_n=1024 --gpu_d=128 --repeats=1    # CPU smoke
    python -m experiments.bench_gpu --out=runs/bench/gpu.json               # on the GPU

`launch/gpu_bench.sh` runs this with the rest of the GPU suite.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("gpu_n", 65536, "pairwise: rows per dictionary; GEMM: n x n x d.")
flags.DEFINE_integer("gpu_d", 1024, "pairwise / GEMM inner dimension.")
flags.DEFINE_integer("gpu_corr_features", 16384, "dense correlation GEMM: features.")
flags.DEFINE_integer("gpu_corr_chunk", 8192, "dense correlation GEMM: tokens per chunk.")
flags.DEFINE_integer("gpu_cca_rows", 1 << 20, "CCA statistics: rows.")
flags.DEFINE_integer("gpu_cca_dim", 2048, "CCA statistics: columns per side.")
flags.DEFINE_float("gpu_peak_tflops", 0.0, "Dense bf16 peak in TFLOP/s (0: from PEAKS).")
common.define_bench_flags()

# Dense (no sparsity) peak TFLOP/s per precision, from the vendors' data sheets (SXM parts).
PEAKS = {
    "NVIDIA H200": {"bf16": 989.0, "tf32": 494.0, "float32": 67.0},
    "NVIDIA H100 80GB HBM3": {"bf16": 989.0, "tf32": 494.0, "float32": 67.0},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312.0, "tf32": 156.0, "float32": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312.0, "tf32": 156.0, "float32": 19.5},
    "TPU v4": {"bf16": 275.0, "tf32": 275.0, "float32": 275.0 / 6},
    "TPU v5 lite": {"bf16": 197.0, "tf32": 197.0, "float32": 197.0 / 6},
}


def _peak(kind: str, precision: str) -> float | None:
    if FLAGS.gpu_peak_tflops > 0:
        scale = {"bf16": 1.0, "tf32": 0.5, "float32": 1 / 15}[precision]
        return FLAGS.gpu_peak_tflops * scale * 1e12
    for name, table in PEAKS.items():
        if kind.startswith(name):
            return table[precision] * 1e12
    return None


def main(argv):
    del argv
    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engine import mesh as mesh_lib
    from engine import paired_stats, pairwise

    kind = jax.devices()[0].device_kind
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    n, d = FLAGS.gpu_n, FLAGS.gpu_d
    results = []

    def record(r, flops, precision):
        peak = _peak(kind, precision)
        r.update(
            flops=flops,
            precision=precision,
            device_kind=kind,
            threads=budget,
            load=os.getloadavg()[0],
            candidate_tflops=flops / r["candidate_median_s"] / 1e12,
            baseline_tflops=flops / r["baseline_median_s"] / 1e12,
            peak_tflops=None if peak is None else peak / 1e12,
            fraction_of_peak=None if peak is None else flops / r["candidate_median_s"] / peak,
            goal_fraction_of_peak=0.5,
        )
        results.append(r)
        print(
            f"{r['name']}: {r['candidate_tflops']:.1f} TFLOP/s"
            + ("" if peak is None else f" = {100 * r['fraction_of_peak']:.0f} % of peak")
        )

    # Raw GEMM per precision (the roof each kernel is measured against).
    a = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((min(n, 8192), d)), jnp.float32)
    gemms = {
        "bf16": jax.jit(
            lambda x, y: jnp.dot(
                x.astype(jnp.bfloat16), y.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32
            )
        ),
        "tf32": jax.jit(lambda x, y: jnp.dot(x, y.T, precision=jax.lax.Precision.DEFAULT)),
        "float32": jax.jit(lambda x, y: jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST)),
    }
    gflops = 2.0 * n * b.shape[0] * d
    for p, g in gemms.items():
        r = bench.compare(
            lambda g=g: g(a, b),
            lambda: gemms["bf16"](a, b),
            repeats=FLAGS.repeats,
            name=f"GEMM {n}x{d} @ {d}x{b.shape[0]} ({p}) vs bf16 GEMM",
        )
        record(r, gflops, p)

    # Pairwise max cosine, exact, both directions.
    an = np.asarray(rng.standard_normal((n, d)), np.float32)
    bn = an[rng.permutation(n)] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    big = jnp.asarray(bn)
    full_gemm = jax.jit(lambda x, y: jnp.max(jnp.dot(x, y.T, precision="DEFAULT"), axis=1))
    for prec, label in (("DEFAULT", "tf32"), ("HIGHEST", "float32")):
        r = bench.compare(
            lambda prec=prec: pairwise.max_cosine(
                an, bn, mesh, precision=prec, margin=16 if prec != "HIGHEST" else 4
            ),
            lambda: full_gemm(jnp.asarray(an[: min(n, 8192)]), big),
            repeats=FLAGS.repeats,
            name=f"max_cosine exact {n}x{d} (precision {prec}) vs one GEMM block",
        )
        r["baseline_note"] = "baseline is a GEMM of min(n, 8192) rows only (a roof, not a peer)"
        record(r, 2.0 * n * n * d, label)

    # Dense correlation GEMM (one chunk) and CCA statistics.
    f, c = FLAGS.gpu_corr_features, FLAGS.gpu_corr_chunk
    za = jnp.asarray(rng.random((c, f)), jnp.float32)
    zb = jnp.asarray(rng.random((c, f)), jnp.float32)
    corr = jax.jit(lambda x, y: jnp.dot(x.T, y, precision=jax.lax.Precision.HIGHEST))
    r = bench.compare(
        lambda: corr(za, zb),
        lambda: gemms["float32"](za.T, zb.T),
        repeats=FLAGS.repeats,
        name=f"correlation GEMM {f}x{c} @ {c}x{f} (f32)",
    )
    record(r, 2.0 * f * f * c, "float32")
    rows, dim = FLAGS.gpu_cca_rows, FLAGS.gpu_cca_dim
    x = np.asarray(rng.standard_normal((rows, dim)), np.float32)
    y = np.asarray(rng.standard_normal((rows, dim)), np.float32)
    r = bench.compare(
        lambda: paired_stats.pair_stats(x, y, mesh=mesh).cov_xy,
        lambda: gemms["float32"](jnp.asarray(x[:dim]).T, jnp.asarray(y[:dim]).T),
        repeats=FLAGS.repeats,
        name=f"CCA statistics {rows}x{dim} (f32, host arrays streamed)",
    )
    record(r, 2.0 * rows * (2 * dim) ** 2, "float32")
    bench.report(results, common.bench_out("gpu"))


if __name__ == "__main__":
    app.run(main)

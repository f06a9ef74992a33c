"""Benchmark: streamed CrossMoments on the mesh vs a float64 numpy in-memory reference.

An example of the benchmark helper (engine/bench.py) that every bench_*.py uses. Run::

    python -m experiments.bench_accumulator --out=runs/bench/accumulator.json

Both sides get the same thread budget (--threads, recorded in the JSON).

Peer: float64 NumPy in memory (centre both sides, one GEMM ``X^T Y``), the strongest simple
way to get the same cross-moments: one BLAS call over data that already fits in memory, no
chunking or device transfers. The candidate streams (bounded memory, resumable) and is float32,
so it is compared for speed and for its distance to this exact reference.
"""

from __future__ import annotations

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("acc_rows", 1_000_000, "Rows of X and Y.")
flags.DEFINE_integer("acc_d1", 64, "Columns of X.")
flags.DEFINE_integer("acc_d2", 64, "Columns of Y.")
flags.DEFINE_integer("acc_chunk", 65536, "Rows per streamed chunk.")
common.define_bench_flags()


def main(argv):
    del argv
    from engine import bench

    bench.set_thread_budget(FLAGS.threads)
    import numpy as np

    from engine import accumulators, streaming
    from engine import mesh as mesh_lib

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(FLAGS.acc_rows, FLAGS.acc_d1)) + 100.0).astype(np.float32)
    noise = rng.normal(size=(FLAGS.acc_rows, FLAGS.acc_d2))
    y = (x[:, : FLAGS.acc_d2] * 0.5 + noise).astype(np.float32)
    mesh = mesh_lib.make_mesh()
    acc = accumulators.CrossMoments(FLAGS.acc_d1, FLAGS.acc_d2)

    def candidate():
        state = accumulators.accumulate(
            acc, streaming.ChunkStream((x, y), FLAGS.acc_chunk, check_finite=False), mesh
        )
        return state.sxy

    def baseline():
        xd, yd = x.astype(np.float64), y.astype(np.float64)
        xc, yc = xd - xd.mean(0), yd - yd.mean(0)
        return xc.T @ yc / len(xd)

    shape = f"{FLAGS.acc_rows}x({FLAGS.acc_d1},{FLAGS.acc_d2})"
    result = bench.compare(
        candidate,
        baseline,
        repeats=FLAGS.repeats,
        name=f"CrossMoments {shape} streamed f32 vs numpy f64",
        work=FLAGS.acc_rows,
        work_unit="rows",
    )
    ref = baseline()
    got = acc.finalize(
        accumulators.accumulate(
            acc, streaming.ChunkStream((x, y), FLAGS.acc_chunk, check_finite=False), mesh
        )
    ).cov_xy
    result["max_rel_err_vs_float64"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    result["threads"] = FLAGS.threads
    result["peak_host_bytes_baseline_estimate"] = int(x.nbytes * 2 + y.nbytes * 2)
    bench.report([result], common.bench_out("accumulator"))
    print(f"max relative error vs float64: {result['max_rel_err_vs_float64']:.2e}")


if __name__ == "__main__":
    app.run(main)

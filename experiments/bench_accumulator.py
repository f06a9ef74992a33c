"""Benchmark: streamed CrossMoments on the mesh vs a float64 numpy in-memory reference.

An example of the benchmark helper (engine/bench.py) that every bench_*.py uses. Run::

    python -m experiments.bench_accumulator --out=runs/bench/accumulator.json

Both sides get the same thread budget (--threads, recorded in the JSON).
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 1_000_000, "Rows of X and Y.")
flags.DEFINE_integer("d1", 64, "Columns of X.")
flags.DEFINE_integer("d2", 64, "Columns of Y.")
flags.DEFINE_integer("chunk", 65536, "Rows per streamed chunk.")
flags.DEFINE_integer("threads", 2, "Thread budget for XLA and BLAS (both sides).")
flags.DEFINE_integer("repeats", 3, "Timed repetitions per side.")
flags.DEFINE_string("out", "runs/bench/accumulator.json", "JSON output path.")


def main(argv):
    del argv
    from engine import bench
    bench.set_thread_budget(FLAGS.threads)
    import numpy as np

    from engine import accumulators, streaming
    from engine import mesh as mesh_lib

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(FLAGS.rows, FLAGS.d1)) + 100.0).astype(np.float32)
    y = (x[:, :FLAGS.d2] * 0.5 + rng.normal(size=(FLAGS.rows, FLAGS.d2))).astype(np.float32)
    mesh = mesh_lib.make_mesh()
    acc = accumulators.CrossMoments(FLAGS.d1, FLAGS.d2)

    def candidate():
        state = accumulators.accumulate(
            acc, streaming.ChunkStream((x, y), FLAGS.chunk, check_finite=False), mesh)
        return state.sxy

    def baseline():
        xd, yd = x.astype(np.float64), y.astype(np.float64)
        xc, yc = xd - xd.mean(0), yd - yd.mean(0)
        return xc.T @ yc / len(xd)

    result = bench.compare(candidate, baseline, repeats=FLAGS.repeats, name="CrossMoments "
                           f"{FLAGS.rows}x({FLAGS.d1},{FLAGS.d2}) streamed f32 vs numpy f64",
                           work=FLAGS.rows, work_unit="rows")
    ref = baseline()
    got = acc.finalize(accumulators.accumulate(
        acc, streaming.ChunkStream((x, y), FLAGS.chunk, check_finite=False), mesh)).cov_xy
    result["max_rel_err_vs_float64"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    result["threads"] = FLAGS.threads
    result["peak_host_bytes_baseline_estimate"] = int(x.nbytes * 2 + y.nbytes * 2)
    bench.report([result], FLAGS.out)
    print(f"max relative error vs float64: {result['max_rel_err_vs_float64']:.2e}")


if __name__ == "__main__":
    app.run(main)

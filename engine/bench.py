"""Benchmark helper: candidate vs baseline in one process, interleaved, medians, ratio, JSON.

Every `experiments/bench_*.py` uses this so that numbers are comparable: both sides get the
same thread budget (recorded), are warmed up first (compilation excluded), are blocked on
their results (JAX dispatch is asynchronous), and alternate repetitions so that machine
noise hits both.

Thread budget: call `set_thread_budget` BEFORE importing jax / torch / numpy-heavy code in
the benchmark script (XLA reads its flags at start-up).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def set_thread_budget(threads: int) -> dict:
    """Caps BLAS, OpenMP, XLA, native-kernel and torch threads at ``threads`` (call before
    importing them).

    On 2-core machines each runtime starting its own pool can slow a run 50x.
    """
    threads = int(threads)
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "SAE_KERNEL_THREADS",  # the native kernels (engine/kernels)
    ):
        os.environ[var] = str(threads)
    # OpenBLAS workers spin ~2^28 cycles after each GEMM before sleeping (default timeout 28);
    # between tile GEMMs that spinning steals the cores from the JAX work in between (the
    # host-GEMM max_cosine measured 69 % -> 77 % of NumPy's GEMM rate with 4). Read at BLAS
    # start-up only: set before NumPy is imported. A value already set is kept.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        flags += f" intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = flags.strip()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return {
        "threads": threads,
        "XLA_FLAGS": os.environ["XLA_FLAGS"],
        "OPENBLAS_THREAD_TIMEOUT": os.environ["OPENBLAS_THREAD_TIMEOUT"],
    }


def block(result: Any) -> Any:
    """Waits for asynchronous JAX results (no-op for numpy / torch CPU values)."""
    if "jax" in sys.modules:
        import jax

        leaves = jax.tree.leaves(result)
        for leaf in leaves:
            if hasattr(leaf, "block_until_ready"):
                leaf.block_until_ready()
    return result


def time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def compare(
    candidate: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    name: str = "",
    work: float | None = None,
    work_unit: str = "items",
) -> dict:
    """Times ``candidate`` and ``baseline`` interleaved; reports medians and their ratio.

    Args:
      candidate / baseline: zero-argument callables doing one unit of work each.
      repeats: timed repetitions per side (interleaved).
      warmup: untimed calls per side first (compilation, caches).
      work: amount of work per call (tokens, FLOPs...) to report throughput.

    Returns:
      A dict with per-side times, medians, ``speedup = baseline / candidate`` and throughput.
    """
    for _ in range(warmup):
        block(candidate())
        block(baseline())
    cand, base = [], []
    for _ in range(repeats):
        cand.append(time_once(candidate))
        base.append(time_once(baseline))
    c, b = statistics.median(cand), statistics.median(base)
    out = {
        "name": name,
        "candidate_s": cand,
        "baseline_s": base,
        "candidate_median_s": c,
        "baseline_median_s": b,
        "speedup": b / c if c > 0 else float("inf"),
    }
    if work is not None:
        out[f"candidate_{work_unit}_per_s"] = work / c
        out[f"baseline_{work_unit}_per_s"] = work / b
    return out


def environment() -> dict:
    """Machine and library facts recorded with every benchmark."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if "jax" in sys.modules:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def report(results: list[dict] | dict, path: str | None = None) -> dict:
    """Prints a one-line summary per result and writes ``{"env": ..., "results": ...}``."""
    results = [results] if isinstance(results, dict) else list(results)
    for r in results:
        print(
            f"{r.get('name', ''):40s} candidate {r['candidate_median_s'] * 1e3:10.2f} ms  "
            f"baseline {r['baseline_median_s'] * 1e3:10.2f} ms  speedup {r['speedup']:.2f}x"
        )
    doc = {"env": environment(), "results": results}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, default=float)
        print(f"wrote {path}")
    return doc

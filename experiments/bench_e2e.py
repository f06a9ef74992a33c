"""End-to-end benchmark: one comparison of two TopK SAEs, the pipeline vs a simple script.

The workload of issue 18: two 1536-feature TopK SAEs (k 32) on 200k tokens (d_in 384), feature
pass (encode both sides, per-feature statistics, activation correlation), pairing (best
partner both ways, one-to-one, threshold), and three metrics (SVCCA, CKA, RSA) with 200
random-pairing shuffles each.

* candidate: `experiments.pipeline.compare.run_comparison`, the pipeline's own path (fresh
  `StepCache`, so nothing is loaded from a previous step), including every JAX compilation.
* peer: the strongest simple script we know (`script_comparison`): NumPy GEMM encoding in
  chunks, ``torch.topk``, scipy CSR ``A.T @ B`` for the correlation, argmax pairing with mutual
  best one-to-one pairs, and metric loops that hoist the permutation-invariant work out of the
  200 shuffles (SVCCA: whitened SVD reductions once; CKA: centred Gram-free cross-covariance;
  RSA: ranks once). It is what a researcher writes in an afternoon; nothing in it compiles.

"Compile included" needs a fresh process for each timed repetition (a process that compiled
once never compiles again), so every repetition is a subprocess, and the three kinds are
interleaved (peer, pipeline cold, pipeline warm, peer, ...):

* ``pipeline_cold``: empty persistent compilation cache, every kernel compiled (and stored);
* ``pipeline_warm``: the next process, which finds the cache (`engine.compile_cache`) filled
  by the cold one, as a later comparison, grid cell or run of the same shapes does;
* ``script``: the peer.

Each subprocess builds the same synthetic data first (not timed) and reports the timed work,
the pipeline's part times (feature pass, pairing and filters, metrics) and JAX's compile time
and persistent-cache hits (`jax.monitoring` events). Run::

    python -m experiments.bench_e2e --out=runs/bench/e2e.json           # issue size
    python -m experiments.bench_e2e --e2e_tokens=20000 --e2e_features=256 --e2e_perms=20 \\
        --repeats=1                                                      # smoke

Machine load is recorded before and after every repetition (``os.getloadavg``); on a shared
machine absolute numbers are pessimistic, the interleaved ratio is the number to read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("e2e_tokens", 200_000, "Tokens (rows) of the comparison.")
flags.DEFINE_integer("e2e_features", 1536, "Features per SAE.")
flags.DEFINE_integer("e2e_d_in", 384, "Activation width of both sides.")
flags.DEFINE_integer("e2e_k", 32, "TopK k of both SAEs.")
flags.DEFINE_integer("e2e_perms", 200, "Random-pairing shuffles per metric.")
flags.DEFINE_integer("e2e_chunk", 8192, "Rows per chunk (both sides).")
flags.DEFINE_enum(
    "e2e_role",
    "",
    ["", "pipeline", "script"],
    "Internal: run one timed repetition of one side and print its JSON.",
)
flags.DEFINE_string("e2e_cache_dir", "", "Internal: persistent compilation cache directory.")
common.define_bench_flags()

METRICS = ("svcca", "cka", "rsa_spearman")


def make_data(tokens: int, features: int, d_in: int, k: int, seed: int = 0):
    """Activations of two "models" (B a rotated, noisy copy of A) and a TopK SAE per side
    whose features correspond up to a permutation, so the comparison finds real pairs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w_a = rng.normal(size=(d_in, features)).astype(np.float32)
    w_a /= np.linalg.norm(w_a, axis=0, keepdims=True)
    # Sparse-ish activations: a few active dictionary directions per token plus noise.
    codes_k = max(1, k // 2)
    xa = 0.1 * rng.normal(size=(tokens, d_in)).astype(np.float32)
    for _ in range(codes_k):
        idx = rng.integers(0, features, tokens)
        xa += rng.exponential(1.0, (tokens, 1)).astype(np.float32) * w_a.T[idx]
    rot, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    rot = rot.astype(np.float32)
    xb = xa @ rot + 0.1 * rng.normal(size=(tokens, d_in)).astype(np.float32)
    perm = rng.permutation(features)
    noise = 0.2 * rng.normal(size=(d_in, features)).astype(np.float32) / np.sqrt(d_in)
    w_b = (rot.T @ w_a)[:, perm] + noise
    w_b /= np.linalg.norm(w_b, axis=0, keepdims=True)
    return (
        xa,
        xb,
        {"W_enc": w_a, "W_dec": np.ascontiguousarray(w_a.T)},
        {"W_enc": w_b, "W_dec": np.ascontiguousarray(w_b.T)},
    )


# ---------------------------------------------------------------------------------------------
# The peer: a simple NumPy / scipy / torch script.
# ---------------------------------------------------------------------------------------------


def script_comparison(
    xa,
    xb,
    sae_a: dict,
    sae_b: dict,
    k: int,
    perms: int,
    chunk: int,
    threshold: float = 0.1,
    seed: int = 0,
) -> dict:
    """The whole comparison as a researcher's script would do it (see the module docstring)."""
    import numpy as np
    import scipy.linalg
    import scipy.sparse
    import scipy.stats
    import torch

    n, f = xa.shape[0], sae_a["W_enc"].shape[1]

    def encode(x, w):
        vals, idx = [], []
        for s in range(0, len(x), chunk):
            pre = torch.from_numpy(x[s : s + chunk] @ w)
            v, i = torch.topk(pre, k, dim=1)
            vals.append(torch.relu(v).numpy())
            idx.append(i.numpy().astype(np.int32))
        v, i = np.concatenate(vals), np.concatenate(idx)
        indptr = np.arange(0, v.size + 1, k)
        return scipy.sparse.csr_matrix((v.ravel(), i.ravel(), indptr), shape=(len(x), f))

    za, zb = encode(xa, sae_a["W_enc"]), encode(xb, sae_b["W_enc"])
    stats = {}
    for side, z in (("a", za), ("b", zb)):
        mean = np.asarray(z.mean(0)).ravel().astype(np.float64)
        sq = np.asarray(z.multiply(z).mean(0)).ravel().astype(np.float64)
        density = np.bincount(z.indices[z.data > 0], minlength=f) / n
        stats[side] = {
            "mean": mean,
            "std": np.sqrt(np.maximum(sq - mean**2, 0)),
            "density": density,
            "max": np.asarray(z.max(0).todense()).ravel(),
        }
    cross = (za.T @ zb).toarray().astype(np.float64) / n
    cov = cross - np.outer(stats["a"]["mean"], stats["b"]["mean"])
    sd = np.outer(stats["a"]["std"], stats["b"]["std"])
    corr = np.where(sd > 0, cov / np.where(sd > 0, sd, 1), 0.0)
    best_b, best_a = corr.argmax(1), corr.argmax(0)
    a_ids = np.flatnonzero((best_a[best_b] == np.arange(f)) & (stats["a"]["density"] > 0))
    keep = corr[a_ids, best_b[a_ids]] >= threshold
    pa, pb = a_ids[keep], best_b[a_ids[keep]]
    x = sae_a["W_dec"][pa].astype(np.float64)
    y = sae_b["W_dec"][pb].astype(np.float64)
    m = len(pa)
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(m) for _ in range(perms)]
    out = {"n_pairs": int(m), "mean_best_corr": float(corr.max(1).mean())}

    # SVCCA: reduce to 99 % variance and whiten once; each shuffle is one small SVD.
    def reduce_whiten(a):
        a = a - a.mean(0)
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        r = a @ vt[: int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.99)) + 1].T
        e, v = np.linalg.eigh(r.T @ r / len(r))
        return r @ ((v / np.sqrt(e)) @ v.T)

    xw, yw = reduce_whiten(x), reduce_whiten(y)

    def svcca(p):
        return np.mean(np.clip(np.linalg.svd(xw.T @ yw[p] / m, compute_uv=False), 0, 1))

    # Linear CKA: centred once; the normalisers do not change under a shuffle.
    xc, yc = x - x.mean(0), y - y.mean(0)
    norm = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)

    def cka(p):
        return np.linalg.norm(xc.T @ yc[p]) ** 2 / norm

    # RSA (Spearman of the two correlation RDMs): both rank transforms once.
    iu = np.triu_indices(m, 1)
    ra = scipy.stats.rankdata(np.corrcoef(x)[iu])
    ra = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    rank_y = np.zeros((m, m))
    rank_y[iu] = scipy.stats.rankdata(np.corrcoef(y)[iu])
    rank_y += rank_y.T

    def rsa(p):
        rb = rank_y[p[iu[0]], p[iu[1]]]
        rb = rb - rb.mean()
        return rb @ ra / np.linalg.norm(rb)

    ident = np.arange(m)
    for name, fn in (("svcca", svcca), ("cka", cka), ("rsa_spearman", rsa)):
        obs = float(fn(ident))
        null = np.array([fn(p) for p in shuffles])
        out[name] = {
            "score": obs,
            "null_mean": float(null.mean()),
            "p": float((1 + np.sum(null >= obs)) / (1 + perms)),
        }
    return out


# ---------------------------------------------------------------------------------------------
# One timed repetition (subprocess).
# ---------------------------------------------------------------------------------------------


def _role_main() -> None:
    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    if FLAGS.e2e_role == "pipeline":
        from engine import compile_cache

        compile_cache.enable(FLAGS.e2e_cache_dir or None)
    # Libraries both sides use, imported before the clock starts (imports are not the work).
    import numpy as np
    import scipy.linalg  # noqa: F401
    import scipy.sparse  # noqa: F401
    import scipy.stats  # noqa: F401

    t_import = time.perf_counter()
    xa, xb, sa, sb = make_data(FLAGS.e2e_tokens, FLAGS.e2e_features, FLAGS.e2e_d_in, FLAGS.e2e_k)
    doc = {"role": FLAGS.e2e_role, "threads": budget, "load_before": os.getloadavg()[0]}
    if FLAGS.e2e_role == "script":
        import torch

        torch.set_num_threads(FLAGS.threads)
        t0, c0 = time.perf_counter(), time.process_time()
        res = script_comparison(xa, xb, sa, sb, FLAGS.e2e_k, FLAGS.e2e_perms, FLAGS.e2e_chunk)
        doc["seconds"] = time.perf_counter() - t0
        doc["cpu_seconds"] = time.process_time() - c0
        doc["result"] = res
    else:
        doc.update(_pipeline_once(xa, xb, sa, sb, np))
    doc["load_after"] = os.getloadavg()[0]
    doc["data_seconds"] = time.perf_counter() - t_import - doc["seconds"]
    print("E2E_JSON " + json.dumps(doc, default=float))


def _pipeline_once(xa, xb, sa, sb, np) -> dict:
    import jax
    import jax.numpy as jnp

    from engine import mesh as mesh_lib
    from engine import streaming
    from experiments.pipeline import compare, filters
    from experiments.pipeline.stepcache import StepCache
    from models import sae as sae_lib

    events: dict[str, float] = {}

    def on_duration(name, secs, **_):
        events[name] = events.get(name, 0.0) + secs
        events[name + ":count"] = events.get(name + ":count", 0) + 1

    def on_event(name, **_):
        events[name + ":count"] = events.get(name + ":count", 0) + 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    marks: list[tuple[str, float]] = []
    tmp = tempfile.mkdtemp(prefix="speed_e2e_")
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])

        def sae(p):
            cfg = sae_lib.SAEConfig(
                d_in=FLAGS.e2e_d_in, d_sae=FLAGS.e2e_features, activation="topk", k=FLAGS.e2e_k
            )
            return sae_lib.from_arrays(
                cfg,
                jnp.asarray(p["W_enc"]),
                jnp.zeros(FLAGS.e2e_features),
                jnp.asarray(p["W_dec"]),
                jnp.zeros(FLAGS.e2e_d_in),
            )

        a, b = sae(sa), sae(sb)
        rows = np.arange(len(xa), dtype=np.int32)
        cfg = compare.CompareConfig(
            metrics=METRICS,
            num_permutations=FLAGS.e2e_perms,
            filters=filters.FilterConfig(non_concept=False),
        )
        res = compare.run_comparison(
            "e2e",
            lambda: streaming.ChunkStream((rows, xa, xb), FLAGS.e2e_chunk, name="e2e"),
            a,
            b,
            lambda r: [str(int(i)) for i in r],
            mesh,
            cfg,
            StepCache(tmp),
            ckpt_root=os.path.join(tmp, "ckpt"),
            stage=lambda label: marks.append((label, time.perf_counter())),
        )
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts = {}
    stamps = [("setup", t0)] + marks + [("end", t0 + seconds)]
    for (label, t), (_, t_next) in zip(stamps[:-1], stamps[1:]):
        parts[label.replace("e2e: ", "")] = t_next - t
    compile_s = events.get("/jax/core/compile/backend_compile_duration", 0.0)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "parts": parts,
        "compile_seconds": compile_s,
        "compiles": events.get("/jax/core/compile/backend_compile_duration:count", 0),
        "jaxpr_trace_seconds": events.get("/jax/core/compile/jaxpr_trace_duration", 0.0),
        "cache_hits": events.get("/jax/compilation_cache/cache_hits:count", 0),
        "cache_misses": events.get("/jax/compilation_cache/cache_misses:count", 0),
        "cache_retrieval_seconds": events.get(
            "/jax/compilation_cache/cache_retrieval_time_sec", 0.0
        ),
        "result": {
            "n_pairs": res.n_pairs,
            **{
                m: {"score": v.score, "null_mean": v.null_mean, "p": v.p}
                for m, v in res.metrics.items()
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# The orchestrator: interleaved subprocesses.
# ---------------------------------------------------------------------------------------------


def _one(role: str, cache_dir: str = "") -> dict:
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_e2e",
        f"--e2e_role={role}",
        f"--threads={FLAGS.threads}",
        f"--e2e_tokens={FLAGS.e2e_tokens}",
        f"--e2e_features={FLAGS.e2e_features}",
        f"--e2e_d_in={FLAGS.e2e_d_in}",
        f"--e2e_k={FLAGS.e2e_k}",
        f"--e2e_perms={FLAGS.e2e_perms}",
        f"--e2e_chunk={FLAGS.e2e_chunk}",
        f"--e2e_cache_dir={cache_dir}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("E2E_JSON ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"bench_e2e: {role} repetition failed (rc {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    doc = json.loads(lines[-1][len("E2E_JSON ") :])
    doc["process_wall_s"] = wall
    return doc


def main(argv):
    del argv
    if FLAGS.e2e_role:
        _role_main()
        return
    import statistics

    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    cache = tempfile.mkdtemp(prefix="speed_e2e_cache_")
    runs: dict[str, list[dict]] = {"script": [], "pipeline_cold": [], "pipeline_warm": []}
    try:
        for _ in range(FLAGS.repeats):
            # cold: an empty cache (every program compiled and stored); warm: the next process
            # with the same shapes (another comparison, grid cell or run) loads them.
            shutil.rmtree(cache, ignore_errors=True)
            for kind, role, where in (
                ("script", "script", ""),
                ("pipeline_cold", "pipeline", cache),
                ("pipeline_warm", "pipeline", cache),
            ):
                runs[kind].append(_one(role, where))
                r = runs[kind][-1]
                print(
                    f"{kind}: {r['seconds']:.1f} s (load {r['load_before']:.1f}->"
                    f"{r['load_after']:.1f}) {json.dumps(r.get('parts', {}), default=float)}",
                    flush=True,
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    def med(kind, key="seconds"):
        return statistics.median(r[key] for r in runs[kind])

    size = (
        f"{FLAGS.e2e_features}x{FLAGS.e2e_features} TopK k={FLAGS.e2e_k}, "
        f"{FLAGS.e2e_tokens} tokens, 3 metrics x {FLAGS.e2e_perms} shuffles"
    )
    results = []
    for kind in ("pipeline_cold", "pipeline_warm"):
        c, b = med(kind), med("script")
        results.append(
            {
                "name": f"comparison end to end ({kind.split('_')[1]} compile cache) vs script: "
                f"{size}",
                "candidate_s": [r["seconds"] for r in runs[kind]],
                "baseline_s": [r["seconds"] for r in runs["script"]],
                "candidate_median_s": c,
                "baseline_median_s": b,
                "speedup": b / c,
                "goal_speedup": 1.0,
                "candidate_cpu_s": [r["cpu_seconds"] for r in runs[kind]],
                "baseline_cpu_s": [r["cpu_seconds"] for r in runs["script"]],
                "candidate_compile_s": [r["compile_seconds"] for r in runs[kind]],
                "candidate_compiles": [r["compiles"] for r in runs[kind]],
                "candidate_cache_hits": [r["cache_hits"] for r in runs[kind]],
                "candidate_parts_s": [r["parts"] for r in runs[kind]],
                "candidate_process_wall_s": [r["process_wall_s"] for r in runs[kind]],
                "baseline_process_wall_s": [r["process_wall_s"] for r in runs["script"]],
                "load": [(r["load_before"], r["load_after"]) for r in runs[kind] + runs["script"]],
                "candidate_result": runs[kind][-1]["result"],
                "baseline_result": runs["script"][-1]["result"],
                "threads": budget,
            }
        )
    for r in results:
        print(
            f"{r['name']}\n   pipeline {r['candidate_s']} s (compile "
            f"{r['candidate_compile_s']}, parts {r['candidate_parts_s'][-1]})\n   script   "
            f"{r['baseline_s']} s  -> ratio {r['speedup']:.2f}x"
        )
    bench.report(results, common.bench_out("e2e"))


if __name__ == "__main__":
    app.run(main)

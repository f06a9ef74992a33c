"""Benchmark: the sparse TopK SAE primitives, native CPU kernels against XLA and PyTorch.

For each op of `engine.sparse_ops` -- ``topk`` (of the ``[batch, d_sae]`` pre-activations),
``gather_dot`` (``[batch, k]`` dot products with gathered encoder rows), ``gather_combine``
(sparse decode) and ``scatter_outer`` (the table gradient of both) -- and ``sae_grad`` (the
loss and gradient of a TopK SAE on one batch through all of them: GEMM, top-k, gather-dot
encode, gather-combine decode, their VJPs; torch: dense autograd with ``torch.topk``, as
experiments/bench_sae.py's baseline) -- two interleaved
comparisons (engine.bench: same thread budget, warm-up excluded, medians):

1. ``<op>/<size>/native_vs_xla``: the native kernel (``native=True``) against the XLA path
   (``native=False``: ``jax.lax.top_k`` and the slot-scans of the sparse path).
2. ``<op>/<size>/native_vs_torch``: the native kernel against the plain PyTorch equivalent
   (``torch.topk``; gather + einsum; gather + einsum; ``index_add_`` of the outer products).

Peer and why: PyTorch's CPU ops are what SAELens / Gao et al.'s reference code call for the
same step, on the same BLAS and threads.

Sizes: ``small`` = d_in 384, d_sae 1536, k 16, batch 1024 (the sweep's SAEs); ``big`` =
d_in 384, d_sae 16384, k 32, batch 4096; ``tiny`` = the suite's smoke scale. Before timing,
the native result is checked against the XLA one (max |difference| recorded in the JSON).

Run (writes JSON, prints ratios)::

    python -m experiments.bench_sparse_ops --threads=2 --out=runs/bench/sparse_ops.json
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
common.define_bench_flags()
flags.DEFINE_list("so_sizes", ["small", "big"], "Sizes to run (tiny, small, big).")

SIZES = {
    "tiny": dict(d_in=32, d_sae=256, k=4, batch=64),  # the suite's smoke scale
    "small": dict(d_in=384, d_sae=1536, k=16, batch=1024),
    "big": dict(d_in=384, d_sae=16384, k=32, batch=4096),
}
OPS = ("topk", "gather_dot", "gather_combine", "scatter_outer", "sae_grad")


def main(argv=None) -> None:
    """absl entry: runs the benchmark (its exit code must not be the JSON document)."""
    del argv
    run_bench()


def run_bench() -> dict:
    """Runs every comparison; returns the JSON document it writes."""
    args = FLAGS
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from engine import bench

    budget = bench.set_thread_budget(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    from engine import kernels, sparse_ops

    if not kernels.available("topk"):
        raise SystemExit("bench_sparse_ops: native kernels unavailable (see the log)")
    ops = common.bench_sections(OPS)
    unknown = [s for s in args.so_sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--so_sizes: unknown {unknown}; expected some of {list(SIZES)}")

    results = []
    for size in args.so_sizes:
        p = SIZES[size]
        d_in, n, k, rows = p["d_in"], p["d_sae"], p["k"], p["batch"]
        rng = np.random.default_rng(0)
        pre = rng.normal(size=(rows, n)).astype(np.float32)
        table = (rng.normal(size=(n, d_in)) / np.sqrt(d_in)).astype(np.float32)
        vecs = rng.normal(size=(rows, d_in)).astype(np.float32)
        coef = np.abs(rng.normal(size=(rows, k))).astype(np.float32)
        # TopK-like ids: k distinct features per row.
        idx = np.argsort(rng.random((rows, n)), axis=1)[:, :k].astype(np.int32)
        j = {name: jnp.asarray(a) for name, a in dict(pre=pre, t=table, v=vecs, c=coef).items()}
        j["i"] = jnp.asarray(idx)
        t = {
            name: torch.from_numpy(a) for name, a in dict(pre=pre, t=table, v=vecs, c=coef).items()
        }
        t["i"] = torch.from_numpy(idx.astype(np.int64))

        w_enc = jnp.asarray(table.T.copy())
        b_enc = jnp.zeros((n,), jnp.float32)

        def sae_loss(we, be, wd, x, native):
            pre = jax.lax.stop_gradient(x @ we + be)
            _, i = sparse_ops.top_k(pre, k, native=native)
            vals = sparse_ops.gather_dot(we.T, x, i, native=native) + jnp.take(be, i)
            recon = sparse_ops.gather_combine(wd, jax.nn.relu(vals), i, native=native)
            return jnp.mean(jnp.sum((x - recon) ** 2, axis=-1))

        def jax_fn(op, native):
            if op == "sae_grad":
                g = jax.jit(jax.value_and_grad(sae_loss, argnums=(0, 1, 2)), static_argnums=4)
                return lambda: g(w_enc, b_enc, j["t"], j["v"], native)
            if op == "topk":
                f = jax.jit(lambda x: sparse_ops.top_k(x, k, native=native))
                return lambda: f(j["pre"])
            if op == "gather_dot":
                f = jax.jit(lambda a, b, c: sparse_ops.gather_dot(a, b, c, native=native))
                return lambda: f(j["t"], j["v"], j["i"])
            if op == "gather_combine":
                f = jax.jit(lambda a, b, c: sparse_ops.gather_combine(a, b, c, native=native))
                return lambda: f(j["t"], j["c"], j["i"])
            f = jax.jit(lambda a, b, c: sparse_ops.scatter_outer(a, b, c, n, native=native))
            return lambda: f(j["c"], j["v"], j["i"])

        tw_enc = torch.tensor(table.T.copy(), requires_grad=True)
        tb_enc = torch.zeros(n, requires_grad=True)
        tw_dec = torch.tensor(table, requires_grad=True)

        def torch_sae_grad():
            pre = t["v"] @ tw_enc + tb_enc
            vals, i = torch.topk(pre, k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, i, torch.relu(vals))
            loss = (t["v"] - f @ tw_dec).pow(2).sum(-1).mean()
            return torch.autograd.grad(loss, (tw_enc, tb_enc, tw_dec))

        def torch_fn(op):
            if op == "sae_grad":
                return torch_sae_grad
            if op == "topk":
                return lambda: torch.topk(t["pre"], k, dim=-1)
            if op == "gather_dot":
                return lambda: torch.einsum("rkd,rd->rk", t["t"][t["i"]], t["v"])
            if op == "gather_combine":
                return lambda: torch.einsum("rk,rkd->rd", t["c"], t["t"][t["i"]])

            def scatter():
                prod = (t["c"][:, :, None] * t["v"][:, None, :]).reshape(-1, d_in)
                out = torch.zeros(n, d_in)
                return out.index_add_(0, t["i"].reshape(-1), prod)

            return scatter

        for op in ops:
            nat, xla, tor = jax_fn(op, True), jax_fn(op, False), torch_fn(op)
            a, b = nat(), xla()
            if op == "sae_grad":
                check = {
                    "max_abs_grad_diff_vs_xla": max(
                        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                        for x, y in zip(a[1], b[1])
                    )
                }
            elif op == "topk":
                exact = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
                check = {"bit_identical_to_xla": exact}
            else:
                check = {"max_abs_diff_vs_xla": float(np.max(np.abs(np.asarray(a - b))))}
            for base_name, base in (("xla", xla), ("torch", tor)):
                r = bench.compare(
                    nat,
                    base,
                    repeats=args.repeats,
                    warmup=2,
                    name=f"{op}/{size}/native_vs_{base_name}",
                )
                r.update(size=p, **check)
                results.append(r)
    doc = bench.report(results, common.bench_out("sparse_ops"))
    doc["budget"] = budget
    return doc


if __name__ == "__main__":
    app.run(main)

"""Benchmark: TopK SAE training tokens/s, JAX (this project) against PyTorch, same machine, run.

Four interleaved comparisons (engine.bench: same thread budget, warm-up excluded, medians):

1. ``train_step``: one TopK SAE optimisation step (d_in 512, d_sae 16384, k 32, batch 4096 by
   default) -- models/sae_train.py (sparse TopK encoder backward and decoder, Adam, decoder
   gradient projection and renormalisation, dead-latent counters) against a plain PyTorch
   implementation of the same SAE and optimiser (dense autograd, as SAELens' TopK trainer
   does; SAELens itself is not installed here). Goal: >= 1.5x tokens/s.
2. ``dense_vs_torch``: the JAX step with the dense path against the same torch baseline: the
   framework alone, without the sparse algorithm (no goal; reported for honesty).
3. ``sparse_vs_dense_step``: the same JAX step with the sparse TopK path against the dense one
   (``decode="dense"``). Goal: >= 2x at d_sae >= 16k.
4. ``decode_fwd_bwd``: the decoder alone, forward + backward: `models.sae.gather_combine`
   against scatter-to-dense + matmul.

Peer and why: the plain PyTorch step (dense autograd through ``torch.topk``, torch.optim.Adam)
is the strongest simple one: it is how SAELens and Gao et al.'s reference code train TopK
SAEs, runs on the same BLAS, and has no Python per-latent work.

Before timing, one step of each implementation from the same initial weights is compared
(max |difference| of the updated parameters is written to the JSON) so the baseline is the
same computation. AuxK runs only when a latent is dead (10M tokens by default, as Gao et al.),
so neither side pays for it in these few steps.

Run (writes JSON, prints ratios)::

    python -m experiments.bench_sae --out=runs/bench/sae.json --threads=2

``--bs_scale=0.25`` divides batch and d_sae by 4 for a quick check (recorded in the JSON).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
common.define_bench_flags()
flags.DEFINE_integer("bs_d_in", 512, "SAE input width.")
flags.DEFINE_integer("bs_d_sae", 16384, "SAE latents.")
flags.DEFINE_integer("bs_k", 32, "TopK k.")
flags.DEFINE_integer("bs_batch", 4096, "Rows per step.")
flags.DEFINE_float("bs_scale", 1.0, "Multiply batch and d_sae by this (quick runs).")
flags.DEFINE_integer("bs_steps_per_call", 2, "Steps timed per call (both sides).")
flags.DEFINE_string(
    "bs_torch_device",
    "cpu",
    "Device of the PyTorch baseline (cuda on GPU machines: the plain PyTorch CUDA step, issue 18).",
)
flags.DEFINE_list(
    "bs_skip",
    [],
    "Comparisons to skip (train_step, dense_vs_torch, sparse_vs_dense_step, decode_fwd_bwd).",
)


def torch_topk_sae(torch, w_dec, b_dec, k, lr, eps, device="cpu"):
    """The plain PyTorch TopK SAE + Adam step (the baseline); returns ``(params, step)``."""
    W_dec = torch.nn.Parameter(torch.tensor(w_dec, device=device))
    W_enc = torch.nn.Parameter(torch.tensor(w_dec.T.copy(), device=device))
    b_enc = torch.nn.Parameter(torch.zeros(w_dec.shape[0], device=device))
    b_dec_p = torch.nn.Parameter(torch.tensor(b_dec, device=device))
    params = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec_p}
    opt = torch.optim.Adam(list(params.values()), lr=lr, eps=eps)
    since_fired = torch.zeros(w_dec.shape[0], dtype=torch.int64, device=device)

    def step(x):
        pre = (x - b_dec_p) @ W_enc + b_enc
        vals, idx = torch.topk(pre, k, dim=-1)
        vals = torch.relu(vals)
        f = torch.zeros_like(pre).scatter(-1, idx, vals)
        x_hat = f @ W_dec + b_dec_p
        loss = (x - x_hat).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Unit-norm decoder rows: remove the gradient along each row, renormalise after.
            g = W_dec.grad
            g -= (g * W_dec).sum(-1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))
            fired = torch.zeros_like(since_fired, dtype=torch.bool)
            fired[idx.reshape(-1)[vals.reshape(-1) > 0]] = True
            since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        return loss.detach()

    return params, step


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

    from engine import mesh as mesh_lib
    from models import sae as sae_lib
    from models import sae_train

    d_in, k = args.bs_d_in, args.bs_k
    d_sae = int(round(args.bs_d_sae * args.bs_scale))
    batch = int(round(args.bs_batch * args.bs_scale))
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    # Activation-like data: a few strong directions plus noise, already at norm ~sqrt(d_in).
    x = (
        rng.normal(size=(batch, d_in)) + rng.normal(size=(batch, 8)) @ rng.normal(size=(8, d_in))
    ).astype(np.float32)
    x *= np.sqrt(d_in) / np.mean(np.linalg.norm(x, axis=1))
    skip = set(args.bs_skip)

    def jax_program(decode):
        cfg = sae_train.TrainConfig(
            d_sae=d_sae,
            activation="topk",
            k=k,
            lr=1e-4,
            decode=decode,
            normalize_input=False,
            b_dec_init="mean",
        )
        program = sae_train.SweepProgram([cfg], d_in, 10**6, mesh)
        state = mesh_lib.replicate(mesh, program.init_state(x[:2048]), copy=True)
        return program, state

    def runner(program, state):
        fn = program.step_fn()
        xb = mesh_lib.shard_batch(mesh, x)
        holder = {"state": state}

        def call():
            s = holder["state"]
            for _ in range(args.bs_steps_per_call):
                s, m = fn(s, xb)
            holder["state"] = s
            return m["loss"]

        return call, holder

    results = []
    meta = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch": batch,
        "scale": args.bs_scale,
        "steps_per_call": args.bs_steps_per_call,
        "thread_budget": budget,
        "sparse_auto": sae_lib.prefer_sparse(d_sae, k),
    }
    tokens = batch * args.bs_steps_per_call

    sparse_prog, sparse_state = jax_program("sparse")
    # -- same computation check: one step of JAX (sparse) vs torch from the same weights ----
    export = sae_train.SweepProgram.export_params
    p0 = export(jax.device_get(jax.tree.map(lambda a: a[0], sparse_state.params["sae"])))
    tdev = args.bs_torch_device
    tparams, tstep = torch_topk_sae(
        torch, np.asarray(p0["W_dec"]), np.asarray(p0["b_dec"]), k, 1e-4, 6.25e-10, device=tdev
    )
    xt = torch.from_numpy(x).to(tdev)
    meta["torch_device"] = tdev
    check_state = mesh_lib.replicate(mesh, sparse_state, copy=True)
    check_state, m = sparse_prog.step_fn()(check_state, mesh_lib.shard_batch(mesh, x))
    t_loss = float(tstep(xt))
    p1 = export(jax.device_get(jax.tree.map(lambda a: a[0], check_state.params["sae"])))
    # Adam's first step is lr * g / (|g| + eps): entries with near-zero gradients move by
    # +-lr whatever their size, so rounding can flip a few; the relative difference of the
    # whole update is the meaningful number.
    check = {"loss_jax": float(m["loss"]), "loss_torch": t_loss}
    for name in tparams:
        a = np.asarray(p1[name], np.float64)
        b = tparams[name].detach().cpu().numpy().astype(np.float64)
        start = np.asarray(p0[name], np.float64)
        check[name] = {
            "max_abs_diff": float(np.max(np.abs(a - b))),
            "update_rel_diff": float(np.linalg.norm(a - b) / max(np.linalg.norm(b - start), 1e-30)),
        }
    meta["one_step_check_jax_vs_torch"] = check
    print("one step, JAX vs torch:", check)
    del check_state

    if "train_step" not in skip:
        jax_call, _ = runner(sparse_prog, sparse_state)

        def torch_call():
            with torch.enable_grad():
                for _ in range(args.bs_steps_per_call):
                    loss = tstep(xt)
            if tdev != "cpu":
                torch.cuda.synchronize()  # CUDA is asynchronous, like JAX's dispatch
            return loss

        r = bench.compare(
            jax_call,
            torch_call,
            repeats=args.repeats,
            warmup=1,
            name="train_step jax(sparse) vs torch",
            work=tokens,
            work_unit="tokens",
        )
        r["goal"] = 1.5
        results.append(r)

    if "dense_vs_torch" not in skip and "train_step" not in skip:
        # The framework alone: the same dense algorithm in JAX against torch.
        dense_prog, dense_state = jax_program("dense")
        dense_call, _ = runner(dense_prog, dense_state)
        r = bench.compare(
            dense_call,
            torch_call,
            repeats=args.repeats,
            warmup=1,
            name="train_step jax(dense) vs torch",
            work=tokens,
            work_unit="tokens",
        )
        r["goal"] = None
        results.append(r)
        del dense_state
    tparams = tstep = None

    if "sparse_vs_dense_step" not in skip:
        dense_prog, dense_state = jax_program("dense")
        sp_prog2, sp_state2 = jax_program("sparse")
        sparse_call, _ = runner(sp_prog2, sp_state2)
        dense_call, _ = runner(dense_prog, dense_state)
        r = bench.compare(
            sparse_call,
            dense_call,
            repeats=args.repeats,
            warmup=1,
            name="train_step jax sparse vs dense",
            work=tokens,
            work_unit="tokens",
        )
        r["goal"] = 2.0
        results.append(r)
        del dense_state, sp_state2

    if "decode_fwd_bwd" not in skip:
        w_dec = jnp.asarray(rng.normal(size=(d_sae, d_in)).astype(np.float32))
        vals, idx = jax.lax.top_k(jnp.asarray(rng.normal(size=(batch, d_sae)), jnp.float32), k)
        target = jnp.asarray(x)

        def sparse_loss(w, v):
            return jnp.sum((sae_lib.gather_combine(w, v, idx) - target) ** 2)

        def dense_loss(w, v):
            return jnp.sum((sae_lib.scatter_rows(v, idx, d_sae) @ w - target) ** 2)

        gs = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))
        gd = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
        r = bench.compare(
            lambda: gs(w_dec, vals),
            lambda: gd(w_dec, vals),
            repeats=args.repeats + 2,
            warmup=1,
            name="decode fwd+bwd sparse vs dense",
            work=batch,
            work_unit="tokens",
        )
        r["goal"] = 2.0
        results.append(r)

    doc = bench.report(results, None)
    doc["config"] = meta
    out = common.bench_out("sae")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from engine import metrics_io

    metrics_io.write_json(out, doc)
    print(f"wrote {out}")
    for r in results:
        goal = f" (goal {r['goal']}x)" if r["goal"] else ""
        print(f"{r['name']}: {r['speedup']:.2f}x{goal}")
    return doc


if __name__ == "__main__":
    app.run(main)

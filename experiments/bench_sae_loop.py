"""Benchmark: the pipeline's SAE training loop, data loading included, against a plain
PyTorch loop on in-memory data (issue 13: goal >= 1.5x that loop).

Interleaved in one process with one thread budget (engine.bench), each call trains
``--steps`` steps of a TopK SAE (d_in 384, 1536 latents, k 16, batch 1024 by default):

* ``torch_loop``: the baseline: a shuffled in-memory tensor, ``data[perm[i:i+B]]`` per step,
  the TopK SAE + Adam step of experiments/bench_sae.py (dense autograd, unit-norm decoder).
* ``train_saes_memory``: `models.sae_train.train_saes` on the in-memory array (ChunkStream
  shuffling, host-to-device copies, metrics every 100 steps, initialisation included).
* ``train_saes_stream``: the same from an activation source through the bounded shuffle
  buffer (`sae_train.source_stream`: what a cache-fed run does, minus the disk).
* ``bare_step``: the jitted step alone on one device-resident batch (the ceiling).

Peer and why: ``torch_loop`` is the strongest simple loop: data already in memory as one
tensor (no reader, no shuffle buffer), one fancy-index gather per step, the same plain PyTorch
step as `experiments.bench_sae`; anything simpler does more work per step.

Run::

    python -m experiments.bench_sae_loop --threads=2 --out=runs/bench/sae_loop.json

Flags: the shared ``--threads --repeats --out`` (`experiments.common.define_bench_flags`) and
this bench's ``--bsl_*`` sizes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("bsl_d_in", 384, "Input width.")
flags.DEFINE_integer("bsl_d_sae", 1536, "SAE latents.")
flags.DEFINE_integer("bsl_k", 16, "TopK k.")
flags.DEFINE_integer("bsl_batch", 1024, "Rows per step.")
flags.DEFINE_integer("bsl_rows", 1 << 16, "Rows of the in-memory data.")
flags.DEFINE_integer("bsl_steps", 100, "Training steps per timed call.")
common.define_bench_flags()


def main(argv) -> None:
    del argv
    args = FLAGS
    out = common.bench_out("sae_loop")
    from engine import bench

    budget = bench.set_thread_budget(args.threads)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    from engine import mesh as mesh_lib
    from experiments.bench_sae import torch_topk_sae
    from models import activation_source as asrc
    from models import sae_train

    d_in, k, batch, steps = args.bsl_d_in, args.bsl_k, args.bsl_batch, args.bsl_steps
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    data = (
        rng.normal(size=(args.bsl_rows, d_in))
        + rng.normal(size=(args.bsl_rows, 8)) @ rng.normal(size=(8, d_in))
    ).astype(np.float32)
    data *= np.sqrt(d_in) / np.mean(np.linalg.norm(data, axis=1))
    cfg = sae_train.TrainConfig(
        d_sae=args.bsl_d_sae, activation="topk", k=k, lr=1e-4, b_dec_init="mean"
    )
    source = asrc.ArraySource(np.arange(args.bsl_rows), data)

    # -- baseline: plain PyTorch loop on in-memory data --------------------------------------
    w0 = rng.normal(size=(args.bsl_d_sae, d_in)).astype(np.float32)
    w0 /= np.linalg.norm(w0, axis=1, keepdims=True)
    _, tstep = torch_topk_sae(torch, w0, data.mean(0), k, 1e-4, 6.25e-10)
    tdata = torch.from_numpy(data)
    pos = {"i": 0, "perm": torch.randperm(args.bsl_rows)}

    def torch_loop():
        loss = None
        for _ in range(steps):
            i = pos["i"]
            if i + batch > args.bsl_rows:
                pos["i"], pos["perm"], i = 0, torch.randperm(args.bsl_rows), 0
            loss = tstep(tdata[pos["perm"][i : i + batch]])
            pos["i"] = i + batch
        return float(loss)

    def memory_run():
        return sae_train.train_saes(data, cfg, steps=steps, batch_size=batch, mesh=mesh)

    def stream_run():
        return sae_train.train_saes(
            source,
            cfg,
            steps=steps,
            batch_size=batch,
            mesh=mesh,
            shuffle_buffer=1 << 15,
            shuffle_block=1024,
        )

    program = sae_train.SweepProgram([cfg], d_in, 10**6, mesh)
    state0 = program.init_state(data[:4096])
    fn = program.step_fn()
    xb = mesh_lib.shard_batch(mesh, data[:batch])
    holder = {"s": mesh_lib.replicate(mesh, state0, copy=True)}

    def bare():
        s = holder["s"]
        for _ in range(steps):
            s, m = fn(s, xb)
        holder["s"] = s
        return m["loss"]

    tokens = steps * batch
    results = []
    for name, cand in (
        ("train_saes_memory", memory_run),
        ("train_saes_stream", stream_run),
        ("bare_step", bare),
    ):
        r = bench.compare(
            cand,
            torch_loop,
            repeats=args.repeats,
            warmup=1,
            name=f"{name} vs torch_loop",
            work=tokens,
            work_unit="tokens",
        )
        r["candidate_steps_per_s"] = steps / r["candidate_median_s"]
        r["baseline_steps_per_s"] = steps / r["baseline_median_s"]
        results.append(r)
        print(
            f"{name}: {r['candidate_steps_per_s']:.1f} steps/s, torch loop "
            f"{r['baseline_steps_per_s']:.1f} steps/s, ratio {r['speedup']:.2f}x",
            flush=True,
        )
    doc = bench.report(results, out)
    doc["meta"] = {
        "d_in": d_in,
        "d_sae": args.bsl_d_sae,
        "k": k,
        "batch": batch,
        "steps_per_call": steps,
        "thread_budget": budget,
        "load_average": os.getloadavg(),
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)

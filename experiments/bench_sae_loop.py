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

Run::

    python -m experiments.bench_sae_loop --threads=2 --out=runs/bench_sae_loop.json
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_in", type=int, default=384)
    p.add_argument("--d_sae", type=int, default=1536)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rows", type=int, default=1 << 16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_sae_loop/bench.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

    d_in, k, batch, steps = args.d_in, args.k, args.batch, args.steps
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(args.rows, d_in)) + rng.normal(size=(args.rows, 8)) @
            rng.normal(size=(8, d_in))).astype(np.float32)
    data *= np.sqrt(d_in) / np.mean(np.linalg.norm(data, axis=1))
    cfg = sae_train.TrainConfig(d_sae=args.d_sae, activation="topk", k=k, lr=1e-4,
                                b_dec_init="mean")
    source = asrc.ArraySource(np.arange(args.rows), data)

    # -- baseline: plain PyTorch loop on in-memory data --------------------------------------
    w0 = rng.normal(size=(args.d_sae, d_in)).astype(np.float32)
    w0 /= np.linalg.norm(w0, axis=1, keepdims=True)
    _, tstep = torch_topk_sae(torch, w0, data.mean(0), k, 1e-4, 6.25e-10)
    tdata = torch.from_numpy(data)
    pos = {"i": 0, "perm": torch.randperm(args.rows)}

    def torch_loop():
        loss = None
        for _ in range(steps):
            i = pos["i"]
            if i + batch > args.rows:
                pos["i"], pos["perm"], i = 0, torch.randperm(args.rows), 0
            loss = tstep(tdata[pos["perm"][i:i + batch]])
            pos["i"] = i + batch
        return float(loss)

    def memory_run():
        return sae_train.train_saes(data, cfg, steps=steps, batch_size=batch, mesh=mesh)

    def stream_run():
        return sae_train.train_saes(source, cfg, steps=steps, batch_size=batch, mesh=mesh,
                                    shuffle_buffer=1 << 15, shuffle_block=1024)

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
    for name, cand in (("train_saes_memory", memory_run), ("train_saes_stream", stream_run),
                       ("bare_step", bare)):
        r = bench.compare(cand, torch_loop, repeats=args.repeats, warmup=1,
                          name=f"{name} vs torch_loop", work=tokens, work_unit="tokens")
        r["candidate_steps_per_s"] = steps / r["candidate_median_s"]
        r["baseline_steps_per_s"] = steps / r["baseline_median_s"]
        results.append(r)
        print(f"{name}: {r['candidate_steps_per_s']:.1f} steps/s, torch loop "
              f"{r['baseline_steps_per_s']:.1f} steps/s, ratio {r['speedup']:.2f}x",
              flush=True)
    doc = bench.report(results, args.out)
    doc["meta"] = {"d_in": d_in, "d_sae": args.d_sae, "k": k, "batch": batch,
                   "steps_per_call": steps, "thread_budget": budget,
                   "load_average": os.getloadavg()}
    import json
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    return doc


if __name__ == "__main__":
    main()

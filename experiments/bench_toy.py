"""Benchmark: many-instance toy-model training here vs the PyTorch way (ARENA / the notebook).

Shapes of the issue: 1000 instances, 20 -> 5, batch 1024 (ReLU model, importance 0.9^i,
sparsity spread over the instances). The paper trains 10k steps; each timed repetition here
runs ``--bt_steps`` steps (default 20, i.e. the 10k-step run scaled down 500x; the steps/s and
the ratio are what is compared, and the projected 10k-step times are reported).

* candidate: `models.toy` (one jitted `lax.scan` of ``--bt_steps`` AdamW steps over all
  instances, the instance axis sharded over the mesh, hashed one-uniform data).
* baseline ``torch_arena``: PyTorch with the instance dimension inside the weight tensors
  (``W [I, n, m]``, ``b [I, n]``), data drawn the way the notebook and ARENA do it (one
  ``torch.rand`` for values, one for the on/off mask), einsum forward, ``torch.optim.AdamW``
  (lr 1e-3).
* baseline ``torch_one_uniform`` (``--bt_torch_one_uniform``): the same PyTorch code with this
  project's one-uniform data trick, to show how much of the speed-up is the data generator and
  how much is XLA's fused program.

Peer and why: ``torch_arena`` is the strongest simple implementation we know: the instance
axis inside the weights (one batched einsum for all instances instead of a Python loop over
models, as ARENA's solution does), fused AdamW, the notebook's data generator.

Both sides get the same thread budget (``--threads``, recorded) and alternate repetitions
(engine.bench.compare). Before timing, the two implementations are checked to compute the same
loss on the same W, b and batch (``same_model_max_abs_diff``). Run::

    python -m experiments.bench_toy --out=runs/bench/toy.json
"""

from __future__ import annotations

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("bt_instances", 1000, "Toy-model instances trained together.")
flags.DEFINE_integer("bt_n_features", 20, "n.")
flags.DEFINE_integer("bt_n_hidden", 5, "m.")
flags.DEFINE_integer("bt_batch_size", 1024, "Samples per instance per step.")
flags.DEFINE_integer("bt_steps", 20, "Training steps per timed repetition (10k scaled down).")
flags.DEFINE_bool("bt_torch_one_uniform", True, "Also time the one-uniform PyTorch variant.")
common.define_bench_flags()


def _torch_trainer(
    instances: int, n: int, m: int, batch: int, importance, sparsity, one_uniform: bool
):
    """ARENA-style batched-instance training in PyTorch; returns ``run(steps) -> loss``."""
    import torch

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.empty(instances, n, m))
    torch.nn.init.xavier_normal_(W)
    b = torch.nn.Parameter(torch.zeros(instances, n))
    imp = torch.as_tensor(importance, dtype=torch.float32)  # [I, n]
    s = torch.as_tensor(sparsity, dtype=torch.float32)  # [I, n]
    opt = torch.optim.AdamW([W, b], lr=1e-3)

    def data():
        if one_uniform:
            u = torch.rand(instances, batch, n)
            ss = s[:, None, :]
            return torch.where(u >= ss, (u - ss) / (1 - ss), torch.zeros(()))
        values = torch.rand(instances, batch, n)
        on = torch.rand(instances, batch, n) <= (1 - s)[:, None, :]
        return torch.where(on, values, torch.zeros(()))

    def run(steps: int):
        loss = None
        for _ in range(steps):
            x = data()
            h = torch.einsum("ibn,inm->ibm", x, W)
            out = torch.relu(torch.einsum("ibm,inm->ibn", h, W) + b[:, None, :])
            loss = (imp[:, None, :] * (x - out) ** 2).sum(-1).mean(-1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach()

    return run


def _same_model_check(importance, n: int, m: int) -> float:
    """Loss of both implementations on the same W, b and batch (max abs difference)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from models import toy

    rng = np.random.default_rng(0)
    W = rng.normal(size=(m, n)).astype(np.float32)
    b = rng.normal(scale=0.1, size=n).astype(np.float32)
    x = (rng.uniform(size=(64, n)) * (rng.uniform(size=(64, n)) > 0.5)).astype(np.float32)
    imp = np.asarray(importance[0], np.float32)
    ours = float(
        toy.instance_loss(
            toy.ToyParams(W=jnp.asarray(W), b=jnp.asarray(b)), jnp.asarray(x), jnp.asarray(imp)
        )
    )
    Wt = torch.as_tensor(W.T.copy())[None]  # [1, n, m]
    xt = torch.as_tensor(x)[None]
    h = torch.einsum("ibn,inm->ibm", xt, Wt)
    out = torch.relu(torch.einsum("ibm,inm->ibn", h, Wt) + torch.as_tensor(b)[None, None])
    theirs = float((torch.as_tensor(imp) * (xt - out) ** 2).sum(-1).mean(-1).sum())
    return abs(ours - theirs)


def main(argv):
    del argv
    from engine import bench

    budget = bench.set_thread_budget(FLAGS.threads)
    import numpy as np
    import torch

    torch.set_num_threads(FLAGS.threads)

    from engine import mesh as mesh_lib
    from models import toy

    I, n, m, B, K = (
        FLAGS.bt_instances,
        FLAGS.bt_n_features,
        FLAGS.bt_n_hidden,
        FLAGS.bt_batch_size,
        FLAGS.bt_steps,
    )
    importance = np.broadcast_to(0.9 ** np.arange(n), (I, n)).astype(np.float32)
    sparsity = np.broadcast_to(np.linspace(0.0, 0.99, I)[:, None], (I, n)).astype(np.float32)
    config = toy.ToyConfig(n, m, batch_size=B, lr=1e-3)
    instances = toy.make_instances(n, sparsity=sparsity, importance=importance)
    mesh = mesh_lib.make_mesh()
    sweep = toy.Sweep(config, instances, mesh)

    def candidate():
        return sweep.advance(K)

    diff = _same_model_check(importance, n, m)
    results = []
    variants = [("torch_arena", False)] + (
        [("torch_one_uniform", True)] if FLAGS.bt_torch_one_uniform else []
    )
    for name, one_uniform in variants:
        trainer = _torch_trainer(I, n, m, B, importance, sparsity, one_uniform)
        r = bench.compare(
            candidate,
            lambda: trainer(K),
            repeats=FLAGS.repeats,
            warmup=1,
            name=f"toy {I}x{n}->{m} b{B}, {K} steps: jax vs {name}",
            work=K,
            work_unit="steps",
        )
        r.update(
            {
                "baseline": name,
                "instances": I,
                "n_features": n,
                "n_hidden": m,
                "batch_size": B,
                "steps_per_repeat": K,
                "goal_speedup": 3.0,
                "projected_10k_steps_candidate_s": 1e4 * r["candidate_median_s"] / K,
                "projected_10k_steps_baseline_s": 1e4 * r["baseline_median_s"] / K,
                "same_model_max_abs_diff": diff,
                "thread_budget": budget,
                "devices": int(mesh.size),
            }
        )
        results.append(r)
        print(
            f"{name}: jax {r['candidate_steps_per_s']:.2f} steps/s, torch "
            f"{r['baseline_steps_per_s']:.2f} steps/s, speedup {r['speedup']:.2f}x "
            f"(goal >= 3x)"
        )
    bench.report(results, common.bench_out("toy"))


if __name__ == "__main__":
    app.run(main)

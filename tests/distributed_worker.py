"""One process of the 2-process test (tests/test_distributed.py), and the shared workload.

Run as ``python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``: it sets
2 CPU devices and gloo collectives, calls `jax.distributed.initialize`, runs `workload` on a
mesh over every process's devices and `harvest_workload` (each process harvests its shards
of the same contexts into one cache), and process 0 writes ``OUT_DIR/result.npz``.
"""

import os
import sys

import numpy as np

D, ROWS = 8, 384
METRICS = ("svcca", "pwcca", "cka", "rsa_spearman", "procrustes", "mutual_knn")


def data():
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((ROWS, D)).astype(np.float32)
    xb = (
        xa @ (np.eye(D) + 0.3 * rng.standard_normal((D, D))) + 0.2 * rng.standard_normal((ROWS, D))
    ).astype(np.float32)
    return xa, xb


def workload(mesh, workdir: str) -> dict:
    """Streaming SAE training (bounded shuffle, checkpointed), a tiled feature pass and the
    similarity metrics with their permutation nulls."""
    from engine import streaming
    from experiments.pipeline import features
    from models import activation_source as asrc
    from models import sae_train as st

    xa, xb = data()
    src = asrc.ArraySource(np.arange(ROWS), [xa, xb], ["a", "b"])
    cfg = st.TrainConfig(d_sae=64, activation="topk", k=3, lr=3e-3, lr_warmup_steps=2)
    out = {}
    saes = []
    for col in (1, 2):
        sae = st.train_saes(
            src,
            cfg,
            steps=12,
            batch_size=32,
            mesh=mesh,
            data_seed=col,
            shuffle_buffer=96,
            shuffle_block=16,
            column=col,
            log_every=4,
            checkpoint_every=5,
            workdir=os.path.join(workdir, f"sae{col}"),
            init_sample=(xa, xb)[col - 1][:128],
        )[0]
        saes.append(sae)
        for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
            out[f"sae{col}_{f}"] = np.asarray(getattr(sae, f))
    stream = streaming.ChunkStream((np.arange(ROWS, dtype=np.int32), xa, xb), 64, name="pair")
    # a budget that forces 2+ blocks of features (the tiled path)
    plan_budget = 4 * 64 * 128 * 3 + 8 * ROWS * 6 + 4 * 32 * 32 * 5
    fp = features.feature_pass(
        stream,
        saes[0],
        saes[1],
        mesh,
        memory_budget=plan_budget,
        checkpoint_dir=os.path.join(workdir, "fp"),
    )
    out["tiled"] = np.asarray(fp.corr is None)
    for s in ("a", "b"):
        out[f"match_{s}"] = getattr(fp.matches, f"{s}_match")
        out[f"value_{s}"] = getattr(fp.matches, f"{s}_value")
    out["density_a"] = fp.stats_a.density
    out["top_rows_a"] = fp.stats_a.top_rows
    # every metric with its permutation null, permutations split over the 4 devices
    from engine import similarity

    res = similarity.evaluate(
        xa[:40].astype(np.float64),
        xb[:40].astype(np.float64),
        METRICS,
        num_permutations=16,
        seed=0,
        mesh=mesh,
    )["metrics"]
    for m in METRICS:
        out[f"{m}_score"] = np.asarray(res[m]["score"])
        out[f"{m}_null_mean"] = np.asarray(res[m]["null_mean"])
    return out


HOOKS = ["resid_post.0", "mlp_out.1"]


def harvest_contexts(tokenizer):
    """23 contexts of 16 tokens (padded tails): 5 shards of 5 contexts, the last one short,
    so the 2 processes get 3 and 2 shards."""
    from models import text

    return text.make_contexts(
        [d[:400] for d in text.sample_documents(8)], tokenizer, 16, pad_tail=True, max_contexts=23
    )


def harvest_workload(out_dir: str) -> dict:
    """Each process harvests its shards of the same contexts into one shared cache."""
    from engine import mesh as mesh_lib
    from models import activation_cache as ac
    from models import lm, lm_tiny

    root = os.path.join(out_dir, "models")
    if mesh_lib.is_primary():  # one copy of the model on disk, loaded by all
        lm_tiny.make_tiny_model_pair(root, arch="llama", vocab_size=300, n_layers=2, d_model=16)
    mesh_lib.barrier("tiny model written")
    model = lm.LanguageModel.load(os.path.join(root, "model_a"))
    cache = ac.harvest(
        model,
        harvest_contexts(model.tokenizer),
        HOOKS,
        os.path.join(out_dir, "cache"),
        batch_size=3,
        shard_contexts=5,
        progress=False,
        text_info={"source": "sample[:8]"},
    )
    out = {}
    for h in HOOKS:
        out[f"cache_rows_{h}"], out[f"cache_{h}"] = cache.read(h)
    out["cache_shards"] = np.asarray([s["contexts"] for s in cache.shards])
    out["cache_tokens"] = cache.token_ids()
    out["cache_mask"] = cache.mask()
    out["cache_non_special"] = np.asarray(cache.metadata["token_count_non_special"])
    return out


def main():
    pid, nproc, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from engine import mesh as mesh_lib

    mesh_lib.maybe_initialize_distributed(
        True, coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid
    )
    assert jax.device_count() == 2 * nproc and jax.local_device_count() == 2
    mesh = mesh_lib.make_mesh()
    out = workload(mesh, os.path.join(out_dir, "work"))
    out.update(harvest_workload(os.path.join(out_dir, "harvest")))
    if mesh_lib.is_primary():
        np.savez(os.path.join(out_dir, "result.npz"), **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

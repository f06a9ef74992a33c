"""The benchmark suite: every ``bench_*`` at one scale, one JSON and one markdown table.

Each benchmark runs in its own process (thread budgets are fixed before JAX / torch start, see
`engine.bench.set_thread_budget`) and times candidate and peer interleaved in that process;
this runner only schedules them and gathers their JSON into ``DIR/suite.json`` and
``DIR/suite.md`` (workload, size, project time, peer time, ratio, goal, device, machine load).
Run::

    python -m experiments.bench --out=runs/bench/suite --scale=small
    python -m experiments.bench --out=runs/bench/smoke --scale=smoke       # seconds; CI-sized
    python -m experiments.bench --out=runs/bench/issue --scale=issue --only=similarity

Scales: ``smoke`` (tiny sizes: checks that everything runs, numbers meaningless), ``small``
(minutes on 2 CPU cores), ``issue`` (the sizes the issues set goals at; hours on 2 cores, meant
for an accelerator). Tests run the smoke scale and never assert on timings.

The peer of each benchmark (``Benchmark.peer``, printed under the table) says what the
project is timed against. Where a stronger simple peer is known but not yet in the benchmark,
the text says so: a ratio is only as honest as its peer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
# --out (here: a directory, default runs/bench/suite), --only (benchmark names), --threads and
# --repeats are the flags every benchmark shares.
common.define_bench_flags()
flags.DEFINE_enum("scale", "small", ["smoke", "small", "issue"], "Problem sizes (see above).")
flags.DEFINE_integer("timeout", 0, "Seconds allowed per benchmark (0: no limit).")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One ``experiments.bench_<name>`` module, its peer and its flags at each scale."""

    name: str
    peer: str
    scales: dict


PEERS_NOTE = "strongest simple peer, timed interleaved in the same process"

BENCHMARKS = (
    Benchmark(
        "accumulator",
        "float64 NumPy in memory (centre, one GEMM): the exact reference, no streaming",
        {
            "smoke": ["--acc_rows=4096", "--acc_chunk=1024"],
            "small": ["--acc_rows=200000"],
            "issue": [],
        },
    ),
    Benchmark(
        "toy",
        "PyTorch eager with the instance axis in the weights (ARENA / Elhage et al.'s "
        "notebook), AdamW",
        {
            "smoke": ["--bt_instances=8", "--bt_steps=2", "--bt_batch_size=64"],
            "small": ["--bt_instances=200"],
            "issue": [],
        },
    ),
    Benchmark(
        "sae",
        "plain PyTorch TopK SAE step with Adam (dense encoder/decoder, torch.topk)",
        {
            "smoke": ["--bs_d_in=32", "--bs_d_sae=256", "--bs_k=4", "--bs_batch=64"],
            "small": ["--bs_scale=0.25"],
            "issue": [],
        },
    ),
    Benchmark(
        "similarity",
        "pairwise: NumPy's float32 GEMM (OpenBLAS) of the same tiles, the strongest "
        "simple peer (faster than XLA's GEMM on CPU; the jitted tile GEMM and a NumPy "
        "max/argmax script are reported too); correlation: scipy.sparse CSR A.T @ B "
        "(and the dense z-scored GEMM path); matching: scipy linear_sum_assignment",
        {
            "smoke": [
                "--pw_n=256",
                "--pw_d=32",
                "--pw_tile_a=128",
                "--pw_tile_b=128",
                "--pw_check_rows=16",
                "--corr_features=256",
                "--corr_k=4",
                "--corr_tokens=4096",
                "--corr_dense_slice=512",
                "--corr_chunk=1024",
                "--corr_dense_chunk=256",
                "--match_sizes=64",
            ],
            "small": [
                "--pw_n=4096",
                "--corr_features=4096",
                "--corr_tokens=262144",
                "--match_sizes=512,1024",
            ],
            "issue": ["--pw_n=65536", "--corr_features=16384", "--corr_tokens=1048576"],
        },
    ),
    Benchmark(
        "representation",
        "in-memory float64 NumPy SVCCA; nulls: a NumPy loop that hoists the "
        "permutation-invariant work (SVD reduction and whitening; rank transform) out "
        "of the loop, the strongest simple peer (loops recomputing everything are "
        "reported too)",
        {
            "smoke": [
                "--rep_rows=4096",
                "--rep_dim=16",
                "--rep_latent=4",
                "--rep_chunk=1024",
                "--rep_pairs=200",
                "--rep_null_dim=8",
                "--rep_permutations=16",
                "--rep_loop_perms=4",
            ],
            "small": ["--rep_rows=100000", "--rep_dim=128", "--rep_pairs=2000"],
            "issue": ["--rep_rows=200000", "--rep_pairs=5000"],
        },
    ),
    Benchmark(
        "e2e",
        "a NumPy/scipy/torch script doing the same comparison (GEMM encode + torch.topk, "
        "scipy CSR A.T @ B, argmax pairs, hoisted null loops); pipeline timed in fresh "
        "processes with compilation, cold and warm persistent compile cache",
        {
            "smoke": [
                "--e2e_tokens=4096",
                "--e2e_features=128",
                "--e2e_k=8",
                "--e2e_d_in=32",
                "--e2e_perms=10",
                "--e2e_chunk=1024",
            ],
            "small": ["--e2e_tokens=50000", "--e2e_features=768", "--e2e_perms=100"],
            "issue": [],
        },
    ),
    Benchmark(
        "gpu",
        "the raw jnp.dot of the same precision (the roof); fractions of the device's "
        "dense peak where known (not on CPU)",
        {
            "smoke": [
                "--gpu_n=512",
                "--gpu_d=64",
                "--gpu_corr_features=256",
                "--gpu_corr_chunk=256",
                "--gpu_cca_rows=4096",
                "--gpu_cca_dim=32",
            ],
            "small": [
                "--gpu_n=4096",
                "--gpu_d=256",
                "--gpu_corr_features=2048",
                "--gpu_corr_chunk=2048",
                "--gpu_cca_rows=65536",
                "--gpu_cca_dim=256",
            ],
            "issue": [],
        },
    ),
    Benchmark(
        "sparse_ops",
        "PyTorch CPU ops doing the same (torch.topk; gather + einsum; index_add_ of the "
        "outer products; dense autograd TopK SAE loss + gradient), and the project's own XLA "
        "path",
        {
            "smoke": ["--so_sizes=tiny"],
            "small": ["--so_sizes=small"],
            "issue": ["--so_sizes=small,big"],
        },
    ),
    Benchmark(
        "harvest",
        "transformers forward with output_hidden_states=True; raw np.load for reads",
        {
            "smoke": [
                "--hv_quick",
                "--hv_batch_size=2",
                "--hv_batches=1",
                "--hv_context_length=16",
                "--hv_read_mb=1",
            ],
            "small": ["--hv_quick"],
            "issue": [],
        },
    ),
)


def _load() -> float:
    return os.getloadavg()[0]


def run_one(
    bench: Benchmark, scale: str, out_dir: str, threads: int, repeats: int, timeout: int
) -> dict:
    """Runs one benchmark module in a subprocess; returns its JSON plus the runner's facts."""
    path = os.path.join(out_dir, f"{bench.name}.json")
    cmd = [
        sys.executable,
        "-m",
        f"experiments.bench_{bench.name}",
        f"--out={path}",
        f"--threads={threads}",
        f"--repeats={repeats}",
        *bench.scales[scale],
    ]
    load_before = _load()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout or None, check=False
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    doc = {
        "bench": bench.name,
        "peer": bench.peer,
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "wall_s": wall,
        "load_before": load_before,
        "load_after": _load(),
    }
    if rc == 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            doc.update(json.load(f))
    else:
        doc["error"] = tail
    return doc


def _fmt(x, unit="") -> str:
    if x is None:
        return ""
    return f"{x:.3g}{unit}"


def markdown(docs: list[dict], scale: str) -> str:
    """The suite as one markdown table (one row per timed workload)."""
    lines = [
        f"# Benchmark suite ({scale})",
        "",
        "ratio = peer time / project time (> 1: the project is faster); each row timed "
        f"interleaved in one process ({PEERS_NOTE}).",
        "",
        "| bench | workload | project s | peer s | ratio | goal | device | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        env = d.get("env", {})
        device = ",".join(sorted(set(s.split(":")[0] for s in env.get("devices", [])))) or "?"
        load = f"{d['load_before']:.1f}->{d['load_after']:.1f}"
        if "error" in d:
            lines.append(
                f"| {d['bench']} | FAILED (rc {d['returncode']}) | | | | | {device} | {load} |"
            )
            continue
        for r in d.get("results", []):
            goal = r.get("goal_speedup")
            # loops timed on a few permutations report their time scaled to the full R
            peer_s = r.get("baseline_scaled_s", r.get("baseline_median_s"))
            ratio = r.get("speedup_scaled", r.get("speedup"))
            lines.append(
                f"| {d['bench']} | {r.get('name', '')} | {_fmt(r.get('candidate_median_s'))} | "
                f"{_fmt(peer_s)} | {_fmt(ratio, 'x')} | "
                f"{_fmt(goal, 'x') if goal else ''} | {device} | {load} |"
            )
    lines += ["", "Peers:", ""]
    lines += [f"- **{d['bench']}**: {d['peer']}" for d in docs]
    return "\n".join(lines) + "\n"


def run_suite(
    out_dir: str,
    scale: str,
    only=(),
    threads: int = 2,
    repeats: int = 0,
    timeout: int = 0,
    progress: bool = True,
) -> list[dict]:
    known = [b.name for b in BENCHMARKS]
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SystemExit(
            f"bench: --only has unknown benchmark(s) {unknown}; expected some of {known}"
        )
    if threads < 1:
        raise SystemExit(f"bench: --threads must be >= 1, got {threads}")
    repeats = repeats or (1 if scale == "smoke" else 3)
    os.makedirs(out_dir, exist_ok=True)
    chosen = [b for b in BENCHMARKS if not only or b.name in only]
    docs = []
    for i, b in enumerate(chosen):
        if progress:
            print(f"[{i + 1}/{len(chosen)}] bench_{b.name} ({scale}) ...", flush=True)
        doc = run_one(b, scale, out_dir, threads, repeats, timeout)
        if progress:
            status = "ok" if "error" not in doc else f"FAILED: {doc['error'][-300:]}"
            print(f"      {doc['wall_s']:.0f} s, {status}", flush=True)
        docs.append(doc)
    with open(os.path.join(out_dir, "suite.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"scale": scale, "threads": threads, "repeats": repeats, "benchmarks": docs},
            f,
            indent=2,
            default=float,
        )
    with open(os.path.join(out_dir, "suite.md"), "w", encoding="utf-8") as f:
        f.write(markdown(docs, scale))
    return docs


def main(argv):
    del argv
    repeats = FLAGS.repeats if FLAGS["repeats"].present else 0
    docs = run_suite(
        FLAGS.out or os.path.join("runs", "bench", "suite"),
        FLAGS.scale,
        FLAGS.only,
        FLAGS.threads,
        repeats,
        FLAGS.timeout,
    )
    print(markdown(docs, FLAGS.scale))
    failed = [d["bench"] for d in docs if "error" in d]
    if failed:
        print(f"bench: {len(failed)} benchmark(s) failed: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

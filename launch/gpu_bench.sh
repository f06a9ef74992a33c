#!/usr/bin/env bash
# The GPU part of issue 18 in one command (needs a CUDA build of jax and torch in the active
# environment; nothing is downloaded). Writes everything under OUT (default runs/bench/gpu):
#   gpu.json        fraction of the bf16 / TF32 / float32 peak for the GEMM-bound kernels
#   sae.json        SAE training tokens/s, JAX vs a plain PyTorch CUDA step
#   correlation.json  sparse correlation at 1M tokens x 65k x 65k features
#   suite/          the whole suite at the issue's sizes (suite.json, suite.md)
# Usage: launch/gpu_bench.sh [OUT] [SECONDS_PER_BENCH]
set -euo pipefail
OUT=${1:-runs/bench/gpu}
LIMIT=${2:-900}
mkdir -p "$OUT"
export SAE_JAX_CACHE_DIR=${SAE_JAX_CACHE_DIR:-$OUT/jax_cache}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv" || true
python -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
uptime | tee "$OUT/load.txt"
run() { timeout "$LIMIT" "$@" 2>&1 | tail -n 40 || echo "FAILED or timed out: $*"; uptime >> "$OUT/load.txt"; }
run python -m experiments.bench_gpu --out="$OUT/gpu.json" --threads=16 --repeats=3
run python -m experiments.bench_sae --out="$OUT/sae.json" --threads=16 --bs_torch_device=cuda --bs_d_sae=65536 --bs_batch=8192
run python -m experiments.bench_similarity --only=correlation --out="$OUT/correlation.json" --threads=16 --corr_features=65536 --corr_tokens=1048576 --corr_chunk=65536 --nocorr_scipy --repeats=1
run python -m experiments.bench --out="$OUT/suite" --scale=issue --threads=16 --timeout="$LIMIT"

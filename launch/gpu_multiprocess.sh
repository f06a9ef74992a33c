#!/usr/bin/env bash
# Several processes on one or more GPU hosts without a scheduler: one process per GPU.
#   COORD=host0:12345 NPROC=2 PROC_ID=0 launch/gpu_multiprocess.sh experiments.train_sae ...
# Run the same command on every host with its own PROC_ID (0..NPROC-1). For one process per
# GPU on a single host, start NPROC copies with CUDA_VISIBLE_DEVICES=i and PROC_ID=i.
# The experiment calls jax.distributed.initialize itself (experiments/common.py, --distributed);
# each process reads its slice of every batch, process 0 writes results/logs/plots, orbax
# coordinates the checkpoints (a gs:// --workdir is passed to orbax as it is).
set -euo pipefail
module="${1:?usage: launch/gpu_multiprocess.sh experiments.<name> [flags]}"; shift
: "${COORD:?set COORD=host:port of process 0}" "${NPROC:?set NPROC}" "${PROC_ID:?set PROC_ID}"
cd "$(dirname "$0")/.."
exec python -m "$module" --distributed --coordinator_address="$COORD" \
  --num_processes="$NPROC" --process_id="$PROC_ID" "$@"

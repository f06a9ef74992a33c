#!/usr/bin/env bash
# Several processes on one or more GPU hosts without a scheduler: one process per GPU.
#   COORD=host0:12345 NPROC=2 PROC_ID=0 launch/gpu_multiprocess.sh experiments.train_sae ...
# Run the same command on every host with its own PROC_ID (0..NPROC-1). For one process per
# GPU on a single host, start NPROC copies with CUDA_VISIBLE_DEVICES=i and PROC_ID=i.
set -euo pipefail
module="${1:?usage: launch/gpu_multiprocess.sh experiments.<name> [flags]}"; shift
: "${COORD:?set COORD=host:port of process 0}" "${NPROC:?set NPROC}" "${PROC_ID:?set PROC_ID}"
cd "$(dirname "$0")/.."
exec python - "$module" "$@" <<PY
import runpy, sys
import jax
jax.distributed.initialize(coordinator_address="$COORD", num_processes=$NPROC,
                           process_id=$PROC_ID)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__")
PY

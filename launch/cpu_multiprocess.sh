#!/usr/bin/env bash
# N processes on this host, each with D simulated CPU devices, gloo collectives: the
# multi-process path without a cluster (what tests/test_distributed.py checks).
#   launch/cpu_multiprocess.sh 2 2 experiments.train_sae --workdir=runs/mp --source=synthetic ...
set -euo pipefail
nproc="${1:?usage: launch/cpu_multiprocess.sh NPROC DEVICES_PER_PROC experiments.<name> [flags]}"
ndev="${2:?}"; module="${3:?}"; shift 3
cd "$(dirname "$0")/.."
port=$(python -c "import socket; s=socket.socket(); s.bind(('localhost', 0)); print(s.getsockname()[1])")
pids=()
# Killed (timeout, Ctrl-C): take the processes down too; JAX's preemption handler may hold
# SIGTERM, hence the SIGKILL after a grace period.
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 3
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap 'stop; exit 143' TERM INT
for ((i = 0; i < nproc; i++)); do
  ${PYTHON:-python} -m "$module" --distributed --coordinator_address="localhost:$port" \
    --num_processes="$nproc" --process_id="$i" --num_cpu_devices="$ndev" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status

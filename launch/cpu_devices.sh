#!/usr/bin/env bash
# N simulated CPU devices on one host: exercises the sharded code paths without accelerators.
#   launch/cpu_devices.sh 4 experiments.demo --workdir=runs/demo
set -euo pipefail
n="${1:?usage: launch/cpu_devices.sh N experiments.<name> [flags]}"; shift
module="${1:?missing module}"; shift
cd "$(dirname "$0")/.."
# --num_cpu_devices sets jax_num_cpu_devices before JAX starts (see experiments/common.py).
exec env JAX_PLATFORMS=cpu python -m "$module" --num_cpu_devices="$n" "$@"

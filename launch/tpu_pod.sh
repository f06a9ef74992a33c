#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; JAX auto-detects the pod.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh experiments.universality --workdir=gs://b/run
set -euo pipefail
module="${1:?usage: launch/tpu_pod.sh experiments.<name> [flags]}"; shift
: "${TPU:?set TPU=<tpu name>}" "${ZONE:?set ZONE=<zone>}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd sae-universality && pip install -q -e . 'jax[tpu]' && python -m $module --distributed $*"

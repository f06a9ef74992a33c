#!/usr/bin/env bash
# One device (or all local devices of one host), no multi-host runtime.
#   launch/local.sh experiments.universality --workdir=runs/toy
set -euo pipefail
module="${1:?usage: launch/local.sh experiments.<name> [flags]}"; shift
cd "$(dirname "$0")/.."
exec python -m "$module" "$@"

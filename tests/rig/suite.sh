#!/usr/bin/env bash
# Brings the whole rig up before `meson test` and down after it (the rig/up
# and rig/down tests run first and last, alone). Each suite still calls
# `ensure`, so a single suite can run on its own; then run `suite.sh down`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
  up)
    "$here/rabbitmq.sh" ensure
    if [ "${LHPC_SKIP_SLURM:-0}" != 1 ]; then
      "$here/slurm-cluster.sh" ensure 3
    fi
    ;;
  down)
    rc=0
    "$here/slurm-cluster.sh" down || rc=1
    # The GPU cluster a suite may have started (LHPC_RIG_SLURM_GPUS): none, nothing to do.
    LHPC_RIG_SLURM_GPUS=1 "$here/slurm-cluster.sh" down || rc=1
    "$here/rabbitmq.sh" down || rc=1
    exit $rc
    ;;
  *)
    echo "usage: suite.sh up|down" >&2
    exit 2
    ;;
esac

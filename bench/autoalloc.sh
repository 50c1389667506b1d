#!/bin/bash
# autoalloc benchmark: from the first task published with zero jobs to the
# first task done, split into the controller's reaction (publish -> sbatch),
# Slurm's scheduling latency (SubmitTime -> StartTime) and our own start-up
# (StartTime -> first task done: stage, workers, the task); against a
# baseline in the same session: the user who runs sbatch by hand the moment
# the task is published. Then the controller's CPU and its broker and
# scheduler queries per minute, idle (no job) and while a job serves.
#
#   bench/autoalloc.sh [BUILD_DIR] [--rounds R] [--poll S] [--idle-seconds S]
#
# Runs on the test rig (tests/rig/: a real 3-node Slurm cluster on this
# machine and a real broker), started here when not running and left running.
# Submission and allocation times come from slurmctld's log (to the millisecond)
# when readable, else from scontrol (to the second).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$HERE/build
ROUNDS=3
POLL=2
IDLE_SECONDS=60
while (($#)); do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --poll) POLL=$2; shift 2 ;;
        --idle-seconds) IDLE_SECONDS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) BUILD=$(cd "$1" && pwd); shift ;;
    esac
done
BIN=${LHPC_BIN:-$BUILD/lithops-hpc}
[[ -x $BIN ]] || { echo "no $BIN: build first (meson compile -C $BUILD)" >&2; exit 1; }
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

. "$HERE/bench/lib.sh"
rig_up_with_slurm "$HERE"

WORK=$(mktemp -d "$BUILD/bench-autoalloc.XXXXXX")   # outside /tmp: every node sees it
trap 'rm -rf "$WORK"' EXIT
export LITHOPS_HPC_BIN=$BIN PYTHONPATH=$HERE/tests/fake-lithops LITHOPS_FAKE_STORAGE_DIR=$WORK/storage
"$BUILD/tests/tools/make-sif" "$WORK/rt.sif" 4M

LHPC_BENCH_WORK=$WORK LHPC_BENCH_ROUNDS=$ROUNDS LHPC_BENCH_POLL=$POLL LHPC_BENCH_IDLE=$IDLE_SECONDS \
    LHPC_BIN=$BIN LHPC_SOURCE_ROOT=$HERE /usr/bin/python3 "$HERE/bench/autoalloc_bench.py"

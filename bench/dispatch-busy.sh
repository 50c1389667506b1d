#!/bin/bash
# What a rank costs the broker while every slot is busy and a backlog waits,
# against the same ranks idle, for one or two lithops-hpc binaries in the same
# run (e.g. main's, built in another directory, as the baseline):
#   bench/dispatch-busy.sh [BUILD_DIR]       (default: ./build; needs dispatch-bench and lithops-hpc)
#   LHPC_BASELINE=/path/to/main/lithops-hpc bench/dispatch-busy.sh build
# For each binary: RANKS (default 8) `lithops-hpc worker --slots 1` on the rig
# broker, each in its own vhost-less share of one queue; the broker's CPU
# (beam.smp user+system, % of one core) over WINDOW seconds (default 20)
#   idle:  consumers connected, nothing queued;
#   busy:  RANKS x 3 tasks published that each sleep longer than the window:
#          every slot runs one, the rest wait in the queue;
# and, from the workers' debug logs, how often each rank rotated a held task
# to the tail of the queue (an old design: every 100 ms per busy rank) and how
# many tasks the ranks gave back from their reserve (reserve_patience) in all.
# Prints a Markdown table.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$SRC/build}" && pwd)
. "$SRC/bench/lib.sh"
RANKS=${RANKS:-8}
WINDOW=${WINDOW:-20}
PY=/usr/bin/python3
BENCH=$BUILD/bench/dispatch-bench
LHPC=${LHPC:-$BUILD/lithops-hpc}
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

for b in "$BENCH" "$LHPC" ${LHPC_BASELINE:+"$LHPC_BASELINE"}; do
    [[ -x $b ]] || { echo "dispatch-busy.sh: $b missing" >&2; exit 2; }
done

rig_broker "$SRC"
broker_watch

scratch_dir lhpc-bench-busy

run() { # binary label -> one table row
    local bin=$1 label=$2 url cfg=$T/wrk.toml i
    "$SRC/tests/rig/rabbitmq.sh" add-vhost "busy-$label-$$" >&2
    url=$BASE_URL/busy-$label-$$
    host_worker_config "$cfg" "$PY" 1
    PIDS=()
    for ((i = 0; i < RANKS; i++)); do
        AMQP_URL=$url PYTHONPATH=$SRC/tests/fake-lithops LITHOPS_HPC_STATE_DIR=$T/state-$label \
            "$bin" --config "$cfg" --log-level debug worker --slots 1 >"$T/$label-$i.log" 2>&1 &
        PIDS+=($!)
    done
    local deadline=$((SECONDS + 120))
    for ((i = 0; i < RANKS; i++)); do
        until grep -qs consuming "$T/$label-$i.log"; do
            ((SECONDS < deadline)) || { cat "$T/$label-$i.log" >&2; exit 1; }
            sleep 0.1
        done
    done
    local idle busy n
    idle=$(broker_pct "$WINDOW")
    n=$((RANKS * 3))
    AMQP_URL=$url "$BENCH" publish --count "$n" --sleep $((WINDOW * 3)) 2>/dev/null
    # Every slot busy: each rank cancelled its slot consumer (the handlers'
    # own output, LHPC-BUSY-START, goes to per-rank files outside this log now).
    deadline=$((SECONDS + 120))
    until (($(cat "$T/$label-"*.log | grep -c "cancelled: every slot busy" || true) >= RANKS)); do
        ((SECONDS < deadline)) || { echo "dispatch-busy.sh: slots never all busy" >&2; tail "$T/$label-0.log" >&2; exit 1; }
        sleep 0.1
    done
    local rot0 rot1
    rot0=$(cat "$T/$label-"*.log | grep -c "rotated to the tail" || true)
    busy=$(broker_pct "$WINDOW")
    rot1=$(cat "$T/$label-"*.log | grep -c "rotated to the tail" || true)
    # Tasks given back from a reserve (reserve_patience), from publish to the window's end.
    local back
    back=$(cat "$T/$label-"*.log | grep -c "given back for a free slot" || true)
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    PIDS=()
    awk -v l="$label" -v r="$RANKS" -v i="$idle" -v b="$busy" -v w="$WINDOW" -v rot=$((rot1 - rot0)) -v back="$back" 'BEGIN {
        printf "| %s | %d | %.2f | %.2f | %.3f | %s | %d |\n", l, r, i, b, (b - i) / r, (rot > 0 ? sprintf("%.1f", rot / w / r) : "0"), back
    }'
}

echo "| binary | busy ranks | broker % core idle | broker % core busy | (busy - idle) per rank | rotations/s per rank (debug log) | given back from a reserve, in all |"
echo "|---|---:|---:|---:|---:|---:|---:|"
[[ -n ${LHPC_BASELINE:-} ]] && run "$LHPC_BASELINE" baseline
run "$LHPC" new

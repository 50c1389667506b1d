#!/bin/bash
# The end of a map: wall time of a map of 1 s calls against the ideal (calls x
# seconds / slots), for one or two lithops-hpc binaries alternating in the same
# run (e.g. main's, built in another directory, as the baseline):
#   bench/tail.sh [BUILD_DIR]                  (default: ./build; needs dispatch-bench and lithops-hpc)
#   LHPC_BASELINE=/path/to/main/lithops-hpc bench/tail.sh build
# Each run: RANKS (default 3) `lithops-hpc worker --slots SLOTS` (default 2;
# host engine, runtime-defs/handler.py, tests/fake-lithops) on the rig broker,
# in a vhost of their own, and CALLS (default 60) calls of SECONDS (default 1)
# published at once in messages of BATCH calls (default 2: the real client's
# send_task carries `worker_processes` calls, singularity.py's invoke). Each
# call writes its start and end (the fake Lithops' record_dir); wall = last
# end - first publish. REPEAT runs per binary (default 3). Prints a Markdown
# table of wall / ideal.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$SRC/build}" && pwd)
. "$SRC/bench/lib.sh"
RANKS=${RANKS:-3}
SLOTS=${SLOTS:-2}
CALLS=${CALLS:-60}
SECONDS_PER_CALL=${SECONDS_PER_CALL:-1}
BATCH=${BATCH:-2}
REPEAT=${REPEAT:-3}
PY=/usr/bin/python3
BENCH=$BUILD/bench/dispatch-bench
LHPC=${LHPC:-$BUILD/lithops-hpc}
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

for b in "$BENCH" "$LHPC" ${LHPC_BASELINE:+"$LHPC_BASELINE"}; do
    [[ -x $b ]] || { echo "tail.sh: $b missing" >&2; exit 2; }
done
((CALLS % BATCH == 0)) || { echo "tail.sh: CALLS must be a multiple of BATCH" >&2; exit 2; }

rig_broker "$SRC"
scratch_dir lhpc-bench
host_worker_config "$T/wrk.toml" "$PY" 30

start_worker() { # binary url log -> pid in PIDS
    AMQP_URL=$2 PYTHONPATH=$SRC/tests/fake-lithops LITHOPS_HPC_STATE_DIR=$T/state \
        "$1" --config "$T/wrk.toml" --log-level info worker --slots "$SLOTS" >"$3" 2>&1 &
    PIDS+=($!)
}

# run's workers are started in the $(...) subshell, out of scratch_dir's sight:
# a failing run stops them itself.
fail() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    echo "tail.sh: $*" >&2
    exit 1
}

run() { # binary -> wall/ideal
    local name url rec i t0
    name=$(mktemp -u "tail-XXXXXX")
    name=${name##*/}
    "$SRC/tests/rig/rabbitmq.sh" add-vhost "$name" >&2
    url=$BASE_URL/$name
    rec=$T/$name.rec
    mkdir -p "$rec"
    PIDS=()
    for ((i = 0; i < RANKS; i++)); do start_worker "$1" "$url" "$T/$name-$i.log"; done
    local deadline=$((SECONDS + 60))
    for ((i = 0; i < RANKS; i++)); do
        until grep -qs consuming "$T/$name-$i.log"; do
            ((SECONDS < deadline)) || { cat "$T/$name-$i.log" >&2; fail "rank $i never consumed"; }
            sleep 0.05
        done
    done
    t0=$(now)
    AMQP_URL=$url "$BENCH" publish --count $((CALLS / BATCH)) --calls "$BATCH" --sleep "$SECONDS_PER_CALL" \
        --record-dir "$rec" >/dev/null 2>&1
    deadline=$((SECONDS + 300))
    until (($(find "$rec" -name '*.json' | wc -l) >= CALLS)); do
        ((SECONDS < deadline)) || fail "timed out: $(find "$rec" -name '*.json' | wc -l) of $CALLS calls done"
        sleep 0.1
    done
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p"; wait "$p" || true; done
    PIDS=()
    "$PY" - "$rec" "$t0" "$((CALLS * SECONDS_PER_CALL))" "$((RANKS * SLOTS))" <<'EOF'
import json, os, sys
rec, t0, work, slots = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ends = [json.load(open(os.path.join(rec, f)))['end'] for f in os.listdir(rec) if f.endswith('.json')]
print(f"{(max(ends) - t0) / (work / slots):.3f}")
EOF
}

after=() before=()
for ((i = 0; i < REPEAT; i++)); do
    if [[ -n ${LHPC_BASELINE:-} ]]; then before+=("$(run "$LHPC_BASELINE")"); fi
    after+=("$(run "$LHPC")")
done
echo "| ranks x slots | calls x s (per message) | ideal | binary | wall / ideal (median) | runs |"
echo "|---|---|---:|---|---:|---|"
ideal=$(awk -v c="$CALLS" -v s="$SECONDS_PER_CALL" -v n=$((RANKS * SLOTS)) 'BEGIN { printf "%.1f s", c * s / n }')
shape="$CALLS x $SECONDS_PER_CALL ($BATCH)"
if [[ -n ${LHPC_BASELINE:-} ]]; then
    printf '| %s x %s | %s | %s | baseline | %s | %s |\n' "$RANKS" "$SLOTS" "$shape" "$ideal" \
        "$(median "${before[@]}")" "${before[*]}"
fi
printf '| %s x %s | %s | %s | %s | %s | %s |\n' "$RANKS" "$SLOTS" "$shape" "$ideal" "${LHPC##*/}" \
    "$(median "${after[@]}")" "${after[*]}"

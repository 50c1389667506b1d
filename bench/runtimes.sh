#!/bin/bash
# Two runtimes interleaved on the one task queue against one runtime alone,
# in the same run, on the rig broker:
#   bench/runtimes.sh [BUILD_DIR]          (default: ./build; needs dispatch-bench and lithops-hpc)
# Each run: two `lithops-hpc worker`s (host engine, runtime-defs/handler.py,
# tests/fake-lithops: its function_handler does nothing) of SLOTS slots each
# (default 2), and N (default 4000) single-call no-op send_task messages
# published as fast as the broker confirms them:
#   one:  both workers serve runtime rt-a, every message names rt-a;
#   two:  one worker serves rt-a, the other rt-b, messages name rt-a and rt-b
#         in turn (a worker moves what is the other's to its runtime queue:
#         one more publish, confirm and ack per moved message).
# tasks/s = N / (last ack - first publish) over both workers; REPEAT times
# (default 3), one and two alternating: medians. Prints a Markdown table.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$SRC/build}" && pwd)
. "$SRC/bench/lib.sh"
N=${N:-4000}
SLOTS=${SLOTS:-2}
REPEAT=${REPEAT:-3}
PY=/usr/bin/python3
BENCH=$BUILD/bench/dispatch-bench
LHPC=${LHPC:-$BUILD/lithops-hpc}
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

for b in "$BENCH" "$LHPC"; do
    [[ -x $b ]] || { echo "runtimes.sh: $b missing: meson compile -C $BUILD" >&2; exit 2; }
done

rig_broker "$SRC"
scratch_dir lhpc-bench
host_worker_config "$T/wrk.toml" "$PY" 30

start_worker() { # url runtime latency-file -> pid in PIDS
    AMQP_URL=$1 PYTHONPATH=$SRC/tests/fake-lithops LITHOPS_HPC_LATENCY_LOG=$3 LITHOPS_HPC_STATE_DIR=$T/state \
        "$LHPC" --config "$T/wrk.toml" --log-level info worker --slots "$SLOTS" --runtime "$2" >"$3.log" 2>&1 &
    PIDS+=($!)
    local deadline=$((SECONDS + 60))
    until grep -qs consuming "$3.log"; do
        ((SECONDS < deadline)) || { cat "$3.log" >&2; exit 1; }
        sleep 0.05
    done
}

acks() { cat "$@" 2>/dev/null | wc -l; }

run() { # one|two -> tasks/s in RESULT
    local name url a b
    name=$(mktemp -u "rt-$1-XXXXXX")
    name=${name##*/}
    "$SRC/tests/rig/rabbitmq.sh" add-vhost "$name" >&2
    url=$BASE_URL/$name
    a=$T/$name-a b=$T/$name-b
    PIDS=()
    start_worker "$url" rt-a "$a"
    if [[ $1 == one ]]; then
        start_worker "$url" rt-a "$b"
        AMQP_URL=$url "$BENCH" publish --count "$N" --runtimes rt-a 2>/dev/null
    else
        start_worker "$url" rt-b "$b"
        AMQP_URL=$url "$BENCH" publish --count "$N" --runtimes rt-a,rt-b 2>/dev/null
    fi
    local deadline=$((SECONDS + 300))
    until (($(acks "$a" "$b") >= N)); do
        ((SECONDS < deadline)) || { echo "runtimes.sh: timed out ($(acks "$a" "$b") of $N acked)" >&2; exit 1; }
        sleep 0.05
    done
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p"; wait "$p" || true; done
    PIDS=()
    RESULT=$(cat "$a" "$b" | "$PY" -c '
import sys
rows = [tuple(map(int, l.split())) for l in sys.stdin if l.strip()]
span = (max(a for _, a in rows) - min(s for s, _ in rows)) / 1e9
print(f"{len(rows) / span:.0f}")')
}

one=() two=()
for ((i = 0; i < REPEAT; i++)); do
    run one
    one+=("$RESULT")
    run two
    two+=("$RESULT")
done
m1=$(median "${one[@]}")
m2=$(median "${two[@]}")
echo "| workers x slots | N | one runtime tasks/s | two runtimes interleaved tasks/s | two/one | runs (one; two) |"
echo "|---|---:|---:|---:|---:|---|"
printf '| 2 x %s | %s | %s | %s | %s | %s; %s |\n' "$SLOTS" "$N" "$m1" "$m2" \
    "$(awk -v a="$m2" -v b="$m1" 'BEGIN { printf "%.0f%%", 100 * a / b }')" "${one[*]}" "${two[*]}"

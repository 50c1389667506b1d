#!/bin/bash
# The dispatcher against a raw rabbitmq-c consumer with the same prefetch
# (slots + 1) and one ack per message, on the rig broker, in the same run:
#   bench/dispatch.sh [BUILD_DIR]          (default: ./build; needs dispatch-bench and lithops-hpc)
# Per slot count (SLOTS, default "1 2 4 8"; RAW_WORK_US, default 0, makes the
# raw consumer spin that long before each ack):
#   saturated: N (default 20000) single-call no-op send_task messages
#     published as fast as the broker confirms them while the consumer runs:
#     tasks/s = N / (last ack - first publish), publish->ack p50/p99;
#   each REPEAT times (default 3), raw and dispatcher alternating: medians;
#   the broker's CPU time (beam.smp user+system) per message in those runs;
#   paced: PACED_N (default 2000) messages at RATE/s (default 500), under
#     every consumer's capacity: publish->ack p50/p99 is per-message overhead,
#     not queueing.
# The dispatcher runs with the host engine, runtime-defs/handler.py and
# tests/fake-lithops (its function_handler does nothing). Prints a Markdown table.
# LHPC_BASELINE=/path/to/other/lithops-hpc (e.g. main's, built in another
# directory) runs that binary's dispatcher too, alternating with the others,
# and adds its saturated tasks/s and latency: what a design change costs or buys.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$SRC/build}" && pwd)
. "$SRC/bench/lib.sh"
N=${N:-20000}
SLOTS=${SLOTS:-"1 2 4 8"}
PACED_N=${PACED_N:-2000}
RATE=${RATE:-500}
REPEAT=${REPEAT:-3}
# The raw consumer spins this many µs before each ack (0: acks at once), to
# ask how much of the gap is the work rather than the dispatcher.
RAW_WORK_US=${RAW_WORK_US:-0}
PY=/usr/bin/python3
BENCH=$BUILD/bench/dispatch-bench
LHPC=${LHPC:-$BUILD/lithops-hpc}
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

for b in "$BENCH" "$LHPC" ${LHPC_BASELINE:+"$LHPC_BASELINE"}; do
    [[ -x $b ]] || { echo "dispatch.sh: $b missing: meson compile -C $BUILD" >&2; exit 2; }
done
# The worker writes the publish->ack latency log (LITHOPS_HPC_LATENCY_LOG)
# only in a test build; a release binary holds no bench code. LHPC and
# LHPC_BASELINE must be test builds too.
grep -qx '#define LHPC_TEST_HOOKS 1' "$BUILD/lhpc_build_config.h" 2>/dev/null ||
    { echo "dispatch.sh: $BUILD is not a test build (meson configure -Dtest_hooks=true $BUILD)" >&2; exit 2; }

rig_broker "$SRC"
broker_watch
# ticks before, message count -> broker µs per message since then
broker_us() { echo $((($(broker_ticks) - $1) * 1000000 / TICK / $2)); }

T=$(mktemp -d /tmp/lhpc-bench-XXXXXX)
WORKER_PID=
cleanup() {
    [[ -n $WORKER_PID ]] && kill -KILL "$WORKER_PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

fresh_url() { # name -> URL of a new vhost
    "$SRC/tests/rig/rabbitmq.sh" add-vhost "$1" >&2
    echo "$BASE_URL/$1"
}

wait_lines() { # file n seconds
    local deadline=$((SECONDS + $3))
    until [[ -f $1 && $(wc -l <"$1") -ge $2 ]]; do
        ((SECONDS < deadline)) || { echo "dispatch.sh: timed out waiting for $2 acks in $1" >&2; return 1; }
        sleep 0.05
    done
}

# latency file -> "tasks/s p50_ms p99_ms"
stats() {
    "$PY" - "$1" <<'EOF'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
lat = sorted((a - s) / 1e6 for s, a in rows)
span = (max(a for _, a in rows) - min(s for s, _ in rows)) / 1e9
pct = lambda p: lat[min(len(lat) - 1, max(0, int(round(p / 100 * len(lat))) - 1))]
print(f"{len(rows) / span:.0f} {pct(50):.2f} {pct(99):.2f}")
EOF
}

# Called in $(...) subshells: names come from mktemp, not from a counter.
run_raw() { # slots count rate -> latency file
    local url out
    out=$(mktemp "$T/raw-$1-$2-XXXXXX")
    url=$(fresh_url "bench-${out##*/}")
    local b0
    b0=$(broker_ticks)
    AMQP_URL=$url "$BENCH" raw --count "$2" --prefetch $(($1 + 1)) --work-us "$RAW_WORK_US" --latency-log "$out" &
    local consumer=$!
    AMQP_URL=$url "$BENCH" publish --count "$2" --rate "$3" 2>/dev/null
    wait "$consumer"
    broker_us "$b0" "$2" >"$out.broker"
    echo "$out"
}

run_dispatcher() { # slots count rate [binary] -> latency file (a fresh one: the worker appends)
    local url out log cfg=$T/wrk.toml bin=${4:-$LHPC}
    # This runs in a subshell: it cleans up its own worker if it fails.
    trap '[[ -n $WORKER_PID ]] && kill -KILL "$WORKER_PID" 2>/dev/null' EXIT
    out=$(mktemp "$T/wrk-$1-$2-XXXXXX")
    log=$out.log
    url=$(fresh_url "bench-${out##*/}")
    cat >"$cfg" <<EOF
[singularity]
engine = "host"
python = "$PY"
[deploy]
drain_timeout = 30
EOF
    AMQP_URL=$url PYTHONPATH=$SRC/tests/fake-lithops LITHOPS_HPC_LATENCY_LOG=$out LITHOPS_HPC_STATE_DIR=$T/state \
        "$bin" --config "$cfg" --log-level info worker --slots "$1" >"$log" 2>&1 &
    WORKER_PID=$!
    local deadline=$((SECONDS + 60))
    until grep -qs consuming "$log"; do
        ((SECONDS < deadline)) || { cat "$log" >&2; exit 1; }
        sleep 0.05
    done
    local b0
    b0=$(broker_ticks)
    AMQP_URL=$url "$BENCH" publish --count "$2" --rate "$3" 2>/dev/null
    wait_lines "$out" "$2" 300
    broker_us "$b0" "$2" >"$out.broker"
    kill -TERM "$WORKER_PID"
    wait "$WORKER_PID" || { cat "$log" >&2; exit 1; }
    WORKER_PID=
    echo "$out"
}

# Median of REPEAT runs each, raw and dispatcher alternating, so load from
# other processes on the machine hits both alike.

B_HEAD= B_RULE=
if [[ -n ${LHPC_BASELINE:-} ]]; then
    B_HEAD=" baseline tasks/s | dispatcher/baseline | baseline p50 / p99 ms |"
    B_RULE="---:|---:|---:|"
fi
echo "| slots | raw tasks/s | dispatcher tasks/s | dispatcher/raw | raw p50 / p99 ms | dispatcher p50 / p99 ms | broker µs/msg raw / dispatcher | paced ${RATE}/s raw p50 / p99 ms | paced ${RATE}/s dispatcher p50 / p99 ms |$B_HEAD"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|$B_RULE"
for s in $SLOTS; do
    rt=() r50=() r99=() rb=() dt=() d50=() d99=() db=() bt=() b50=() b99=()
    for ((i = 0; i < REPEAT; i++)); do
        f=$(run_raw "$s" "$N" 0)
        read -r a b c < <(stats "$f")
        rt+=("$a") r50+=("$b") r99+=("$c") rb+=("$(<"$f.broker")")
        f=$(run_dispatcher "$s" "$N" 0)
        read -r a b c < <(stats "$f")
        dt+=("$a") d50+=("$b") d99+=("$c") db+=("$(<"$f.broker")")
        if [[ -n ${LHPC_BASELINE:-} ]]; then
            f=$(run_dispatcher "$s" "$N" 0 "$LHPC_BASELINE")
            read -r a b c < <(stats "$f")
            bt+=("$a") b50+=("$b") b99+=("$c")
        fi
    done
    B_COLS=
    if [[ -n ${LHPC_BASELINE:-} ]]; then
        BT=$(median "${bt[@]}")
        B_COLS=" $BT | $("$PY" -c "print(f'{$(median "${dt[@]}") / $BT * 100:.0f}%')") | $(median "${b50[@]}") / $(median "${b99[@]}") |"
    fi
    read -r _ pr50 pr99 < <(stats "$(run_raw "$s" "$PACED_N" "$RATE")")
    read -r _ pd50 pd99 < <(stats "$(run_dispatcher "$s" "$PACED_N" "$RATE")")
    RT=$(median "${rt[@]}") DT=$(median "${dt[@]}")
    ratio=$("$PY" -c "print(f'{$DT / $RT * 100:.0f}%')")
    echo "| $s | $RT | $DT | $ratio | $(median "${r50[@]}") / $(median "${r99[@]}") | $(median "${d50[@]}") / $(median "${d99[@]}") | $(median "${rb[@]}") / $(median "${db[@]}") | $pr50 / $pr99 | $pd50 / $pd99 |$B_COLS"
done

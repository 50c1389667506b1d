#!/bin/bash
# The end of a map with the REAL Lithops client on the 3-node Slurm rig
# (issue 22), for one or two lithops-hpc binaries alternating in the same run:
#   LHPC_LITHOPS_SRC=/path/to/lithops bench/tail-slurm.sh [BUILD_DIR]
#   LHPC_BASELINE=/path/to/other/lithops-hpc LHPC_LITHOPS_SRC=... bench/tail-slurm.sh build
# BUILD_DIR (default ./build) needs lithops-hpc and tests/tools/make-sif.
# LHPC_LITHOPS_SRC: a Lithops git checkout (never fetched here; its `lithops`
# package is copied under BUILD_DIR, since each rig node has a private /tmp).
# Each run: `sbatch -N3 slurm/lithops-deploy.sh` (one rank a node,
# `worker_processes` SLOTS (default 2) slots each, host engine, a fresh vhost,
# the real Lithops as the ranks' Lithops, `--log-level debug`), then the real
# client (`worker_processes` SLOTS, `storage: redis` on a password-protected
# redis-server started here) runs a warm-up map of 6 no-op calls, then
# `fexec.map(sleep_1s, range(CALLS))` (CALLS default 60) + `get_result`,
# timed against the ideal CALLS x 1 s / (3 x SLOTS). Lithops' `monitoring`
# is MONITORING: default storage (its job monitor polls the storage every
# 2 s, every 0.4 s after a poll that found calls done), or rabbitmq (each
# call's status comes through the broker). Each call returns its node, start
# and end, so a run also reports the last call's end after map() started
# (lithops-hpc's part), when the client saw the last call done and had the
# last result, the calls per node, the last calls, and how many tasks the
# ranks gave back from a reserve (their debug log).
# REPEAT runs per binary (default 3). Then, per binary, the broker's CPU
# (beam.smp, % of one core) over WINDOW s (default 10) with the 3 ranks idle
# and with every slot busy and a backlog queued (as bench/dispatch-busy.sh).
# Prints a Markdown table; per-run detail on stderr.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(cd "${1:-$SRC/build}" && pwd)
. "$SRC/bench/lib.sh"
SLOTS=${SLOTS:-2}
CALLS=${CALLS:-60}
REPEAT=${REPEAT:-3}
WINDOW=${WINDOW:-10}
MONITORING=${MONITORING:-storage}
PY=/usr/bin/python3
LHPC=${LHPC:-$BUILD/lithops-hpc}
MAKE_SIF=$BUILD/tests/tools/make-sif
LITHOPS_SRC=${LHPC_LITHOPS_SRC:?set LHPC_LITHOPS_SRC to a Lithops checkout}
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}

for b in "$LHPC" "$MAKE_SIF" ${LHPC_BASELINE:+"$LHPC_BASELINE"}; do
    [[ -x $b ]] || { echo "tail-slurm.sh: $b missing" >&2; exit 2; }
done
[[ -f $LITHOPS_SRC/lithops/__init__.py ]] || { echo "tail-slurm.sh: no lithops package in $LITHOPS_SRC" >&2; exit 2; }

rig_up_with_slurm "$SRC" >&2
rig_broker "$SRC"
broker_watch

WORK=$(mktemp -d "$BUILD/bench-tail-slurm.XXXXXX") # outside /tmp: every node sees it
JOBS=() REDIS_PID=
cleanup() {
    local j
    for j in "${JOBS[@]}"; do scancel "$j" 2>/dev/null || true; done
    [[ -n $REDIS_PID ]] && kill "$REDIS_PID" 2>/dev/null
    [[ ${LHPC_KEEP_WORK:-} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -m 700 "$WORK/state" "$WORK/home" "$WORK/redis"
mkdir "$WORK/py"
cp -r "$LITHOPS_SRC/lithops" "$WORK/py/"
# ps_mem is not packaged; lithops/worker/utils.py imports it at load time (README.md).
printf 'def get_memory_usage(*a, **k):\n    raise RuntimeError("stub")\n' >"$WORK/py/ps_mem.py"
"$MAKE_SIF" "$WORK/rt.sif" 12M
export LITHOPS_HPC_STATE_DIR=$WORK/state PYTHONPATH=$WORK/py HOME=$WORK/home

REDIS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REDIS_PASSWORD=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
(umask 077; printf 'port %s\nbind 127.0.0.1\nsave ""\ndir %s\nrequirepass %s\n' \
    "$REDIS_PORT" "$WORK/redis" "$REDIS_PASSWORD" >"$WORK/redis/redis.conf")
redis-server "$WORK/redis/redis.conf" >/dev/null 2>&1 </dev/null &
REDIS_PID=$!

cat >"$WORK/client.py" <<'EOF'
import json, os, socket, sys, time
import lithops

def noop(i):
    return i

def sleep_1s(i):
    t = time.time()
    time.sleep(1)
    return socket.gethostname(), t, time.time()

def sleep_long(i):
    time.sleep(float(os.environ.get("BUSY_SECONDS", "60")))

mode, calls = sys.argv[1], int(sys.argv[2])
fexec = lithops.FunctionExecutor()
if mode == "busy":  # publish and leave: every slot busy, the rest queued
    fexec.map(sleep_long, range(calls))
    print(json.dumps({"published": calls}))
    sys.exit(0)
fexec.get_result(fexec.map(noop, range(6)))  # runtime metadata, handlers warm
t0 = time.time()
fs = fexec.map(sleep_1s, range(calls))
t_map = time.time()
res = fexec.get_result(fs)
t1 = time.time()
# When the client saw each call done (its storage monitor) and had its result.
seen = max(f.stats.get("host_status_done_tstamp", 0) for f in fs)
fetched = max(f.stats.get("host_result_done_tstamp", 0) for f in fs)
print(json.dumps({"t0": t0, "wall": t1 - t0, "map": t_map - t0, "seen": seen - t0, "fetched": fetched - t0,
                  "calls": [[i] + list(r) for i, r in enumerate(res)]}))
EOF

# A deployment of BIN on 3 nodes, ready: sets JID, OUT, URL and LITHOPS_CONFIG_FILE.
deploy() { # binary name
    local d=$WORK/$2
    mkdir "$d"
    URL=$("$PY" -c "import sys; sys.path.insert(0, '$SRC/tests/integration')
import lhpc_test as lt; print(lt.fresh_vhost('$2'))")
    (umask 077
        printf '[singularity]\nengine = "host"\nworker_processes = %s\npython = "%s"\n[rabbitmq]\namqp_url = "%s"\n' \
            "$SLOTS" "$PY" "$URL" >"$d/config.toml"
        printf '[deploy]\ncleanup = true\ndrain_timeout = 3\n[health]\ninterval = 1\n' >>"$d/config.toml"
        printf 'lithops:\n  backend: singularity\n  storage: redis\n  log_level: WARNING\n' >"$d/lithops.yaml"
        [[ $MONITORING == storage ]] || printf '  monitoring: %s\n' "$MONITORING" >>"$d/lithops.yaml"
        printf 'singularity:\n  runtime: rt\n  worker_processes: %s\n' "$SLOTS" >>"$d/lithops.yaml"
        printf 'rabbitmq:\n  amqp_url: %s\nredis:\n  host: 127.0.0.1\n  port: %s\n  password: %s\n' \
            "$URL" "$REDIS_PORT" "$REDIS_PASSWORD" >>"$d/lithops.yaml")
    export LITHOPS_HPC_CONFIG=$d/config.toml LITHOPS_CONFIG_FILE=$d/lithops.yaml
    OUT=$d/job-%j.out
    JID=$(LITHOPS_HPC_BIN=$1 sbatch --parsable -N3 --output="$OUT" --chdir="$d" "$SRC/slurm/lithops-deploy.sh" \
        "$WORK/rt.sif" --log-level debug)
    JID=${JID%%;*}
    JOBS+=("$JID")
    OUT=${OUT/\%j/$JID}
    local deadline=$((SECONDS + 120))
    until [[ $(ready_ranks "$1" "$JID") == 3 ]]; do
        slurm_job_running "$JID" && ((SECONDS < deadline)) || { echo "job $JID not ready:" >&2; cat "$OUT" >&2; exit 1; }
        sleep 0.2
    done
}

undeploy() { # binary
    "$1" stop "$JID" --timeout 60 >/dev/null 2>&1 || scancel "$JID"
    local deadline=$((SECONDS + 90))
    while slurm_job_running "$JID"; do
        ((SECONDS < deadline)) || { scancel "$JID"; deadline=$((SECONDS + 30)); }
        sleep 0.2
    done
}

run() { # binary label -> "wall/ideal calls-end/ideal"
    local out
    deploy "$1" "$2"
    out=$("$PY" "$WORK/client.py" map "$CALLS" 2>"$WORK/$2/client.err") ||
        { tail -n 30 "$WORK/$2/client.err" >&2; exit 1; }
    local back
    back=$(grep -c "given back for a free slot" "$OUT" || true)
    undeploy "$1"
    printf '%s\n' "$out" >"$WORK/$2/client.json"
    "$PY" - "$out" "$((CALLS / (3 * SLOTS)))" "$2" "$back" "$SLOTS" <<'EOF'
import collections, json, sys
r, ideal, label, back = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
t0, calls = r["t0"], r["calls"]
end = max(c[3] for c in calls) - t0
per = collections.Counter(c[1] for c in calls)
last = sorted(calls, key=lambda c: c[3])[-3:]
# Each node's calls onto its slots (a call goes to the slot free first): the
# gaps between a call's end and the next start on the same slot, i.e. the
# per-call cost (handler, Lithops' storage round trips) plus any wait.
gaps = []
for node in per:
    free = []
    for c in sorted((c for c in calls if c[1] == node), key=lambda c: c[2]):
        if len(free) == int(sys.argv[5]):
            i = min(range(len(free)), key=lambda k: free[k])
            gaps.append(c[2] - free.pop(i))
        free.append(c[3])
gaps.sort()
first = min(c[2] for c in calls) - t0
print(f"{label}: map+get_result {r['wall']:.3f} s; after map(): returned {r['map']:.2f}, first call started "
      f"{first:.2f}, last call ended {end:.3f}, last seen done by the client {r['seen']:.2f}, last result "
      f"fetched {r['fetched']:.2f} s; calls per node "
      f"{dict(sorted(per.items()))}, gap between calls on a slot median {gaps[len(gaps) // 2] * 1000:.0f} ms, "
      f"max {gaps[-1] * 1000:.0f} ms, {sum(g > 0.15 for g in gaps)} over 150 ms; given back {back}; last 3 calls (id node start end, s after map): "
      + "; ".join(f"{c[0]} {c[1]} {c[2] - t0:.2f} {c[3] - t0:.2f}" for c in last), file=sys.stderr)
print(f"{r['wall'] / ideal:.3f} {end / ideal:.3f}")
EOF
}

busy() { # binary label -> "idle% busy%"
    local idle pct
    deploy "$1" "$2"
    idle=$(broker_pct "$WINDOW")
    BUSY_SECONDS=$((WINDOW * 4)) "$PY" "$WORK/client.py" busy $((3 * SLOTS * 3)) >/dev/null 2>"$WORK/$2/client.err" ||
        { tail -n 30 "$WORK/$2/client.err" >&2; exit 1; }
    local deadline=$((SECONDS + 60))
    until (($(grep -c "cancelled: every slot busy" "$OUT" || true) >= 3)); do
        ((SECONDS < deadline)) || { echo "tail-slurm.sh: slots never all busy" >&2; tail "$OUT" >&2; exit 1; }
        sleep 0.1
    done
    pct=$(broker_pct "$WINDOW")
    scancel "$JID"
    while slurm_job_running "$JID"; do sleep 0.2; done
    echo "$idle $pct"
}

new=() base=() new_end=() base_end=()
load=("$(cut -d' ' -f1-3 /proc/loadavg)")
for ((i = 0; i < REPEAT; i++)); do
    if [[ -n ${LHPC_BASELINE:-} ]]; then
        run "$LHPC_BASELINE" "base-$i" >"$WORK/r"
        read -r w e <"$WORK/r"
        base+=("$w") base_end+=("$e")
    fi
    run "$LHPC" "new-$i" >"$WORK/r"
    read -r w e <"$WORK/r"
    new+=("$w") new_end+=("$e")
    load+=("$(cut -d' ' -f1-3 /proc/loadavg)")
done
if [[ -n ${LHPC_BASELINE:-} ]]; then
    busy "$LHPC_BASELINE" base-busy >"$WORK/r"
    read -r base_idle base_busy <"$WORK/r"
fi
busy "$LHPC" new-busy >"$WORK/r"
read -r new_idle new_busy <"$WORK/r"
load+=("$(cut -d' ' -f1-3 /proc/loadavg)")
echo "load average (1/5/15 min) before and after each pair: ${load[*]}" >&2

ideal=$(awk -v c="$CALLS" -v n=$((3 * SLOTS)) 'BEGIN { printf "%.1f s", c / n }')
echo "| binary | ideal | map + get_result / ideal: median (runs) | last call's end / ideal: median (runs) | broker % core, idle / every slot busy |"
echo "|---|---:|---|---|---|"
if [[ -n ${LHPC_BASELINE:-} ]]; then
    printf '| baseline | %s | %s (%s) | %s (%s) | %s / %s |\n' "$ideal" "$(median "${base[@]}")" "${base[*]}" \
        "$(median "${base_end[@]}")" "${base_end[*]}" "$base_idle" "$base_busy"
fi
printf '| %s | %s | %s (%s) | %s (%s) | %s / %s |\n' "${LHPC}" "$ideal" "$(median "${new[@]}")" "${new[*]}" \
    "$(median "${new_end[@]}")" "${new_end[*]}" "$new_idle" "$new_busy"

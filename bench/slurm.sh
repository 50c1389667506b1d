#!/bin/bash
# Slurm benchmark: staging a 1 GiB image onto 3 nodes with --transfer mpi
# versus sbcast, in the same run, and launch-to-ready of the 3-node job
# (sbatch returned -> every rank "ready" in the status file).
#
#   bench/slurm.sh [BUILD_DIR] [--size-mib N] [--rounds R]
#
# Runs on the test rig (tests/rig/: a real 3-node Slurm cluster on this
# machine, each node with a private /tmp, and a real broker), started here
# when not running and left running. LHPC_RIG_DIR defaults to BUILD_DIR/rig.
# Each round submits slurm/lithops-deploy.sh once per transfer (order
# alternating), waits for ready, reads deploy's "staged ..." line, stops the
# job (cleanup on, so every round copies to all nodes). Also times a plain
# parallel `cp` of the image into the three nodes' /tmp: on one machine the
# nodes share the same memory bus, so that is the honest ceiling (see
# docs/test-rig.md, "Moving a file, measured here").
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$HERE/build
SIZE_MIB=1024
ROUNDS=3
while (($#)); do
    case $1 in
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) BUILD=$(cd "$1" && pwd); shift ;;
    esac
done
BIN=${LHPC_BIN:-$BUILD/lithops-hpc}
[[ -x $BIN ]] || { echo "no $BIN: build first (meson compile -C $BUILD)" >&2; exit 1; }
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$BUILD/rig}
PY=/usr/bin/python3

. "$HERE/bench/lib.sh"
rig_up_with_slurm "$HERE"

WORK=$(mktemp -d "$BUILD/bench-slurm.XXXXXX")   # outside /tmp: every node sees it
trap 'rm -rf "$WORK"' EXIT
mkdir -m 700 "$WORK/state"
export LITHOPS_HPC_STATE_DIR=$WORK/state LITHOPS_HPC_BIN=$BIN PYTHONPATH=$HERE/tests/fake-lithops


IMAGE=$WORK/bench.sif
t0=$(now)
"$BUILD/tests/tools/make-sif" "$IMAGE" "${SIZE_MIB}M"
echo "image: $SIZE_MIB MiB written in $(seconds_between "$t0" "$(now)") s"

URL=$("$PY" -c "
import sys; sys.path.insert(0, '$HERE/tests/integration')
import lhpc_test as lt; print(lt.fresh_vhost('bench-slurm'))")
CONF=$WORK/config.toml
(umask 077; cat >"$CONF" <<EOF
[singularity]
engine = "host"
worker_processes = 2
python = "/usr/bin/python3"
[rabbitmq]
amqp_url = "$URL"
[deploy]
cleanup = true
drain_timeout = 3
[health]
interval = 0.5
EOF
)
export LITHOPS_HPC_CONFIG=$CONF


# One deployment: prints "<transfer> <stage s> <launch-to-ready s> <start-to-ready s>".
one() {
    local how=$1 out jid t_sub t_ready start
    out=$WORK/$how-%j.out
    t_sub=$(now)
    jid=$(sbatch --parsable -N3 --output="$out" --chdir="$WORK" "$HERE/slurm/lithops-deploy.sh" "$IMAGE" \
        --transfer "$how")
    out=${out/\%j/$jid}
    while [[ $(ready_ranks "$BIN" "$jid") != 3 ]]; do
        slurm_job_running "$jid" || { echo "job $jid ended before ready:" >&2; cat "$out" >&2; exit 1; }
        sleep 0.1
    done
    t_ready=$(now)
    start=$(date -d "$(scontrol -o show job "$jid" | sed -n 's/.*StartTime=\([^ ]*\).*/\1/p')" +%s)
    "$BIN" stop "$jid" --timeout 60 >/dev/null
    while slurm_job_running "$jid"; do sleep 0.2; done
    local line
    # "staged rt.sif (1.0 GiB) on 3 node(s) in 7.13 s: copied to 3 at ..."
    line=$(grep -o 'staged [^ ]* ([^)]*) on [0-9]* node(s) in [0-9.]* s: copied to [0-9]*' "$out" | head -1)
    [[ -n $line ]] || { echo "no staging line in $out:" >&2; cat "$out" >&2; exit 1; }
    [[ $line == *"copied to 3" ]] || { echo "expected a copy to 3 nodes: $line" >&2; exit 1; }
    local stage_s=${line##* in }
    stage_s=${stage_s%% s:*}
    printf '%s %s %s %s\n' "$how" "$stage_s" "$(seconds_between "$t_sub" "$t_ready")" "$(seconds_between "$start" "$t_ready")"
}

results=$WORK/results
: >"$results"
for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then order=(mpi sbcast); else order=(sbcast mpi); fi
    for how in "${order[@]}"; do
        one "$how" | tee -a "$results"
    done
done

# Baseline: cp of the same file into the three nodes' /tmp, in parallel.
cp_times=()
for ((r = 1; r <= ROUNDS; r++)); do
    sync; t0=$(now)
    pids=()
    for n in n1 n2 n3; do
        pid_var=RIG_SLURMD_PID_$n
        nsenter -t "${!pid_var}" -m cp "$IMAGE" "/tmp/bench-cp.sif" &
        pids+=($!)
    done
    wait "${pids[@]}"
    cp_times+=("$(seconds_between "$t0" "$(now)")")
    for n in n1 n2 n3; do pid_var=RIG_SLURMD_PID_$n; nsenter -t "${!pid_var}" -m rm -f /tmp/bench-cp.sif; done
done

"$PY" - "$results" "$SIZE_MIB" "${cp_times[@]}" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
mib = int(sys.argv[2])
cp = [float(x) for x in sys.argv[3:]]
print()
print(f"{mib} MiB image onto 3 nodes, {len(rows) // 2} round(s); median (min-max)")
print(f"{'':14}{'staging s':>22}{'GiB/s (3 copies)':>18}{'sbatch->ready s':>22}{'start->ready s':>20}")
def fmt(v): return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
for how in ("mpi", "sbcast"):
    r = [x for x in rows if x[0] == how]
    st = [float(x[1]) for x in r]
    print(f"{how:14}{fmt(st):>22}{3 * mib / 1024 / statistics.median(st):>18.2f}"
          f"{fmt([float(x[2]) for x in r]):>22}{fmt([float(x[3]) for x in r]):>20}")
print(f"{'cp parallel':14}{fmt(cp):>22}{3 * mib / 1024 / statistics.median(cp):>18.2f}")
EOF

#!/usr/bin/env bash
# Launch-to-all-ready time of `lithops-hpc deploy` for several rank counts
# (each rank its own node, host engine, one machine) with the image already
# staged (cached: the second stage of the same image is a hash check), each
# rank's memory, and the same launch of tests/tools/health-driver (MPI start-up
# and health only: no image, no worker, no broker) to tell Open MPI's share
# from ours.
#   bench/deploy.sh [BUILD_DIR]      (ROUNDS=3 RANKS="1 4 16 32" SLOTS=2 SIZE=256M)
# Time: from starting mpirun to `lithops-hpc status` exiting 0 (every rank
# ready), polled every 50 ms. The first rank count is the baseline of the
# ratios. Prints a Markdown table, then the load average before and after.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$src/build}" && pwd)
rounds=${ROUNDS:-3}
ranks_list=${RANKS:-"1 4 16 32"}
slots=${SLOTS:-2}
size=${SIZE:-256M}
bin=$build/lithops-hpc
driver=$build/tests/tools/health-driver
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$build/rig}
"$src/tests/rig/rabbitmq.sh" ensure >/dev/null
set -a; . "$LHPC_RIG_DIR/rabbitmq/env"; set +a
export AMQP_URL=$RIG_AMQP_URL OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
unset SLURM_JOB_ID LITHOPS_HPC_CONFIG
work=$(mktemp -d /tmp/lhpc-bench-deploy-XXXXXX)
trap 'rm -rf "$work"' EXIT
export LITHOPS_HPC_STATE_DIR=$work/state PYTHONPATH=$src/tests/fake-lithops
"$build/tests/tools/make-sif" "$work/rt.sif" "$size"
cat >"$work/config.toml" <<TOML
[singularity]
engine = "host"
sif_path = "$work/nodes/%n"
worker_processes = $slots
python = "/usr/bin/python3"
[health]
interval = 0.5
TOML
chmod 600 "$work/config.toml"

. "$src/bench/lib.sh"

# Seconds from launching "$@" under mpirun -np $n to `status $job` exiting 0;
# the run is then stopped. $rss gets each rank's memory at rest (min-max).
launch_to_ready() {
  local n=$1 job=$2 t0 t1 pid
  shift 2
  t0=$(now)
  mpirun --oversubscribe --bind-to none -np "$n" sh -c 'LITHOPS_HPC_NODE_ID=node$OMPI_COMM_WORLD_RANK exec "$@"' sh \
    "$@" >"$work/log" 2>&1 &
  pid=$!
  until "$bin" status "$job" >/dev/null 2>&1; do
    kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(now)
  seconds_between "$t0" "$t1" >"$work/took"
  sleep 2  # a few reports, so memory is measured at rest
  rss=$("$bin" status --json "$job" | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
own = [r["rss_kb"] / 1024 for r in d["ranks"]]
tree = [r["rss_tree_kb"] / 1024 for r in d["ranks"]]
span = lambda v: "%.0f" % v[0] if round(min(v)) == round(max(v)) else "%.0f-%.0f" % (min(v), max(v))
print("%s/%s MiB" % (span(sorted(own)), span(sorted(tree))))')
  "$bin" stop "$job" --timeout 120 >/dev/null
  wait $pid
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "| ranks | deploy: launch to all ready (median of $rounds) | ratio to $(set -- $ranks_list; echo "$1") rank(s) | all runs (s) | RSS per rank (rank / with handlers) | MPI start-up + health only (health-driver, median) |"
echo "|---|---|---|---|---|---|"
base=""
for n in $ranks_list; do
  times=()
  for r in $(seq 0 "$rounds"); do  # round 0 stages the image; it is not timed
    export LITHOPS_HPC_JOB_ID=bench-$n  # one job id: later rounds find the staged copy
    launch_to_ready "$n" "bench-$n" "$bin" --config "$work/config.toml" deploy --sif "$work/rt.sif"
    [ "$r" -gt 0 ] && times+=("$(cat "$work/took")")
  done
  deploy_rss=$rss
  drv=()
  for r in $(seq 1 "$rounds"); do
    unset LITHOPS_HPC_JOB_ID
    launch_to_ready "$n" "drv-$n-$r" "$driver" --job "drv-$n-$r" --interval 0.5 --ready-after 0 --fake-nodes
    drv+=("$(cat "$work/took")")
  done
  med=$(median "${times[@]}")
  base=${base:-$med}
  echo "| $n | $(printf '%.2f' "$med") s | $(awk -v a="$med" -v b="$base" 'BEGIN { printf "%.1f×", a / b }') |" \
       "$(printf '%.2f ' "${times[@]}")| $deploy_rss | $(printf '%.2f' "$(median "${drv[@]}")") s |"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

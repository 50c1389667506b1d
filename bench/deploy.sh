#!/usr/bin/env bash
# Launch-to-all-ready time of `lithops-hpc deploy` for 1, 2 and 4 ranks (each
# rank its own node, host engine) with the image already staged (cached: the
# second stage of the same image is a hash check), and each rank's memory.
#   bench/deploy.sh [BUILD_DIR]      (ROUNDS=3, RANKS="1 2 4")
# Time: from starting mpirun to `lithops-hpc status` exiting 0 (every rank
# ready), polled every 50 ms. Prints a Markdown table.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$src/build}" && pwd)
rounds=${ROUNDS:-3}
ranks_list=${RANKS:-"1 2 4"}
bin=$build/lithops-hpc
export LHPC_RIG_DIR=${LHPC_RIG_DIR:-$build/rig}
"$src/tests/rig/rabbitmq.sh" ensure >/dev/null
set -a; . "$LHPC_RIG_DIR/rabbitmq/env"; set +a
export AMQP_URL=$RIG_AMQP_URL OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d /tmp/lhpc-bench-deploy-XXXXXX)
trap 'rm -rf "$work"' EXIT
export LITHOPS_HPC_STATE_DIR=$work/state PYTHONPATH=$src/tests/fake-lithops
"$build/tests/tools/make-sif" "$work/rt.sif" 256M
cat >"$work/config.toml" <<TOML
[singularity]
engine = "host"
sif_path = "$work/nodes/%n"
worker_processes = 2
python = "/usr/bin/python3"
[health]
interval = 0.5
TOML
chmod 600 "$work/config.toml"

. "$src/bench/lib.sh"
echo "| ranks | launch to all ready (median of $rounds) | all runs (s) | RSS per rank (rank / with handlers) |"
echo "|---|---|---|---|"
for n in $ranks_list; do
  times=()
  rss=""
  for r in $(seq 0 "$rounds"); do  # round 0 stages the image; it is not timed
    export LITHOPS_HPC_JOB_ID=bench-$n
    t0=$(date +%s.%N)
    mpirun --oversubscribe -np "$n" sh -c 'LITHOPS_HPC_NODE_ID=node$OMPI_COMM_WORLD_RANK exec "$@"' sh \
      "$bin" --config "$work/config.toml" deploy --sif "$work/rt.sif" >"$work/log" 2>&1 &
    pid=$!
    until "$bin" status bench-$n >/dev/null 2>&1; do
      kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
      sleep 0.05
    done
    t1=$(date +%s.%N)
    [ "$r" -gt 0 ] && times+=("$(echo "$t1 - $t0" | bc)")
    sleep 2  # two reports, so memory is measured at rest
    rss=$("$bin" status --json bench-$n | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
print(", ".join("%.0f/%.0f MiB" % (r["rss_kb"] / 1024, r["rss_tree_kb"] / 1024) for r in d["ranks"]))')
    "$bin" stop bench-$n --timeout 60 >/dev/null
    wait $pid
  done
  med=$(median "${times[@]}")
  echo "| $n | $(printf '%.2f' "$med") s | $(printf '%.2f ' "${times[@]}") | $rss |"
done

# shellcheck shell=bash disable=SC2034  # sets variables for the scripts that source it
# Helpers the bench scripts share; sourced, never run.

now() { date +%s.%N; }
# Seconds from $1 to $2 (two `now` values), to the millisecond.
seconds_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# Median of the arguments (the mean of the middle two for an even count).
median() {
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# The rig's broker and 3-node Slurm cluster up, their environment exported,
# and nothing of the caller's own job or broker left in it. $1: source root.
rig_up_with_slurm() {
    "$1/tests/rig/rabbitmq.sh" ensure
    "$1/tests/rig/slurm-cluster.sh" ensure 3
    set -a
    # shellcheck disable=SC1090
    . "$("$1/tests/rig/slurm-cluster.sh" env)"
    set +a
    unset SLURM_JOB_ID AMQP_URL LITHOPS_HPC_CONFIG LITHOPS_SIF
}

# The rig broker's Erlang VM (beam.smp): its PID file is under run/ since the
# rig runs deploy/rabbitmq-user-broker.sh (at the top before).
beam_pid() { # rabbitmq dir
    local f
    for f in "$1/run/beam.pid" "$1/beam.pid"; do
        [[ -s $f ]] && { cat "$f"; return; }
    done
    echo "bench: no beam.pid under $1 (is the rig broker running?)" >&2
    return 1
}

# The rig's broker up; sets BASE_URL (its URL: new vhosts go below it) and
# RIG_RABBITMQ_DIR. $1: source root.
rig_broker() {
    "$1/tests/rig/rabbitmq.sh" ensure >&2
    local env_file
    env_file=$("$1/tests/rig/rabbitmq.sh" env)
    BASE_URL=$(grep '^RIG_AMQP_URL=' "$env_file" | cut -d= -f2-)
    RIG_RABBITMQ_DIR=$(grep '^RIG_RABBITMQ_DIR=' "$env_file" | cut -d= -f2-)
}

# A scratch directory T, removed at exit after a SIGKILL to every pid in
# PIDS (the workers a run started: call runs in this shell, not in $(...),
# or a failed run leaves its workers behind). $1: the name's prefix.
scratch_dir() {
    T=$(mktemp -d "/tmp/${1:-lhpc-bench}-XXXXXX")
    PIDS=()
    trap 'kill_pids; rm -rf "$T"' EXIT
}
kill_pids() {
    local p
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}

# The configuration the bench workers share: the host engine, python $2,
# drain_timeout $3 seconds. $1: the file.
host_worker_config() {
    cat >"$1" <<EOC
[singularity]
engine = "host"
python = "$2"
[deploy]
drain_timeout = $3
EOC
}

# The rig broker's CPU, after rig_broker: broker_watch sets BEAM_PID and
# TICK; broker_ticks prints the user+system clock ticks it used so far;
# broker_pct N the % of one core it used over the next N seconds.
broker_watch() {
    BEAM_PID=$(beam_pid "$RIG_RABBITMQ_DIR")
    TICK=$(getconf CLK_TCK)
}
broker_ticks() { awk '{print $14 + $15}' "/proc/$BEAM_PID/stat"; }
broker_pct() {
    local t0 s0 t1
    t0=$(broker_ticks)
    s0=$(now)
    sleep "$1"
    t1=$(broker_ticks)
    awk -v d=$((t1 - t0)) -v hz="$TICK" -v s="$(seconds_between "$s0" "$(now)")" 'BEGIN { printf "%.2f", d / hz / s * 100 }'
}

# Slurm jobs on the rig: slurm_job_running JOB (queued or running);
# ready_ranks BIN JOB prints how many of the job's ranks are "ready" in
# `BIN status JOB --json` (0 before the status file exists).
slurm_job_running() { [[ $(squeue -h -j "$1" -o %T 2>/dev/null) == @(PENDING|RUNNING|CONFIGURING|COMPLETING) ]]; }
ready_ranks() {
    "$1" status "$2" --json 2>/dev/null | /usr/bin/python3 -c '
import json, sys
try: d = json.load(sys.stdin)
except ValueError: print(0); sys.exit()
print(sum(r["state"] == "ready" for r in d["ranks"]))' || echo 0
}

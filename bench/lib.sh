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

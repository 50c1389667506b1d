#!/bin/bash
# A real N-node Slurm cluster on this machine (see tests/rig/README.md).
#   slurm-cluster.sh up N|ensure N|down|status|env|kill-node nX|start-node nX
# State lives in ${LHPC_RIG_DIR:-$PWD/rig}/slurm. With LHPC_RIG_SLURM_GPUS=N
# (N > 0) every command acts on another cluster, in .../slurm-gpu, whose nodes
# have N dummy GPUs each (gres). Facts behind the choices: docs/test-rig.md
# ("Slurm: several nodes on one machine", "GPUs as gres on dummy devices").
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
RIG=${LHPC_RIG_DIR:-$PWD/rig}
mkdir -p "$RIG"
# GPUs per node (0: none, the default cluster): dummy device files under
# $D/dev, a gres.conf naming them, GresTypes=gpu and Gres=gpu:N on every node.
GPUS=${LHPC_RIG_SLURM_GPUS:-0}
[[ $GPUS =~ ^[0-9]+$ ]] || { echo "slurm-cluster.sh: LHPC_RIG_SLURM_GPUS must be a count" >&2; exit 1; }
D=$(cd "$RIG" && pwd)/slurm
((GPUS == 0)) || D=$D-gpu
PY=/usr/bin/python3
UP_TIMEOUT=${LHPC_RIG_SLURM_UP_TIMEOUT:-60}
DRAIN_TIMEOUT=${LHPC_RIG_SLURM_DRAIN_TIMEOUT:-30}
export SLURM_CONF=$D/slurm.conf

die() { echo "slurm-cluster.sh: $*" >&2; exit 1; }
log() { echo "slurm-cluster.sh: $*" >&2; }
# A zombie counts as dead: PID 1 here reaps orphans only every ~1.5 s.
alive() { local stat; stat=$(cat "/proc/${1:-x}/stat" 2>/dev/null) && [[ ${stat#*) } != Z* ]]; }
# PIDs in our state files may be stale after a crash: only signal our daemons
# (or what they are for a moment after spawn, before the final exec).
ours() { alive "$1" && [[ $(cat "/proc/$1/comm" 2>/dev/null) == @(slurmd|slurmctld|munged|setsid|unshare|node-init.sh) ]]; }

# Nodes have a private /tmp (and /dev/shm): the cluster dir, which holds the
# config and munge socket they need, and the checkout whose binaries jobs run
# must be visible from every node. Where they live under /tmp (a clone made
# there), node-init.sh binds their top directory back into each node's /tmp.
case $D in /dev/shm/*) die "LHPC_RIG_DIR must be outside /dev/shm (got $D)";; esac
rig_keep=""
for p in "$D" "$(cd "$HERE/../.." && pwd)"; do
    case $p in /tmp/?*)
        top=$(cut -d/ -f1-3 <<<"$p")   # /tmp/clone/build/rig -> /tmp/clone
        [[ ":$rig_keep:" == *":$top:"* ]] || rig_keep=${rig_keep:+$rig_keep:}$top;; esac
done
[[ $D != *[[:space:]]* ]] || die "LHPC_RIG_DIR must not contain whitespace"
# The munge socket path must fit a sockaddr_un (108 bytes).
((${#D} < 90)) || die "LHPC_RIG_DIR path too long for a unix socket: $D"

wait_for() { # seconds description command...  (poll, never a blind sleep)
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
        sleep 0.2
    done
}

# SIGTERM by PID, all at once, wait with a deadline, SIGKILL as a last resort.
all_gone() { local p; for p; do alive "$p" && return 1; done; return 0; }
stop_pids() { # pids...
    local p live=()
    for p; do ours "$p" && live+=("$p") && kill -TERM "$p" 2>/dev/null; done
    ((${#live[@]})) || return 0
    wait_for 15 "pids ${live[*]} to exit" all_gone "${live[@]}" || kill -KILL "${live[@]}" 2>/dev/null || true
}

free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

state_var() { [[ -f $D/env ]] || return 0; sed -n "s/^$1=//p" "$D/env"; }
nodes_up() { ours "$(state_var RIG_SLURMCTLD_PID)" && state_var RIG_SLURM_NNODES; }

all_idle() { # every node idle, and as many as configured
    local out; out=$(sinfo -h -o '%T %D' 2>/dev/null) || return 1
    [[ $out == "idle $1" ]]
}

write_conf() { # N ctldport nodeports...
    local n=$1 ctld=$2 host; shift 2
    host=$(hostname -s)
    cat >"$D/slurm.conf" <<EOF
ClusterName=lhpcrig
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/run/munge.sock
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=5
# A node killed by a test is marked down after ~this (plus a ping interval), not
# after the default 300 s.
SlurmdTimeout=15
MailProg=/bin/true
PlugStackConfig=$D/plugstack.conf
EOF
    local i=1 p gres=""
    ((GPUS == 0)) || { gres=" Gres=gpu:$GPUS"; echo "GresTypes=gpu" >>"$D/slurm.conf"; write_gres "$n"; }
    for p in "$@"; do
        echo "NodeName=n$i NodeAddr=127.0.0.1 Port=$p CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=1000$gres" >>"$D/slurm.conf"
        i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$D/slurm.conf"
    : >"$D/plugstack.conf"
    # Names the nodes resolve: every node and the controller are loopback.
    echo "127.0.0.1 localhost $host $(seq -f 'n%g' -s ' ' 1 "$n")" >"$D/hosts"
}

# Dummy GPUs: per node, character devices with /dev/null's numbers. slurmd
# 22.05 wants File= to be a character or block device (a regular file is
# logged as invalid and the job then gets no CUDA_VISIBLE_DEVICES; a missing
# one stalls slurmd); without a device cgroup nothing opens them.
write_gres() { # N
    local i k
    : >"$D/gres.conf"
    for ((i = 1; i <= $1; i++)); do
        mkdir -p "$D/dev/n$i"
        for ((k = 0; k < GPUS; k++)); do mknod -m 666 "$D/dev/n$i/gpu$k" c 1 3; done
        echo "NodeName=n$i Name=gpu File=$D/dev/n$i/gpu[0-$((GPUS - 1))]" >>"$D/gres.conf"
    done
}

# Launch a daemon detached from the caller (own session, no inherited stdio, no
# flock fd) and echo its PID.
spawn() { # logname command...
    local logf=$D/log/$1.out; shift
    setsid "$@" </dev/null >>"$logf" 2>&1 8>&- &
    echo $!
}

start_node() { # nX -> pid
    # unshare without --fork and setsid as a non-leader both exec: $! is the slurmd.
    LHPC_RIG_KEEP=$rig_keep LHPC_RIG_HOSTS=$D/hosts spawn "slurmd-$1" unshare --uts --mount -- "$HERE/node-init.sh" "$1"
}

do_up() {
    local n=$1 t0=$SECONDS
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "node count must be a positive integer"
    rm -rf "$D"; mkdir -p "$D"/{munge,run,state,log}
    chmod 700 "$D/munge"; chmod 755 "$D" "$D/run"   # socket dir must be o+x, key dir private
    local i; for ((i = 1; i <= n; i++)); do mkdir -p "$D/spool/n$i"; done

    mungekey -c -k "$D/munge/munge.key" -b 1024 >/dev/null 2>&1 && chmod 600 "$D/munge/munge.key"
    local munged; munged=$(spawn munged munged -F --key-file="$D/munge/munge.key" \
        --socket="$D/run/munge.sock" --pid-file="$D/run/munged.pid" \
        --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed")
    echo "RIG_MUNGED_PID=$munged" >"$D/env.partial"
    wait_for 10 "munge socket" test -S "$D/run/munge.sock" || { tail "$D/log/munged.out" >&2; die "munged failed"; }

    local ports; read -ra ports < <(free_ports $((n + 1)))
    write_conf "$n" "${ports[@]}"

    # -i: ignore (absent) saved state.
    local ctld; ctld=$(spawn slurmctld slurmctld -D -i -f "$SLURM_CONF")
    echo "RIG_SLURMCTLD_PID=$ctld" >>"$D/env.partial"
    local pids=()
    for ((i = 1; i <= n; i++)); do
        pids+=("$(start_node "n$i")")
        echo "RIG_SLURMD_PID_n$i=${pids[-1]}" >>"$D/env.partial"
    done
    if ! wait_for "$UP_TIMEOUT" "$n idle nodes" all_idle "$n"; then
        sinfo >&2 || true; tail -n 5 "$D"/log/*.log >&2 || true
        do_down; die "cluster failed to come up (logs: $D/log)"
    fi
    # Pin down that the recorded PIDs really are the slurmds (the namespace
    # entry points tests nsenter into).
    for ((i = 1; i <= n; i++)); do
        [[ $(cat "$D/run/slurmd-n$i.pid") == "${pids[i-1]}" ]] || { do_down; die "slurmd n$i PID mismatch"; }
    done
    {
        cat "$D/env.partial"
        echo "SLURM_CONF=$SLURM_CONF"
        echo "RIG_SLURM_DIR=$D"
        echo "RIG_SLURM_NNODES=$n"
        echo "RIG_SLURM_NODES=$(seq -f 'n%g' -s ',' 1 "$n")"
        echo "RIG_SLURM_GPUS=$GPUS"
        echo "RIG_MUNGE_SOCKET=$D/run/munge.sock"
        # mpirun inside an allocation refuses root without these (srun --mpi=pmix
        # does not need them); srun passes the caller's environment to tasks.
        echo "OMPI_ALLOW_RUN_AS_ROOT=1"
        echo "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    } >"$D/env.tmp"
    mv "$D/env.tmp" "$D/env"; rm -f "$D/env.partial"
    log "$n nodes idle in $((SECONDS - t0))s"
}

do_down() {
    local f=$D/env; [[ -f $f ]] || f=$D/env.partial
    [[ -f $f ]] || { rm -rf "$D"; return 0; }
    local ctld; ctld=$(sed -n 's/^RIG_SLURMCTLD_PID=//p' "$f")
    if ours "$ctld"; then
        # Let running jobs finish so their steps exit cleanly, then cancel stragglers.
        if ! wait_for "$DRAIN_TIMEOUT" "squeue to empty" bash -c '[[ -z $(squeue -h 2>/dev/null) ]]'; then
            scancel --full --quiet --partition=debug 2>/dev/null || true
            wait_for 15 "cancelled jobs to end" bash -c '[[ -z $(squeue -h 2>/dev/null) ]]' || true
        fi
    fi
    local pid nss=()
    local slurmds; slurmds=$(sed -n 's/^RIG_SLURMD_PID_n[0-9]*=//p' "$f")
    for pid in $slurmds; do nss+=("$(mnt_ns "$pid")"); done
    # All together: none needs munge to shut down.
    stop_pids $slurmds $ctld "$(sed -n 's/^RIG_MUNGED_PID=//p' "$f")"
    kill_ns "${nss[@]}"
    # Node mounts live in namespaces that vanished with their last process:
    # nothing to unmount on the host. Keep logs for post-mortems.
    find "$D" -mindepth 1 -maxdepth 1 ! -name log ! -name .lock -exec rm -rf {} +
}

# Any process still inside a node's mount namespace (an orphaned slurmstepd or
# task) keeps that node's tmpfs alive and would outlive the cluster.
kill_ns() { # mount-namespace ids...
    local p ns want host; host=$(mnt_ns $$)
    for p in /proc/[0-9]*; do
        ns=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
        # Never the host's own namespace (a node whose unshare failed).
        for want; do
            [[ -n $want && $want != "$host" && $ns == "$want" ]] && kill -KILL "${p#/proc/}" 2>/dev/null
        done
    done
    return 0
}
mnt_ns() { readlink "/proc/$1/ns/mnt" 2>/dev/null || true; }

lock() { mkdir -p "$D"; exec 8>"$RIG/.${D##*/}.lock"; flock -w 300 8 || die "could not lock"; }

cmd=${1:-}
case $cmd in
    up|ensure)
        n=${2:?usage: slurm-cluster.sh $cmd N}
        lock
        have=$(nodes_up || true)
        if [[ -n $have ]]; then
            # ensure: an up cluster with at least N nodes serves `srun -N N`.
            [[ $cmd == ensure && $have -ge $n ]] && exit 0
            [[ $cmd == up ]] && die "already running with $have nodes (down first)"
            die "running with $have nodes, $n wanted (down first)"
        fi
        do_down; do_up "$n" ;;
    down)
        lock; t0=$SECONDS; do_down; log "down in $((SECONDS - t0))s" ;;
    status)
        have=$(nodes_up || true)
        [[ -n $have ]] || { echo "not running"; exit 3; }
        echo "running nodes=$have"; sinfo -h -o '%N %T %D' ;;
    env)
        [[ -f $D/env ]] || die "no env file (run up or ensure first)"
        echo "$D/env" ;;
    kill-node)
        # Hard-kill a node: its slurmd and everything in its namespace (steps, tasks).
        node=${2:?usage: slurm-cluster.sh kill-node nX}
        pid=$(state_var "RIG_SLURMD_PID_$node"); ours "$pid" || die "node $node not running"
        kill_ns "$(mnt_ns "$pid")" ;;
    start-node)
        # Bring a killed node back (fresh /tmp); ReturnToService=2 makes it usable again.
        node=${2:?usage: slurm-cluster.sh start-node nX}
        lock
        grep -q "^RIG_SLURMD_PID_$node=" "$D/env" || die "no node $node"
        ! ours "$(state_var "RIG_SLURMD_PID_$node")" || die "node $node is running"
        pid=$(start_node "$node")
        sed -i "s/^RIG_SLURMD_PID_$node=.*/RIG_SLURMD_PID_$node=$pid/" "$D/env"
        wait_for "$UP_TIMEOUT" "$node idle" bash -c "[[ \$(sinfo -h -n $node -o %T) == idle ]]" \
            || die "$node did not come back (logs: $D/log)" ;;
    *)
        echo "usage: $0 {up N|ensure N|down|status|env|kill-node nX|start-node nX}" >&2; exit 2 ;;
esac

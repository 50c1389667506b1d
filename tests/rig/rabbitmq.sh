#!/bin/bash
# A private RabbitMQ broker on 127.0.0.1 for the test suite (see tests/rig/README.md).
#   rabbitmq.sh up|ensure|down|restart|stop|status|env|add-vhost NAME
# State lives in ${LHPC_RIG_DIR:-$PWD/rig}/rabbitmq. Facts behind the choices:
# shared/test-rig.md ("RabbitMQ on loopback, by hand").
set -euo pipefail

RIG=${LHPC_RIG_DIR:-$PWD/rig}
mkdir -p "$RIG"
R=$(cd "$RIG" && pwd)/rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin     # not /usr/sbin: those wrappers switch HOME and cookie as root
PY=/usr/bin/python3               # Debian's python3 has pika; a pyenv shim may shadow it
USER_NAME=rig
START_TIMEOUT=${LHPC_RIG_RMQ_START_TIMEOUT:-120}
STOP_TIMEOUT=${LHPC_RIG_RMQ_STOP_TIMEOUT:-60}

die() { echo "rabbitmq.sh: $*" >&2; exit 1; }
log() { echo "rabbitmq.sh: $*" >&2; }

# PIDs in our state files may be stale after a crash: only trust our processes
# (comm is still "setsid" for a moment after we spawn one). A zombie counts as
# dead: PID 1 here reaps orphans only every ~1.5 s.
alive() {
    local stat; stat=$(cat "/proc/${1:-x}/stat" 2>/dev/null) || return 1
    [[ ${stat#*) } != Z* && $(cat "/proc/$1/comm" 2>/dev/null) == @(setsid|rabbitmq-server|beam.smp|epmd) ]]
}
pid_of() { cat "$R/$1.pid" 2>/dev/null || true; }

# Poll a command until it succeeds or the deadline passes (no blind sleeps).
wait_for() { # seconds description command...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
        sleep 0.2
    done
}

free_ports() { # n -> n distinct free loopback ports (bound together so they differ)
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Environment every Erlang process of this broker (server and CLI) needs. Written
# to a file so the rabbitmqctl wrapper and this script agree. No secrets in it.
write_node_env() {
    local amqp=$1 dist=$2 epmd=$3
    cat >"$R/node-env.sh" <<EOF
export HOME='$R/home'
export RABBITMQ_NODENAME=rig@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$amqp RABBITMQ_DIST_PORT=$dist
# Own epmd on its own port: otherwise Erlang starts a shared one on 4369 we cannot stop by PID.
export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$epmd
export RABBITMQ_MNESIA_BASE='$R/mnesia' RABBITMQ_LOG_BASE='$R/log' RABBITMQ_PID_FILE='$R/beam.pid'
export RABBITMQ_CONFIG_FILE='$R/rabbitmq.conf' RABBITMQ_ENABLED_PLUGINS_FILE='$R/enabled_plugins'
export RABBITMQ_CONF_ENV_FILE='$R/empty-env.conf'
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
}

# First-time layout: ports, cookie, password, config. Kept across restart so the
# URL stays valid when a test restarts the broker under a running worker.
init_state() {
    [[ -f $R/ports ]] && return 0
    mkdir -p "$R"/{home,mnesia,log,bin}
    chmod 700 "$R" "$R/home"
    local amqp dist epmd
    read -r amqp dist epmd < <(free_ports 3)
    echo "$amqp $dist $epmd" >"$R/ports.tmp"
    write_node_env "$amqp" "$dist" "$epmd"
    : >"$R/empty-env.conf"
    echo '[].' >"$R/enabled_plugins"      # no plugins: faster boot
    (umask 077
     head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$R/home/.erlang.cookie"
     chmod 400 "$R/home/.erlang.cookie"
     head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$R/password"
     # The user is created by the broker itself on first boot from this 0600
     # file: the password never appears in any argv (rabbitmqctl add_user would
     # need it as an argument).
     cat >"$R/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$amqp
default_user = $USER_NAME
default_pass = $(cat "$R/password")
default_vhost = /
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
default_user_tags.administrator = true
loopback_users = none
EOF
     cat >"$R/env" <<EOF
RIG_AMQP_URL=amqp://$USER_NAME:$(cat "$R/password")@127.0.0.1:$amqp
RIG_AMQP_PORT=$amqp
RIG_AMQP_USER=$USER_NAME
RIG_AMQP_PASSWORD_FILE=$R/password
RIG_RABBITMQCTL=$R/bin/rabbitmqctl
RIG_RABBITMQ_DIR=$R
EOF
    )
    # One wrapper, several names: rabbitmqctl, rabbitmq-diagnostics, rabbitmq-plugins.
    cat >"$R/bin/rabbitmqctl" <<EOF
#!/bin/sh
. '$R/node-env.sh'
exec $RMQ_BIN/"\${0##*/}" "\$@"
EOF
    chmod 755 "$R/bin/rabbitmqctl"
    ln -sf rabbitmqctl "$R/bin/rabbitmq-diagnostics"
    ln -sf rabbitmqctl "$R/bin/rabbitmq-plugins"
    mv "$R/ports.tmp" "$R/ports"          # last: marks the layout complete
}

# AMQP login works (the only readiness that matters to tests). Credentials go
# to python through a file path, not argv.
amqp_ok() {
    "$PY" - "$R/env" <<'EOF' 2>/dev/null
import sys, pika
env = dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[1]) if "=" in l)
p = pika.URLParameters(env["RIG_AMQP_URL"]); p.socket_timeout = 2; p.connection_attempts = 1
pika.BlockingConnection(p).close()
EOF
}

running() { alive "$(pid_of server)"; }

start_epmd() {
    alive "$(pid_of epmd)" && return 0
    . "$R/node-env.sh"
    setsid /usr/bin/epmd -address 127.0.0.1 -port "$ERL_EPMD_PORT" \
        </dev/null >>"$R/log/epmd.log" 2>&1 8>&- &
    echo $! >"$R/epmd.pid"
}

# wait_for helper: stop waiting when the server died or the login succeeds.
server_ready_or_dead() { alive "$(pid_of server)" || return 0; amqp_ok; }

start_server_inner() {
    . "$R/node-env.sh"
    rm -f "$R/beam.pid"
    setsid "$RMQ_BIN/rabbitmq-server" </dev/null >>"$R/log/server.out" 2>&1 8>&- &
    echo $! >"$R/server.pid"
    local t0=$SECONDS
    wait_for "$START_TIMEOUT" "AMQP login on 127.0.0.1:$RABBITMQ_NODE_PORT" server_ready_or_dead || true
    if ! running || ! amqp_ok; then
        tail -n 30 "$R/log/server.out" >&2 || true
        do_stop || true
        die "broker failed to start (logs: $R/log)"
    fi
    log "broker up on 127.0.0.1:$RABBITMQ_NODE_PORT in $((SECONDS - t0))s"
}

# The wrapper was started with setsid: its PID is the process group of the VM
# and its helpers, which may outlive a wrapper killed early.
group_gone() { ! ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'; }
stopped() { local p; for p; do alive "$p" && return 1; done; return 0; }
# Graceful stop so durable queues and persistent messages survive a restart:
# SIGTERM to the rabbitmq-server wrapper makes it stop the VM cleanly (the same
# path as `rabbitmqctl stop`, without the ~1 s CLI start).
stop_server() {
    local pid beam p
    pid=$(pid_of server); beam=$(pid_of beam)
    alive "$pid" || pid=""
    alive "$beam" || beam=""
    # Not the whole group: killing erl_child_setup would crash the VM uncleanly.
    for p in $pid $beam; do kill -TERM "$p" 2>/dev/null || true; done
    if [[ -n $pid ]] && ! wait_for "$STOP_TIMEOUT" "broker exit" group_gone "$pid"; then
        log "broker did not stop in ${STOP_TIMEOUT}s; killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    if [[ -n $beam ]] && ! wait_for "$STOP_TIMEOUT" "VM exit" stopped "$beam"; then
        kill -KILL "$beam" 2>/dev/null || true
    fi
    rm -f "$R/server.pid" "$R/beam.pid"
}

stop_epmd() {
    local pid; pid=$(pid_of epmd)
    if alive "$pid"; then
        kill -TERM "$pid"
        wait_for 10 "epmd exit" stopped "$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$R/epmd.pid"
}

do_stop() { stop_server; stop_epmd; }

lock() { mkdir -p "$R"; exec 8>"$R/.lock"; flock -w 300 8 || die "could not lock $R/.lock"; }

cmd=${1:-}
case $cmd in
    up|ensure)
        lock
        if running && amqp_ok; then
            [[ $cmd == ensure ]] && exit 0
            die "already running (use ensure, or down first)"
        fi
        # A half-dead broker (crashed VM, leftover epmd) is cleaned up first.
        [[ -f $R/ports ]] && do_stop
        # `up` starts from scratch; `ensure` keeps data of a broker that just stopped.
        [[ $cmd == up ]] && rm -rf "$R/mnesia" "$R/ports" "$R/env"
        init_state
        start_epmd
        start_server_inner ;;
    stop)
        # Broker outage for tests: stop the VM, keep data, ports and epmd;
        # `ensure` or `restart` brings it back on the same URL.
        lock; stop_server ;;
    restart)
        lock
        [[ -f $R/ports ]] || die "no broker state in $R (run up first)"
        t0=$SECONDS; stop_server; log "stopped in $((SECONDS - t0))s"
        start_epmd
        start_server_inner ;;
    down)
        lock
        [[ -d $R ]] || exit 0
        t0=$SECONDS
        # The data is discarded, so no graceful shutdown (~3 s) is needed: kill
        # the VM's process group (its port helpers exit on EOF).
        pid=$(pid_of server)
        if alive "$pid"; then
            kill -KILL -- "-$pid" 2>/dev/null || true
            wait_for 10 "broker exit" group_gone "$pid" || true
        fi
        do_stop
        # Keep the logs for post-mortems; drop data, password and ports.
        find "$R" -mindepth 1 -maxdepth 1 ! -name log ! -name .lock -exec rm -rf {} +
        log "down in $((SECONDS - t0))s" ;;
    status)
        if running && amqp_ok; then
            echo "running pid=$(pid_of server) beam=$(pid_of beam) epmd=$(pid_of epmd) port=$(cut -d' ' -f1 "$R/ports")"
        else
            echo "not running"; exit 3
        fi ;;
    env)
        # The path, not the contents: the file holds the password.
        [[ -f $R/env ]] || die "no env file (run up or ensure first)"
        echo "$R/env" ;;
    add-vhost)
        name=${2:?usage: rabbitmq.sh add-vhost NAME}
        running || die "broker not running"
        "$R/bin/rabbitmqctl" -q add_vhost "$name" >/dev/null
        "$R/bin/rabbitmqctl" -q set_permissions -p "$name" "$USER_NAME" '.*' '.*' '.*' >/dev/null ;;
    *)
        echo "usage: $0 {up|ensure|down|restart|stop|status|env|add-vhost NAME}" >&2; exit 2 ;;
esac

#!/bin/bash
# The test suite's private RabbitMQ broker (see tests/rig/README.md): the
# user broker users run, deploy/rabbitmq-user-broker.sh, on 127.0.0.1 without
# TLS (its default), in ${LHPC_RIG_DIR:-$PWD/rig}/rabbitmq. This wrapper only
# keeps the CLI the tests use and writes the env file they read.
#   rabbitmq.sh up|ensure|down|restart|stop|status|env|add-vhost NAME
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BROKER=$HERE/../../deploy/rabbitmq-user-broker.sh
RIG=${LHPC_RIG_DIR:-$PWD/rig}
mkdir -p "$RIG"
RIG=$(cd "$RIG" && pwd)
R=$RIG/rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin     # not /usr/sbin: those wrappers switch HOME and cookie as root
PY=/usr/bin/python3               # Debian's python3 has pika; a pyenv shim may shadow it
USER_NAME=lithops                 # the user broker's login
export LITHOPS_BROKER_START_TIMEOUT=${LHPC_RIG_RMQ_START_TIMEOUT:-120}
export LITHOPS_BROKER_STOP_TIMEOUT=${LHPC_RIG_RMQ_STOP_TIMEOUT:-60}
export RABBITMQ_SBIN=$RMQ_BIN

die() { echo "rabbitmq.sh: $*" >&2; exit 1; }
log() { echo "rabbitmq.sh: $*" >&2; }

# 8>&-: the broker's daemons must not inherit our lock. Its instructions for
# users go to stderr: our stdout is for `env`.
broker() { "$BROKER" "$@" --dir "$R" 8>&- >&2; }

port() { sed -n 's/^AMQP_PORT=//p' "$R/settings"; }

# The env file tests read (KEY=VALUE, no quoting). It holds the URL: 0600.
write_env() {
    (umask 077
     printf '%s\n' "RIG_AMQP_URL=$(cat "$R/amqp_url")" "RIG_AMQP_PORT=$(port)" "RIG_AMQP_USER=$USER_NAME" \
         "RIG_AMQP_PASSWORD_FILE=$R/password" "RIG_RABBITMQCTL=$R/bin/rabbitmqctl" "RIG_RABBITMQ_DIR=$R" \
         >"$R/env.tmp")
    mv "$R/env.tmp" "$R/env"
    # One wrapper, several names: rabbitmqctl, rabbitmq-diagnostics,
    # rabbitmq-plugins. It reads the broker's own node-env.sh rather than
    # calling the broker script's `ctl`, which would wait for its lock while
    # another test starts the broker.
    mkdir -p "$R/bin"
    printf '%s\n' '#!/bin/sh' ". '$R/node-env.sh'" "exec $RMQ_BIN/\"\${0##*/}\" \"\$@\"" >"$R/bin/rabbitmqctl"
    chmod 755 "$R/bin/rabbitmqctl"
    ln -sf rabbitmqctl "$R/bin/rabbitmq-diagnostics"
    ln -sf rabbitmqctl "$R/bin/rabbitmq-plugins"
}

# AMQP login works (the only readiness that matters to tests). Credentials go
# to python through a file path, not argv.
amqp_ok() {
    [[ -f $R/amqp_url ]] || return 1
    "$PY" - "$R/amqp_url" <<'EOF' 2>/dev/null
import sys, pika
p = pika.URLParameters(open(sys.argv[1]).read().strip()); p.socket_timeout = 2; p.connection_attempts = 1
pika.BlockingConnection(p).close()
EOF
}

start() {
    local t0=$SECONDS
    broker start --name rig@localhost
    amqp_ok || die "broker started but AMQP login fails (logs: $R/log)"
    write_env
    log "broker up on 127.0.0.1:$(port) in $((SECONDS - t0))s"
}

server_pid() { cat "$R/run/server.pid" 2>/dev/null || true; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
running() { alive "$(server_pid)" && amqp_ok; }

# Beside the broker directory, not in it: the broker script locks $R/.lock
# itself while we hold ours.
lock() { exec 8>"$RIG/rabbitmq.lock"; flock -w 300 8 || die "could not lock $RIG/rabbitmq.lock"; }

# Keep the logs for post-mortems; drop data, password and ports.
wipe() { find "$R" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +; }

cmd=${1:-}
case $cmd in
    up|ensure)
        lock
        if running; then
            [[ $cmd == ensure ]] && exit 0
            die "already running (use ensure, or down first)"
        fi
        # `up` starts from scratch (new ports and password); `ensure` keeps the
        # data and URL of a broker that just stopped.
        if [[ $cmd == up && -d $R ]]; then
            broker stop || true
            wipe
        fi
        start ;;
    stop)
        # Broker outage for tests: stop it, keep data and ports; `ensure` or
        # `restart` brings it back on the same URL.
        lock; broker stop ;;
    restart)
        lock
        [[ -f $R/settings ]] || die "no broker state in $R (run up first)"
        broker stop
        start ;;
    down)
        lock
        [[ -d $R ]] || exit 0
        t0=$SECONDS
        # The data is discarded, so no graceful shutdown (~3 s) is needed: kill
        # the VM's process group (the broker script starts it with setsid).
        pid=$(server_pid)
        if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        broker stop || true
        wipe
        log "down in $((SECONDS - t0))s" ;;
    status)
        if running; then
            echo "running pid=$(server_pid) port=$(port)"
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

#!/bin/bash
# rabbitmq-user-broker.sh: a RabbitMQ broker of your own, run as your user on a
# service (login, gateway) node that your Slurm jobs can reach, for Lithops
# and lithops-hpc. No root, no system service: data, logs, credentials and
# ports live in one directory you own.
#
#   rabbitmq-user-broker.sh start [--dir DIR] [--host NAME] [--port N] [--bind ADDR]
#                                 [--tls-cert FILE --tls-key FILE [--tls-ca FILE] | --no-tls]
#                                 [--name NODE] [--consumer-timeout SECONDS|off]
#   rabbitmq-user-broker.sh status|stop|url [--dir DIR]
#   rabbitmq-user-broker.sh ctl [--dir DIR] RABBITMQCTL-ARGS...   e.g. ctl list_queues
#
# DIR defaults to $LITHOPS_BROKER_DIR, else ~/.lithops-hpc/rabbitmq (prefer a
# local disk if your home is on NFS). The first start picks free ports and a
# random password; both stay the same across restarts, so the URL stays valid.
# The password never appears on a command line (others can read those); the
# full URL is only in DIR/amqp_url (mode 0600) and printed by `url`:
#
#   export AMQP_URL=$(rabbitmq-user-broker.sh url)      # lithops-hpc reads it
#
# Who can reach it: without TLS the broker listens on 127.0.0.1 only (plain
# AMQP carries the password and every task in clear), and the URL names
# 127.0.0.1: right for one machine, unreachable from compute nodes. To open it:
#   --tls-cert FILE --tls-key FILE [--tls-ca FILE]   (PEM; the name given with
#       --host must be in the certificate): amqps:// only, on every interface
#       (or --bind ADDR); the way to serve compute nodes.
#   --bind ADDR (e.g. --bind 0.0.0.0, or the address of the cluster network)
#       without TLS: plain AMQP on that interface; only on a network where
#       every host and user able to reach the port is trusted. A warning says so.
# Options given to a later start replace the saved ones; --port/--host/--bind/
# --tls-*/--name/--consumer-timeout are kept otherwise. --name sets the Erlang node name (default
# lithops@localhost): two brokers on one machine each have their own epmd, so
# they may share it. DIR/node-env.sh holds the environment rabbitmqctl needs
# to reach this broker (no secrets).
#
# Fit for long Lithops calls: a task is acked when it has finished, so the
# broker's consumer_timeout (RabbitMQ's default: 30 min) is 24 h here, or
# --consumer-timeout SECONDS, or off (no limit). The memory alarm is at 1/8 of
# this node's memory (at least 256 MiB, at most 4 GiB: a login node is
# shared) and the disk alarm at 1 GB free: past either the broker blocks
# publishers rather than fail.
#
# Needs: rabbitmq-server (Debian/Ubuntu package rabbitmq-server, or a generic
# tarball with RABBITMQ_SBIN=<its sbin>), epmd (Erlang), python3 or ss to find
# free ports.
set -euo pipefail

PROG=rabbitmq-user-broker.sh
START_TIMEOUT=${LITHOPS_BROKER_START_TIMEOUT:-120}
STOP_TIMEOUT=${LITHOPS_BROKER_STOP_TIMEOUT:-60}
BROKER_USER=lithops

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
# alive PID WORD: PID runs, is this user's, and WORD is in its command line. A
# pid file outlives its process and the number is reused: kill -0 alone would
# take (and stop signals to) whatever of the user's now has that number.
alive() {
    local pid=${1:-} word=${2:?alive needs the word its command line holds}
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ -d /proc/$pid ]] || return 0 # no /proc here: kill -0 is all there is
    [[ -O /proc/$pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word"
}

wait_for() { # seconds description command...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { log "timed out after $1 s waiting for $what"; return 1; }
        sleep 0.5
    done
}

# The scripts that start the VM directly. Debian's /usr/sbin wrappers switch to
# the rabbitmq user and its HOME when run as root, so they are used only when
# nothing else is there.
find_sbin() {
    local d
    for d in "${RABBITMQ_SBIN:-}" /usr/lib/rabbitmq/bin /usr/local/lib/rabbitmq/bin; do
        [[ -n $d && -x $d/rabbitmq-server ]] && { echo "$d"; return 0; }
    done
    d=$(command -v rabbitmq-server 2>/dev/null) || true
    [[ -n $d ]] && { dirname "$d"; return 0; }
    die "rabbitmq-server not found: install it (Debian: rabbitmq-server) or set RABBITMQ_SBIN to its sbin directory"
}

free_ports() { # n -> n distinct free TCP ports
    if command -v python3 >/dev/null; then
        python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
        return
    fi
    command -v ss >/dev/null || die "need python3 or ss to pick free ports (or give --port)"
    local used p out=() tries=0
    used=$(ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -u)
    while ((${#out[@]} < $1)); do
        ((tries++ < 1000)) || die "no free port found"
        p=$((20000 + RANDOM % 40000))
        grep -qx "$p" <<<"$used" || [[ " ${out[*]} " == *" $p "* ]] || out+=("$p")
    done
    echo "${out[*]}"
}

port_free() { # port -> true when nothing listens on it
    if command -v python3 >/dev/null; then
        python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1])))' "$1" 2>/dev/null
    else
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 1; fi
    fi
}

# ---- state: DIR/settings (no secrets) and 0600 files for the secrets ---------

load_settings() {
    AMQP_PORT="" DIST_PORT="" EPMD_PORT="" HOST="" BIND="" TLS_CERT="" TLS_KEY="" TLS_CA="" NODE_NAME=""
    CONSUMER_TIMEOUT=86400
    # shellcheck disable=SC1091
    [[ -f $D/settings ]] && . "$D/settings"
    return 0
}

save_settings() {
    cat >"$D/settings.tmp" <<EOF
AMQP_PORT=$AMQP_PORT
DIST_PORT=$DIST_PORT
EPMD_PORT=$EPMD_PORT
HOST=$(printf %q "$HOST")
BIND=$(printf %q "$BIND")
TLS_CERT=$(printf %q "$TLS_CERT")
TLS_KEY=$(printf %q "$TLS_KEY")
TLS_CA=$(printf %q "$TLS_CA")
NODE_NAME=$(printf %q "$NODE_NAME")
CONSUMER_TIMEOUT=$CONSUMER_TIMEOUT
EOF
    mv "$D/settings.tmp" "$D/settings"
}

# The memory alarm: 1/8 of this node's memory, within [256 MiB, 4 GiB].
memory_limit() {
    local kb mib
    kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo 2>/dev/null || true)
    mib=$(( ${kb:-2097152} / 1024 / 8 ))
    ((mib >= 256)) || mib=256
    ((mib <= 4096)) || mib=4096
    echo "${mib}MiB"
}

scheme() { [[ -n $TLS_CERT ]] && echo amqps || echo amqp; }
url_redacted() { echo "$(scheme)://$BROKER_USER:***@$HOST:$AMQP_PORT"; }

# Everything the Erlang VM and the CLI tools need; sourced by both.
write_node_env() {
    cat >"$D/node-env.sh" <<EOF
export HOME=$(printf %q "$D/home")
export RABBITMQ_NODENAME=${NODE_NAME:-lithops@localhost}
export RABBITMQ_DIST_PORT=$DIST_PORT
# Our own epmd, loopback only, on its own port: the distribution port is never
# reachable from other hosts, and stop can end it by its PID.
export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT
export RABBITMQ_MNESIA_BASE=$(printf %q "$D/mnesia") RABBITMQ_LOG_BASE=$(printf %q "$D/log")
export RABBITMQ_PID_FILE=$(printf %q "$D/run/beam.pid")
export RABBITMQ_CONFIG_FILE=$(printf %q "$D/rabbitmq.conf")
export RABBITMQ_ADVANCED_CONFIG_FILE=$(printf %q "$D/advanced.config")
export RABBITMQ_ENABLED_PLUGINS_FILE=$(printf %q "$D/enabled_plugins")
export RABBITMQ_CONF_ENV_FILE=$(printf %q "$D/rabbitmq-env.conf")
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
EOF
}

first_time_setup() {
    mkdir -p "$D"
    chmod 700 "$D"
    mkdir -p "$D"/{home,mnesia,log,run}
    chmod 700 "$D/home"
    : >"$D/rabbitmq-env.conf"       # not the system's /etc/rabbitmq/rabbitmq-env.conf
    echo '[].' >"$D/enabled_plugins"
    (
        umask 077
        [[ -f $D/home/.erlang.cookie ]] || {
            head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/home/.erlang.cookie"
            chmod 400 "$D/home/.erlang.cookie"
        }
        [[ -f $D/password ]] || head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$D/password"
    )
}

# Where the listener is: as given with --bind; else every interface for TLS,
# and loopback only for plain AMQP (nothing in clear leaves the machine).
listen_address() {
    if [[ -n $BIND ]]; then echo "$BIND"; elif [[ -n $TLS_CERT ]]; then echo ""; else echo 127.0.0.1; fi
}
is_loopback() { [[ $1 == 127.* || $1 == ::1 || $1 == localhost ]]; }

write_config() {
    local listen=$AMQP_PORT addr
    addr=$(listen_address)
    [[ -n $addr ]] && listen=$addr:$AMQP_PORT
    (
        umask 077
        {
            echo "# Written by $PROG on each start: edit its options, not this file."
            if [[ -n $TLS_CERT ]]; then
                echo "listeners.tcp = none"
                echo "listeners.ssl.default = $listen"
                echo "ssl_options.certfile = $TLS_CERT"
                echo "ssl_options.keyfile = $TLS_KEY"
                [[ -n $TLS_CA ]] && echo "ssl_options.cacertfile = $TLS_CA"
                echo "ssl_options.verify = verify_none"
                echo "ssl_options.fail_if_no_peer_cert = false"
            else
                echo "listeners.tcp.default = $listen"
            fi
            # Created on the first boot from this 0600 file: the password
            # never goes through rabbitmqctl's command line.
            echo "default_user = $BROKER_USER"
            echo "default_pass = $(cat "$D/password")"
            echo "default_vhost = /"
            echo "default_permissions.configure = .*"
            echo "default_permissions.read = .*"
            echo "default_permissions.write = .*"
            echo "loopback_users = none"
            # lithops-hpc acks a task when it has finished: let one run up to a
            # day, or as set (the default, 30 min, would close the worker's
            # channel). "off" is set in advanced.config below.
            [[ $CONSUMER_TIMEOUT == off ]] || echo "consumer_timeout = $((CONSUMER_TIMEOUT * 1000))"
            echo "vm_memory_high_watermark.absolute = $(memory_limit)"
            echo "disk_free_limit.absolute = 1GB"
        } >"$D/rabbitmq.conf"
        echo "$(scheme)://$BROKER_USER:$(cat "$D/password")@$HOST:$AMQP_PORT" >"$D/amqp_url"
    )
    {
        echo "%% Written by $PROG on each start: edit its options, not this file."
        if [[ $CONSUMER_TIMEOUT == off ]]; then
            echo "[{rabbit, [{consumer_timeout, undefined}]}]."
        else
            echo "[]."
        fi
    } >"$D/advanced.config"
}

pid_of() { cat "$D/run/$1.pid" 2>/dev/null || true; }
running() { alive "$(pid_of server)" rabbit; }

# Where to knock: the bound address, or loopback when bound to every interface.
probe_addr() {
    local a; a=$(listen_address)
    [[ -z $a || $a == 0.0.0.0 || $a == :: ]] && a=127.0.0.1
    echo "$a"
}
port_open() { (exec 3<>"/dev/tcp/$(probe_addr)/$AMQP_PORT") 2>/dev/null; }

ctl() { # rabbitmqctl-like tool with this broker's environment
    local tool=$1; shift
    # shellcheck disable=SC1091
    (. "$D/node-env.sh" && exec "$SBIN/$tool" "$@")
}

# ---- commands ----------------------------------------------------------------

# The name in the URL: as given; else 127.0.0.1 when the listener is loopback
# only (a host name may resolve elsewhere, e.g. Debian's 127.0.1.1), else this
# host's name. A plain listener off loopback is said out loud.
choose_host() { # host given at this start ("" if none)
    local addr; addr=$(listen_address)
    if [[ -z $addr ]] || ! is_loopback "$addr"; then
        [[ -n $HOST ]] && ! is_loopback "$HOST" || HOST=$(hostname -f 2>/dev/null || hostname)
        [[ -n $TLS_CERT ]] ||
            log "warning: plain AMQP (no TLS) on ${addr:-every interface}: the password and tasks travel in clear;" \
                "use --tls-cert/--tls-key unless every host that can reach port ${AMQP_PORT:-the port} is trusted"
        return 0
    fi
    if ! is_loopback "${HOST:-x}"; then
        [[ -z $1 ]] || die "--host $1 cannot reach a broker listening on $addr only: add --bind ADDR or TLS (see --help)"
        HOST=127.0.0.1
    fi
    log "listening on $addr only (no TLS): for this machine alone; to serve compute nodes use" \
        "--tls-cert/--tls-key, or --bind ADDR on a trusted network (see --help)"
}

do_start() {
    local opt_port="" opt_host="" opt_bind="" opt_cert="" opt_key="" opt_ca="" no_tls="" opt_name="" opt_timeout=""
    while (($#)); do
        case $1 in
            --port) opt_port=${2:?--port needs a number}; shift 2 ;;
            --host) opt_host=${2:?--host needs a name}; shift 2 ;;
            --bind) opt_bind=${2:?--bind needs an address}; shift 2 ;;
            --tls-cert) opt_cert=${2:?}; shift 2 ;;
            --tls-key) opt_key=${2:?}; shift 2 ;;
            --tls-ca) opt_ca=${2:?}; shift 2 ;;
            --no-tls) no_tls=1; shift ;;
            --name) opt_name=${2:?--name needs a node name such as rig@localhost}; shift 2 ;;
            --consumer-timeout) opt_timeout=${2:?--consumer-timeout needs seconds or off}; shift 2 ;;
            *) die "start: unknown option $1 (see $PROG --help)" ;;
        esac
    done
    load_settings
    if running && port_open; then
        log "already running (pid $(pid_of server)); Lithops URL: $(url_redacted)"
        return 0
    fi
    first_time_setup
    [[ -z $opt_port ]] || [[ $opt_port =~ ^[0-9]+$ && $opt_port -ge 1 && $opt_port -le 65535 ]] ||
        die "--port must be a number from 1 to 65535"
    [[ -n $opt_host ]] && HOST=$opt_host
    [[ -n $opt_bind ]] && BIND=$opt_bind
    [[ -n $opt_name ]] && NODE_NAME=$opt_name
    if [[ -n $opt_timeout ]]; then
        [[ $opt_timeout == off || ($opt_timeout =~ ^[0-9]+$ && $opt_timeout -ge 1) ]] ||
            die "--consumer-timeout takes seconds (1 or more) or off, not $opt_timeout"
        CONSUMER_TIMEOUT=$opt_timeout
    fi
    if [[ -n $no_tls ]]; then
        TLS_CERT="" TLS_KEY="" TLS_CA=""
    elif [[ -n $opt_cert || -n $opt_key ]]; then
        [[ -n $opt_cert && -n $opt_key ]] || die "TLS needs both --tls-cert and --tls-key"
        TLS_CERT=$(readlink -f -- "$opt_cert") TLS_KEY=$(readlink -f -- "$opt_key") TLS_CA=""
        [[ -n $opt_ca ]] && TLS_CA=$(readlink -f -- "$opt_ca")
    fi
    local f
    for f in "$TLS_CERT" "$TLS_KEY" "$TLS_CA"; do
        [[ -z $f || -r $f ]] || die "cannot read $f"
    done
    # Ports: as given, else as saved (when still free), else new free ones.
    local fresh
    read -r -a fresh <<<"$(free_ports 3)"
    if [[ -n $opt_port ]]; then
        AMQP_PORT=$opt_port
        port_free "$AMQP_PORT" || die "port $AMQP_PORT is in use: pick another --port or leave it out"
    elif [[ -z $AMQP_PORT ]] || ! port_free "$AMQP_PORT"; then
        [[ -n $AMQP_PORT ]] && log "saved port $AMQP_PORT is taken now: the URL changes"
        AMQP_PORT=${fresh[0]}
    fi
    { [[ -n $DIST_PORT ]] && port_free "$DIST_PORT"; } || DIST_PORT=${fresh[1]}
    # A leftover epmd of ours keeps its port (start reuses that epmd).
    alive "$(pid_of epmd)" epmd || { [[ -n $EPMD_PORT ]] && port_free "$EPMD_PORT"; } || EPMD_PORT=${fresh[2]}
    choose_host "$opt_host"
    save_settings
    write_node_env
    write_config

    # shellcheck disable=SC1091
    . "$D/node-env.sh"
    if ! alive "$(pid_of epmd)" epmd; then
        local epmd; epmd=$(command -v epmd || true)
        [[ -n $epmd ]] || die "epmd (Erlang) not found in PATH"
        # 9>&-: daemons must not hold this script's lock.
        setsid "$epmd" -address 127.0.0.1 -port "$EPMD_PORT" -relaxed_command_check \
            </dev/null >>"$D/log/epmd.log" 2>&1 9>&- &
        echo $! >"$D/run/epmd.pid"
    fi
    rm -f "$D/run/beam.pid"
    (cd "$D" && exec setsid "$SBIN/rabbitmq-server" </dev/null >>"$D/log/server.out" 2>&1 9>&-) &
    echo $! >"$D/run/server.pid"
    log "starting RabbitMQ in $D (log: $D/log) ..."
    local t0=$SECONDS
    if ! wait_for "$START_TIMEOUT" "the broker to listen on port $AMQP_PORT" \
        bash -c "! kill -0 $(pid_of server) 2>/dev/null || (exec 3<>/dev/tcp/$(probe_addr)/$AMQP_PORT) 2>/dev/null" ||
        ! running || ! ctl rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then
        tail -n 20 "$D/log/server.out" >&2 || true
        do_stop >/dev/null 2>&1 || true
        die "the broker did not start (logs: $D/log)"
    fi
    log "running (pid $(pid_of server)) after $((SECONDS - t0)) s"
    print_instructions
}

print_instructions() {
    cat <<EOF
Broker URL for Lithops (password hidden here):
    $(url_redacted)
The full URL is in $D/amqp_url (mode 0600); print it with
    $PROG url${D_GIVEN:+ --dir $D}
Use it as rabbitmq.amqp_url in ~/.lithops/config and in the lithops-hpc
configuration, or in the environment of both:
    export AMQP_URL=\$($PROG url${D_GIVEN:+ --dir $D})
EOF
    [[ -z $TLS_CERT ]] || echo "TLS: clients must trust the CA of $TLS_CERT and connect to the name $HOST."
}

# gone PID...: none of the (non-empty) PIDs runs any more.
gone() {
    local p
    for p; do [[ -z $p ]] || ! kill -0 "$p" 2>/dev/null || return 1; done
}

stop_server() {
    local pid beam
    pid=$(pid_of server); beam=$(pid_of beam)
    alive "$pid" rabbit || pid=""
    alive "$beam" beam || beam=""
    [[ -n $pid || -n $beam ]] || return 0
    # SIGTERM to the start script stops the VM cleanly (messages on disk kept).
    if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; else kill -TERM "$beam" 2>/dev/null || true; fi
    if ! wait_for "$STOP_TIMEOUT" "the broker to exit" gone "$pid" "$beam"; then
        log "the broker did not stop in $STOP_TIMEOUT s; killing it"
        if [[ -n $pid ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        if [[ -n $beam ]]; then kill -KILL "$beam" 2>/dev/null || true; fi
    fi
}

do_stop() {
    [[ -d $D/run ]] || { log "no broker in $D"; return 0; }
    local t0=$SECONDS
    stop_server
    local e; e=$(pid_of epmd)
    if alive "$e" epmd; then
        kill -TERM "$e" 2>/dev/null || true
        wait_for 10 "epmd to exit" bash -c "! kill -0 $e 2>/dev/null" || kill -KILL "$e" 2>/dev/null || true
    fi
    rm -f "$D/run/server.pid" "$D/run/beam.pid" "$D/run/epmd.pid"
    log "stopped in $((SECONDS - t0)) s (data kept in $D; remove it to forget queues and credentials)"
}

do_status() {
    [[ -f $D/settings ]] || { echo "no broker in $D"; exit 3; }
    load_settings
    if running && port_open; then
        echo "running: pid $(pid_of server), $(url_redacted), data $D"
        ctl rabbitmqctl -q list_queues name messages_ready messages_unacknowledged consumers 2>/dev/null || true
    else
        echo "not running (data $D)"
        exit 3
    fi
}

do_url() {
    [[ -f $D/amqp_url ]] || die "no broker in $D: run '$PROG start' first"
    running || log "note: the broker is not running"
    cat "$D/amqp_url"
}

# ---- main --------------------------------------------------------------------

cmd=${1:-}
[[ -n $cmd ]] || { usage >&2; exit 2; }
shift
D=${LITHOPS_BROKER_DIR:-${HOME:?HOME is not set}/.lithops-hpc/rabbitmq}
D_GIVEN=""
args=()
while (($#)); do
    case $1 in
        --dir) D=${2:?--dir needs a directory}; D_GIVEN=1; shift 2 ;;
        --dir=*) D=${1#--dir=}; D_GIVEN=1; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ $D == /* ]] || D=$PWD/$D
[[ $D != *[[:space:]]* ]] || die "the directory must not contain spaces: $D"
mkdir -p "$D"
# One command at a time per broker directory.
exec 9>"$D/.lock"
flock -w 300 9 || die "another $PROG is busy with $D"

case $cmd in
    start) SBIN=$(find_sbin); do_start "${args[@]}" ;;
    stop) do_stop ;;
    status) SBIN=$(find_sbin); do_status ;;
    url) do_url ;;
    ctl) SBIN=$(find_sbin); load_settings; [[ -f $D/node-env.sh ]] || die "no broker in $D"
         ctl rabbitmqctl "${args[@]}" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac

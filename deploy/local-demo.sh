#!/usr/bin/env bash
# The main job end to end on one machine (Debian 12, root): install, build,
# start a private RabbitMQ broker on loopback, deploy two MPI ranks (each its
# own "node") with the host engine, publish Lithops-format tasks, ping every
# rank, show the status, stop cleanly. Then the serverless loop, with nothing
# deployed by hand: `lithops-hpc up --local` (broker, store, controller; no
# Slurm), tasks published with no worker, a deployment appears (mpirun on
# this machine), serves them, idles out; `down`.
#
# Lithops is not a Debian package, so the handler runs the
# stand-in function handler of tests/fake-lithops: the messages, the queue,
# the dispatcher and handler.py are the real ones. The image staged to each
# "node" is a generated SIF file (the host engine does not run it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${LHPC_BUILD_DIR:-$root/build}
demo=$build/demo

step() { printf '\n==> %s\n' "$*"; }

# publish_tasks PREFIX RECORDS: 20 send_task messages of 5 calls each, as the
# Lithops client sends them, to the broker of $AMQP_URL, else of the Lithops
# config `up` wrote (never on a command line); prints when it began.
publish_tasks() {
  /usr/bin/python3 - "$@" <<'PY'
import base64, json, os, sys, time
import pika, yaml
prefix, records = sys.argv[1], sys.argv[2]
url = os.environ.get("AMQP_URL")
if not url:
    with open(os.environ["LITHOPS_CONFIG_FILE"]) as f:
        url = yaml.safe_load(f)["rabbitmq"]["amqp_url"]  # what up wrote for the Lithops client
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.queue_declare(queue="task_queue", durable=True)
print(time.time())
for j in range(20):
    calls = [f"{i:05d}" for i in range(5)]
    payload = {"job_key": f"{prefix}{j:02d}", "call_ids": calls, "data_byte_ranges": [[0, 0]] * 5,
               "total_calls": 5, "worker_processes": 5, "log_level": "INFO", "execution_timeout": 60,
               "config": {"lithops": {"backend": "singularity"}},
               "lhpc_test": {"sleep": 0.05, "record_dir": records}}
    body = json.dumps({"action": "send_task",
                       "payload": base64.b64encode(json.dumps(payload).encode()).decode()})
    ch.basic_publish("", "task_queue", body, pika.BasicProperties(delivery_mode=2))
conn.close()
PY
}

step "installing dependencies (Debian 12 packages)"
deploy/install-deps.sh
step "building"
[ -f "$build/build.ninja" ] || meson setup "$build" >/dev/null
meson compile -C "$build" >/dev/null
bin=$build/lithops-hpc

rm -rf "$demo"
mkdir -p "$demo"
export LITHOPS_HPC_STATE_DIR=$demo/state
broker=(deploy/rabbitmq-user-broker.sh)
cleanup() {
  [ -n "${deploy_pid:-}" ] && kill -0 "$deploy_pid" 2>/dev/null && "$bin" stop --timeout 60 >/dev/null 2>&1 || true
  "${broker[@]}" stop --dir "$demo/broker" >/dev/null 2>&1 || true
  [ -n "${services_up:-}" ] && "$bin" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "starting a private RabbitMQ broker on 127.0.0.1"
"${broker[@]}" start --dir "$demo/broker" --host 127.0.0.1 --bind 127.0.0.1 --no-tls
AMQP_URL=$("${broker[@]}" url --dir "$demo/broker")
export AMQP_URL  # the URL travels in the environment, never on a command line

(umask 077 && cat >"$demo/config.toml" <<TOML
[singularity]
engine = "host"
sif_path = "$demo/nodes/%n"
worker_processes = 2
python = "/usr/bin/python3"
[deploy]
cleanup = true
[health]
interval = 1
TOML
)
"$build/tests/tools/make-sif" "$demo/lithops-rt.sif" 64M

step "lithops-hpc config check"
"$bin" --config "$demo/config.toml" config check

step "deploying 2 ranks: mpirun -np 2 lithops-hpc deploy --sif $demo/lithops-rt.sif"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PYTHONPATH=$root/tests/fake-lithops mpirun --oversubscribe -np 2 \
  sh -c 'LITHOPS_HPC_NODE_ID=node$OMPI_COMM_WORLD_RANK exec "$@"' sh \
  "$bin" --config "$demo/config.toml" deploy --sif "$demo/lithops-rt.sif" >"$demo/deploy.log" 2>&1 &
deploy_pid=$!
deadline=$((SECONDS + 120))
until "$bin" status >/dev/null 2>&1; do
  kill -0 "$deploy_pid" 2>/dev/null || { cat "$demo/deploy.log"; echo "deploy ended early" >&2; exit 1; }
  ((SECONDS < deadline)) || { cat "$demo/deploy.log"; echo "not ready in 120 s" >&2; exit 1; }
  sleep 0.5
done
grep -E "staged|rank 0 node0: [0-9]+ of" "$demo/deploy.log" | sed 's/^\[[^]]*\] //' || true

step "publishing 20 Lithops send_task messages of 5 calls each (as the Lithops client does)"
mkdir -p "$demo/records"
publish_tasks demo-job "$demo/records" >/dev/null
/usr/bin/python3 - "$demo/records" <<'PY'
import glob, sys, time
records = sys.argv[1]
t0, deadline = time.time(), time.time() + 60
while len(glob.glob(records + "/*.json")) < 100 and time.time() < deadline:
    time.sleep(0.1)
n = len(glob.glob(records + "/*.json"))
print(f"{n} of 100 calls ran in {time.time() - t0:.2f} s")
sys.exit(0 if n == 100 else 1)
PY

step "lithops-hpc ping --count 10"
"$bin" ping --count 10

step "lithops-hpc status"
"$bin" status

step "lithops-hpc logs --rank 1 | tail -n 2   (handler output: per-rank files, not the job output)"
"$bin" logs --rank 1 | tail -n 2

step "lithops-hpc stop"
"$bin" stop --timeout 60
wait "$deploy_pid"
deploy_pid=
grep -E "removed|stopped:" "$demo/deploy.log" | sed 's/^\[[^]]*\] //' || true
step "done: the deployment drained and stopped"

step "the serverless loop: lithops-hpc up --local --sif $demo/lithops-rt.sif   (no Slurm, no worker)"
"${broker[@]}" stop --dir "$demo/broker" >/dev/null  # up starts its own broker, and a Redis
unset AMQP_URL
# A Lithops config of the demo's own: up writes the broker's and the store's settings there.
export LITHOPS_CONFIG_FILE=$demo/lithops-config LITHOPS_HPC_CONFIG=$demo/local.toml
(umask 077 && cat >"$demo/local.toml" <<TOML
[singularity]
engine = "host"
worker_processes = 4
python = "/usr/bin/python3"
[health]
interval = 1
[autoalloc]
idle_timeout = 5
poll = 5
TOML
)
services_up=1
PYTHONPATH=$root/tests/fake-lithops "$bin" up --local --sif "$demo/lithops-rt.sif" --max-nodes 1 |
  grep -Ev "^(Try:|  python3 -c|Stop them all)"
controller_state=$LITHOPS_HPC_STATE_DIR/autoalloc/state.json
deadline=$((SECONDS + 30))
until grep -q "scaled to zero" "$controller_state" 2>/dev/null; do
  ((SECONDS < deadline)) || { echo "the controller did not start" >&2; exit 1; }
  sleep 0.2
done
grep -o '"next": "[^"]*"' "$controller_state"

step "publishing 20 send_task messages of 5 calls each; nothing serves the queue yet"
mkdir -p "$demo/records-local"
published=$(publish_tasks loop-job "$demo/records-local")
/usr/bin/python3 - "$demo/records-local" "$controller_state" "$published" <<'PY'
import glob, json, sys, time
records, state, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
first, deadline = None, time.time() + 120
while len(glob.glob(records + "/*.json")) < 100 and time.time() < deadline:
    if first is None and glob.glob(records + "/*.json"):
        first = time.time() - t0
    time.sleep(0.05)
n = len(glob.glob(records + "/*.json"))
with open(state) as f:
    jobs = [j["id"] for j in json.load(f)["jobs"]]
print(f"the controller started deployment {', '.join(jobs) or '?'} (mpirun on this machine)")
print(f"{n} of 100 calls ran from zero: the first {first or 0:.2f} s after publishing, all in {time.time() - t0:.2f} s")
sys.exit(0 if n == 100 else 1)
PY

step "lithops-hpc status"
"$bin" status | tail -n 3

step "no more tasks: the deployment idles out (autoalloc.idle_timeout = 5 s)"
t0=$SECONDS
deadline=$((SECONDS + 90))
until grep -q '"jobs": \[\]' "$controller_state"; do
  ((SECONDS < deadline)) || { echo "the deployment did not idle out in 90 s" >&2; exit 1; }
  sleep 0.5
done
echo "scaled back to zero after $((SECONDS - t0)) s; the controller waits for the next task"

step "lithops-hpc down"
"$bin" down
services_up=
step "done: the deployment came with the tasks and went with them; nothing of the demo runs"

"""Helpers for lithops-hpc integration tests (stdlib + pika; run by /usr/bin/python3).

Each test is a plain unittest script: `python3 tests/integration/test_x.py`,
exiting non-zero and naming the failed check on failure (unittest does that).
The broker and the Slurm cluster come from tests/rig/ (see its README); both
are shared by every test of a run, so each test takes its own vhost
(fresh_vhost) or its own queue names.

Environment: LHPC_RIG_DIR (default $PWD/rig) locates the rig's state and env files.
"""
import base64
import collections
import itertools
import json
import os
import secrets
import socket
import subprocess
import time
import unittest
import urllib.parse
from pathlib import Path

try:
    import pika
except ImportError:  # e.g. a pyenv python3 first in PATH
    raise SystemExit("lhpc_test needs pika: run tests with /usr/bin/python3 "
                     "(Debian's python3-pika)") from None

RIG_SCRIPTS = Path(__file__).resolve().parent.parent / "rig"
_vhost_counter = itertools.count()

Message = collections.namedtuple("Message", "body headers")


def rig_dir():
    return Path(os.environ.get("LHPC_RIG_DIR") or Path.cwd() / "rig").resolve()


def _read_env_file(path):
    # KEY=VALUE lines written by the rig scripts: no quoting, no export.
    out = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def rig_env():
    """Variables from the broker and cluster env files that exist (see tests/rig/README.md)."""
    env = {"LHPC_RIG_DIR": str(rig_dir())}
    for part in ("rabbitmq", "slurm"):
        path = rig_dir() / part / "env"
        if path.exists():
            env.update(_read_env_file(path))
    return env


def _rig(script, *args):
    env = dict(os.environ, LHPC_RIG_DIR=str(rig_dir()))
    subprocess.run([str(RIG_SCRIPTS / script), *args], env=env, check=True,
                   stdin=subprocess.DEVNULL)


def ensure_broker():
    """Start the shared broker unless it runs (safe from concurrent tests); returns rig_env()."""
    _rig("rabbitmq.sh", "ensure")
    return rig_env()


def restart_broker():
    """Stop and start the broker keeping data and URL (queues, persistent messages survive)."""
    _rig("rabbitmq.sh", "restart")


def ensure_cluster(nodes=3):
    """Start an N-node Slurm cluster unless one with >= N nodes runs; returns rig_env()."""
    _rig("slurm-cluster.sh", "ensure", str(nodes))
    return rig_env()


def ensure_gpu_cluster(nodes=1, gpus=4):
    """Start the GPU cluster (its own daemons, in <rig>/slurm-gpu: nodes with `gpus` dummy
    GPUs each as gres, tests/rig/README.md) unless one with >= `nodes` nodes runs; returns
    the variables a client needs for it (SLURM_CONF, RIG_*), like slurm_env()."""
    env = dict(os.environ, LHPC_RIG_DIR=str(rig_dir()), LHPC_RIG_SLURM_GPUS=str(gpus))
    subprocess.run([str(RIG_SCRIPTS / "slurm-cluster.sh"), "ensure", str(nodes)], env=env, check=True,
                   stdin=subprocess.DEVNULL)
    got = _read_env_file(rig_dir() / "slurm-gpu" / "env")
    if got.get("RIG_SLURM_GPUS") != str(gpus):
        raise RuntimeError(f"the GPU cluster runs with {got.get('RIG_SLURM_GPUS')} GPUs per node, {gpus} wanted "
                           "(stop it: LHPC_RIG_SLURM_GPUS=1 tests/rig/slurm-cluster.sh down)")
    return got


def slurm_env(base=None):
    """os.environ (or base) plus the cluster's variables: for subprocess(env=...) of srun etc."""
    env = dict(os.environ if base is None else base)
    env.update({k: v for k, v in rig_env().items()
                if k == "SLURM_CONF" or k.startswith("OMPI_") or k.startswith("RIG_")})
    return env


def free_port():
    """A loopback TCP port free right now (the usual small race applies)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_vhost(prefix="t"):
    """Create a new vhost for the rig user and return its AMQP URL (about 1 s)."""
    env = rig_env()
    ctl = env.get("RIG_RABBITMQCTL")
    if not ctl:
        raise RuntimeError("no broker env file: run tests/rig/rabbitmq.sh ensure (or ensure_broker())")
    name = f"{prefix}-{os.getpid()}-{next(_vhost_counter)}-{secrets.token_hex(3)}"
    for args in (["add_vhost", name],
                 ["set_permissions", "-p", name, env["RIG_AMQP_USER"], ".*", ".*", ".*"]):
        subprocess.run([ctl, "-q", *args], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
    return env["RIG_AMQP_URL"] + "/" + urllib.parse.quote(name, safe="")


def _connect(url):
    params = pika.URLParameters(url)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


def _publish(url, queue, body, props):
    conn = _connect(url)
    try:
        ch = conn.channel()
        # Publisher confirms: once this returns the broker holds the message, so
        # queue_depth() right after is exact. The Lithops client does not use
        # confirms, which changes nothing a worker can see.
        ch.confirm_delivery()
        ch.queue_declare(queue=queue, durable=True)   # exactly as Lithops: no arguments
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=props,
                         mandatory=True)
    finally:
        conn.close()


def lithops_body(action, payload_dict):
    """The message body the Lithops singularity backend publishes."""
    payload = base64.b64encode(json.dumps(payload_dict, default=str).encode()).decode()
    return json.dumps({"action": action, "payload": payload})


def publish_lithops(url, action, payload_dict, queue="task_queue", headers=None,
                    reply_to=None, correlation_id=None):
    """Publish like lithops' singularity backend: default exchange, routing key = queue,
    persistent, no content type, body {"action": A, "payload": base64(json)}."""
    props = pika.BasicProperties(delivery_mode=2, headers=headers, reply_to=reply_to,
                                 correlation_id=correlation_id)
    _publish(url, queue, lithops_body(action, payload_dict), props)


def publish_lithops_many(url, action, payload_dicts, queue="task_queue"):
    """publish_lithops for each payload, over one connection (a backlog of hundreds of
    messages in a fraction of a second); confirmed like publish_lithops."""
    conn = _connect(url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue=queue, durable=True)
        for payload in payload_dicts:
            ch.basic_publish(exchange="", routing_key=queue, body=lithops_body(action, payload),
                             properties=pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        conn.close()


def publish_raw(url, body_bytes, queue="task_queue", headers=None):
    """Publish an arbitrary (e.g. malformed) body, otherwise like publish_lithops."""
    _publish(url, queue, body_bytes, pika.BasicProperties(delivery_mode=2, headers=headers))


def _passive_count(conn, queue):
    try:
        return conn.channel().queue_declare(queue=queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise


def queue_depth(url, queue="task_queue"):
    """Messages ready (not unacked) in queue; 0 if the queue does not exist."""
    conn = _connect(url)
    try:
        return _passive_count(conn, queue) or 0
    finally:
        conn.close()


def queue_exists(url, queue):
    """True when the queue exists (a passive declare on a connection of its own)."""
    conn = _connect(url)
    try:
        return _passive_count(conn, queue) is not None
    finally:
        conn.close()


def drain_queue(url, queue):
    """Get and ack every ready message; list of Message(body: bytes, headers: dict).
    [] if the queue does not exist (e.g. task_queue.dead before any dead letter)."""
    conn = _connect(url)
    out = []
    try:
        if _passive_count(conn, queue) is None:
            return out
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(queue=queue, auto_ack=False)
            if method is None:
                return out
            out.append(Message(body, dict(props.headers or {})))
            ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


def wait_until(pred, timeout, what, interval=0.1):
    """Poll pred() until it returns something truthy (returned); AssertionError naming
    `what` after timeout seconds. Exceptions from pred propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_script(path, text):
    """An executable file (mode 0755) holding text: a stand-in interpreter for a test; returns path."""
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def descendants(root):
    """PIDs of every live process below root, from /proc (children of children)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def make_send_task(n_calls, job_key, extra=None):
    """A minimal Lithops-shaped job payload (the dict inside a send_task message)."""
    executor_id, _, job_id = job_key.rpartition("-")
    payload = {
        "config": {"lithops": {"backend": "singularity", "storage": "localhost",
                               "log_level": "INFO"},
                   "singularity": {"worker_processes": 1}},
        "chunksize": 1,
        "log_level": "INFO",
        "func_name": "noop",
        "func_key": f"lithops.jobs/{executor_id}/{job_key}.func.pickle",
        "data_key": f"lithops.jobs/{executor_id}/{job_key}.data.pickle",
        "extra_env": {},
        "total_calls": n_calls,
        "execution_timeout": 60,
        "data_byte_ranges": [[i * 10, i * 10 + 9] for i in range(n_calls)],
        "executor_id": executor_id or job_key,
        "job_id": job_id,
        "job_key": job_key,
        "max_workers": n_calls,
        "call_ids": [f"{i:05d}" for i in range(n_calls)],
        "host_submit_tstamp": time.time(),
        "lithops_version": "3.7.0",
        # The runtime of the tests' images (rt.sif): a deployment runs only its own.
        "runtime_name": "rt",
        "runtime_memory": None,
        "worker_processes": 1,
    }
    payload.update(extra or {})
    return payload


def decode_lithops(body):
    """Inverse of lithops_body: (action, payload_dict)."""
    msg = json.loads(body)
    return msg["action"], json.loads(base64.b64decode(msg["payload"]))


def main():
    """Run the calling script's unittest cases; exit status tells pass/fail."""
    unittest.main(module="__main__", verbosity=2)


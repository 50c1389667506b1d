#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz/corpus/ (except the SIF ones, which
make-sif-seeds writes from tests/unit/sif_fixtures). Deterministic: running it
again gives the same files. The large and deeply nested seeds are here because
libFuzzer grows inputs by a few bytes at a time: left to itself it never gets
near the sizes and depths that break recursive code (issue 12: inputs stayed
under ~28 KB in a 5-minute campaign, the stack overflow needs ~100,000 levels).

Usage: tests/fuzz/make-seeds.py [CORPUS_DIR]   (default: tests/fuzz/corpus)
"""
import base64
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def job(calls, **extra):
    p = {
        "config": {"lithops": {"backend": "singularity", "storage": "localhost"}},
        "job_key": "A000-M000",
        "call_ids": ["%05d" % i for i in range(calls)],
        "data_byte_ranges": [[i * 10, i * 10 + 9] for i in range(calls)],
        "total_calls": calls,
        "worker_processes": calls,
        "log_level": "INFO",
        "func_key": "lithops.jobs/A000-M000/func.pickle",
        "data_key": "lithops.jobs/A000-M000/data.pickle",
        "execution_timeout": 1800,
    }
    p.update(extra)
    return p


def message(action, payload_text):
    b64 = base64.b64encode(payload_text.encode() if isinstance(payload_text, str) else payload_text).decode()
    return json.dumps({"action": action, "payload": b64}, separators=(",", ":"))


def deep_array(levels):
    return "[" * levels + "]" * levels


def deep_object(levels):
    return '{"a":' * levels + "1" + "}" * levels


# The nested value sits in a field the dispatcher copies but never reads.
def deep_job(nested):
    text = json.dumps(job(1), separators=(",", ":"))
    return text[:-1] + ',"nested":' + nested + "}"


def payloads():
    # Each seed for the payload target starts with its pick byte (action, free slots).
    return {
        "one-call": (0x00, json.dumps(job(1))),
        "three-calls-two-free": (0x01, json.dumps(job(3))),
        "eight-calls": (0x07, json.dumps(job(8))),
        "get-metadata": (0x10, json.dumps({"runtime_name": "lithops-hpc", "log_level": "INFO", "storage": {}})),
        "ping": (0x20, json.dumps({"echo": {"n": 1}, "reply_to": "amq.rabbitmq.reply-to"})),
        "total-calls-mismatch": (0x00, json.dumps(job(2, total_calls=5))),
        "ranges-short": (0x00, json.dumps(job(2, data_byte_ranges=[[0, 1]]))),
        "ids-not-strings": (0x01, json.dumps(job(2, call_ids=[1, {"x": [2]}]))),
        "unicode": (0x00, json.dumps(job(1, job_key="j\u00e9\u4e2d\U0001f600"), ensure_ascii=False)),
        # Issue 12 finding 4: ~100,000 levels crashed every rank in dump() and the split's copies.
        "deep-array-100000": (0x00, deep_job(deep_array(100000))),
        "deep-object-100000": (0x01, deep_job(deep_object(100000))),
        "deep-array-100000-split": (0x01, json.dumps(job(3), separators=(",", ":"))[:-1] + ',"nested":' + deep_array(100000) + "}"),
    }


def dispatch_seeds():
    for name, (pick, text) in payloads().items():
        write("payload", name, bytes([pick]) + text.encode())
        action = {0x00: "send_task", 0x10: "get_metadata", 0x20: "ping"}[pick & 0x30]
        # The message target's last byte picks the free slots.
        write("message", name, message(action, text).encode() + bytes([pick & 0x07]))
    big = job(33000)  # ~1 MB once base64-encoded: a huge multi-call message
    write("message", "send-task-1mb", message("send_task", json.dumps(big, separators=(",", ":"))) + "\x03")
    write("message", "not-json", "{\"action\": \"send_task\", \"payload\": \x00")
    write("message", "bad-base64", message("send_task", "x")[:-3] + "!!\"}\x00")
    write("message", "no-action", json.dumps({"payload": "e30="}) + "\x00")
    write("message", "deep-body-100000", deep_array(100000) + "\x00")


def config_seeds():
    toml = {
        "minimal": '[rabbitmq]\namqp_url = "amqp://guest:guest@localhost:5672/"\n',
        "full": """[singularity]
sif_path = "/scratch/%u/sif/%j"
runtime = "lithops-hpc"
engine = "apptainer"
fakeroot = false
nv = true
instance_name = "lithops-%j-%n"
binds = ["/scratch:/scratch:rw", "/etc/hosts"]
worker_processes = 4
python = "python3"

[rabbitmq]
amqp_url = "amqps://user:p%40ss@broker.example.org:5671/lithops"
queue = "task_queue"
heartbeat = 60
ca_cert = "/etc/ssl/certs/ca.pem"
verify_peer = true

[deploy]
transfer = "sbcast"
chunk_mib = 8
compress = true
cleanup = true
mode = "dispatch"
drain_timeout = 60.5
drain_before_end = 120
min_ranks = 1
start_timeout = 300
restart_limit = 5

[health]
interval = 5
status_file = "/tmp/%u/status-%j.json"
""",
        "unknown-key": "[deploy]\ntransfr = \"mpi\"\n",
        "wrong-type": "[deploy]\nchunk_mib = \"8\"\n",
        "inline-tables": "singularity = { runtime = \"x\", binds = [] }\ndeploy.mode = 'runscript'\n",
        "dates-and-floats": "[health]\ninterval = 1e3\n[x]\nd = 1979-05-27T07:32:00Z\nf = inf\n",
        # Issue 12 finding 8: a 50,000-character instance_name overflowed the stack in std::regex_match.
        "long-instance-name": "[singularity]\ninstance_name = \"" + "a" * 50000 + "\"\n",
        "deep-array": "[singularity]\nbinds = " + "[" * 5000 + "]" * 5000 + "\n",
        "deep-inline-table": "a = " + "{b=" * 2000 + "1" + "}" * 2000 + "\n",
        "non-ascii-key": "[singularity]\n\u00e9 = 1\nruntime = \"\u4e2d\"\n",
    }
    for name, text in toml.items():
        write("config", name, text)


def url_seeds():
    urls = {
        "plain": "amqp://guest:guest@localhost:5672/",
        "tls": "amqps://user:secret@broker.example.org:5671/vhost",
        "escaped": "amqp://us%3Aer:p%40ss%2Fword@host/%2F",
        "no-userinfo": "amqp://host",
        "ipv6": "amqp://u:p@[::1]:5672/v",
        "bad-port": "amqp://u:pw@host:99999/",
        "slash-in-password": "amqp://u:pa/ssword@host:5672/v",
        "long": "amqp://" + "u" * 5000 + ":" + "p" * 5000 + "@" + "h" * 5000,
    }
    for name, text in urls.items():
        write("amqp_url", name, text)


def record_seeds():
    rec = {
        "format": "lithops-hpc stage record 1",
        "xxh3_128": "0123456789abcdef0123456789abcdef",
        "size": 1048576,
        "file": {"dev": 64769, "ino": 1234567, "size": 1048576, "mtime_ns": 1700000000123456789,
                 "ctime_ns": 1700000000123456789},
        "source": "/shared/images/lithops-hpc.sif",
    }
    write("record", "valid", json.dumps(rec, indent=2) + "\n")
    # Issue 12 finding 10: a float out of uint64_t's range converted anyway.
    write("record", "size-1e20", json.dumps(dict(rec, size=1e20)))
    write("record", "negative-size", json.dumps(dict(rec, size=-1)))
    write("record", "stamp-float", json.dumps(dict(rec, file=dict(rec["file"], mtime_ns=1.5e300))))
    write("record", "wrong-format", json.dumps(dict(rec, format="lithops-hpc stage record 2")))
    write("record", "deep", '{"format":"lithops-hpc stage record 1","source":' + deep_array(100000) + "}")


def status_seeds():
    rank = {"rank": 0, "node": "n1", "pid": 4242, "state": "ready", "slots_busy": 1, "slots_total": 2,
            "done": 10, "failed": 1, "requeued": 0, "dead_lettered": 0, "broker": True, "instance": True,
            "restarts": 0, "rss_kb": 1000, "rss_tree_kb": 5000, "last_seen": 1700000000.5, "last_error": ""}
    status = {"version": 1, "job": "1234", "updated": 1700000010.0, "started": 1700000000.0, "interval": 5,
              "rank0": {"host": "n1", "pid": 4242}, "state": "running",
              "summary": {"ranks": 2, "ready": 1, "degraded": 0, "unresponsive": 1, "slots_busy": 1,
                          "slots_total": 4, "done": 10, "failed": 1, "requeued": 0, "dead_lettered": 0},
              "ranks": [rank, dict(rank, rank=1, node="n2", state="unresponsive", last_seen=None,
                                   last_error="handler exited with status 1 \u00e9")]}
    write("status", "two-ranks", json.dumps(status, indent=2))
    many = dict(status, ranks=[dict(rank, rank=i, node="n%d" % i) for i in range(2000)])
    write("status", "2000-ranks", json.dumps(many))
    write("status", "stopped-huge-numbers", json.dumps(dict(status, state="stopped", updated=1e308, interval=-1,
                                                           summary=dict(status["summary"], done=2**64 - 1))))
    write("status", "wrong-version", json.dumps(dict(status, version=2)))
    write("status", "deep", '{"version":1,"job":' + deep_array(100000) + "}")


def autoalloc_state_seeds():
    job = {"id": "1001", "nodes": 2, "phase": "serving", "submitted": 1700000000.0, "out": "/tmp/aa/1001.out",
           "renews": "", "ever_serving": True, "renewed": False, "stop_requested": False, "cancelled": False,
           "ready_ranks": 2, "slots_total": 8, "slots_busy": 3, "idle_since": 1700000100.0, "done": 42,
           "seconds_left": 3000}
    state = {"version": 1, "controller": "running", "job_name": "lithops-aa-0000abcd", "pid": 4242, "host": "login1",
             "started": 1700000000.0, "updated": 1700000200.0,
             "demand": {"ready": 5, "consumers": 1, "seen": 1700000190.0},
             "supply": {"held_nodes": 3, "pending_jobs": 1, "serving_nodes": 2, "free_slots": 5, "busy_slots": 3},
             "next": "wait: 5 ready, 5 free slots", "error": "", "last_refusal": "", "refused_in_row": 0,
             "backoff_until": 0, "start_failures_in_row": 0, "failed_outputs": [], "halted": False,
             "halted_at": 0, "slots_per_node": 4,
             "limits": {"max_nodes": 4, "nodes_per_job": 1, "max_pending": 1, "min_nodes": 0, "idle_timeout": 300,
                        "renew_before": 300, "max_start_failures": 3},
             "counters": {"sbatch_calls": 2, "broker_queries": 20, "scheduler_queries": 20},
             "jobs": [job, dict(job, id="1002", nodes=1, phase="pending", ever_serving=False, done=0,
                                seconds_left=None)]}
    write("autoalloc_state", "two-jobs", json.dumps(state, indent=2))
    # Issue 20 finding 7: floats out of the integer fields' range, negative counts.
    write("autoalloc_state", "nodes-1e20", json.dumps(dict(state, jobs=[dict(job, nodes=1e20)])))
    write("autoalloc_state", "done-1e20", json.dumps(dict(state, jobs=[dict(job, done=1e20)])))
    write("autoalloc_state", "ready-1e20", json.dumps(dict(state, demand=dict(state["demand"], ready=1e20))))
    write("autoalloc_state", "negative-ready", json.dumps(dict(state, demand=dict(state["demand"], ready=-1))))
    write("autoalloc_state", "huge-nodes", json.dumps(dict(state, jobs=[dict(job, nodes=2**31 - 1)] * 3)))
    write("autoalloc_state", "halted", json.dumps(dict(state, halted=True, halted_at=1700000300.5,
                                                      failed_outputs=["/tmp/aa/1003.out"], jobs=[])))
    write("autoalloc_state", "deep", '{"jobs":[],"demand":{},"next":' + deep_array(100000) + "}")


dispatch_seeds()
config_seeds()
url_seeds()
record_seeds()
status_seeds()
autoalloc_state_seeds()

#!/usr/bin/python3
"""Chaos benchmark (issue 21): broker faults injected at random, from a
seeded generator, under a steady stream of tasks; then every figure a user
of at-least-once delivery cares about: faults injected, tasks published,
done, lost, run twice, and the longest stall (the longest time with tasks
waiting and none finishing).

    bench/chaos.py [BUILD_DIR] [--minutes M] [--seed S] [--rate R] [--workers W]

The workers are real `lithops-hpc worker`s (host engine, 2 slots, heartbeat
2 s), each in its own network namespace reaching the rig broker through a
relay, as in integration/faults; the faults are those of that suite: the
task queue deleted and declared again (`lithops clean`; the ready messages
it held are gone by definition and counted apart as "deleted"), a worker
frozen past the heartbeat (SIGSTOP), a worker's network cut for 3 x the
heartbeat, a memory alarm for 3 s. Needs root (network namespaces) and the
rig broker (started here when not running, left running).
"""
import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests", "integration"))


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build", nargs="?", default=os.path.join(HERE, "build"))
    p.add_argument("--minutes", type=float, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=8, help="tasks published per second")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--call-seconds", type=float, default=0.2)
    return p.parse_args()


ARGS = parse()
BUILD = os.path.abspath(ARGS.build)
os.environ.setdefault("LHPC_SOURCE_ROOT", HERE)
os.environ.setdefault("LHPC_BIN", os.path.join(BUILD, "lithops-hpc"))
os.environ.setdefault("LHPC_RIG_DIR", os.path.join(BUILD, "rig"))

import lhpc_test as lt  # noqa: E402
from test_faults import NetNode, Relay, ctl, via  # noqa: E402
from worker_util import Worker, records  # noqa: E402


class Stream:
    """Publishes one task every 1/rate s until stopped; remembers what."""

    def __init__(self, url, rec, rate, seconds):
        self.url, self.rec, self.period, self.seconds = url, rec, 1.0 / rate, seconds
        self.published = []  # (time, job)
        # Jobs whose publish failed and was made again: the first may have
        # reached the broker all the same (the confirm was lost), so a
        # second run of one of these is the publisher's, not the workers'.
        self.republished = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        test = {"record_dir": self.rec, "sleep": self.seconds}
        i = 0
        while not self.stopping.wait(self.period):
            job = f"chaos-{i:06d}"
            try:
                lt.publish_lithops_many(self.url, "send_task", [lt.make_send_task(1, job, {"lhpc_test": test})])
                self.published.append((time.time(), job))
                i += 1
            except Exception as e:  # the broker may refuse under an alarm: try the same job again
                self.republished.add(job)
                print(f"chaos: publish of {job} failed ({type(e).__name__}); again", flush=True)


class Faults:
    """The faults, each one call that injects it and puts it back."""

    def __init__(self, url, workers, nodes):
        self.url, self.workers, self.nodes = url, workers, nodes
        self.deleted = 0  # ready messages a queue deletion took with it

    def queue_deleted(self, rng):
        conn = lt._connect(self.url)
        try:
            ch = conn.channel()
            self.deleted += ch.queue_delete("task_queue").method.message_count
            ch.queue_declare("task_queue", durable=True)
        finally:
            conn.close()

    def frozen(self, rng):
        w = rng.choice(self.workers)
        os.kill(w.pid, signal.SIGSTOP)
        time.sleep(6)  # past 2 missed heartbeats of 2 s
        os.kill(w.pid, signal.SIGCONT)

    def cut(self, rng):
        node = rng.choice(self.nodes)
        node.cut()
        time.sleep(6)
        node.mend()

    def memory_alarm(self, rng):
        ctl("set_vm_memory_high_watermark", "0.0001")
        time.sleep(3)
        ctl("set_vm_memory_high_watermark", "0.4")


def longest_stall(published, recs):
    """Longest interval with a task waiting (published, not yet finished by
    anyone) and no call finishing."""
    ends = sorted(r["end"] for r in recs)
    first_end = {}
    for r in recs:
        first_end[r["job_key"]] = min(r["end"], first_end.get(r["job_key"], r["end"]))
    waiting = sorted((t, first_end.get(j, float("inf"))) for t, j in published)
    worst = 0.0
    for a, b in zip(ends, ends[1:]):
        # a task published before b and not finished by a waited through [max(a, its publish), b]
        starts = [p for p, e in waiting if p < b and e >= b]
        if starts:
            worst = max(worst, b - max(a, min(starts)))
    return worst


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` puts everything back
    lt.ensure_broker()
    url = lt.fresh_vhost("chaos")
    rec = tempfile.mkdtemp(prefix="lhpc-chaos-")
    host = urllib.parse.urlsplit(url)
    nodes, relays, workers = [], [], []
    try:
        for i in range(ARGS.workers):
            node = NetNode(i)
            nodes.append(node)
            relay = Relay(node.host_ip, (host.hostname, host.port))
            relays.append(relay)
            w = Worker(via(url, node.host_ip, relay.port), slots=2, heartbeat=2, wrap=node.enter())
            workers.append(w)
            w.wait_consuming()
        run(url, rec, workers, nodes)
    finally:
        ctl("set_vm_memory_high_watermark", "0.4")
        for w in workers:
            w.kill()
        for r in relays:
            r.close()
        for n in nodes:
            n.remove()


def run(url, rec, workers, nodes):
    rng = random.Random(ARGS.seed)
    faults = Faults(url, workers, nodes)
    kinds = [faults.queue_deleted, faults.frozen, faults.cut, faults.memory_alarm]
    injected = {k.__name__: 0 for k in kinds}
    stream = Stream(url, rec, ARGS.rate, ARGS.call_seconds)
    started = time.time()
    stream.thread.start()
    while time.time() - started < ARGS.minutes * 60:
        time.sleep(rng.uniform(4, 12))
        kind = rng.choice(kinds)
        print(f"chaos: {time.time() - started:6.1f} s: {kind.__name__}", flush=True)
        kind(rng)
        injected[kind.__name__] += 1
    stream.stopping.set()
    stream.thread.join()
    jobs = {j for _, j in stream.published}
    try:
        lt.wait_until(lambda: len({r["job_key"] for r in records(rec)} & jobs) + faults.deleted >= len(jobs), 180,
                      "every task not deleted with the queue to finish")
    except AssertionError as e:
        print(f"chaos: {e}: some are lost", flush=True)
    time.sleep(1)  # a late duplicate may still be writing its record: reported, not asserted
    report(stream, faults, injected, records(rec), workers, time.time() - started)


def report(stream, faults, injected, recs, workers, seconds):
    jobs = {j for _, j in stream.published}
    done = {r["job_key"] for r in recs} & jobs
    runs = {}
    for r in recs:
        runs[r["job_key"]] = runs.get(r["job_key"], 0) + 1
    twice = {j for j, n in runs.items() if n > 1}
    stopped = [w.stop() for w in workers]
    dup_lines = [line for w in workers for line in w.output().splitlines() if "stopped:" in line]
    print(f"\nchaos: seed {ARGS.seed}, {ARGS.minutes:g} min, {len(workers)} workers x 2 slots, "
          f"{ARGS.rate:g} tasks/s of {ARGS.call_seconds:g} s, {seconds:.0f} s in all")
    print("faults injected: " + ", ".join(f"{k} {n}" for k, n in injected.items()))
    print(f"tasks published {len(jobs)}, done {len(done)}, deleted with the queue {faults.deleted}, "
          f"lost {len(jobs) - len(done) - faults.deleted}, run more than once {len(twice - stream.republished)} "
          f"(+{len(twice & stream.republished)} published twice by the benchmark)")
    print(f"longest stall {longest_stall(stream.published, recs):.1f} s; workers exited {stopped}")
    for line in dup_lines:
        print("  " + line.split("] ", 2)[-1])


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Runtimes: deployments of two runtimes on one broker, each `lithops-hpc
worker --runtime NAME` with the host engine, the real handler and
tests/fake-lithops; a marker in each worker's environment stands for its image
(the fake records it per call and in the runtime metadata). The client
publishes every runtime's messages to task_queue: each call must run in its own
runtime's image, each get_metadata be answered by its own, and no message be
lost when a worker holding moved messages is killed.
Run: /usr/bin/python3 tests/integration/test_runtimes.py
"""
import hashlib
import json
import os
import signal
import tempfile
import unittest

import pika

import lhpc_test as lt
from worker_util import Worker, records, wait_records

DEAD = "task_queue.dead"


def runtime_queue(runtime):
    return f"task_queue.runtime.{runtime}"


def metadata_name(runtime, version="3.7.0"):
    """What Lithops 3.7's singularity backend puts in a get_metadata (_format_job_name(runtime, 128))."""
    digest = hashlib.sha1(f"{runtime}-128-{version}".encode()).hexdigest()[:10]
    return f"lithops-worker-{version.replace('.', '')}-{digest}"


def task(runtime, job_key, n_calls, record_dir, **test):
    test["record_dir"] = record_dir
    return lt.make_send_task(n_calls, job_key, {"runtime_name": runtime, "lhpc_test": test})


class RuntimesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def setUp(self):
        self.url = lt.fresh_vhost("rts")
        self.rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        self.storage = tempfile.mkdtemp(prefix="lhpc-storage-")
        self.workers = []

    def tearDown(self):
        failed = any(t is self for t, _ in getattr(self._outcome.result, "errors", []) +
                     getattr(self._outcome.result, "failures", []))
        for w in self.workers:
            if failed:
                print(f"--- worker log {w.log_path}:\n{w.log()[-6000:]}")
            w.cleanup()

    def worker(self, runtime, marker, slots=2, wait=True):
        w = Worker(self.url, slots=slots, args=["--runtime", runtime], extra_env={"LITHOPS_FAKE_MARKER": marker})
        self.workers.append(w)
        if wait:
            w.wait_consuming()
        return w

    def get_metadata(self, runtime):
        lt.publish_lithops(self.url, "get_metadata",
                           {"backend": "fake", "fake": {"storage_bucket": "b", "storage_dir": self.storage},
                            "runtime_name": metadata_name(runtime), "log_level": 20})

    def meta_path(self, runtime):
        return os.path.join(self.storage, "b", "lithops.jobs", metadata_name(runtime) + ".meta")

    def test_interleaved_runtimes_each_run_and_answer_only_their_own(self):
        a = self.worker("rt-a", "A")
        b = self.worker("rt-b", "B")
        self.assertIn("runtime rt-a", a.output())
        self.get_metadata("rt-a")
        self.get_metadata("rt-b")
        payloads = []
        for i in range(12):
            rt = ("rt-a", "rt-b")[i % 2]
            payloads.append(task(rt, f"{rt}-{i:03d}", 1 + i % 3, self.rec, sleep=0.02))
        lt.publish_lithops_many(self.url, "send_task", payloads)
        want = sum(p["total_calls"] for p in payloads)
        recs = wait_records(self.rec, want, 60)
        calls = sorted((r["job_key"], r["call_id"]) for r in recs)
        self.assertEqual(len(calls), len(set(calls)), "a call ran twice")
        self.assertEqual(len(calls), want)
        wrong = [(r["job_key"], r["marker"]) for r in recs if r["marker"] != r["job_key"][3].upper()]
        self.assertEqual(wrong, [], "calls run by another runtime's image")
        for rt, marker in (("rt-a", "A"), ("rt-b", "B")):
            lt.wait_until(lambda: os.path.exists(self.meta_path(rt)), 30, f"runtime metadata of {rt}")
            with open(self.meta_path(rt)) as f:
                self.assertEqual(json.load(f)["marker"], marker, f"{rt}'s metadata answered by another image")
        # Every message acked, nothing dead-lettered; each worker moved the other's.
        for w in (a, b):
            self.assertEqual(w.stop(), 0)
        for q in ("task_queue", runtime_queue("rt-a"), runtime_queue("rt-b"), DEAD):
            self.assertEqual(lt.queue_depth(self.url, q), 0, q)
        self.assertIn("moved to", a.log() + b.log())

    def test_a_worker_killed_holding_moved_messages_loses_none(self):
        gate = os.path.join(self.rec, "gate")
        a = self.worker("rt-a", "A")
        # rt-b has no worker yet: rt-a moves every rt-b task to rt-b's queue.
        n = 5
        lt.publish_lithops_many(self.url, "send_task",
                                [task("rt-b", f"kb-{i:03d}", 1, self.rec, wait_for=gate, print=f"LHPC-RUN-{i}")
                                 for i in range(n)])
        lt.wait_until(lambda: lt.queue_depth(self.url, runtime_queue("rt-b")) == n, 30,
                      f"{n} tasks moved to {runtime_queue('rt-b')}")
        self.assertEqual(lt.queue_depth(self.url), 0)
        self.assertEqual(records(self.rec), [])
        # A worker of rt-b takes one to run and one in reserve, then dies
        # (SIGKILL, handlers included: nothing of it finishes a call).
        b1 = self.worker("rt-b", "B", slots=1)
        b1.wait_log("LHPC-RUN-", 30)
        lt.wait_until(lambda: lt.queue_depth(self.url, runtime_queue("rt-b")) == n - 2, 30,
                      "the rt-b worker to hold two messages")
        victims = b1.descendants()
        os.kill(b1.pid, signal.SIGKILL)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        b1.proc.wait(30)
        lt.wait_until(lambda: lt.queue_depth(self.url, runtime_queue("rt-b")) == n, 30,
                      "the broker to requeue what the killed worker held")
        # The next rt-b worker runs every one of them; rt-a still runs none.
        open(gate, "w").close()
        self.worker("rt-b", "B2")
        recs = wait_records(self.rec, n, 60)
        self.assertEqual(sorted(r["job_key"] for r in recs), [f"kb-{i:03d}" for i in range(n)])
        self.assertEqual({r["marker"] for r in recs}, {"B2"})
        self.assertEqual(lt.queue_depth(self.url, DEAD), 0)
        self.assertTrue(a.alive())

    def test_a_runtime_queue_the_broker_deleted_is_declared_bound_and_consumed_again(self):
        # As `lithops clean` or an operator deleting it: the broker cancels
        # the worker's consumers of that queue, nothing else.
        b = self.worker("rt-b", "B", slots=1)
        conn = lt._connect(self.url)
        try:
            conn.channel().queue_delete(runtime_queue("rt-b"))
        finally:
            conn.close()
        b.wait_log(f"restored: consuming {runtime_queue('rt-b')} again", timeout=15)
        lt.wait_until(lambda: lt.queue_exists(self.url, runtime_queue("rt-b")), 5, "rt-b's queue declared again")
        # Published to the queue itself, as another runtime's worker moves
        # tasks; and get_metadata through the fanout: the binding is back.
        lt.publish_lithops_many(self.url, "send_task", [task("rt-b", f"back-{i}", 1, self.rec) for i in range(3)],
                                queue=runtime_queue("rt-b"))
        wait_records(self.rec, 3, 30)
        body = lt.lithops_body("get_metadata", {
            "backend": "fake", "fake": {"storage_bucket": "b", "storage_dir": self.storage},
            "runtime_name": metadata_name("rt-b"), "log_level": 20})
        conn = lt._connect(self.url)
        try:
            ch = conn.channel()
            ch.confirm_delivery()  # mandatory: unroutable (no binding) raises
            ch.basic_publish(exchange="task_queue.runtimes", routing_key="", body=body,
                             properties=pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            conn.close()
        lt.wait_until(lambda: os.path.exists(self.meta_path("rt-b")), 30, "rt-b's metadata through the fanout")
        self.assertIn("the broker cancelled our consumer of task_queue.runtime.rt-b", b.log())
        self.assertEqual(b.stop(), 0)


if __name__ == "__main__":
    lt.main()

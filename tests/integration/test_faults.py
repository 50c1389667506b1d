#!/usr/bin/python3
"""Broker faults a worker must live through without going deaf, each its own
short case on the real broker: every task done, none lost, duplicates
counted, serving again within a stated time.

The memory alarm and the consumer timeout are broker-wide settings: this
suite runs alone (is_parallel: false) and puts each setting back.
"""
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

import lhpc_test as lt
from worker_util import Worker, records

# A fault is over and the worker serves again within this many seconds.
SERVE_AGAIN = 15


def ctl(*args):
    """rabbitmqctl of the rig broker; its output."""
    env = lt.rig_env()
    return subprocess.run([env["RIG_RABBITMQCTL"], "-q", *args], check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).stdout


def job_keys(rec):
    return {r["job_key"] for r in records(rec)}


def publish_tasks(url, rec, prefix, n, **extra):
    test = {"record_dir": rec}
    test.update(extra)
    jobs = [f"{prefix}{i:02d}" for i in range(n)]
    lt.publish_lithops_many(url, "send_task", [lt.make_send_task(1, j, {"lhpc_test": test}) for j in jobs])
    return set(jobs)


class Relay:
    """A TCP relay from an address of the host's side of a veth pair to the
    rig broker, which listens on loopback only: a node in its own network
    namespace reaches the broker through it, and cutting the veth link cuts
    the node off, the relay staying up on the broker's side as a router
    would. The broker sees only missing heartbeats, the worker too."""

    def __init__(self, host, target):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                node, _ = self.sock.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(self.target, 5)
            except OSError:
                node.close()
                continue
            for src, dst in ((node, broker), (broker, node)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


class NetNode:
    """A network namespace joined to the host by a veth pair on a /30 of
    198.18.0.0/15 (the benchmarking range: never routed), unique per test
    process and index. `cut()` and `mend()` take the host's end down and up."""

    def __init__(self, index=0):
        # index: several nodes of one process (0-3).
        pid = os.getpid()
        self.ns = f"lhpc-cut-{pid}-{index}"
        self.veth = f"lhc{pid % 10**7}{index}"
        block = ((pid % 2**12) * 4 + index) * 4  # /30 blocks in 198.18.0.0/16
        self.host_ip = f"198.18.{block // 256}.{block % 256 + 1}"
        self.node_ip = f"198.18.{block // 256}.{block % 256 + 2}"
        peer = self.veth + "n"
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer],
                    ["ip", "link", "set", peer, "netns", self.ns],
                    ["ip", "addr", "add", self.host_ip + "/30", "dev", self.veth],
                    ["ip", "link", "set", self.veth, "up"],
                    self.enter() + ["ip", "addr", "add", self.node_ip + "/30", "dev", peer],
                    self.enter() + ["ip", "link", "set", peer, "up"],
                    self.enter() + ["ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)

    def enter(self):
        # nsenter, not `ip netns exec` (docs/test-rig.md): it execs the
        # program in place, so the worker keeps the pid the test knows.
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--"]

    def cut(self):
        subprocess.run(["ip", "link", "set", self.veth, "down"], check=True)

    def mend(self):
        subprocess.run(["ip", "link", "set", self.veth, "up"], check=True)

    def remove(self):
        subprocess.run(["ip", "link", "del", self.veth], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)


def via(url, host, port):
    """The same AMQP URL with another host and port."""
    u = urllib.parse.urlsplit(url)
    netloc = u.netloc.rsplit("@", 1)[0] + f"@{host}:{port}"
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))


class FaultTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def start_worker(self, url, **kw):
        w = Worker(url, **kw)
        self.addCleanup(w.cleanup)
        try:
            w.wait_consuming()
        except BaseException:
            print(w.log()[-6000:])
            raise
        return w

    def dump_on_failure(self, w):
        # unittest has no "on failure" hook: print the log if the case fails.
        outcome = getattr(self, "_outcome", None)
        self.addCleanup(lambda: (outcome and not outcome.success) and print(w.log()[-8000:]))

    def test_a_queue_deleted_and_declared_again_is_served_within_seconds(self):
        # What `lithops clean` does to the singularity backend's queue.
        url = lt.fresh_vhost("fq")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = self.start_worker(url, slots=2)
        self.dump_on_failure(w)
        conn = lt._connect(url)
        try:
            ch = conn.channel()
            ch.queue_delete("task_queue")
            ch.queue_declare("task_queue", durable=True)
        finally:
            conn.close()
        w.wait_log("cancelled our consumer", timeout=10)
        jobs = publish_tasks(url, rec, "del-", 5)
        lt.wait_until(lambda: job_keys(rec) >= jobs, SERVE_AGAIN, "every task after the queue came back")
        self.assertIn("restored: consuming task_queue again", w.log())
        self.assertTrue(w.alive())
        self.assertEqual(w.stop(), 0)
        self.assertEqual(lt.queue_depth(url), 0)

    def test_b_a_deleted_queue_nobody_declares_is_declared_again(self):
        url = lt.fresh_vhost("fn")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = self.start_worker(url, slots=1)
        self.dump_on_failure(w)
        conn = lt._connect(url)
        try:
            conn.channel().queue_delete("task_queue")
        finally:
            conn.close()
        w.wait_log("restored: consuming task_queue again", timeout=SERVE_AGAIN)
        lt.wait_until(lambda: lt.queue_exists(url, "task_queue"), 5, "the worker to declare task_queue")
        jobs = publish_tasks(url, rec, "nodecl-", 3)
        lt.wait_until(lambda: job_keys(rec) >= jobs, SERVE_AGAIN, "every task")
        self.assertEqual(w.stop(), 0)

    def test_c_an_oversized_message_is_dead_lettered_with_headers_and_never_buffered(self):
        url = lt.fresh_vhost("fo")
        w = self.start_worker(url, slots=2, rabbitmq_extra="max_message_bytes = 65536")
        self.dump_on_failure(w)
        big = 48 * 1024 * 1024
        for i in range(3):
            lt.publish_raw(url, b"x" * big, headers={"n": i})
        dead = []
        lt.wait_until(lambda: dead.extend(lt.drain_queue(url, "task_queue.dead")) or len(dead) >= 3, 60,
                      "three dead letters")
        for m in dead:
            self.assertEqual(m.body, b"")
            self.assertIn("max_message_bytes", m.headers["x-lithops-hpc-reason"].decode()
                          if isinstance(m.headers["x-lithops-hpc-reason"], bytes)
                          else m.headers["x-lithops-hpc-reason"])
        self.assertEqual(sorted(m.headers["n"] for m in dead), [0, 1, 2])
        # Peak resident memory of the worker itself: nowhere near one body.
        with open(f"/proc/{w.pid}/status") as f:
            hwm_kb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
        self.assertLess(hwm_kb * 1024, big // 2, "the worker buffered an oversized body")
        self.assertEqual(w.stop(), 0)

    def test_d_a_call_longer_than_consumer_timeout_runs_at_most_twice_then_is_dead_lettered(self):
        url = lt.fresh_vhost("ft")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        # Read by each new channel; RabbitMQ 3.10 checks the timeout on the
        # channel's tick (60 s by default): 1 s here.
        ctl("eval", "application:set_env(rabbit, channel_tick_interval, 1000).")
        ctl("eval", "application:set_env(rabbit, consumer_timeout, 3000).")
        self.addCleanup(ctl, "eval", "application:set_env(rabbit, channel_tick_interval, 60000).")
        self.addCleanup(ctl, "eval", "application:set_env(rabbit, consumer_timeout, 86400000).")
        w = self.start_worker(url, slots=2)
        self.dump_on_failure(w)
        publish_tasks(url, rec, "long-", 1, sleep=8)
        dead = []
        lt.wait_until(lambda: dead.extend(lt.drain_queue(url, "task_queue.dead")) or dead, 60,
                      "the long call dead-lettered")
        reason = dead[0].headers["x-lithops-hpc-reason"]
        self.assertIn("consumer_timeout", reason if isinstance(reason, str) else reason.decode())
        log = w.output()
        self.assertIn("consumer_timeout (3 s) expired while job long-00", log)
        # Both copies finish (at-least-once), none starts a third time.
        lt.wait_until(lambda: len(records(rec)) >= 2, 30, "both copies to finish")
        w.wait_log("duplicate", timeout=10)
        self.assertEqual(len(records(rec)), 2)
        self.assertEqual(lt.queue_depth(url), 0)
        ctl("eval", "application:set_env(rabbit, consumer_timeout, 86400000).")
        # Serving again: short tasks run and are acked.
        jobs = publish_tasks(url, rec, "after-", 2)
        lt.wait_until(lambda: job_keys(rec) >= jobs, SERVE_AGAIN, "tasks after the timeouts")
        self.assertEqual(w.stop(), 0)

    def test_e_a_memory_alarm_blocks_the_worker_and_it_resumes(self):
        url = lt.fresh_vhost("fm")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = self.start_worker(url, slots=1)
        self.dump_on_failure(w)
        gate = os.path.join(rec, "gate")
        # A runs, B waits in the reserve, the malformed M stays in the queue.
        jobs = publish_tasks(url, rec, "alarm-a", 1, wait_for=gate)
        w.wait_log("Tasks received", timeout=20)
        jobs |= publish_tasks(url, rec, "alarm-b", 1, wait_for=gate)
        lt.publish_raw(url, b"not lithops json")
        ctl("set_vm_memory_high_watermark", "0.0001")
        self.addCleanup(ctl, "set_vm_memory_high_watermark", "0.4")
        lt.wait_until(lambda: "memory" in ctl("eval", "rabbit_alarm:get_alarms()."), 20, "the memory alarm")
        # A and B finish; M's dead letter is the first publish: the broker
        # blocks the connection and says so. Nothing wedges.
        open(gate, "w").close()
        lt.wait_until(lambda: job_keys(rec) >= jobs, 20, "the calls to finish under the alarm")
        w.wait_log("blocks this connection", timeout=20)
        self.assertTrue(w.alive())
        ctl("set_vm_memory_high_watermark", "0.4")
        w.wait_log("unblocked this connection", timeout=SERVE_AGAIN)
        more = publish_tasks(url, rec, "thaw-", 3)
        lt.wait_until(lambda: job_keys(rec) >= jobs | more, SERVE_AGAIN, "tasks after the alarm")
        lt.wait_until(lambda: lt.queue_depth(url) == 0, 10, "an empty queue")
        self.assertEqual(len(lt.drain_queue(url, "task_queue.dead")), 1)
        self.assertEqual(w.stop(), 0)

    def test_f_a_worker_frozen_past_the_heartbeat_reconnects_and_counts_duplicates(self):
        url = lt.fresh_vhost("fs")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = self.start_worker(url, slots=2, heartbeat=2)
        self.dump_on_failure(w)
        gate = os.path.join(rec, "gate")
        jobs = publish_tasks(url, rec, "frz-", 2, wait_for=gate)
        lt.wait_until(lambda: w.log().count("Tasks received") >= 2, 20, "both calls running")
        # Frozen for longer than the broker waits for heartbeats (2 missed:
        # about 4 s): it closes the connection and requeues both messages.
        os.kill(w.pid, signal.SIGSTOP)
        try:
            lt.wait_until(lambda: lt.queue_depth(url) >= 2, 20, "the broker to take both messages back")
        finally:
            os.kill(w.pid, signal.SIGCONT)
        w.wait_log("reconnected", timeout=SERVE_AGAIN)
        open(gate, "w").close()
        lt.wait_until(lambda: job_keys(rec) >= jobs, SERVE_AGAIN, "every task")
        lt.wait_until(lambda: lt.queue_depth(url) == 0, SERVE_AGAIN, "an empty queue")
        # The first copies finished after the broker took them back: counted.
        lt.wait_until(lambda: len(records(rec)) >= 4, SERVE_AGAIN, "both copies of both calls")
        self.assertEqual(w.stop(), 0)
        self.assertRegex(w.output(), r"stopped: 4 calls done, .*, 2 duplicates")

    @unittest.skipUnless(os.geteuid() == 0, "network namespaces need root")
    def test_g_a_node_cut_off_from_the_broker_reconnects_and_counts_duplicates(self):
        url = lt.fresh_vhost("fc")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        node = NetNode()
        self.addCleanup(node.remove)
        target = urllib.parse.urlsplit(url)
        relay = Relay(node.host_ip, (target.hostname, target.port))
        self.addCleanup(relay.close)
        w = self.start_worker(via(url, node.host_ip, relay.port), slots=2, heartbeat=2, wrap=node.enter())
        self.dump_on_failure(w)
        gate = os.path.join(rec, "gate")
        jobs = publish_tasks(url, rec, "cut-", 2, wait_for=gate)
        lt.wait_until(lambda: w.log().count("Tasks received") >= 2, 20, "both calls running")
        node.cut()
        try:
            # Both sides notice only missing heartbeats (2 s): the broker
            # takes both messages back, the worker gives the connection up
            # and keeps trying while the calls run on.
            lt.wait_until(lambda: lt.queue_depth(url) >= 2, 20, "the broker to take both messages back")
            w.wait_log("heartbeat timeout", timeout=20)
            self.assertTrue(w.alive())
        finally:
            node.mend()
        w.wait_log("reconnected", timeout=SERVE_AGAIN + 10)
        open(gate, "w").close()
        lt.wait_until(lambda: job_keys(rec) >= jobs, SERVE_AGAIN, "every task")
        lt.wait_until(lambda: len(records(rec)) >= 4, SERVE_AGAIN, "both copies of both calls")
        lt.wait_until(lambda: lt.queue_depth(url) == 0, SERVE_AGAIN, "an empty queue")
        more = publish_tasks(url, rec, "mended-", 2)
        lt.wait_until(lambda: job_keys(rec) >= jobs | more, SERVE_AGAIN, "tasks after the cut")
        self.assertEqual(w.stop(), 0)
        self.assertRegex(w.output(), r"stopped: 6 calls done, .*, 2 duplicates")


if __name__ == "__main__":
    lt.main()

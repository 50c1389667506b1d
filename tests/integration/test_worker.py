#!/usr/bin/python3
"""`lithops-hpc worker` in dispatch mode against the real broker, with the host
engine, the real runtime-defs/handler.py and tests/fake-lithops standing in for
Lithops' function handler. One test per behaviour a user relies on; each test
has its own vhost. Run: /usr/bin/python3 tests/integration/test_worker.py
(env from meson: LHPC_BIN, LHPC_SOURCE_ROOT, LHPC_RIG_DIR).
"""
import base64
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import unittest

import lhpc_test as lt
from worker_util import BIN, Worker, max_concurrency, records, rig_password, wait_records

DEAD = "task_queue.dead"


def task(job_key, n_calls=1, record_dir=None, **test):
    if record_dir:
        test["record_dir"] = record_dir
    return lt.make_send_task(n_calls, job_key, {"lhpc_test": test})


class WorkerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def setUp(self):
        self.url = lt.fresh_vhost("wrk")
        self.rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        self.workers = []

    def tearDown(self):
        for w in self.workers:
            if self._outcome_failed():
                print(f"--- worker log {w.log_path}:\n{w.log()[-6000:]}")
            w.cleanup()

    def _outcome_failed(self):
        result = getattr(self._outcome, "result", None)
        errors = getattr(result, "errors", []) + getattr(result, "failures", [])
        return any(t is self for t, _ in errors)

    def worker(self, **kw):
        w = Worker(self.url, **kw)
        self.workers.append(w)
        w.wait_consuming()
        return w

    def publish(self, payload, action="send_task"):
        lt.publish_lithops(self.url, action, payload)

    def dead_letters(self, n, timeout=60):
        got = []
        lt.wait_until(lambda: got.extend(lt.drain_queue(self.url, DEAD)) or len(got) >= n, timeout,
                      f"{n} messages in {DEAD}")
        return got

    # --- the normal path ---------------------------------------------------

    def test_each_message_acked_once_and_concurrency_never_above_slots(self):
        w = self.worker(slots=3)
        for i in range(12):
            self.publish(task(f"ex-{i:03d}", record_dir=self.rec, sleep=0.3))
        self.publish(task("ex-big", 4, record_dir=self.rec, sleep=0.3))  # more calls than slots: split
        recs = wait_records(self.rec, 16, 90)
        calls = sorted((r["job_key"], r["call_id"]) for r in recs)
        self.assertEqual(len(calls), len(set(calls)), "a call ran twice")
        self.assertEqual(len(calls), 16)
        self.assertLessEqual(max_concurrency(recs), 3)
        self.assertTrue(all(r["worker_processes"] == 1 for r in recs), "handlers get one call at a time")
        self.assertEqual(w.stop(), 0)
        # Nothing was left unacked (the broker would have requeued it at close).
        self.assertEqual(lt.queue_depth(self.url), 0)
        self.assertEqual(len(records(self.rec)), 16)
        self.assertIn("republishing", w.log())

    def test_split_remainder_goes_to_an_idle_worker(self):
        a = self.worker(slots=1)
        b = self.worker(slots=1)
        handlers_a = set(a.handler_pids().values())
        handlers_b = set(b.handler_pids().values())
        self.publish(task("ex-split", 4, record_dir=self.rec, sleep=1.0))
        recs = wait_records(self.rec, 4, 60)
        pids = {r["pid"] for r in recs}
        self.assertTrue(pids & handlers_a and pids & handlers_b,
                        f"both workers should run calls of the split message: {pids} {handlers_a} {handlers_b}")
        self.assertEqual(sorted(r["call_id"] for r in recs), ["00000", "00001", "00002", "00003"])

    def test_get_metadata_never_waits_behind_tasks(self):
        # Calls end when the test opens their gate: no timing guessed.
        gate = lambda i: os.path.join(self.rec, f"gate-{i}")  # noqa: E731
        storage = tempfile.mkdtemp(prefix="lhpc-storage-")
        meta_path = lambda rt: os.path.join(storage, "b", "lithops.jobs", f"{rt}.meta")  # noqa: E731

        def get_metadata(rt):
            self.publish({"backend": "fake", "fake": {"storage_bucket": "b", "storage_dir": storage},
                          "runtime_name": rt, "log_level": 20}, action="get_metadata")

        w = self.worker(slots=1)
        try:
            self.publish(task("ex-busy0", record_dir=self.rec, wait_for=gate(0), print="LHPC-STARTED-0"))
            w.wait_log("LHPC-STARTED-0")
            # The only slot busy: get_metadata comes through the reserve and is
            # answered while the task runs.
            get_metadata("rt-a")
            lt.wait_until(lambda: os.path.exists(meta_path("rt-a")), 30, "runtime metadata of rt-a in storage")
            self.assertEqual(records(self.rec), [])
            # A task in the reserve waits for the slot; a get_metadata behind it
            # is answered once that task has started, before it ends.
            self.publish(task("ex-busy1", record_dir=self.rec, wait_for=gate(1), print="LHPC-STARTED-1"))
            get_metadata("rt-b")
            open(gate(0), "w").close()
            lt.wait_until(lambda: os.path.exists(meta_path("rt-b")), 30, "runtime metadata of rt-b in storage")
            self.assertEqual([r["job_key"] for r in records(self.rec)], ["ex-busy0"])
            # The task has started (its handler's print reaches the rank log on its own time).
            w.wait_log("LHPC-STARTED-1", 30)
        finally:
            for i in (0, 1):
                open(gate(i), "w").close()
        wait_records(self.rec, 2, 30)
        with open(meta_path("rt-a")) as f:
            m = json.load(f)
        self.assertIn("preinstalls", m)
        self.assertIn("python_version", m)

    def test_job_with_deleted_data_fails_fast_and_frees_its_slot(self):
        w = self.worker(slots=1)
        self.publish(task("ex-gone", record_dir=self.rec, missing_data=True))
        self.publish(task("ex-next", record_dir=self.rec))
        recs = wait_records(self.rec, 1, 30)
        self.assertEqual(recs[0]["job_key"], "ex-next")
        w.wait_log("could not run")
        lt.wait_until(lambda: lt.queue_depth(self.url) == 0, 10, "an empty queue")
        self.assertEqual(lt.drain_queue(self.url, DEAD), [])

    # --- failures ----------------------------------------------------------

    def test_handler_killed_mid_task_is_restarted_and_the_task_completes(self):
        w = self.worker(slots=1)
        self.publish(task("ex-kill", record_dir=self.rec, sleep=2, print="LHPC-RUNNING"))
        w.wait_log("LHPC-RUNNING")
        victim = w.handler_pids("0")
        self.assertIsNotNone(victim)
        os.kill(victim, signal.SIGKILL)
        recs = wait_records(self.rec, 1, 60)
        self.assertEqual(len(recs), 1)
        self.assertNotEqual(recs[0]["pid"], victim)
        self.assertIn("requeued", w.log())
        self.assertTrue(w.alive())
        self.assertEqual(lt.drain_queue(self.url, DEAD), [])

    def test_handler_that_dies_right_after_ready_is_restarted_with_backoff_then_the_worker_fails(self):
        # A "python" that says ready and exits: every handler dies as soon as it is up.
        script = lt.write_script(os.path.join(self.rec, "dies-when-ready.sh"),
                                 "#!/bin/sh\necho '{\"event\":\"ready\",\"pid\":'$$',\"python\":\"sh\",\"lithops\":\"x\"}'\n")
        w = Worker(self.url, slots=1, python=script)
        self.workers.append(w)
        try:
            rc = w.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.fail(f"still restarting handlers after 90 s: {w.log().count(' started (pid ')} starts")
        log = w.log()
        self.assertEqual(rc, 6, log)
        # restart_limit = 3: the first run and three restarts per handler, never more.
        self.assertLessEqual(log.count(" started (pid "), 2 * 4, log)
        delays = [float(x) for x in re.findall(r"restarting handler 0 in ([\d.]+) s", log)]
        self.assertEqual(delays, [0.5, 1.0, 2.0], log)
        self.assertRegex(log, r"handlers of rank 0 on \S+ cannot be kept running: "
                              r"(handler 0|control handler) died 4 times within 60 s \(deploy.restart_limit = 3\)")
        self.assertIn("hint: ", log)

    def test_task_that_crashes_twice_is_dead_lettered(self):
        w = self.worker(slots=1)
        self.publish(task("ex-poison", crash="always"))
        dead = self.dead_letters(1)
        self.assertEqual(len(dead), 1)
        h = dead[0].headers
        self.assertIn("crashed the handler 2 times", h["x-lithops-hpc-reason"])
        self.assertEqual(h["x-lithops-hpc-rank"], 0)
        self.assertTrue(h["x-lithops-hpc-host"])
        self.assertEqual(h["x-lithops-hpc-crashes"], 2)
        self.assertTrue(h["x-lithops-hpc-message-id"])
        action, payload = lt.decode_lithops(dead[0].body)
        self.assertEqual((action, payload["job_key"]), ("send_task", "ex-poison"))
        # The worker keeps going.
        self.publish(task("ex-after", record_dir=self.rec))
        wait_records(self.rec, 1, 60)
        self.assertTrue(w.alive())

    def test_task_that_crashes_once_runs_again(self):
        marker = os.path.join(self.rec, ".crashed-once")
        self.worker(slots=1)
        self.publish(task("ex-once", record_dir=self.rec, crash="once", crash_marker=marker))
        recs = wait_records(self.rec, 1, 60)
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(len(recs), 1)
        self.assertEqual(lt.drain_queue(self.url, DEAD), [])

    def test_malformed_messages_are_dead_lettered_with_the_reason(self):
        w = self.worker(slots=1)
        b64 = lambda obj: base64.b64encode(json.dumps(obj).encode()).decode()  # noqa: E731
        mismatch = lt.make_send_task(3, "ex-mm")
        mismatch["data_byte_ranges"] = mismatch["data_byte_ranges"][:2]
        total = lt.make_send_task(2, "ex-tc")
        total["total_calls"] = 7
        cases = {
            "body is not JSON": b"this is not json",
            "no action": json.dumps({"payload": b64({})}).encode(),
            "unknown action 'explode'": json.dumps({"action": "explode", "payload": b64({})}).encode(),
            "no payload": json.dumps({"action": "send_task"}).encode(),
            "payload is not valid base64": json.dumps({"action": "send_task", "payload": "@@not base64@@"}).encode(),
            "payload is not a JSON object": json.dumps({"action": "send_task", "payload": b64([1, 2])}).encode(),
            "call_ids (3) and data_byte_ranges (2) differ in length":
                json.dumps({"action": "send_task", "payload": b64(mismatch)}).encode(),
            "total_calls (7) differs from the number of call_ids (2)":
                json.dumps({"action": "send_task", "payload": b64(total)}).encode(),
        }
        for body in cases.values():
            lt.publish_raw(self.url, body)
        dead = self.dead_letters(len(cases))
        reasons = {m.headers["x-lithops-hpc-reason"]: m.body for m in dead}
        for reason, body in cases.items():
            self.assertEqual(reasons.get("malformed: " + reason), body, reason)
        for m in dead:
            self.assertEqual(m.headers["x-lithops-hpc-rank"], 0)
            self.assertIn("x-lithops-hpc-host", m.headers)
        self.assertTrue(w.alive())
        self.assertGreaterEqual(w.log().count("is malformed"), len(cases))
        self.publish(task("ex-good", record_dir=self.rec))
        wait_records(self.rec, 1, 30)

    def test_deeply_nested_message_is_dead_lettered_and_the_worker_lives(self):
        # A valid send_task whose payload nests 100,000 levels (267 KB): it used
        # to overflow the worker's stack, unacked, and kill the next one too.
        w = self.worker(slots=1)
        payload = json.dumps(lt.make_send_task(1, "ex-deep"))
        payload = payload[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"
        body = json.dumps({"action": "send_task", "payload": base64.b64encode(payload.encode()).decode()})
        self.assertGreater(len(body), 260000)
        lt.publish_raw(self.url, body.encode())
        dead = self.dead_letters(1)
        self.assertEqual(dead[0].headers["x-lithops-hpc-reason"],
                         "malformed: payload nests deeper than max_message_depth (64)")
        self.assertEqual(dead[0].body, body.encode())
        self.assertTrue(w.alive())
        self.publish(task("ex-after-deep", record_dir=self.rec))
        wait_records(self.rec, 1, 30)
        self.assertEqual(w.stop(), 0)
        self.assertEqual(lt.queue_depth(self.url), 0)

    def test_sigterm_finishes_running_calls_and_requeues_the_rest(self):
        w = self.worker(slots=2)
        for i in range(6):
            self.publish(task(f"ex-t{i}", record_dir=self.rec, sleep=2, print=f"LHPC-START-{i}"))
        lt.wait_until(lambda: len(re.findall(r"LHPC-START-\d", w.log())) >= 2, 30, "two calls running")
        started = set(re.findall(r"LHPC-START-(\d)", w.log()))
        self.assertEqual(w.stop(signal.SIGTERM), 0)
        recs = records(self.rec)
        self.assertEqual({r["job_key"] for r in recs}, {f"ex-t{i}" for i in started},
                         "the calls running at SIGTERM finished, nothing else started")
        # None lost: what did not run is back in the queue.
        self.assertEqual(len(recs) + lt.queue_depth(self.url), 6)
        self.assertIn("drained", w.log())

    def test_no_password_in_any_command_line_or_log(self):
        password = rig_password()
        w = self.worker(slots=2)
        self.publish(task("ex-secret", record_dir=self.rec, sleep=1, print="LHPC-SECRET-RUN"))
        w.wait_log("LHPC-SECRET-RUN")
        pids = [w.pid] + w.descendants()
        self.assertGreaterEqual(len(pids), 4)  # worker + 2 slot handlers + control
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except FileNotFoundError:
                continue
            self.assertNotIn(password.encode(), cmd, f"pid {pid}")
        for pid in w.handler_pids().values():
            with open(f"/proc/{pid}/environ", "rb") as f:
                self.assertNotIn(b"AMQP_URL=", f.read(), "handlers never get the broker URL")
        out = subprocess.run([BIN, "--config", w.config, "ping", "--count", "3"], env=w.env,
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertEqual(w.stop(), 0)
        self.assertNotIn(password, w.log())
        self.assertNotIn(password, out.stdout + out.stderr)
        self.assertIn(lt.rig_env()["RIG_AMQP_USER"] + ":***@", w.log())  # the rig broker's user, redacted

    def test_unreachable_broker_is_retried_with_growing_delays(self):
        w = Worker(f"amqp://u:secret-pw@127.0.0.1:{lt.free_port()}/", slots=1)
        self.workers.append(w)
        delays = lambda: [float(x) for x in re.findall(r"retrying in ([\d.]+) s", w.log())]  # noqa: E731
        lt.wait_until(lambda: len(delays()) >= 3, 30, "three connection attempts")
        self.assertEqual(delays()[:3], [0.5, 1.0, 2.0])
        self.assertTrue(w.alive())
        self.assertEqual(w.stop(), 0)
        self.assertNotIn("secret-pw", w.log())
        self.assertIn("u:***@127.0.0.1", w.log())

    # --- handler output: per-rank log file, not the worker's output -------

    def logs(self, w, *args):
        return subprocess.run([BIN, "--config", w.config, "logs", *args], env=w.env, capture_output=True,
                              text=True, timeout=60)

    def test_handler_output_goes_to_the_rank_log_capped_and_at_each_tasks_log_level(self):
        w = self.worker(slots=1, logs_extra="max_bytes = 4096")
        job = w.env["LITHOPS_HPC_JOB_ID"]
        # One handler runs these in order: a DEBUG task, then a WARNING one.
        # Lithops sets the task's level only after loading the function, so
        # without the handler setting it first the WARNING task would log the
        # DEBUG task's "loading" line.
        self.publish(task("ex-dbg", record_dir=self.rec, print="LHPC-DEBUG-TASK") | {"log_level": "DEBUG"})
        self.publish(task("ex-warn", record_dir=self.rec, print="LHPC-WARN-TASK") | {"log_level": "WARNING"})
        wait_records(self.rec, 2, 30)
        lt.wait_until(lambda: "LHPC-WARN-TASK" in w.handler_log(), 10, "the second task's print in the rank log")
        log = w.handler_log()
        self.assertIn("loading function and data of ex-dbg", log)
        self.assertIn("debug line of ex-dbg", log)
        self.assertNotIn("of ex-warn", log, "no DEBUG line of the WARNING task")
        self.assertNotIn("LHPC-", w.output(), "the worker's own output has no handler lines")
        self.assertNotIn("Tasks received", w.output())
        # `logs` prints them prefixed with the rank; exit codes scripts test.
        r = self.logs(w, job)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"(?m)^rank 0: LHPC-DEBUG-TASK$")
        self.assertRegex(r.stdout, r"(?m)^rank 0: .*Tasks received")
        self.assertEqual(self.logs(w, job, "--rank", "1").returncode, 8, "no rank 1")
        self.assertEqual(self.logs(w, "no-such-job").returncode, 8, "no such job")
        # The cap: 16 calls printing 2 x 600 bytes each are far past 2 x 4096.
        for i in range(16):
            self.publish(task(f"ex-big{i:02d}", record_dir=self.rec, print=f"BIG{i:02d}-" + "z" * 594))
        wait_records(self.rec, 18, 60)
        lt.wait_until(lambda: "BIG15-" in w.handler_log(), 10, "the last call's print in the rank log")
        files = glob.glob(os.path.join(w.logs_dir, job, "rank-0.log*"))
        self.assertEqual(sorted(os.path.basename(f) for f in files), ["rank-0.log", "rank-0.log.1"])
        for f in files:
            self.assertLessEqual(os.path.getsize(f), 4096, f)
            self.assertEqual(os.stat(f).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(files[0])).st_mode & 0o777, 0o700)
        r = self.logs(w, "--rank", "0")  # the newest job without an id
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"(?m)^rank 0: BIG15-z+$")
        self.assertEqual(w.stop(), 0)

    def test_a_handler_that_dies_before_ready_has_its_last_output_lines_in_the_worker_output(self):
        script = lt.write_script(os.path.join(self.rec, "cannot-start.sh"),
                                 "#!/bin/sh\necho 'Traceback: LHPC-WHY-IT-DIED' >&2\nexit 1\n")
        w = Worker(self.url, slots=1, python=script)
        self.workers.append(w)
        self.assertEqual(w.proc.wait(90), 6, w.output())
        out = w.output()
        self.assertIn("died before it was ready", out)
        self.assertRegex(out, r"last lines of handler output \(\S+/rank-0.log\):")
        self.assertRegex(out, r"(?m)  \| Traceback: LHPC-WHY-IT-DIED$")

    def test_a_symlink_planted_at_the_log_directory_is_not_followed(self):
        shared = tempfile.mkdtemp(prefix="lhpc-shared-")   # like /tmp: everyone writes, sticky
        self.addCleanup(shutil.rmtree, shared, True)
        os.chmod(shared, 0o1777)
        evil = os.path.join(shared, "evil")
        # Another local user plants logs -> a directory of theirs.
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c",
                        f"mkdir -m 777 {evil} && ln -s {evil} {shared}/logs"], check=True)
        w = self.worker(slots=1, logs_dir=os.path.join(shared, "logs"))
        self.assertRegex(w.output(), r"handler output stays in this output: .*logs is a symbolic link")
        self.publish(task("ex-evil", record_dir=self.rec, print="LHPC-NOT-IN-EVIL"))
        wait_records(self.rec, 1, 30)
        lt.wait_until(lambda: "LHPC-NOT-IN-EVIL" in w.output(), 10, "the print in the worker's own output")
        self.assertEqual(os.listdir(evil), [], "nothing written through the symlink")
        self.assertEqual(w.stop(), 0)

    # --- ping --------------------------------------------------------------

    # --- refused before the loop: an error, never a crash ----------------------

    def exit_of(self, **kw):
        w = Worker(self.url, **kw)
        self.workers.append(w)
        return w.proc.wait(60), w.output()

    def test_a_state_directory_that_cannot_hold_the_inflight_record_is_an_error_not_a_crash(self):
        blocker = os.path.join(self.rec, "a-file")  # <state dir>/inflight/<node> cannot be made under a file
        open(blocker, "w").close()
        rc, out = self.exit_of(extra_env={"LITHOPS_HPC_STATE_DIR": blocker})
        self.assertGreater(rc, 0, out)  # negative: killed by a signal (it was SIGSEGV)
        self.assertRegex(out, r"\[error\] .*" + re.escape(blocker) + ": Not a directory")  # main's report of the Error

    def test_a_job_id_that_is_not_one_is_refused_before_anything_starts(self):
        rc, out = self.exit_of(extra_env={"LITHOPS_HPC_JOB_ID": "j" * 50000})
        self.assertEqual(rc, 2, out[-3000:])
        self.assertIn("is not a job id", out)
        self.assertNotIn("starting", out)

    def test_a_gpu_runtime_on_a_node_without_gpus_fails_at_start_saying_so(self):
        rc, out = self.exit_of(slots=0, config_extra="gpus_per_slot = 1", extra_env={"CUDA_VISIBLE_DEVICES": ""})
        self.assertEqual(rc, 6, out[-3000:])
        self.assertIn("a GPU runtime needs 1 nvidia GPU(s) per slot, but 0 were found (CUDA_VISIBLE_DEVICES)", out)
        self.assertNotIn("consuming", out)

    def test_ping_reports_each_rank_and_the_throughput(self):
        w = self.worker(slots=1)
        gate = os.path.join(self.rec, "gate")
        try:
            # The only slot busy and a task waiting in the reserve: pings come
            # through the rank's own channel, which has no prefetch limit.
            self.publish(task("ex-busy", record_dir=self.rec, wait_for=gate, print="LHPC-BUSY"))
            self.publish(task("ex-next", record_dir=self.rec, wait_for=gate))
            w.wait_log("LHPC-BUSY")
            lt.wait_until(lambda: lt.queue_depth(self.url) == 0, 30, "the second task in the reserve")
            out = subprocess.run([BIN, "--config", w.config, "ping", "--count", "40", "--concurrency", "4"],
                                 env=w.env, capture_output=True, text=True, timeout=60)
            self.assertEqual(records(self.rec), [], "the pings did not wait for the task")
        finally:
            open(gate, "w").close()
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertRegex(out.stdout, r"(?m)^rank 0 node \S+: 40 replies, p50 [\d.]+ ms, p99 [\d.]+ ms$")
        self.assertRegex(out.stdout, r"40/40 pings answered by 1 rank in [\d.]+ s: [\d.]+ pings/s")
        more = subprocess.run([BIN, "--config", w.config, "ping", "--count", "2", "--expect-ranks", "2"],
                              env=w.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(more.returncode, 1, more.stdout + more.stderr)
        self.assertIn("only 1 of the 2 expected ranks answered", more.stdout)

    def test_ping_without_a_deployment_fails(self):
        env = dict(os.environ, AMQP_URL=self.url)
        env.pop("LITHOPS_HPC_CONFIG", None)
        out = subprocess.run([BIN, "--config", "/dev/null", "ping", "--count", "2", "--timeout", "1"], env=env,
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
        self.assertIn("no reply within 1 s", out.stdout)
        # Its unanswered pings expire instead of waiting for the next worker.
        lt.wait_until(lambda: lt.queue_depth(self.url) == 0, 10, "the expired pings to go")

    def test_ping_with_an_unreachable_broker_exits_5(self):
        env = dict(os.environ, AMQP_URL=f"amqp://u:p@127.0.0.1:{lt.free_port()}/")
        out = subprocess.run([BIN, "--config", "/dev/null", "ping", "--count", "1"], env=env,
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 5, out.stdout + out.stderr)
        self.assertIn("u:***@", out.stderr)


if __name__ == "__main__":
    lt.main()

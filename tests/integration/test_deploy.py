"""`lithops-hpc deploy` under real Open MPI with a real broker: ranks-as-nodes
(LITHOPS_HPC_NODE_ID per rank, %n in sif_path), the host engine, the real
handler.py and tests/fake-lithops.

Checks the issue's list: 3 ranks reach ready and the status file lists them;
pings reach every rank; a SIGSTOPped rank shows as unresponsive within 3
intervals while the others keep serving; SIGTERM drains with no message lost;
`status` exit codes and --json schema; a singleton deploy; a rank that cannot
start fails the deployment fast, naming rank and node.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import lhpc_test as lt
from worker_util import records

SOURCE_ROOT = os.environ["LHPC_SOURCE_ROOT"]
BUILD_ROOT = os.environ["LHPC_BUILD_ROOT"]
BIN = os.environ["LHPC_BIN"]
MAKE_SIF = os.path.join(BUILD_ROOT, "tests", "tools", "make-sif")
FAKE_LITHOPS = os.path.join(SOURCE_ROOT, "tests", "fake-lithops")
INTERVAL = 1.0


class Deployment:
    """mpirun -np N lithops-hpc deploy, each rank its own node."""

    def __init__(self, url, ranks, sif=None, slots=2, python="/usr/bin/python3", heartbeat=60, args=(), env=None,
                 interval=INTERVAL):
        self.dir = tempfile.mkdtemp(prefix="lhpc-deploy-test-")
        self.state = os.path.join(self.dir, "state")
        self.records = os.path.join(self.dir, "records")
        os.makedirs(self.records)
        self.config = os.path.join(self.dir, "config.toml")
        with open(os.open(self.config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"""[singularity]
engine = "host"
worker_processes = {slots}
python = "{python}"
sif_path = "{self.dir}/nodes/%n"
[rabbitmq]
heartbeat = {heartbeat}
[deploy]
drain_timeout = 30
cleanup = true
[health]
interval = {interval}
[logs]
dir = "{self.dir}/logs"
progress_interval = 1
""")
        self.env = dict(os.environ, AMQP_URL=url, PYTHONPATH=FAKE_LITHOPS, LITHOPS_HPC_STATE_DIR=self.state,
                        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                        OMPI_MCA_rmaps_base_oversubscribe="1")
        self.env.pop("LITHOPS_HPC_CONFIG", None)
        self.env.pop("SLURM_JOB_ID", None)
        self.env.update(env or {})
        argv = [BIN, "--config", self.config, "deploy"] + (["--sif", sif] if sif else []) + list(args)
        self.log_path = os.path.join(self.dir, "deploy.log")
        self._log = open(self.log_path, "w")
        if ranks == 0:  # singleton: no launcher at all
            cmd = argv
        else:
            cmd = ["mpirun", "--oversubscribe", "-np", str(ranks), "sh", "-c",
                   'LITHOPS_HPC_NODE_ID=node$OMPI_COMM_WORLD_RANK exec "$@"', "sh"] + argv
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def status(self, *args):
        return subprocess.run([BIN, "status", *args], env=self.env, capture_output=True, text=True, timeout=30)

    def status_json(self):
        r = self.status("--json")
        if r.returncode == 8:  # no deployment found (yet)
            return None
        return json.loads(r.stdout)

    def wait_ready(self, n, timeout=60):
        def ready():
            d = self.status_json()
            return d and sum(1 for r in d["ranks"] if r["state"] == "ready") == n
        lt.wait_until(ready, timeout, f"{n} ranks ready")

    def rank_pids(self):
        d = self.status_json()
        return {r["rank"]: r.get("pid") for r in d["ranks"]}

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def signal_ranks(self, sig):
        # Like scancel: the rank processes get the signal, not the launcher.
        for pid in subprocess.run(["pgrep", "-s", str(self.proc.pid), "-x", "lithops-hpc"],
                                  capture_output=True, text=True).stdout.split():
            os.kill(int(pid), sig)

    def wait(self, timeout=90):
        return self.proc.wait(timeout=timeout)

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()
        cls.tmp = tempfile.mkdtemp(prefix="lhpc-deploy-sif-")
        cls.sif = os.path.join(cls.tmp, "rt.sif")
        subprocess.run([MAKE_SIF, cls.sif, "3M"], check=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.url = lt.fresh_vhost("deploy")
        self.deps = []

    def tearDown(self):
        failed = any(e for _, e in getattr(self._outcome, "errors", []) if e) if hasattr(self, "_outcome") else False
        for d in self.deps:
            if failed or d.proc.poll() is None:
                print(f"--- deploy log ({d.log_path}) ---\n{d.log()[-6000:]}")
            d.close()

    def deploy(self, ranks, **kw):
        d = Deployment(self.url, ranks, **kw)
        self.deps.append(d)
        return d

    def test_three_ranks_ready_serve_pings_and_tasks_then_drain_on_sigterm_losing_nothing(self):
        # --logs-dir state: every rank's handler log in the job's state directory.
        d = self.deploy(3, sif=self.sif, args=["--logs-dir", "state"])
        d.wait_ready(3)
        doc = d.status_json()
        self.assertEqual([r["node"] for r in doc["ranks"]], ["node0", "node1", "node2"])
        self.assertEqual(d.status().returncode, 0, "status exits 0 when every rank is ready")
        # The image landed on every "node", verified, in a private directory.
        for n in range(3):
            copies = glob.glob(os.path.join(d.dir, "nodes", f"node{n}", "lithops-hpc-*", "rt.sif"))
            self.assertEqual(len(copies), 1, f"node{n} holds one staged copy")
            self.assertEqual(os.stat(os.path.dirname(copies[0])).st_mode & 0o777, 0o700)
        # Without --expect-ranks: every rank of the status file, each reached
        # through its own queue, `count` pings each.
        ping = subprocess.run([BIN, "ping", "--count", "5", "--concurrency", "3"], env=d.env,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(ping.returncode, 0, ping.stdout + ping.stderr)
        for n in range(3):
            self.assertRegex(ping.stdout, rf"(?m)^rank {n} node node{n}: 5 replies, ")
        self.assertIn("15/15 pings answered by 3 ranks", ping.stdout)

        # Tasks that take a while, then SIGTERM in the middle: every call either
        # ran to the end or is back in the queue; none lost, none half-acked.
        published = set()
        for j in range(12):
            p = lt.make_send_task(4, f"job{j:02d}", {"lhpc_test": {"sleep": 0.4, "record_dir": d.records,
                                                                   "print": "LHPC-CALL"}})
            published |= {(p["job_key"], c) for c in p["call_ids"]}
            lt.publish_lithops(self.url, "send_task", p)
        lt.wait_until(lambda: len(records(d.records)) >= 8, 60, "some calls ran")
        # Rank 0's progress line (every progress_interval = 1 s while serving, none once draining).
        progress = (r"(?m)rank 0 node0: progress: tasks \d+ done, \d+ failed, [\d.]+/s; "
                    r"slots \d+/6 busy; ranks \d/3 ready; runtime rt$")
        lt.wait_until(lambda: re.search(progress, d.log()), 15, "rank 0's progress line")
        follow = subprocess.Popen([BIN, "logs", "--follow"], env=d.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: follow.poll() is None and follow.kill())
        d.signal_ranks(signal.SIGTERM)
        self.assertEqual(d.wait(), 0, "deploy exits 0 after a drain")
        out, err = follow.communicate(timeout=30)   # returns once the status says stopped
        self.assertEqual(follow.returncode, 0, err)
        done = {(r["job_key"], r["call_id"]) for r in records(d.records) if r.get("end")}
        left = set()
        for m in lt.drain_queue(self.url, "task_queue"):
            action, payload = lt.decode_lithops(m.body)
            left |= {(payload["job_key"], c) for c in payload["call_ids"]}
        self.assertEqual(done | left, published, "every published call ran or is back in the queue")
        self.assertTrue(done, "some calls finished before the drain")
        final = d.status_json()
        self.assertEqual(final["state"], "stopped")
        self.assertTrue(all(r["state"] == "stopped" for r in final["ranks"]))
        self.assertEqual(final["summary"]["done"], len(done))
        self.assertEqual(glob.glob(os.path.join(d.dir, "nodes", "*", "lithops-hpc-*", "*.sif")), [],
                         "cleanup removed the staged images")
        # The job output: lithops-hpc's lines (the progress line above), no handler output.
        self.assertNotIn("LHPC-CALL", d.log())
        self.assertNotIn("Tasks received", d.log())
        # `logs --follow` saw every call's print (twice: print() and a write to fd 1), each line with its rank.
        self.assertGreaterEqual(out.count("LHPC-CALL"), 2 * len(done))
        for line in out.splitlines():
            self.assertRegex(line, r"^rank [0-2]: ")
        logdir = os.path.join(d.state, "jobs", final["job"], "logs")
        self.assertEqual(sorted(os.listdir(logdir)), ["rank-0.log", "rank-1.log", "rank-2.log"])
        self.assertEqual(os.stat(logdir).st_mode & 0o777, 0o700)
        again = subprocess.run([BIN, "logs", final["job"], "--rank", "2"], env=d.env, capture_output=True,
                               text=True, timeout=30)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertTrue(all(line.startswith("rank 2: ") for line in again.stdout.splitlines()))

    def test_a_stopped_rank_is_unresponsive_within_three_intervals_while_others_serve(self):
        # A short heartbeat: the broker notices the stopped rank's connection is
        # dead and gives its prefetched messages to the others.
        d = self.deploy(3, sif=self.sif, heartbeat=3)
        d.wait_ready(3)
        pid = d.rank_pids()[2]
        self.assertTrue(pid, "the status file names each rank's pid")
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            lt.wait_until(lambda: d.status_json()["ranks"][2]["state"] == "unresponsive", 4 * INTERVAL + 5,
                          "rank 2 unresponsive")
            self.assertLess(time.monotonic() - t0, 3 * INTERVAL + 4)
            r = d.status()
            self.assertEqual(r.returncode, 1, "status exits 1 when a rank is unresponsive")
            self.assertIn("unresponsive", r.stdout)
            # ping names the rank that did not answer; the others answer theirs.
            ping = subprocess.run([BIN, "ping", "--count", "2", "--timeout", "2"], env=d.env,
                                  capture_output=True, text=True, timeout=60)
            self.assertEqual(ping.returncode, 1, ping.stdout + ping.stderr)
            self.assertIn("no reply within 2 s from rank (node): 2 (node2)", ping.stdout)
            for n in range(2):
                self.assertRegex(ping.stdout, rf"(?m)^rank {n} node node{n}: 2 replies, ")
            # With the default count (10 each) a silent rank costs one
            # timeout, not 10 of them in a row (20 s here; 1,000 s for 100 ranks).
            t0 = time.monotonic()
            ping = subprocess.run([BIN, "ping", "--timeout", "2"], env=d.env, capture_output=True, text=True,
                                  timeout=60)
            took = time.monotonic() - t0
            self.assertEqual(ping.returncode, 1, ping.stdout + ping.stderr)
            self.assertIn("no reply within 2 s from rank (node): 2 (node2)", ping.stdout)
            self.assertIn("10 pings got no reply within 2 s (9 not sent: their rank had missed one already)",
                          ping.stdout)
            self.assertLess(took, 5 * 2, ping.stdout)
            # The others keep serving; what the stopped rank had prefetched comes
            # back when the broker drops its connection (2 missed heartbeats).
            for j in range(12):
                p = lt.make_send_task(1, f"while-stopped-{j}", {"lhpc_test": {"record_dir": d.records}})
                lt.publish_lithops(self.url, "send_task", p)
            lt.wait_until(lambda: len(records(d.records)) >= 9, 30, "the healthy ranks ran most tasks at once")
            lt.wait_until(lambda: len({r["job_key"] for r in records(d.records)}) == 12, 60,
                          "every task ran, the stopped rank's too")
        finally:
            os.kill(pid, signal.SIGCONT)
        lt.wait_until(lambda: d.status_json()["ranks"][2]["state"] == "ready", 10, "rank 2 ready again")
        stop = subprocess.run([BIN, "stop", "--timeout", "60"], env=d.env, capture_output=True, text=True, timeout=90)
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertEqual(d.wait(), 0)

    def test_status_json_schema_and_exit_codes(self):
        env = dict(os.environ, LITHOPS_HPC_STATE_DIR=tempfile.mkdtemp(prefix="lhpc-empty-state-"))
        env.pop("SLURM_JOB_ID", None)
        none = subprocess.run([BIN, "status"], env=env, capture_output=True, text=True)
        self.assertEqual(none.returncode, 8, "no deployment found")
        self.assertIn("no deployment", none.stderr.lower())
        d = self.deploy(0)  # singleton, host engine, no image
        d.wait_ready(1)
        doc = d.status_json()
        for key in ("job", "version", "updated", "interval", "state", "summary", "ranks", "rank0"):
            self.assertIn(key, doc)
        rank = doc["ranks"][0]
        for key in ("rank", "node", "state", "slots_busy", "slots_total", "done", "failed", "requeued",
                    "dead_lettered", "broker", "instance", "restarts", "rss_kb", "last_seen", "last_error"):
            self.assertIn(key, rank)
        self.assertEqual(rank["state"], "ready")
        # The broker connection is made off the event loop: it follows "ready".
        lt.wait_until(lambda: d.status_json()["ranks"][0]["broker"], 30, "rank 0 connected to the broker")
        self.assertEqual(rank["slots_total"], 2)
        self.assertEqual(d.status(doc["job"]).returncode, 0, "status JOBID")
        d.signal_ranks(signal.SIGINT)
        self.assertEqual(d.wait(), 0)
        self.assertEqual(d.status_json()["state"], "stopped")

    def watch_until_ready(self, d, phase):
        """Poll `status` until every rank is ready: it never calls the file
        stale (rank 0 "stopped updating") nor a rank unresponsive, and the
        ranks were seen in `phase` after 3 intervals (else this checks nothing)."""
        lt.wait_until(lambda: d.status_json(), 30, "a status file")
        first = time.monotonic()
        late = False
        while True:
            self.assertIsNone(d.proc.poll(), f"deploy ended while {phase}")
            r = d.status()
            self.assertNotIn("stopped updating the status file", r.stdout)
            if r.returncode == 0:
                break  # every rank ready
            doc = d.status_json()
            states = [x["state"] for x in doc["ranks"]]
            self.assertNotIn("unresponsive", states, doc)
            late = late or (time.monotonic() - first > 3 * INTERVAL + 1 and phase in states)
            self.assertLess(time.monotonic() - first, 60, "every rank ready within 60 s")
            time.sleep(0.2)
        self.assertTrue(late, f"{phase} outlasted 3 intervals (else this test checks nothing)")
        stop = subprocess.run([BIN, "stop", "--timeout", "60"], env=d.env, capture_output=True, text=True, timeout=90)
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertEqual(d.wait(), 0)

    def test_status_stays_fresh_while_workers_start_slowly(self):
        # Handlers whose interpreter takes 3 intervals and more to come up (a
        # loaded node, many handlers per node, a cold shared filesystem):
        # `status` shows the ranks starting, never "rank 0 stopped updating
        # the status file", and rank 0 does not call them unresponsive.
        slow = lt.write_script(os.path.join(self.tmp, "slow-python"),
                               "#!/bin/sh\nsleep %g\nexec /usr/bin/python3 \"$@\"\n" % (4 * INTERVAL + 2))
        self.watch_until_ready(self.deploy(2, python=slow), "starting")

    def test_status_stays_fresh_while_the_image_is_staged_slowly(self):
        # A transfer longer than 3 intervals (a large image, sbcast on many
        # nodes): the ranks show staging, the file stays fresh. The test hook
        # makes each writing node take 4 intervals + 2 s for the image's one chunk.
        d = self.deploy(2, sif=self.sif, env={"LITHOPS_HPC_STAGE_THROTTLE_MS": str(int((4 * INTERVAL + 2) * 1000))})
        self.watch_until_ready(d, "staging")

    def test_a_rank_that_cannot_start_fails_the_deployment_naming_rank_and_node(self):
        # No such handler interpreter: the worker cannot start on any rank.
        d = self.deploy(2, sif=self.sif, python="/nonexistent/python3")
        rc = d.wait(120)
        self.assertEqual(rc, 6, "exit 6: ranks failed to start")
        log = d.log()
        self.assertRegex(log, r"rank 1 on node1 failed to start")
        self.assertIn("/nonexistent/python3", log)
        self.assertEqual(d.status_json()["state"], "failed")

if __name__ == "__main__":
    unittest.main(verbosity=2)

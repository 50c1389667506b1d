#!/usr/bin/env python3
"""Health over real Open MPI: tests/tools/health-driver ranks (scripted states,
no image, no broker) report to rank 0, which writes the status file that
`lithops-hpc status` and `lithops-hpc stop` read.

Run: meson test -C build integration/health-mpi
 or  LHPC_BIN=build/lithops-hpc LHPC_BUILD_ROOT=build /usr/bin/python3 tests/integration/test_health_mpi.py

Every wait polls the status file or a process against a deadline; no blind sleeps.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lhpc_test import wait_until  # noqa: E402

BIN = os.environ.get("LHPC_BIN", "build/lithops-hpc")
BUILD = Path(os.environ.get("LHPC_BUILD_ROOT", Path(BIN).resolve().parent))
DRIVER = str(BUILD / "tests" / "tools" / "health-driver")
MPIRUN = shutil.which("mpirun") or "/usr/bin/mpirun"

INTERVAL = 1.0  # seconds; unresponsive after 3 of them
# Scheduling slack on a loaded 2-core machine, on top of what the design promises.
SLACK = 1.5

TOP_KEYS = {"job", "version", "updated", "started", "interval", "rank0", "summary", "state", "ranks", "runtime"}
SUMMARY_KEYS = {"ranks", "ready", "degraded", "unresponsive", "slots_busy", "slots_total", "done", "failed",
                "requeued", "dead_lettered", "duplicates"}
RANK_KEYS = {"rank", "node", "pid", "state", "reported_state", "slots_busy", "slots_total", "done", "failed",
             "requeued", "dead_lettered", "duplicates", "broker", "consuming", "blocked", "instance", "restarts", "rss_kb", "rss_tree_kb", "uptime",
             "seq", "last_seen", "last_error", "gpus", "gpus_out", "gpus_out_why", "gpu_memory"}
STATES = {"staging", "starting", "ready", "draining", "failed", "stopped", "unresponsive", "reconnecting"}


def gone(pid):
    """True when pid has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] in ("Z", "X")
    except FileNotFoundError:
        return True
    return False


def proc_state(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("State:"):
                return line.split()[1]
    return "?"


class HealthRun:
    """One mpirun of the health driver with its own state dir and job id."""

    def __init__(self, test, job, np=3, extra=(), interval=INTERVAL):
        self.test = test
        self.job = job
        self.interval = interval
        self.state_dir = tempfile.mkdtemp(prefix="lhpc-health-")
        self.env = dict(os.environ, LITHOPS_HPC_STATE_DIR=self.state_dir, OMPI_ALLOW_RUN_AS_ROOT="1",
                        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
        for k in ("SLURM_JOB_ID", "LITHOPS_HPC_JOB_ID"):
            self.env.pop(k, None)
        self.status_path = Path(self.state_dir) / "jobs" / job / "status.json"
        self.log_path = Path(self.state_dir) / "mpirun.log"
        self.log = open(self.log_path, "wb")
        argv = [MPIRUN, "--oversubscribe", "--allow-run-as-root", "--bind-to", "none", "-np", str(np), DRIVER,
                "--job", job, "--interval", str(interval), "--fake-nodes", *extra]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.stopped_pids = []
        test.addCleanup(self.cleanup)

    def cleanup(self):
        for pid in self.stopped_pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def status(self):
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_status(self, pred, timeout, what):
        def check():
            if self.proc.poll() is not None and not self.status_path.exists():
                raise AssertionError(f"mpirun ended ({self.proc.returncode}) before {what}:\n{self.log_text()}")
            s = self.status()
            return s if s and pred(s) else None
        try:
            return wait_until(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast status: {self.status()}\nlog:\n{self.log_text()}") from None

    def all_ready(self, timeout=30):
        return self.wait_status(lambda s: [r["state"] for r in s["ranks"]] == ["ready"] * len(s["ranks"]),
                                timeout, "every rank ready")

    def cli(self, *args, timeout=60):
        return subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def sigstop(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.stopped_pids.append(pid)
        wait_until(lambda: proc_state(pid) == "T", 5, f"pid {pid} stopped")

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mpirun still running after {timeout} s:\n{self.log_text()}") from None


class HealthOverMpi(unittest.TestCase):
    def check_schema(self, s, ranks):
        self.assertEqual(set(s), TOP_KEYS)
        self.assertEqual(s["version"], 1)
        self.assertEqual(set(s["summary"]), SUMMARY_KEYS)
        self.assertEqual(set(s["rank0"]), {"host", "pid"})
        self.assertIn(s["state"], {"running", "draining", "stopped", "failed"})
        self.assertEqual(s["summary"]["ranks"], ranks)
        self.assertEqual([r["rank"] for r in s["ranks"]], list(range(ranks)))
        for r in s["ranks"]:
            self.assertEqual(set(r), RANK_KEYS)
            self.assertIn(r["state"], STATES)
            self.assertIsInstance(r["broker"], bool)
            self.assertIsInstance(r["instance"], bool)
            for k in ("slots_busy", "slots_total", "done", "failed", "requeued", "dead_lettered", "restarts",
                      "rss_kb", "rss_tree_kb", "seq", "pid"):
                self.assertIsInstance(r[k], int, k)

    def test_ready_unresponsive_recovers_and_stops(self):
        run = HealthRun(self, "h1")
        s = run.all_ready()
        self.check_schema(s, 3)
        self.assertEqual([r["node"] for r in s["ranks"]], ["n1", "n2", "n3"])
        self.assertEqual(s["state"], "running")
        self.assertEqual(s["rank0"]["pid"], s["ranks"][0]["pid"])
        self.assertEqual(os.stat(run.status_path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(run.status_path.parent).st_mode & 0o777, 0o700)
        self.assertTrue(all(r["rss_kb"] > 0 and r["rss_tree_kb"] >= r["rss_kb"] for r in s["ranks"]))

        st = run.cli("status", "h1")
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        self.assertTrue(st.stdout.startswith("RANK  NODE"), st.stdout)
        self.assertIn("job h1 (every runtime): running, 3/3 ranks ready", st.stdout)
        st = run.cli("status")  # no JOBID: the newest of this user's
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        js = run.cli("status", "--json", "h1")
        self.assertEqual(js.returncode, 0, js.stderr)
        self.check_schema(json.loads(js.stdout), 3)  # stdout is the JSON and nothing else

        # A stopped rank is unresponsive within 3 intervals; the others stay ready.
        victim = s["ranks"][2]["pid"]
        t0 = time.monotonic()
        run.sigstop(victim)
        s = run.wait_status(lambda s: s["ranks"][2]["state"] == "unresponsive", 3 * INTERVAL + SLACK + 1,
                            "rank 2 unresponsive")
        took = time.monotonic() - t0
        self.assertLessEqual(took, 3 * INTERVAL + SLACK, f"unresponsive only after {took:.1f} s")
        self.assertEqual([r["state"] for r in s["ranks"][:2]], ["ready", "ready"])
        self.assertTrue(all(r["last_seen"] < 2 * INTERVAL for r in s["ranks"][:2]), s["ranks"])
        self.assertEqual(s["ranks"][2]["reported_state"], "ready")
        self.assertEqual(s["summary"]["unresponsive"], 1)
        self.assertIn("rank 2 n3: ready -> unresponsive (no report for", run.log_text())
        st = run.cli("status", "h1")
        self.assertEqual(st.returncode, 1, st.stdout + st.stderr)
        self.assertIn("unresponsive", st.stdout)
        self.assertIn("DEGRADED", st.stdout)

        os.kill(victim, signal.SIGCONT)
        run.stopped_pids.remove(victim)
        run.wait_status(lambda s: s["ranks"][2]["state"] == "ready", 2 * INTERVAL + SLACK, "rank 2 ready again")
        self.assertIn("rank 2 n3: unresponsive -> ready (report after", run.log_text())
        st = run.cli("status", "h1")
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)

        # stop: every rank drains and stops, the run ends cleanly.
        pids = [r["pid"] for r in s["ranks"]]
        sp = run.cli("stop", "h1", "--timeout", "30")
        self.assertEqual(sp.returncode, 0, sp.stdout + sp.stderr + run.log_text())
        self.assertIn("stop requested for job h1", sp.stdout)
        self.assertIn("job h1 (every runtime): stopped", sp.stdout)
        self.assertEqual(run.wait_exit(15), 0, run.log_text())
        s = run.status()
        self.check_schema(s, 3)
        self.assertEqual(s["state"], "stopped")
        self.assertEqual([r["state"] for r in s["ranks"]], ["stopped"] * 3)
        self.assertGreater(s["summary"]["done"], 0)
        self.assertFalse((run.status_path.parent / "stop").exists())
        self.assertTrue(all(gone(p) for p in pids))
        st = run.cli("status", "h1")
        self.assertEqual(st.returncode, 1, st.stdout)  # ended: not serving
        self.assertIn("job h1 (every runtime): stopped", st.stdout)
        sp = run.cli("stop", "h1")
        self.assertEqual(sp.returncode, 0)
        self.assertIn("already stopped", sp.stdout)

    def test_hung_rank_at_shutdown_ends_the_job(self):
        # Rank 2 fails (its last error holds a broker URL with a password);
        # rank 1 is SIGSTOPped and never answers the stop: MPI_Finalize would
        # hang, so rank 0 ends the job with MPI_Abort after 3 silent intervals.
        run = HealthRun(self, "h2", extra=["--fail-rank", "2"])
        s = run.wait_status(lambda s: [r["state"] for r in s["ranks"]] == ["ready", "ready", "failed"], 30,
                            "ranks 0, 1 ready and rank 2 failed")
        err = s["ranks"][2]["last_error"]
        self.assertIn("amqp://rig:***@127.0.0.1:5672/v1", err)
        self.assertNotIn("s3cret", run.status_path.read_text())
        self.assertNotIn("s3cret", run.log_text())
        st = run.cli("status", "h2")
        self.assertEqual(st.returncode, 1)
        self.assertIn("rank 2 n3: last error: instance lithops-worker-h2 died 5 times", st.stdout)

        victim = s["ranks"][1]["pid"]
        pids = [r["pid"] for r in s["ranks"]]
        run.sigstop(victim)
        run.wait_status(lambda s: s["ranks"][1]["state"] == "unresponsive", 3 * INTERVAL + SLACK + 1,
                        "rank 1 unresponsive")
        t0 = time.monotonic()
        sp = run.cli("stop", "h2", "--timeout", "30")
        self.assertEqual(sp.returncode, 1, sp.stdout + sp.stderr)
        self.assertIn("ended failed", sp.stderr)
        rc = run.wait_exit(20)
        self.assertNotEqual(rc, 0)
        self.assertLess(time.monotonic() - t0, 25)
        s = run.status()
        self.assertEqual(s["state"], "failed")
        self.assertEqual([r["state"] for r in s["ranks"]], ["stopped", "unresponsive", "stopped"])
        self.assertIn("rank 1 n2 (unresponsive) did not report stopped and went silent", run.log_text())
        wait_until(lambda: all(gone(p) for p in pids), 10, "every rank gone, the stopped one included")

    def test_hung_rank0_never_hangs_the_others(self):
        # Rank 0 SIGSTOPped: `status` calls the file stale; ranks told to stop
        # (SIGTERM) drain, wait --finish-timeout for a word from rank 0, then
        # end the job with MPI_Abort instead of hanging in MPI_Finalize.
        run = HealthRun(self, "h3", extra=["--finish-timeout", "3"])
        s = run.all_ready()
        rank0 = s["rank0"]["pid"]
        others = [r["pid"] for r in s["ranks"][1:]]
        run.sigstop(rank0)
        st = wait_until(lambda: (lambda p: p if p.returncode == 1 else None)(run.cli("status", "h3")),
                        3 * INTERVAL + SLACK + 2, "status to call the file stale")
        self.assertIn("rank 0 (n1, pid %d) stopped updating the status file" % rank0, st.stdout)
        t0 = time.monotonic()
        for p in others:
            os.kill(p, signal.SIGTERM)
        rc = run.wait_exit(20)
        self.assertNotEqual(rc, 0)
        self.assertLess(time.monotonic() - t0, 15)
        self.assertIn("no word from rank 0", run.log_text())
        wait_until(lambda: gone(rank0) and all(gone(p) for p in others), 10, "every rank gone")

    def test_rank_that_stops_early_waits_while_rank0_lives(self):
        # One rank told to stop on its own (SIGTERM to its pid) reports
        # stopped and waits: rank 0's keep-alives keep it from aborting the
        # job, however long the others run; the later stop is clean.
        run = HealthRun(self, "h4", extra=["--finish-timeout", "2"])
        s = run.all_ready()
        os.kill(s["ranks"][2]["pid"], signal.SIGTERM)
        run.wait_status(lambda s: s["ranks"][2]["state"] == "stopped", 10, "rank 2 stopped")
        # Three times the finish timeout: a rank without keep-alives would have aborted the job.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            self.assertIsNone(run.proc.poll(), run.log_text())
            s = run.status()
            self.assertEqual([r["state"] for r in s["ranks"]], ["ready", "ready", "stopped"])
            time.sleep(0.2)
        st = run.cli("status", "h4")
        self.assertEqual(st.returncode, 1)  # a rank that stopped is not serving: degraded
        sp = run.cli("stop", "h4", "--timeout", "30")
        self.assertEqual(sp.returncode, 0, sp.stdout + sp.stderr)
        self.assertEqual(run.wait_exit(15), 0, run.log_text())
        self.assertNotIn("MPI_Abort", run.log_text())

    def test_singleton_without_launcher(self):
        state = tempfile.mkdtemp(prefix="lhpc-health-")
        self.addCleanup(shutil.rmtree, state, True)
        env = dict(os.environ, LITHOPS_HPC_STATE_DIR=state, OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.pop("SLURM_JOB_ID", None)
        env.pop("LITHOPS_HPC_JOB_ID", None)
        proc = subprocess.Popen([DRIVER, "--job", "solo", "--interval", str(INTERVAL)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
        path = Path(state) / "jobs" / "solo" / "status.json"

        def ready():
            try:
                s = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return s if s["ranks"][0]["state"] == "ready" else None
        s = wait_until(ready, 30, "the single rank ready")
        self.assertEqual(s["summary"]["ranks"], 1)
        st = subprocess.run([BIN, "status"], env=env, capture_output=True, text=True)
        self.assertEqual(st.returncode, 0, st.stdout + st.stderr)
        sp = subprocess.run([BIN, "stop", "--timeout", "30"], env=env, capture_output=True, text=True)
        self.assertEqual(sp.returncode, 0, sp.stdout + sp.stderr)
        out, _ = proc.communicate(timeout=15)
        self.assertEqual(proc.returncode, 0, out)
        self.assertEqual(json.loads(path.read_text())["state"], "stopped")

    def test_no_deployment_and_stale_files(self):
        state = tempfile.mkdtemp(prefix="lhpc-health-")
        self.addCleanup(shutil.rmtree, state, True)
        env = dict(os.environ, LITHOPS_HPC_STATE_DIR=state)
        env.pop("SLURM_JOB_ID", None)
        env.pop("LITHOPS_HPC_JOB_ID", None)

        def cli(*args, **kw):
            return subprocess.run([BIN, *args], env=dict(env, **kw), capture_output=True, text=True, timeout=30)

        for args in (["status"], ["status", "--json"], ["status", "77"], ["stop"], ["stop", "77"]):
            p = cli(*args)
            self.assertEqual(p.returncode, 8, (args, p.stdout, p.stderr))
            self.assertEqual(p.stdout, "", args)
            self.assertIn("no deployment found (looked in " + state + "/jobs/", p.stderr)
        p = cli("status", SLURM_JOB_ID="4242")
        self.assertEqual(p.returncode, 8)
        self.assertIn("jobs/4242/status.json ($SLURM_JOB_ID)", p.stderr)
        p = cli("status", "../x")
        self.assertEqual(p.returncode, 2)
        self.assertIn("is not a job id", p.stderr)

        # A running deployment whose rank 0 vanished without a last word.
        job_dir = Path(state) / "jobs" / "55"
        job_dir.mkdir(parents=True)
        doc = {"job": "55", "version": 1, "updated": time.time() - 60, "started": time.time() - 100,
               "interval": 5, "rank0": {"host": "n9", "pid": 1}, "state": "running",
               "summary": {k: 0 for k in SUMMARY_KEYS},
               "ranks": []}
        doc["summary"]["ranks"] = 0
        (job_dir / "status.json").write_text(json.dumps(doc))
        p = cli("status", "55")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("rank 0 (n9, pid 1) stopped updating the status file", p.stdout)
        p = cli("status", "--json", "55")
        self.assertEqual(p.returncode, 1)
        self.assertEqual(json.loads(p.stdout), doc)
        p = cli("stop", "55", "--timeout", "1")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("did not stop within 1 s", p.stderr)
        self.assertTrue((job_dir / "stop").exists())
        p = cli("stop", "55", "--timeout", "0")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

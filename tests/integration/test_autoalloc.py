#!/usr/bin/python3
"""`lithops-hpc autoalloc` on the real 3-node Slurm rig with a real broker.

The controller runs as a user would run it (foreground process, SIGTERM to
end it) and submits slurm/lithops-deploy.sh with the host engine and
tests/fake-lithops as Lithops. Each test has its own vhost and its own state
directory (so its own lock, state file and job name). Polls of 0.5 s, idle
timeouts of a few seconds and 1-minute Slurm time limits keep the file within
its CI budget (200 s on a loaded 2-core machine); waits are on conditions
(a task record, a state-file field, a count of the controller's own polls),
never on a hoped-for delay.

Run: LHPC_BIN=<build>/lithops-hpc LHPC_RIG_DIR=<dir outside /tmp> \
     /usr/bin/python3 tests/integration/test_autoalloc.py [-k NAME]
(meson: `meson test -C build integration/autoalloc`).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lhpc_test as lt  # noqa: E402

ROOT = Path(os.environ.get("LHPC_SOURCE_ROOT") or Path(__file__).resolve().parents[2])
BUILD = Path(os.environ.get("LHPC_BUILD_ROOT") or ROOT / "build")
BIN = os.environ.get("LHPC_BIN") or str(BUILD / "lithops-hpc")
MAKE_SIF = BUILD / "tests" / "tools" / "make-sif"
FAKE_LITHOPS = ROOT / "tests" / "fake-lithops"
NODES = ["n1", "n2", "n3"]
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")


def run(cmd, env, timeout=60, check=True):
    return subprocess.run([str(c) for c in cmd], env=env, timeout=timeout, check=check, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL)


class Controller:
    """One `lithops-hpc autoalloc` process with its own state dir, vhost and log."""

    def __init__(self, case, name, args, slots=2, config=None, path_prefix=None, sif=None):
        self.case = case
        self.dir = case.work / name
        self.dir.mkdir()
        self.state = self.dir / "state"
        self.records = self.dir / "records"
        self.records.mkdir()
        self.url = lt.fresh_vhost(name)
        cfg = {
            "singularity": {"engine": "host", "worker_processes": slots, "python": "/usr/bin/python3"},
            "rabbitmq": {"amqp_url": self.url},
            "deploy": {"transfer": "mpi", "drain_timeout": 3, "drain_before_end": 20},
            "health": {"interval": 1},
        }
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.conf = self.dir / "config.toml"
        with open(os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            for section, values in cfg.items():
                f.write(f"[{section}]\n")
                for k, v in values.items():
                    f.write(f"{k} = {json.dumps(v)}\n")
        self.env = dict(case.env, LITHOPS_HPC_CONFIG=str(self.conf), LITHOPS_HPC_STATE_DIR=str(self.state))
        if path_prefix:
            self.env["PATH"] = f"{path_prefix}:{self.env['PATH']}"
        self.args = ["--sif", sif or case.image, "--poll", "0.5", *args]
        self.proc = None
        self.logs = []
        self.start()

    def start(self):
        log = self.dir / f"controller-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            self.proc = subprocess.Popen([BIN, "autoalloc", *self.args], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)

    def log(self):
        return "".join(f"--- {p.name}\n{p.read_text()}" for p in self.logs if p.exists())

    def state_json(self):
        try:
            return json.loads((self.state / "autoalloc" / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def job_name(self):
        """The name every job of this controller carries (kept: a test may remove the state file)."""
        if not getattr(self, "_job_name", None):
            self._job_name = lt.wait_until(lambda: (self.state_json() or {}).get("job_name"), 20,
                                           "the controller's state file")
        return self._job_name

    def slurm_jobs(self):
        """{id: (state, nodes)} of this controller's jobs, straight from squeue."""
        r = run(["squeue", "-h", "-n", self.job_name(), "-o", "%i %T %D"], self.env)
        jobs = {}
        for line in r.stdout.splitlines():
            jid, state, nodes = line.split()
            jobs[jid] = (state, int(nodes))
        return jobs

    def signal(self, sig):
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def polls(self):
        """How many times the controller has polled (its state file's count)."""
        return ((self.state_json() or {}).get("counters") or {}).get("polls", 0)

    def wait_polls(self, n, what):
        """Returns after the controller has polled n more times: the window in which an
        action it should not take (a submission) would have shown."""
        first = self.polls()
        lt.wait_until(lambda: self.polls() >= first + n, 30 + n, f"{n} more polls of the controller ({what})")

    def publish(self, n, sleep, tag):
        """n one-call send_task messages; their (job_key, call_id)."""
        extra = {"lhpc_test": {"sleep": sleep, "record_dir": str(self.records)}}
        job_keys = [f"{tag}-{i:04d}" for i in range(n)]
        lt.publish_lithops_many(self.url, "send_task", [lt.make_send_task(1, k, extra) for k in job_keys])
        return [(k, "00000") for k in job_keys]

    def done_keys(self):
        out = set()
        for p in self.records.glob("*.json"):
            try:
                r = json.loads(p.read_text())
                out.add((r["job_key"], r["call_id"]))
            except (OSError, ValueError):
                pass
        return out

    def stop(self):
        """SIGTERM with every job cancelled afterwards (cleanup after a test)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            name = self.job_name()
        except AssertionError:
            return
        run(["scancel", "-n", name], self.env, check=False)
        lt.wait_until(lambda: not self.slurm_jobs(), 90, "the controller's jobs to end")


@unittest.skipUnless(shutil.which("sbatch") and shutil.which("nsenter"), "needs Slurm and nsenter")
class Autoalloc(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()
        lt.ensure_cluster(3)
        base = BUILD if BUILD.is_dir() else Path(lt.rig_dir())
        cls.work = Path(tempfile.mkdtemp(prefix="autoalloc-", dir=base))  # every node sees it
        cls.image = cls.work / "rt.sif"
        subprocess.run([str(MAKE_SIF), str(cls.image), "4M"], check=True)
        cls.env = lt.slurm_env()
        cls.env.update({"LITHOPS_HPC_BIN": BIN, "PYTHONPATH": str(FAKE_LITHOPS),
                        "LITHOPS_FAKE_STORAGE_DIR": str(cls.work / "storage")})
        for k in ("AMQP_URL", "LITHOPS_HPC_CONFIG", "LITHOPS_SIF", "SLURM_JOB_ID", "SLURM_JOBID"):
            cls.env.pop(k, None)

    @classmethod
    def tearDownClass(cls):
        if os.environ.get("LHPC_KEEP_WORK") != "1":
            shutil.rmtree(cls.work, ignore_errors=True)

    def setUp(self):
        self.ctl = None

    def tearDown(self):
        if self.ctl is None:
            return
        # Always: unittest tells tearDown nothing reliable about the outcome across versions.
        sys.stderr.write("\n--- controller log (last 30 lines) ---\n" + "\n".join(self.ctl.log().splitlines()[-30:]) + "\n")
        self.ctl.stop()

    def staged_on(self, node):
        pid = lt.rig_env()[f"RIG_SLURMD_PID_{node}"]
        r = run(["nsenter", "-t", pid, "-m", "find", "/tmp", "-path", f"/tmp/lithops-hpc-{os.getuid()}-*"],
                self.env, check=False)
        return sorted(p for p in r.stdout.split() if p)

    def submitted_ids(self):
        return re.findall(r"submitted job (\d+)", self.ctl.log())

    # ---------------------------------------------------------------- tests

    def test_1_scale_from_zero_and_back(self):
        """Tasks published with no job are served by a job the controller submits through a
        site's sbatch wrapper that prints a banner before and after sbatch's reply (the job id is
        still read), with its output where Slurm writes it and its time left from Slurm; after
        the idle timeout the job is gone and so is its image."""
        wrap = self.work / "sbatch-banner"
        wrap.mkdir(exist_ok=True)
        (wrap / "sbatch").write_text(f'#!/bin/sh\necho "Welcome to the rig. Quota: 12 hours"\n'
                                     f'{shutil.which("sbatch")} "$@" || exit\necho "-- accounted to project demo --"\n')
        (wrap / "sbatch").chmod(0o755)
        self.ctl = Controller(self, "zero", ["--max-nodes", "2", "--idle-timeout", "4", "--time-limit", "10"],
                              path_prefix=str(wrap))
        ctl = self.ctl
        lt.wait_until(lambda: ctl.state_json(), 20, "the controller's first look")
        self.assertEqual(ctl.slurm_jobs(), {}, "nothing submitted with an empty queue")
        keys = ctl.publish(6, 0.3, "zero")

        def running():
            jobs = (ctl.state_json() or {}).get("jobs", [])
            return jobs and jobs[0]["seconds_left"] is not None and jobs[0]
        job = lt.wait_until(running, 60, "a running job with its time left")
        self.assertLessEqual(job["seconds_left"], 600)
        lt.wait_until(lambda: Path(job["out"]).is_file(), 30, f"{job['out']}: the output file Slurm writes")
        lt.wait_until(lambda: ctl.done_keys() >= set(keys), 120, "all 6 tasks done")
        ids = self.submitted_ids()
        self.assertEqual(ids[0], job["id"], "its id read through the banner")
        self.assertNotIn("refused", ctl.log())
        # status without a job id: one line per deployment and the controller's line.
        st = run([BIN, "status"], ctl.env, check=False)
        self.assertRegex(st.stdout, rf"(?m)^job {ids[0]}( \(runtime [^)]*\))?: ", st.stdout + st.stderr)
        self.assertRegex(st.stdout, r"(?m)^autoalloc \(running, pid \d+ on \S+\): demand \d+ ready", st.stdout)
        doc = json.loads(run([BIN, "status", "--json"], ctl.env, check=False).stdout)
        self.assertIn(ids[0], [d["job"] for d in doc["deployments"]])
        self.assertEqual(doc["autoalloc"]["controller"], "running")
        lt.wait_until(lambda: not ctl.slurm_jobs(), 90, "the idle job to end")
        self.assertRegex(ctl.log(), r"retiring job \d+: job \d+ idle")
        st = lt.wait_until(lambda: (s := ctl.state_json()) and not s["jobs"] and s, 10, "no job in the state")
        self.assertEqual(st["supply"]["held_nodes"], 0)
        self.assertEqual(st["start_failures_in_row"], 0, "a job that served and ended is no start failure")
        self.assertEqual(st["refused_in_row"], 0, st)
        for node in NODES:
            left = [f for f in self.staged_on(node) if any(f.endswith(f"-{i}") or f"-{i}/" in f for i in ids)]
            self.assertEqual(left, [], f"images left on {node}")
        self.assertEqual(lt.queue_depth(ctl.url), 0)
        self.assertEqual(ctl.signal(signal.SIGTERM), 143)
        self.assertEqual(ctl.state_json()["controller"], "stopped")

    def test_2_a_restarted_controller_adopts_its_job_by_name(self):
        """The controller is SIGKILLed while its job serves a backlog and its state file is lost
        (a kill between sbatch and saving it): started again, it finds the job by name in the real
        squeue and submits no duplicate (one that lost track would: the backlog still wants
        nodes). SIGTERM then leaves the job serving, and `stop --all` ends it."""
        self.ctl = Controller(self, "adopt", ["--max-nodes", "1", "--idle-timeout", "60"])
        ctl = self.ctl
        keys = ctl.publish(40, 0.5, "adopt")

        def serving():
            jobs = (ctl.state_json() or {}).get("jobs", [])
            return [j["id"] for j in jobs if j["phase"] == "serving"]
        first = lt.wait_until(serving, 90, "a serving job")
        ctl.job_name()  # kept: the state file goes
        ctl.proc.kill()
        ctl.proc.wait(10)
        (ctl.state / "autoalloc" / "state.json").unlink()
        self.assertEqual(set(ctl.slurm_jobs()), set(first))
        ctl.start()
        lt.wait_until(lambda: f"adopting job {first[0]}" in ctl.logs[-1].read_text(), 20,
                      "the restarted controller to adopt by name")
        self.assertGreater(lt.queue_depth(ctl.url), 0, "the backlog still wants nodes after the restart")
        ctl.wait_polls(6, "a duplicate submission would show")
        self.assertNotIn("submitted job", ctl.logs[-1].read_text(), ctl.log())
        self.assertEqual([j["id"] for j in ctl.state_json()["jobs"]], first)
        lt.wait_until(lambda: ctl.done_keys() >= set(keys), 120, "all 40 tasks done")
        # SIGTERM leaves the job serving; stop --all then ends it.
        self.assertEqual(ctl.signal(signal.SIGTERM), 143)
        self.assertEqual(set(ctl.slurm_jobs()), set(first), "SIGTERM left the job serving")
        sp = run([BIN, "stop", "--all", "--timeout", "60"], ctl.env, check=False, timeout=90)
        self.assertEqual(sp.returncode, 0, sp.stdout + sp.stderr)
        self.assertRegex(sp.stdout + sp.stderr, rf"job {first[0]}\b")
        lt.wait_until(lambda: not ctl.slurm_jobs(), 60, "stop --all to end the job")
        self.assertEqual(len(self.submitted_ids()), 1, "one job in all")

    def test_3_a_refused_submission_shows_sbatch_and_backs_off(self):
        """A nonexistent partition: the real sbatch's own message in the state, the log and
        `status`; no broker URL on sbatch's command line (a wrapper in PATH records it); polls
        within the first backoff call sbatch no more. (The backoff's growth, and the controller's
        other decisions, are unit tests against fake ports: tests/unit/test_autoalloc.cpp.)"""
        wrap = self.work / "sbatch-wrap"
        wrap.mkdir(exist_ok=True)
        calls = wrap / "calls"
        real = shutil.which("sbatch")
        (wrap / "sbatch").write_text(f'#!/bin/sh\necho "$*" >>{calls}\nexec {real} "$@"\n')
        (wrap / "sbatch").chmod(0o755)
        self.ctl = Controller(self, "refused", ["--", "--partition=nonexistent"], path_prefix=str(wrap))
        ctl = self.ctl
        ctl.publish(3, 0.1, "refused")
        st = lt.wait_until(lambda: (s := ctl.state_json()) and s["error"] and s, 30, "the refusal in the state")
        self.assertIn("invalid partition", st["error"].lower())
        self.assertIn("sbatch", st["last_refusal"])
        self.assertRegex(ctl.log(), r"(?i)refused the submission.*invalid partition")
        st = run([BIN, "status"], ctl.env, check=False)
        self.assertEqual(st.returncode, 1, "a controller error makes status report trouble")
        self.assertRegex(st.stdout, r"(?i)error: .*refused the submission.*invalid partition")
        ctl.wait_polls(6, "a submission storm would show")
        self.assertEqual(len(calls.read_text().splitlines()), 1, calls.read_text())
        self.assertEqual(ctl.state_json()["refused_in_row"], 1)
        for line in calls.read_text().splitlines():
            self.assertNotIn("amqp", line, "no broker URL on sbatch's command line")
        self.assertEqual(ctl.slurm_jobs(), {})

if __name__ == "__main__":
    lt.main()

#!/usr/bin/python3
"""`lithops-hpc worker` through the singularity/apptainer stand-in
(tests/stand-in): the exact command lines the engines get, secrets only in
the environment, a task running end to end through `exec instance://`, and
runscript mode (`run instance://` with AMQP_URL in the environment).
"""
import json
import os
import signal
import subprocess
import tempfile
import unittest

import lhpc_test as lt
from worker_util import PYTHON, SOURCE_ROOT, STANDIN_DIR, Worker, rig_password, wait_records

HANDLER = os.path.join(SOURCE_ROOT, "runtime-defs", "handler.py")


def standin_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class EngineTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def setUp(self):
        self.url = lt.fresh_vhost("eng")
        self.tmp = tempfile.mkdtemp(prefix="lhpc-eng-")
        self.rec = os.path.join(self.tmp, "rec")
        os.mkdir(self.rec)
        self.log = os.path.join(self.tmp, "standin.jsonl")
        self.state = os.path.join(self.tmp, "standin-state")
        self.workers = []

    def tearDown(self):
        result = getattr(self._outcome, "result", None)
        failed = any(t is self for t, _ in getattr(result, "errors", []) + getattr(result, "failures", []))
        for w in self.workers:
            if failed:
                print(f"--- worker log:\n{w.log()[-6000:]}")
            w.cleanup()

    def build_sif(self, prog, runscript=None):
        definition = os.path.join(self.tmp, "rt.def")
        with open(definition, "w") as f:
            f.write("Bootstrap: docker\nFrom: python:3.11-slim-bookworm\n")
            if runscript:
                f.write("\n%runscript\n" + runscript + "\n")
        sif = os.path.join(self.tmp, "rt.sif")
        subprocess.run([os.path.join(STANDIN_DIR, prog), "build", sif, definition], check=True,
                       env=self.standin_env(), capture_output=True)
        return sif

    def standin_env(self):
        return dict(os.environ, PATH=STANDIN_DIR + ":" + os.environ["PATH"], STANDIN_LOG=self.log,
                    STANDIN_STATE=self.state)

    def start(self, engine, sif, **kw):
        env = self.standin_env()
        env.pop("STANDIN_LOG")  # the build above logged already; keep only the worker's calls
        w = Worker(self.url, slots=1, engine=engine, sif=sif,
                   extra_env={"PATH": env["PATH"], "STANDIN_LOG": self.log, "STANDIN_STATE": self.state}, **kw)
        self.workers.append(w)
        return w

    def check_dispatch_through(self, prog, prefix):
        sif = self.build_sif(prog)
        open(self.log, "w").close()
        w = self.start(prog, sif)
        w.wait_consuming()
        lt.publish_lithops(self.url, "send_task",
                           lt.make_send_task(1, "ex-eng", {"lhpc_test": {"record_dir": self.rec}}))
        wait_records(self.rec, 1, 60)
        self.assertEqual(w.stop(), 0, w.log())
        name = f"lhpc-test-{w.env['LITHOPS_HPC_JOB_ID']}-0"
        calls = standin_log(self.log)
        self.assertTrue(all(c["prog"] == prog for c in calls))
        argvs = [c["argv"] for c in calls]
        bind = f"{HANDLER}:/opt/lithops-hpc/handler.py:ro"
        self.assertEqual(argvs[0], ["instance", "start", "--bind", bind, sif, name])
        self.assertIn(["instance", "list", "--json", name], argvs)
        execs = [c for c in calls if c["argv"][0] == "exec"]
        self.assertEqual(len(execs), 2, "one slot handler and the control handler")
        for c in execs:
            self.assertEqual(c["argv"], ["exec", f"instance://{name}", PYTHON, "/opt/lithops-hpc/handler.py"])
            self.assertIn(prefix + "LITHOPS_HPC_RANK", c["env"])
            self.assertIn(prefix + "LITHOPS_HPC_HANDLER", c["env"])
            self.assertFalse([e for e in c["env"] if e.endswith("AMQP_URL")], "handlers never get the URL")
        self.assert_stopped_last(argvs, name)
        password = rig_password()
        for c in calls:
            self.assertNotIn(password, " ".join(c["argv"]))

    def test_singularity_command_lines(self):
        self.check_dispatch_through("singularity", "SINGULARITYENV_")

    def test_apptainer_command_lines(self):
        self.check_dispatch_through("apptainer", "APPTAINERENV_")

    def test_dead_instance_is_restarted(self):
        sif = self.build_sif("singularity")
        open(self.log, "w").close()
        w = self.start("singularity", sif)
        w.wait_consuming()
        name = f"lhpc-test-{w.env['LITHOPS_HPC_JOB_ID']}-0"
        sleeper = next(int(p) for p in os.listdir("/proc") if p.isdigit() and self.cmdline_has(p, "standin-instance:" + name))
        os.kill(sleeper, signal.SIGKILL)
        os.kill(w.handler_pids("0"), signal.SIGKILL)  # what a dying instance does to its handlers
        w.wait_log(f"instance {name} is gone: restarting it")
        starts = lambda: [c for c in standin_log(self.log) if c["argv"][:2] == ["instance", "start"]]  # noqa: E731
        lt.wait_until(lambda: len(starts()) == 2, 30, "a second instance start")
        lt.publish_lithops(self.url, "send_task",
                           lt.make_send_task(1, "ex-after-restart", {"lhpc_test": {"record_dir": self.rec}}))
        wait_records(self.rec, 1, 60)
        self.assertEqual(w.stop(), 0, w.log())

    @staticmethod
    def cmdline_has(pid, text):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return text.encode() in f.read()
        except OSError:
            return False

    def test_runscript_that_keeps_failing_is_restarted_then_the_worker_fails(self):
        sif = self.build_sif("singularity", runscript="echo lhpc-runscript-start; exit 1")
        w = self.start("singularity", sif, mode="runscript")
        rc = w.proc.wait(120)
        self.assertEqual(rc, 6, w.log())
        self.assertEqual(w.log().count("lhpc-runscript-start"), 4, "first run + restart_limit (3) restarts")
        self.assertIn("the runscript keeps failing", w.log())

    def test_runscript_mode_gets_the_url_through_the_environment_only(self):
        marker = os.path.join(self.tmp, "runscript-ran")
        sif = self.build_sif("singularity", runscript=(
            f'case "$AMQP_URL" in amqp://*) echo url-in-env > {marker};; esac\nexec sleep 600'))
        open(self.log, "w").close()
        w = self.start("singularity", sif, mode="runscript")
        lt.wait_until(lambda: os.path.exists(marker), 60, "the runscript to see AMQP_URL")
        name = f"lhpc-test-{w.env['LITHOPS_HPC_JOB_ID']}-0"
        calls = standin_log(self.log)
        runs = [c for c in calls if c["argv"][0] == "run"]
        self.assertEqual(runs[0]["argv"], ["run", f"instance://{name}"])
        self.assertIn("SINGULARITYENV_AMQP_URL", runs[0]["env"])
        self.assertEqual(w.stop(signal.SIGTERM), 0, w.log())
        password = rig_password()
        self.assertNotIn(password, w.log())
        for c in standin_log(self.log):
            self.assertNotIn(password, " ".join(c["argv"]))
        self.assert_stopped_last([c["argv"] for c in standin_log(self.log)], name)

    def assert_stopped_last(self, argvs, name):
        """`instance stop NAME` ends the run; only `instance list` (the engine confirming) follows."""
        self.assertIn(["instance", "stop", name], argvs)
        last = max(i for i, a in enumerate(argvs) if a == ["instance", "stop", name])
        for a in argvs[last + 1:]:
            self.assertEqual(a[:2], ["instance", "list"])


if __name__ == "__main__":
    lt.main()

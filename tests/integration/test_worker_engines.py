#!/usr/bin/python3
"""`lithops-hpc worker` through the singularity/apptainer stand-in
(tests/stand-in): the exact command lines the engines get, secrets only in
the environment, a task running end to end through `exec instance://`, and
runscript mode (`run instance://` with AMQP_URL in the environment).
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import unittest
import urllib.parse

import lhpc_test as lt
from worker_util import BIN, PYTHON, SOURCE_ROOT, STANDIN_DIR, Worker, rig_password, wait_records

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
        self.make_scratch()

    def make_scratch(self):
        """A case's own directory (under tempfile.tempdir), records, stand-in log and state."""
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

    def build_sif(self, prog, runscript=None, labels=None):
        definition = os.path.join(self.tmp, "rt.def")
        with open(definition, "w") as f:
            f.write("Bootstrap: docker\nFrom: python:3.11-slim-bookworm\n")
            if runscript:
                f.write("\n%runscript\n" + runscript + "\n")
            if labels:
                f.write("\n%labels\n" + "".join(f"    {k} {v}\n" for k, v in labels.items()))
        sif = os.path.join(self.tmp, "rt.sif")
        if os.path.exists(sif):
            os.unlink(sif)      # a new image for each build in one test
        subprocess.run([os.path.join(STANDIN_DIR, prog), "build", sif, definition], check=True,
                       env=self.standin_env(), capture_output=True)
        return sif

    def standin_env(self):
        return dict(os.environ, PATH=STANDIN_DIR + ":" + os.environ["PATH"], STANDIN_LOG=self.log,
                    STANDIN_STATE=self.state)

    def start(self, engine, sif, url=None, extra=None, **kw):
        env = self.standin_env()
        env.pop("STANDIN_LOG")  # the build above logged already; keep only the worker's calls
        kw.setdefault("slots", 1)
        w = Worker(url or self.url, engine=engine, sif=sif,
                   extra_env=dict({"PATH": env["PATH"], "STANDIN_LOG": self.log, "STANDIN_STATE": self.state},
                                  **(extra or {})), **kw)
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
            self.assertEqual(c["argv"], ["exec", "--no-eval", f"instance://{name}", PYTHON,
                                         "/opt/lithops-hpc/handler.py"])
            self.assertIn(prefix + "LITHOPS_HPC_RANK", c["env"])
            self.assertIn(prefix + "LITHOPS_HPC_HANDLER", c["env"])
            self.assertFalse([e for e in c["env"] if e.endswith("AMQP_URL")], "handlers never get the URL")
        self.assert_stopped_last(argvs, name)
        for c in calls:
            if c["argv"][0] == "instance":   # start, list, stop: nothing there needs the broker
                self.assertFalse([e for e in c["env"] if e.endswith("AMQP_URL")], c["argv"])
        password = rig_password()
        for c in calls:
            self.assertNotIn(password, " ".join(c["argv"]))

    def test_singularity_command_lines(self):
        self.check_dispatch_through("singularity", "SINGULARITYENV_")

    def test_apptainer_command_lines(self):
        self.check_dispatch_through("apptainer", "APPTAINERENV_")

    def test_a_gpu_runtime_on_a_4_gpu_node_gives_each_of_4_concurrent_calls_its_own_gpu(self):
        # The "4-GPU node" is what Slurm tells the job: CUDA_VISIBLE_DEVICES in
        # the worker's environment (the engine passes it into the container too:
        # each slot's own value must win there).
        # A GPU runtime by its image's label (runtime build --gpus-per-slot 1), no key;
        # nvccli: the site's choice of nvidia-container-cli, passed after --nv.
        sif = self.build_sif("singularity", labels={"org.lithops-hpc.gpus-per-slot": "1"})
        open(self.log, "w").close()
        w = self.start("singularity", sif, slots=0, config_extra="nvccli = true",
                       extra={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
        w.wait_consuming()
        gate = os.path.join(self.tmp, "gate")
        try:
            for i in range(4):
                lt.publish_lithops(self.url, "send_task", lt.make_send_task(1, f"ex-gpu{i}", {"lhpc_test": {
                    "record_dir": self.rec, "wait_for": gate, "probe_env": "CUDA_VISIBLE_DEVICES",
                    "print": f"lhpc-gpu-call-{i}-running"}}))
            # All four run at once (each waits at the gate): they are concurrent.
            for i in range(4):
                w.wait_log(f"lhpc-gpu-call-{i}-running", 60)
        finally:
            open(gate, "w").close()
        recs = wait_records(self.rec, 4, 60)
        self.assertEqual(sorted(r["probe"] for r in recs), ["0", "1", "2", "3"], "one GPU per call, none shared")
        self.assertEqual(sorted(r["probe_c"].strip() for r in recs), ["0", "1", "2", "3"])
        self.assertEqual(w.stop(), 0, w.log())
        argvs = [c["argv"] for c in standin_log(self.log)]
        self.assertEqual(argvs[0][:4], ["instance", "start", "--nv", "--nvccli"])
        execs = [c for c in standin_log(self.log) if c["argv"][0] == "exec"]
        with_gpu = [c for c in execs if "SINGULARITYENV_CUDA_VISIBLE_DEVICES" in c["env"]]
        self.assertEqual((len(execs), len(with_gpu)), (5, 4), "4 slot handlers with a GPU, the control one without")

    def test_a_gpu_slot_whose_handler_keeps_dying_is_taken_out_of_service_and_the_other_serves(self):
        # restart_limit = 3 (worker_util's): the 4th death within a minute retires slot 1 and its GPU.
        sif = self.build_sif("singularity")
        w = self.start("singularity", sif, slots=0, config_extra="gpus_per_slot = 1",
                       extra={"CUDA_VISIBLE_DEVICES": "0,1"})
        w.wait_consuming()
        for _ in range(4):
            pid = lt.wait_until(lambda: w.handler_pids().get("1"), 30, "slot 1's handler")
            os.kill(pid, signal.SIGKILL)
            lt.wait_until(lambda: w.handler_pids().get("1") != pid, 30, "slot 1's handler to go")
        w.wait_log("slot 1 taken out of service (1 of 2 slots left)", 30)
        self.assertTrue(w.alive(), w.log())
        self.assertNotIn("1", w.handler_pids())
        lt.publish_lithops(self.url, "send_task", lt.make_send_task(1, "ex-after-gpu-out", {"lhpc_test": {
            "record_dir": self.rec, "probe_env": "CUDA_VISIBLE_DEVICES"}}))
        [rec] = wait_records(self.rec, 1, 60)
        self.assertEqual(rec["probe"], "0", "the call ran on the slot still in service")
        self.assertEqual(w.stop(), 0, w.log())

    def test_an_instance_that_dies_takes_its_handlers_and_the_running_task_is_requeued(self):
        sif = self.build_sif("singularity")
        open(self.log, "w").close()
        w = self.start("singularity", sif)
        w.wait_consuming()
        name = f"lhpc-test-{w.env['LITHOPS_HPC_JOB_ID']}-0"
        lt.publish_lithops(self.url, "send_task", lt.make_send_task(1, "ex-dies", {"lhpc_test": {
            "record_dir": self.rec, "sleep": 4, "print": "lhpc-task-running"}}))
        w.wait_log("lhpc-task-running")
        old = w.handler_pids()
        self.assertIn("0", old)
        # Only the instance's init is killed: its PID namespace takes the
        # handlers exec'd into it along, as with the real engines.
        listed = subprocess.run([os.path.join(STANDIN_DIR, "singularity"), "instance", "list", "--json", name],
                                env=dict(self.standin_env(), STANDIN_LOG=""), capture_output=True, check=True)
        init = json.loads(listed.stdout)["instances"][0]["pid"]
        os.kill(init, signal.SIGKILL)
        lt.wait_until(lambda: not any(self.process_exists(p) for p in old.values()), 20,
                      "the handlers to die with their instance")
        w.wait_log(f"instance {name} is gone: restarting it")
        # After a backoff, never at once: a crash loop must not spin.
        self.assertIn(f"instance {name} is gone: restarting it in 1.0 s (1 of 3)", w.log())
        starts = lambda: [c for c in standin_log(self.log) if c["argv"][:2] == ["instance", "start"]]  # noqa: E731
        lt.wait_until(lambda: len(starts()) == 2, 30, "a second instance start")
        # The task that was running is requeued and runs to the end in a new handler.
        recs = wait_records(self.rec, 1, 90)
        self.assertEqual([r["call_id"] for r in recs], ["00000"])
        self.assertNotIn(recs[0]["pid"], old.values())
        # Each run prints the marker twice (print() and os.write()): the killed run and the finished one.
        self.assertEqual(w.log().count("lhpc-task-running"), 4)
        lt.publish_lithops(self.url, "send_task",
                           lt.make_send_task(1, "ex-after-restart", {"lhpc_test": {"record_dir": self.rec}}))
        wait_records(self.rec, 2, 60)
        self.assertEqual(w.stop(), 0, w.log())

    @staticmethod
    def process_exists(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
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
        self.assertEqual(runs[0]["argv"], ["run", "--no-eval", f"instance://{name}"])
        self.assertIn("SINGULARITYENV_AMQP_URL", runs[0]["env"])
        self.assertEqual(w.stop(signal.SIGTERM), 0, w.log())
        password = rig_password()
        self.assertNotIn(password, w.log())
        for c in standin_log(self.log):
            self.assertNotIn(password, " ".join(c["argv"]))
        self.assert_stopped_last([c["argv"] for c in standin_log(self.log)], name)

    def special_user(self):
        """A broker user whose password the engines' shell would evaluate."""
        env = lt.rig_env()
        user = "lhpc-sp-" + secrets.token_hex(3)
        password = "p$x-$(id)-`id`-\\\\-$HOME"
        vhost = urllib.parse.unquote(self.url.rsplit("/", 1)[1])
        ctl = env["RIG_RABBITMQCTL"]
        subprocess.run([ctl, "-q", "add_user", user, password], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
        subprocess.run([ctl, "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.addCleanup(subprocess.run, [ctl, "-q", "delete_user", user], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL)
        host = self.url.split("@", 1)[1]
        return f"amqp://{user}:{password}@{host}", password

    def test_a_password_with_shell_characters_reaches_the_runscript_and_the_handlers_unchanged(self):
        url, password = self.special_user()
        for prog, version in (("singularity", None), ("apptainer", None), ("apptainer", "1.0.3")):
            with self.subTest(prog=prog, version=version):
                seen = os.path.join(self.tmp, f"seen-{prog}-{version}")
                sif = self.build_sif(prog, runscript=f'printf "%s" "$AMQP_URL" > {seen}\nexec sleep 600')
                extra = {"STANDIN_VERSION": version} if version else {}
                w = self.start(prog, sif, mode="runscript", url=url, extra=extra)
                lt.wait_until(lambda: os.path.exists(seen) and os.path.getsize(seen) > 0, 60,
                              "the runscript to write AMQP_URL")
                with open(seen) as f:
                    self.assertEqual(f.read(), url)
                self.assertEqual(w.stop(signal.SIGTERM), 0, w.log())
                self.assertNotIn(password, w.log())
        # Dispatch mode: the worker logs in with it and the handlers run the task.
        sif = self.build_sif("apptainer")
        w = self.start("apptainer", sif, url=url)
        w.wait_consuming()
        lt.publish_lithops(self.url, "send_task",
                           lt.make_send_task(1, "ex-special", {"lhpc_test": {"record_dir": self.rec}}))
        wait_records(self.rec, 1, 60)
        self.assertEqual(w.stop(), 0, w.log())
        self.assertNotIn(password, w.log())

    def assert_stopped_last(self, argvs, name):
        """`instance stop --timeout N NAME` (N below the worker's own 10 s deadline, so no
        --force) ends the run; only `instance list` (the engine confirming) follows."""
        stop = ["instance", "stop", "--timeout", "5", name]
        self.assertIn(stop, argvs)
        self.assertFalse([a for a in argvs if a[:2] == ["instance", "stop"] and "--force" in a])
        last = max(i for i, a in enumerate(argvs) if a == stop)
        for a in argvs[last + 1:]:
            self.assertEqual(a[:2], ["instance", "list"])



# A Slurm rig whose node has 4 dummy GPUs (gres on character devices, tests/rig/README.md):
# what Slurm itself sets in the job, not a variable the test writes.
@unittest.skipUnless(shutil.which("srun"), "needs Slurm")
class GpuRigTest(unittest.TestCase):
    # EngineTest's fixture (image, stand-in log, workers), not its tests.
    make_scratch = EngineTest.make_scratch
    build_sif = EngineTest.build_sif
    standin_env = EngineTest.standin_env
    start = EngineTest.start
    tearDown = EngineTest.tearDown

    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()
        cls.slurm = lt.ensure_gpu_cluster(nodes=1, gpus=4)
        # Every node has a private /tmp: all the case's files live under the rig dir.
        cls.base = tempfile.mkdtemp(prefix="gpu-", dir=lt.rig_dir())
        # One vhost for the class (each rabbitmqctl call costs seconds on a loaded machine):
        # every case drains what it publishes, but the last (autoalloc's demand).
        cls.url = lt.fresh_vhost("gpu")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    def setUp(self):
        self.saved_tempdir, tempfile.tempdir = tempfile.tempdir, self.base   # Worker's own dir too
        self.addCleanup(setattr, tempfile, "tempdir", self.saved_tempdir)
        self.make_scratch()

    def worker_in_job(self, per_slot, request):
        """`srun --gpus-per-node=4 lithops-hpc worker` (or another request) through the stand-in."""
        sif = self.build_sif("singularity")
        open(self.log, "w").close()
        self.job = f"lhpc-gpu-{os.getpid()}-{secrets.token_hex(3)}"
        # A CUDA_VISIBLE_DEVICES of ours would be replaced by Slurm's (or removed): never one here.
        env = dict(self.slurm, CUDA_VISIBLE_DEVICES="7")
        # A failed case leaves no job behind (a killed srun would leave its step running).
        self.addCleanup(subprocess.run, ["scancel", f"--name={self.job}"], env=dict(os.environ, **self.slurm),
                        stdin=subprocess.DEVNULL)
        return self.start("singularity", sif, slots=0, config_extra=f"gpus_per_slot = {per_slot}", extra=env,
                          wrap=["srun", "-N1", "-n1", "--time=2", f"--job-name={self.job}", request])

    def stop_in_job(self, w):
        """SIGTERM to the worker itself (to srun it would kill the step); srun exits with its code."""
        subprocess.run(["scancel", "--signal=TERM", f"--name={self.job}"], env=dict(os.environ, **self.slurm),
                       check=True, stdin=subprocess.DEVNULL)
        rc = w.proc.wait(90)
        w.stop()
        return rc

    def run_concurrent_calls(self, w, n):
        w.wait_consuming()
        gate = os.path.join(self.tmp, "gate")
        try:
            for i in range(n):
                lt.publish_lithops(self.url, "send_task", lt.make_send_task(1, f"ex-rig{i}", {"lhpc_test": {
                    "record_dir": self.rec, "wait_for": gate, "probe_env": "CUDA_VISIBLE_DEVICES",
                    "print": f"lhpc-rig-call-{i}-running"}}))
            for i in range(n):
                w.wait_log(f"lhpc-rig-call-{i}-running", 60)
        finally:
            open(gate, "w").close()
        probes = sorted(r["probe"] for r in wait_records(self.rec, n, 60))
        self.assertEqual(self.stop_in_job(w), 0, w.log())
        return probes

    def test_a_job_given_4_gpus_runs_4_slots_each_call_on_its_own_gpu(self):
        w = self.worker_in_job(1, "--gpus-per-node=4")
        self.assertEqual(self.run_concurrent_calls(w, 4), ["0", "1", "2", "3"], w.log())
        self.assertIn("4 nvidia GPU(s) from CUDA_VISIBLE_DEVICES, 4 slot(s) of 1", w.log())
        argvs = [c["argv"] for c in standin_log(self.log)]
        self.assertEqual(argvs[0][:3], ["instance", "start", "--nv"])

    def test_b_2_gpus_per_slot_from_gres_give_2_slots_of_2(self):
        w = self.worker_in_job(2, "--gres=gpu:4")
        self.assertEqual(self.run_concurrent_calls(w, 2), ["0,1", "2,3"], w.log())
        self.assertIn("4 nvidia GPU(s) from CUDA_VISIBLE_DEVICES, 2 slot(s) of 2", w.log())

    def test_c_a_job_with_fewer_gpus_than_a_slot_needs_exits_6_saying_so(self):
        w = self.worker_in_job(2, "--gpus-per-node=1")
        self.assertEqual(w.proc.wait(60), 6, w.log())
        self.assertIn("a GPU runtime needs 2 nvidia GPU(s) per slot, but 1 were found (CUDA_VISIBLE_DEVICES)",
                      w.log())

    def test_d_autoalloc_jobs_get_their_gpus_both_ways(self):
        """The sbatch line autoalloc builds, submitted for real: Slurm gives the job the GPUs it
        asks for, as --gpus-per-node=N and as --gres=gpu:N (autoalloc.gpu_request)."""
        sif = self.build_sif("singularity")
        script = os.path.join(self.tmp, "template.sh")
        with open(script, "w") as f:
            f.write('#!/bin/bash\necho "lhpc-gpu-job gpus=$SLURM_JOB_GPUS per_node=${SLURM_GPUS_PER_NODE:-} '
                    'args=$*"\n')
        os.chmod(script, 0o755)
        for how, per_slot, slots in (("gpus-per-node", 1, 4), ("gres", 2, 2)):
            with self.subTest(how=how):
                out = self.autoalloc_job(sif, script, how, per_slot, slots)
                self.assertIn("lhpc-gpu-job gpus=0,1,2,3 ", out)
                self.assertIn(f"--gpus-per-slot {per_slot} --gpu-vendor nvidia", out)
                # SLURM_GPUS_PER_NODE is Slurm's echo of --gpus-per-node; --gres leaves it unset.
                self.assertIn("per_node=4 " if how == "gpus-per-node" else "per_node= ", out)

    def autoalloc_job(self, sif, script, how, per_slot, slots):
        url = self.url
        work = tempfile.mkdtemp(prefix=f"aa-{how}-", dir=self.tmp)
        conf = os.path.join(work, "config.toml")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f'[singularity]\nengine = "host"\nworker_processes = {slots}\n')
        env = dict(os.environ, **self.slurm, AMQP_URL=url, LITHOPS_HPC_CONFIG=conf,
                   LITHOPS_HPC_STATE_DIR=os.path.join(work, "state"))
        lt.publish_lithops(url, "send_task", lt.make_send_task(1, f"ex-aa-{how}", {}))
        log = open(os.path.join(work, "controller.log"), "w")
        ctl = subprocess.Popen([BIN, "autoalloc", "--sif", sif, "--script", script, "--poll", "0.5",
                                "--max-start-failures", "1", "--gpus-per-slot", str(per_slot),
                                "--gpu-request", how], env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        outs = os.path.join(work, "state", "autoalloc", "out")
        try:
            def job_output():
                for name in os.listdir(outs) if os.path.isdir(outs) else []:
                    with open(os.path.join(outs, name)) as o:
                        text = o.read()
                    if "lhpc-gpu-job" in text:
                        return text
                return None
            return lt.wait_until(job_output, 60, f"the output of autoalloc's job ({how})")
        finally:
            ctl.send_signal(signal.SIGTERM)
            ctl.wait(30)
            log.close()


if __name__ == "__main__":
    lt.main()

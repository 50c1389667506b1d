"""Shared pieces of the worker integration tests: start `lithops-hpc worker`
against the rig broker with the host engine (or the singularity/apptainer
stand-in), the real runtime-defs/handler.py and tests/fake-lithops, and read
what the fake function handler recorded.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile

from lhpc_test import descendants, wait_until

SOURCE_ROOT = os.environ.get("LHPC_SOURCE_ROOT") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("LHPC_BIN") or os.path.join(SOURCE_ROOT, "build", "lithops-hpc")
FAKE_LITHOPS = os.path.join(SOURCE_ROOT, "tests", "fake-lithops")
STANDIN_DIR = os.path.join(SOURCE_ROOT, "tests", "stand-in")
PYTHON = "/usr/bin/python3"


def rig_password():
    from lhpc_test import rig_env
    env = rig_env()
    with open(env["RIG_AMQP_PASSWORD_FILE"]) as f:
        return f.read().strip()


class Worker:
    """One `lithops-hpc worker` process with its own config, log and temp dir."""

    def __init__(self, url, slots=2, engine="host", mode=None, sif=None, extra_env=None,
                 config_extra="", rabbitmq_extra="", drain_timeout=30, heartbeat=5, args=(), python=PYTHON,
                 logs_extra="", logs_dir=None, wrap=()):
        self.dir = tempfile.mkdtemp(prefix="lhpc-worker-test-")
        self.url = url
        # Handler output (what functions print, Lithops' logging) goes to
        # <logs_dir>/<job>/rank-0.log, not to the worker's own output.
        self.logs_dir = logs_dir or os.path.join(self.dir, "logs")
        self.config = os.path.join(self.dir, "config.toml")
        with open(os.open(self.config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"""[singularity]
engine = "{engine}"
worker_processes = {slots}
python = "{python}"
instance_name = "lhpc-test"
{config_extra}
[rabbitmq]
heartbeat = {heartbeat}
{rabbitmq_extra}

[deploy]
drain_timeout = {drain_timeout}
restart_limit = 3

[logs]
dir = "{self.logs_dir}"
{logs_extra}
""")
        self.env = dict(os.environ)
        self.env.update({
            "AMQP_URL": url,               # the URL reaches the worker through its environment only
            "PYTHONPATH": FAKE_LITHOPS,
            "LITHOPS_HPC_JOB_ID": "t" + str(os.getpid()),
            "LITHOPS_HPC_STATE_DIR": os.path.join(self.dir, "state"),
        })
        self.env.pop("LITHOPS_HPC_CONFIG", None)
        if extra_env:
            self.env.update(extra_env)
        self.log_path = os.path.join(self.dir, "worker.log")
        argv = [BIN, "--config", self.config, "--log-level", "debug", "worker", "--slots", str(slots)]
        if mode:
            argv += ["--mode", mode]
        if sif:
            argv += ["--sif", sif]
        argv += list(args)
        self.argv = argv
        self._log = open(self.log_path, "w")
        # wrap: a prefix that runs the worker elsewhere (nsenter into a
        # network namespace); it must exec the worker, so pid stays its pid.
        self.proc = subprocess.Popen(list(wrap) + argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        """What the worker itself printed (its stdout and stderr)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def handler_log(self):
        """The handlers' output: the rank's log file, its rotated .1 first."""
        out = ""
        for path in sorted(glob.glob(os.path.join(self.logs_dir, "*", "rank-0.log*")), reverse=True):
            with open(path, errors="replace") as f:
                out += f.read()
        return out

    def log(self):
        """Everything: the worker's output and its handlers'."""
        return self.output() + self.handler_log()

    def alive(self):
        return self.proc.poll() is None

    def wait_consuming(self, timeout=60):
        wait_until(lambda: "consuming" in self.log() or not self.alive(), timeout, "the worker to consume")
        if not self.alive():
            raise AssertionError("worker exited early:\n" + self.log())

    def wait_log(self, text, timeout=60, count=1):
        return wait_until(lambda: self.log().count(text) >= count, timeout, f"{text!r} in the worker log")

    def stop(self, sig=signal.SIGTERM, timeout=90):
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)
        if not self._log.closed:
            self._log.close()

    def descendants(self):
        """PIDs of every process below the worker."""
        return descendants(self.pid)

    def handler_pids(self, which=None):
        """{handler name ('0', '1', ..., 'control'): pid} of the live handler processes."""
        out = {}
        for pid in self.descendants():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if not any(c.endswith(b"handler.py") for c in cmd):
                continue
            name = env.get(b"LITHOPS_HPC_HANDLER", b"?").decode()
            out[name] = pid
        return out if which is None else out.get(which)

    def cleanup(self):
        if self.alive():
            self.kill()
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def records(record_dir):
    """Records the fake function_handler wrote, one dict per finished call."""
    out = []
    for path in glob.glob(os.path.join(record_dir, "*.json")):
        with open(path) as f:
            out.append(json.load(f))
    return out


def max_concurrency(recs):
    """Largest number of calls whose [start, end] intervals overlap."""
    events = []
    for r in recs:
        events.append((r["start"], 1))
        events.append((r["end"], -1))
    events.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def wait_records(record_dir, n, timeout, what=None):
    return wait_until(lambda: len(records(record_dir)) >= n and records(record_dir), timeout,
                      what or f"{n} call records in {record_dir}")

"""The one error path, as a user meets it: every refusal is one `error` line
(what and where) and a `hint` line (what to do), reported by main, with the
exit status lithops-hpc(1) documents; a bad value of an enum reads the same
from a flag and from the configuration file."""
import json
import os
import pty
import select
import shutil
import subprocess
import tempfile
import time
import unittest

BIN = os.environ["LHPC_BIN"]


def run(*args, env=None):
    e = dict(os.environ)
    e.pop("SLURM_JOB_ID", None)
    e.pop("LITHOPS_HPC_JOB_ID", None)
    e.pop("LITHOPS_HPC_CONFIG", None)
    e.update(env or {})
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=60, env=e, stdin=subprocess.DEVNULL)


class CliErrorsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="lhpc-cli-")
        self.addCleanup(self.tmp.cleanup)

    def config_with(self, section, key, value):
        path = os.path.join(self.tmp.name, "c.toml")
        with open(path, "w") as f:
            f.write(f'[{section}]\n{key} = "{value}"\n')
        return path

    def test_a_bad_enum_value_reads_the_same_from_a_flag_and_from_the_config(self):
        cases = [
            ("deploy", "transfer", "deploy", "scp", "'scp' is not one of mpi, sbcast, none"),
            ("stage", "transfer", "deploy", "scp", "'scp' is not one of mpi, sbcast, none"),
            ("deploy", "mode", "deploy", "batch", "'batch' is not one of dispatch, runscript"),
            ("worker", "mode", "deploy", "batch", "'batch' is not one of dispatch, runscript"),
            ("deploy", "engine", "singularity", "docker", "'docker' is not one of singularity, apptainer, host"),
            ("worker", "engine", "singularity", "docker", "'docker' is not one of singularity, apptainer, host"),
        ]
        for cmd, key, section, value, words in cases:
            extra = ["--sif", "/nonexistent.sif"] if cmd == "stage" else []
            r = run(cmd, f"--{key}", value, *extra)
            self.assertEqual(r.returncode, 2, (cmd, key, r.stderr))
            self.assertIn(f"--{key}: {words}", r.stderr, (cmd, key))
            self.assertIn(f"hint: see lithops-hpc {cmd} --help", r.stderr)
            self.assertEqual(r.stdout, "")
            cfg = self.config_with(section, key, value)
            r = run("--config", cfg, "config", "check", env={"AMQP_URL": "amqp://u:p@127.0.0.1:1/"})
            self.assertEqual(r.returncode, 3, (section, key, r.stderr))
            self.assertIn(f"{cfg}:2:", r.stderr)
            self.assertIn(f"{section}.{key}: {words}", r.stderr, (section, key))

    def test_no_deployment_is_8_and_a_bad_command_line_is_2(self):
        state = os.path.join(self.tmp.name, "state")
        env = {"LITHOPS_HPC_STATE_DIR": state}
        for args in (["status"], ["status", "--json"], ["stop"], ["stop", "7"]):
            r = run(*args, env=env)
            self.assertEqual(r.returncode, 8, (args, r.stderr))
            self.assertIn("no deployment found (looked in " + state, r.stderr)
            self.assertIn("hint: start one", r.stderr)
            self.assertEqual(r.stdout, "")
        for args in (["status", "--bogus"], ["stop", "--timeout", "-1"], ["stop", "--timeout", "soon"],
                     ["no-such-command"], ["status", "../x"]):
            r = run(*args, env=env)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn("hint:", r.stderr, args)

    def test_a_group_without_its_command_names_the_commands(self):
        for group, names in (("runtime", "build"), ("config", "check"), ("sif", "inspect")):
            r = run(group)
            self.assertEqual(r.returncode, 2, (group, r.stderr))
            self.assertIn(f"lithops-hpc {group} needs a command: {names}", r.stderr)
            self.assertIn(f"hint: see lithops-hpc {group} --help", r.stderr)

    def test_help_and_version_still_exit_0_on_stdout(self):
        for args in (["--help"], ["--version"], ["status", "--help"]):
            r = run(*args)
            self.assertEqual(r.returncode, 0, (args, r.stderr))
            self.assertNotEqual(r.stdout, "")


NOBODY = 65534


def on_a_terminal(args, env, timeout=30):
    """Runs lithops-hpc with its stdout on a pseudo-terminal: (exit status, bytes shown)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([BIN, *args], stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 0.5)[0]:
            if p.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    p.wait(timeout=timeout)
    p.stderr.close()
    return p.returncode, out


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
class TerminalEscapesTest(unittest.TestCase):
    """Issue 20 finding 3: a handler's output (what a task's sender chose) shows no escape sequence on a terminal."""

    def test_logs_escapes_control_characters_on_a_terminal_and_raw_keeps_them(self):
        tmp = tempfile.mkdtemp(prefix="lhpc-cli-logs-")
        self.addCleanup(shutil.rmtree, tmp, True)
        state = os.path.join(tmp, "state")
        logs = os.path.join(state, "jobs", "j1", "logs")
        os.makedirs(logs, mode=0o700)
        line = b"\x1b]0;owned\x07 \x1b[31mred\tend\xc2\x9b"
        with open(os.path.join(logs, "rank-0.log"), "wb") as f:
            f.write(line + b"\n")
        os.chmod(os.path.join(logs, "rank-0.log"), 0o600)
        record = {"version": 1, "job": "j1", "where": "state", "dir": logs, "max_bytes": 1 << 20, "nodes": ["n1"]}
        with open(os.path.join(state, "jobs", "j1", "logs.json"), "w") as f:
            json.dump(record, f)
        env = dict(os.environ, LITHOPS_HPC_STATE_DIR=state)
        env.pop("SLURM_JOB_ID", None)
        code, shown = on_a_terminal(["logs", "j1"], env)
        self.assertEqual(code, 0, shown)
        self.assertIn(b"rank 0: \\x1b]0;owned\\x07 \\x1b[31mred\tend\\xc2\\x9b", shown)
        self.assertNotIn(b"\x1b", shown)
        code, shown = on_a_terminal(["logs", "j1", "--raw"], env)
        self.assertEqual(code, 0, shown)
        self.assertIn(b"rank 0: " + line, shown)
        piped = subprocess.run([BIN, "logs", "j1"], capture_output=True, env=env, timeout=30)
        self.assertEqual(piped.stdout, b"rank 0: " + line + b"\n")


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
class ForeignFilesTest(unittest.TestCase):
    """Issue 20 findings 7 and 10: what another user (nobody) or a FIFO puts where lithops-hpc reads."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="lhpc-cli-foreign-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        os.chmod(self.tmp, 0o755)
        self.shared = os.path.join(self.tmp, "shared")  # like /tmp: anyone may write, sticky
        os.mkdir(self.shared)
        os.chmod(self.shared, 0o1777)

    def as_nobody(self, script):
        subprocess.run(["setpriv", f"--reuid={NOBODY}", "--regid=nogroup", "--clear-groups", "sh", "-c", script],
                       check=True, timeout=30)

    def test_status_refuses_a_fifo_or_another_users_state_at_once(self):
        state = os.path.join(self.tmp, "state")
        os.makedirs(os.path.join(state, "autoalloc"), mode=0o700)
        os.makedirs(os.path.join(state, "jobs", "77"), mode=0o700)
        os.mkfifo(os.path.join(state, "jobs", "77", "status.json"))
        r = run("status", "77", env={"LITHOPS_HPC_STATE_DIR": state})
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("status.json is not a regular file (a FIFO", r.stderr)
        os.mkfifo(os.path.join(state, "autoalloc", "state.json"))
        r = run("status", env={"LITHOPS_HPC_STATE_DIR": state})
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("state.json is not a regular file (a FIFO", r.stderr)
        # A state directory they made first (a predictable shared path), with a controller line of theirs.
        theirs = os.path.join(self.shared, "state")
        line = '{"controller": "running", "pid": 666, "host": "evil", "next": "trust me", "jobs": [], "demand": {}}'
        self.as_nobody(f"mkdir -p {theirs}/autoalloc && echo '{line}' > {theirs}/autoalloc/state.json")
        r = run("status", env={"LITHOPS_HPC_STATE_DIR": theirs})
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"{theirs} belongs to nobody (uid {NOBODY})", r.stderr)
        self.assertNotIn("trust me", r.stdout)

    def test_sif_inspect_refuses_a_fifo_at_once(self):
        fifo = os.path.join(self.tmp, "image.sif")
        os.mkfifo(fifo)
        r = subprocess.run([BIN, "sif", "inspect", fifo], capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL)
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertIn(f"{fifo} is not a regular file (a FIFO), so not a SIF image", r.stderr)


class ProcessHardeningTest(unittest.TestCase):
    """Issue 12 item 9: never run set-uid; no core dump or ptrace holds the URL."""

    def setUp(self):
        # A directory nobody can traverse, on the same (not nosuid) file system as the build.
        self.dir = tempfile.mkdtemp(prefix="lhpc-setid-", dir=os.path.dirname(BIN))
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)

    def as_nobody(self, binary, *args):
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", binary, *args]

    def copy(self, mode):
        path = os.path.join(self.dir, "lithops-hpc")
        shutil.copy(BIN, path)
        os.chown(path, 0, 0)
        os.chmod(path, mode)
        return path

    def test_a_set_uid_or_set_gid_copy_refuses_to_run(self):
        plain = self.copy(0o755)
        r = subprocess.run(self.as_nobody(plain, "--version"), capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)  # the same binary runs as nobody
        for mode, what in ((0o4755, "effective uid 0"), (0o2755, "effective gid 0")):
            path = self.copy(mode)
            self.assertEqual(os.stat(path).st_mode & 0o6000, mode & 0o6000)
            r = subprocess.run(self.as_nobody(path, "--version"), capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 1, (oct(mode), r.stdout, r.stderr))
            self.assertEqual(r.stdout, "", "nothing ran")
            self.assertIn("runs set-uid or set-gid", r.stderr)
            self.assertIn(what, r.stderr)
            self.assertIn("hint: never install it set-uid", r.stderr)

    def test_a_running_command_is_not_dumpable(self):
        # /proc/PID/environ of a dumpable process belongs to its user; of one
        # that is not, to root: its user's other processes cannot read it.
        state = os.path.join(self.dir, "state")
        env = dict(os.environ, LITHOPS_HPC_STATE_DIR=state, AMQP_URL="amqp://u:secret@127.0.0.1:1/")
        env.pop("SLURM_JOB_ID", None)
        p = subprocess.Popen(self.as_nobody(BIN, "status", "--watch", "1"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        self.addCleanup(p.stderr.close)
        self.addCleanup(p.wait)
        self.addCleanup(p.kill)
        environ = f"/proc/{p.pid}/environ"

        def started():  # setpriv execs in place: same PID, our binary once its uid changed
            try:
                return os.stat(f"/proc/{p.pid}").st_uid == NOBODY and os.readlink(f"/proc/{p.pid}/exe") == BIN
            except OSError:
                return False
        deadline = time.monotonic() + 20
        while not started():
            self.assertIsNone(p.poll(), p.stderr.read() if p.poll() is not None else "")
            self.assertLess(time.monotonic(), deadline, "lithops-hpc status --watch did not start")
            time.sleep(0.05)
        # `status --watch` warns each second that it finds no deployment:
        # the first warning means main() has run its hardening.
        self.assertIn("no deployment found", p.stderr.readline())
        self.assertEqual(os.stat(environ).st_uid, 0, "not dumpable: /proc/PID/environ is root's")
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", environ],
                           capture_output=True, text=True, timeout=30)
        self.assertNotEqual(r.returncode, 0, "another process of the same user cannot read the URL")
        self.assertNotIn("secret", r.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/env python3
"""Self-test of the singularity/apptainer stand-in and of runtime-defs/handler.py.

Run: /usr/bin/python3 tests/integration/test_standin_and_handler.py  (or -m unittest)
No broker, no real container engine, no real Lithops needed
(tests/fake-lithops stands in for Lithops).
"""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import lhpc_test as lt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = os.path.join(ROOT, "tests", "stand-in", "singularity")
APPTAINER = os.path.join(ROOT, "tests", "stand-in", "apptainer")
HANDLER = os.path.join(ROOT, "runtime-defs", "handler.py")
DEFAULT_DEF = os.path.join(ROOT, "runtime-defs", "lithops-default.def")
FAKE_LITHOPS = os.path.join(ROOT, "tests", "fake-lithops")
PYTHON = sys.executable

SIF_HEADER = struct.Struct("<32s10s3s3s16sqqqqqqqq")
SIF_DESCR = struct.Struct("<iBIIIqqqqqqq128s384s")


def check_sif(testcase, path):
    """Structural check of a SIF file; returns {datatype: [(descr, data)]}."""
    with open(path, "rb") as f:
        blob = f.read()
    size = len(blob)
    testcase.assertEqual(SIF_HEADER.size, 128)
    testcase.assertEqual(SIF_DESCR.size, 585)
    testcase.assertGreaterEqual(size, 128)
    (launch, magic, version, arch, uid, created, modified, dfree, dtotal,
     doff, dsize, data_off, data_size) = SIF_HEADER.unpack_from(blob, 0)
    testcase.assertTrue(launch.startswith(b"#!/usr/bin/env run-singularity\n"))
    testcase.assertEqual(magic, b"SIF_MAGIC\x00")
    testcase.assertEqual(version, b"01\x00")
    testcase.assertRegex(arch.decode(), r"^\d\d\x00$")
    testcase.assertNotEqual(uid, bytes(16))
    testcase.assertGreater(created, 0)
    testcase.assertEqual(dsize, dtotal * SIF_DESCR.size)
    testcase.assertGreaterEqual(doff, 128)
    testcase.assertLessEqual(doff + dsize, data_off)
    testcase.assertLessEqual(data_off + data_size, size)
    objects, ids, used = {}, set(), 0
    for i in range(dtotal):
        d = SIF_DESCR.unpack_from(blob, doff + i * SIF_DESCR.size)
        (dtype, in_use, oid, gid, link, off, osize, padded, ctime, mtime,
         _uid, _gid, name, extra) = d
        if not in_use:
            continue
        used += 1
        testcase.assertNotIn(oid, ids)
        ids.add(oid)
        testcase.assertTrue(0x4001 <= dtype <= 0x400B, hex(dtype))
        testcase.assertGreaterEqual(off, data_off)
        testcase.assertLessEqual(off + osize, data_off + data_size)
        testcase.assertGreaterEqual(padded, osize)
        objects.setdefault(dtype, []).append((d, blob[off:off + osize]))
    testcase.assertEqual(dfree, dtotal - used)
    testcase.assertIn(0x4001, objects, "no deffile object")
    testcase.assertIn(0x4004, objects, "no partition object")
    part, data = objects[0x4004][0]
    testcase.assertEqual(part[5] % 4096, 0, "partition not 4 KiB aligned")
    testcase.assertEqual(data[:4], b"hsqs")
    fstype, parttype, parch = struct.unpack_from("<ii3s", part[13])
    testcase.assertEqual((fstype, parttype), (1, 2))
    testcase.assertEqual(parch, arch)
    return objects


def run(cmd, env=None, cwd=None, stdin=None, timeout=30):
    return subprocess.run(cmd, env=env, cwd=cwd, input=stdin, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class StandInTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="standin-test-")
        self.dir = self.tmp.name
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith(("SINGULARITYENV_", "APPTAINERENV_", "STANDIN_")):
                del self.env[k]
        self.env["STANDIN_STATE"] = os.path.join(self.dir, "state")
        self.env["STANDIN_LOG"] = os.path.join(self.dir, "standin.log")
        self.sif = os.path.join(self.dir, "rt.sif")

    def tearDown(self):
        run([STANDIN, "instance", "stop", "--force", "--all"], env=self.env)
        self.tmp.cleanup()

    def sing(self, *args, env=None, **kw):
        return run([STANDIN] + list(args), env=env or self.env, **kw)

    def build_default(self):
        r = self.sing("build", "--fakeroot", self.sif, "lithops-default.def",
                      cwd=os.path.dirname(DEFAULT_DEF))
        self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def log(self):
        with open(self.env["STANDIN_LOG"]) as f:
            return [json.loads(line) for line in f]

    def test_version(self):
        r = run([STANDIN, "--version"])
        self.assertEqual(r.stdout.strip(), "singularity-ce version 4.5.1-standin")
        r = run([APPTAINER, "--version"])
        self.assertEqual(r.stdout.strip(), "apptainer version 1.5.3-standin")
        r = run([APPTAINER, "version"], env=dict(self.env, STANDIN_VERSION="1.0.3"))
        self.assertEqual(r.stdout.strip(), "1.0.3")
        self.assertTrue(os.path.islink(APPTAINER))
        self.assertFalse(os.path.isabs(os.readlink(APPTAINER)))

    def test_build_writes_valid_sif(self):
        self.build_default()
        objects = check_sif(self, self.sif)
        with open(DEFAULT_DEF, "rb") as f:
            self.assertEqual(objects[0x4001][0][1], f.read())

    def test_build_refuses_overwrite_without_force(self):
        self.build_default()
        before = os.stat(self.sif).st_mtime_ns
        r = self.sing("build", self.sif, "lithops-default.def", cwd=os.path.dirname(DEFAULT_DEF))
        self.assertEqual(r.returncode, 255)
        self.assertIn("already exists", r.stderr)
        self.assertEqual(os.stat(self.sif).st_mtime_ns, before)
        r = self.sing("build", "--force", self.sif, "lithops-default.def",
                      cwd=os.path.dirname(DEFAULT_DEF))
        self.assertEqual(r.returncode, 0, r.stderr)
        check_sif(self, self.sif)

    def test_build_errors(self):
        r = self.sing("build", self.sif, os.path.join(self.dir, "missing.def"))
        self.assertEqual(r.returncode, 255)
        self.assertFalse(os.path.exists(self.sif))
        env = dict(self.env, STANDIN_BUILD_FAIL="1")
        r = self.sing("build", self.sif, "lithops-default.def", env=env,
                      cwd=os.path.dirname(DEFAULT_DEF))
        self.assertEqual(r.returncode, 255)
        self.assertFalse(os.path.exists(self.sif))
        # %files resolve against the build's cwd: from elsewhere handler.py is missing
        r = self.sing("build", self.sif, DEFAULT_DEF, cwd=self.dir)
        self.assertEqual(r.returncode, 255)
        self.assertIn("handler.py", r.stderr)

    def test_instance_start_takes_the_gpu_switches_the_real_clis_take_and_refuses_others(self):
        # --nv, --nvccli, --rocm are instance start options of Apptainer 1.x and
        # SingularityCE 3.9+ (their `instance start --help`); --gpu is no flag.
        self.build_default()
        for i, flag in enumerate(("--nv", "--nvccli", "--rocm")):
            self.assertEqual(self.sing("instance", "start", flag, self.sif, f"g{i}").returncode, 0, flag)
        r = self.sing("instance", "start", "--gpu", self.sif, "g9")
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown flag: --gpu", r.stderr)

    def test_flags_after_positional_arguments_are_arguments(self):
        self.build_default()
        # exec: the flag is the command, which does not exist (FATAL, 255)
        r = self.sing("exec", self.sif, "--cleanenv", "true")
        self.assertEqual(r.returncode, 255)
        self.assertIn("--cleanenv", r.stderr)
        r = self.sing("instance", "start", self.sif, "--bind", "/tmp", "w")
        self.assertEqual(r.returncode, 255)
        r = self.sing("instance", "start", self.sif, "w", "--nv")
        self.assertEqual(r.returncode, 255)
        self.assertEqual(self.sing("instance", "start", self.sif, "w").returncode, 0)
        # one argument too many for cobra: exit 1, and the flag is not obeyed
        for args in (["instance", "stop", "w", "--force"], ["instance", "list", "w", "--json"],
                     ["build", self.sif, "x.def", "--force"]):
            r = self.sing(*args)
            self.assertEqual(r.returncode, 1, args)
            self.assertIn("arg(s), received", r.stderr)
        self.assertIn("w", self.sing("instance", "list").stdout)
        # flag errors are cobra's: exit 1
        r = self.sing("exec", "--bogus", self.sif, "true")
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown flag: --bogus", r.stderr)
        r = self.sing("bogus")
        self.assertEqual(r.returncode, 1)
        # flags before the image are fine
        r = self.sing("exec", "--cleanenv", self.sif, "true")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_instance_round_trip(self):
        self.build_default()
        r = self.sing("instance", "start", "--bind", self.dir + ":/data", self.sif, "w-1.x")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.sing("instance", "start", self.sif, "w-1.x")
        self.assertEqual(r.returncode, 255)
        self.assertIn("already exists", r.stderr)
        r = self.sing("instance", "start", self.sif, "bad/name")
        self.assertEqual(r.returncode, 255)
        r = self.sing("instance", "start", os.path.join(self.dir, "standin.log"), "x")
        self.assertEqual(r.returncode, 255)          # not a SIF

        r = self.sing("instance", "list", "--json")
        doc = json.loads(r.stdout)
        self.assertEqual([i["instance"] for i in doc["instances"]], ["w-1.x"])
        inst = doc["instances"][0]
        self.assertEqual(inst["img"], self.sif)
        self.assertTrue(os.path.exists("/proc/%d" % inst["pid"]))
        for key in ("ip", "logErrPath", "logOutPath"):
            self.assertIn(key, inst)
        r = self.sing("instance", "list")
        self.assertIn("w-1.x", r.stdout)

        r = self.sing("exec", "instance://w-1.x", "sh", "-c", "echo hi; echo $SINGULARITY_CONTAINER")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), ["hi", self.sif])
        # bind destination and %files destination are mapped for arguments
        r = self.sing("exec", "instance://w-1.x", "ls", "/data/rt.sif")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.sing("exec", "instance://w-1.x", "cat", "/opt/lithops-hpc/handler.py")
        with open(HANDLER) as f:
            self.assertEqual(r.stdout, f.read())
        # exec joins the instance's PID namespace
        r = self.sing("exec", "instance://w-1.x", "readlink", "/proc/self/ns/pid")
        self.assertEqual(r.stdout.strip(), os.readlink("/proc/%d/ns/pid" % inst["pid"]))
        self.assertNotEqual(r.stdout.strip(), os.readlink("/proc/self/ns/pid"))

        r = self.sing("instance", "stop", "w-1.x")
        self.assertEqual(r.returncode, 0, r.stderr)
        deadline = time.time() + 5
        while os.path.exists("/proc/%d" % inst["pid"]) and time.time() < deadline:
            with open("/proc/%d/stat" % inst["pid"]) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        r = self.sing("instance", "list", "--json")
        self.assertEqual(json.loads(r.stdout), {"instances": []})
        r = self.sing("exec", "instance://w-1.x", "true")
        self.assertEqual(r.returncode, 255)
        r = self.sing("instance", "stop", "w-1.x")
        self.assertEqual(r.returncode, 1)           # RunE error "no instance found"
        self.assertIn("no instance found", r.stderr)

    def start_instance(self, name, *flags):
        r = self.sing("instance", "start", *flags, self.sif, name)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(self.sing("instance", "list", "--json", name).stdout)["instances"][0]["pid"]

    def test_an_instance_that_dies_takes_what_was_execd_into_it(self):
        self.build_default()
        pid = self.start_instance("ns")
        p = subprocess.Popen([STANDIN, "exec", "instance://ns", "sleep", "600"], env=self.env)
        lt.wait_until(lambda: any(pid_of_child_in(pid, "sleep")), 10, "the exec'd sleep in the namespace")
        os.kill(pid, signal.SIGKILL)
        self.assertEqual(p.wait(10), -signal.SIGKILL)
        self.assertEqual(json.loads(self.sing("instance", "list", "--json").stdout)["instances"], [])

    def test_stop_sends_sigint_takes_an_integer_timeout(self):
        self.build_default()
        # SIGINT by default: an init that ignores it is killed after --timeout
        pid = self.start_instance("s")
        with open("/proc/%d/status" % pid) as f:
            caught = int(next(x for x in f if x.startswith("SigCgt:")).split()[1], 16)
        self.assertTrue(caught & (1 << (signal.SIGINT - 1)))
        r = self.sing("instance", "stop", "--timeout", "1.5", "s")
        self.assertEqual(r.returncode, 1)
        self.assertIn("strconv.ParseInt", r.stderr)
        r = self.sing("instance", "stop", "-t", "1", "s")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("(Timeout)", r.stderr)
        r = self.sing("instance", "stop")
        self.assertEqual(r.returncode, 1)
        self.assertIn("invalid command", r.stderr)

    def test_flag_sets_of_instance_start_and_list(self):
        self.build_default()
        for flag in (["--pid"], ["--pwd", "/"], ["--cwd", "/"], ["--no-pid"]):
            r = self.sing("instance", "start", *flag, self.sif, "f")
            self.assertEqual(r.returncode, 1, flag)
            self.assertIn("unknown flag", r.stderr)
        self.assertEqual(self.sing("instance", "list", "--all").returncode, 1)
        self.assertEqual(run([APPTAINER, "instance", "list", "--all"], env=self.env).returncode, 0)
        # --no-eval only from Apptainer 1.1.0 / SingularityCE 3.10.0
        r = self.sing("exec", "--no-eval", self.sif, "true", env=dict(self.env, STANDIN_VERSION="3.9.9"))
        self.assertEqual(r.returncode, 1)
        r = run([APPTAINER, "exec", "--no-eval", self.sif, "true"], env=dict(self.env, STANDIN_VERSION="1.1.0"))
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_definition_files_are_validated(self):
        for body, err in (("%enviroment\n    X=1\n", "invalid section(s) specified: enviroment"),
                          ("Bootsrap: x\n", "invalid header keyword found: bootsrap")):
            path = os.path.join(self.dir, "bad.def")
            with open(path, "w") as f:
                f.write("Bootstrap: docker\nFrom: x\n" + body)
            r = self.sing("build", self.sif, path)
            self.assertEqual(r.returncode, 255)
            self.assertIn(err, r.stderr)
            self.assertFalse(os.path.exists(self.sif))

    def test_oci_mode_refuses_instances_without_no_oci(self):
        self.build_default()
        env = dict(self.env, STANDIN_OCI_MODE="1")
        r = self.sing("instance", "start", self.sif, "o", env=env)
        self.assertEqual(r.returncode, 255)
        self.assertIn("not yet supported in OCI-mode", r.stderr)
        r = self.sing("instance", "start", "--no-oci", self.sif, "o", env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.sing("instance", "stop", "o", env=env)
        self.assertEqual(r.returncode, 255)
        r = self.sing("instance", "stop", "--no-oci", "o", env=env)
        self.assertEqual(r.returncode, 1)       # stop has no --no-oci
        self.assertEqual(self.sing("exec", "instance://o", "true", env=env).returncode, 255)
        self.assertEqual(self.sing("exec", "--no-oci", "instance://o", "true", env=env).returncode, 0)
        r = run([APPTAINER, "instance", "start", "--no-oci", self.sif, "o2"], env=env)
        self.assertEqual(r.returncode, 1)       # Apptainer has no --no-oci

    def test_killed_sleeper_means_no_instance(self):
        self.build_default()
        self.assertEqual(self.sing("instance", "start", self.sif, "k").returncode, 0)
        pid = json.loads(self.sing("instance", "list", "--json").stdout)["instances"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        # Gone once the sleeper is reaped: wait for that, not for a guess.
        lt.wait_until(lambda: self.sing("exec", "instance://k", "true").returncode == 255, 10,
                      "exec into the killed instance to fail with 255")
        self.assertEqual(json.loads(self.sing("instance", "list", "--json").stdout)["instances"], [])

    def test_env_prefix_stripping(self):
        self.build_default()
        self.assertEqual(self.sing("instance", "start", self.sif, "e").returncode, 0)
        env = dict(self.env, SINGULARITYENV_AMQP_URL="amqp://u:secret@h/v",
                   APPTAINERENV_OTHER="from-apptainer", PLAIN="plain")
        script = "echo $AMQP_URL; echo ${OTHER:-unset}; echo ${PLAIN:-unset}; " \
                 "env | grep -c '^SINGULARITYENV_' || true"
        r = run([STANDIN, "exec", "instance://e", "sh", "-c", script], env=env)
        self.assertEqual(r.stdout.split(), ["amqp://u:secret@h/v", "unset", "plain", "0"])
        r = run([APPTAINER, "exec", "instance://e", "sh", "-c", script], env=env)
        self.assertEqual(r.stdout.split(), ["amqp://u:secret@h/v", "from-apptainer", "plain", "0"])
        r = run([APPTAINER, "exec", "--cleanenv", "instance://e", "sh", "-c", script], env=env)
        self.assertEqual(r.stdout.split(), ["amqp://u:secret@h/v", "from-apptainer", "unset", "0"])
        # APPTAINERENV_ wins over SINGULARITYENV_ in apptainer
        env2 = dict(env, APPTAINERENV_AMQP_URL="amqp://a")
        r = run([APPTAINER, "exec", "instance://e", "sh", "-c", "echo $AMQP_URL"], env=env2)
        self.assertEqual(r.stdout.strip(), "amqp://a")
        # the host PATH and the CLI's own variables stay outside
        env3 = dict(env, PATH="/opt/host-only:" + env["PATH"], SINGULARITY_FOO="f", APPTAINER_BAR="b")
        r = run([APPTAINER, "exec", "instance://e", "sh", "-c",
                 "echo $PATH; echo ${SINGULARITY_FOO:-unset} ${APPTAINER_BAR:-unset}"], env=env3)
        self.assertEqual(r.stdout.split("\n")[:2],
                         ["/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "unset unset"])
        r = run([APPTAINER, "exec", "instance://e", "sh", "-c", "echo $PATH"],
                env=dict(env, APPTAINERENV_PREPEND_PATH="/first"))
        self.assertTrue(r.stdout.startswith("/first:/usr/local/sbin:"), r.stdout)
        # ... and are read as flags: APPTAINER_BINDPATH is --bind, SINGULARITY_ the legacy prefix
        for var in ("APPTAINER_BINDPATH", "SINGULARITY_BIND"):
            r = run([APPTAINER, "exec", self.sif, "ls", "/data/rt.sif"],
                    env=dict(self.env, **{var: self.dir + ":/data"}))
            self.assertEqual(r.returncode, 0, (var, r.stderr))
        # the log has names, never values
        recs = [rec for rec in self.log() if rec["argv"][:1] == ["exec"]]
        self.assertIn("SINGULARITYENV_AMQP_URL", recs[0]["env"])
        self.assertEqual(recs[1]["prog"], "apptainer")
        with open(self.env["STANDIN_LOG"]) as f:
            self.assertNotIn("secret", f.read())

    def test_env_values_are_shell_evaluated_unless_no_eval(self):
        self.build_default()
        self.assertEqual(self.sing("instance", "start", self.sif, "v").returncode, 0)
        value = 'p$HOME-$(echo sub)-`echo bq`-\\\\-end'
        for prog in (STANDIN, APPTAINER):
            prefix = "APPTAINERENV_" if prog == APPTAINER else "SINGULARITYENV_"
            env = dict(self.env, **{prefix + "V": value})
            show = ["sh", "-c", 'printf "%s" "$V"']
            r = run([prog, "exec", "instance://v"] + show, env=env)
            self.assertEqual(r.stdout, "p%s-sub-bq-\\-end" % os.environ["HOME"])
            r = run([prog, "exec", "--no-eval", "instance://v"] + show, env=env)
            self.assertEqual(r.stdout, value)
            # NO_EVAL from the host environment is --no-eval
            r = run([prog, "exec", "instance://v"] + show, env=dict(env, SINGULARITY_NO_EVAL="1"))
            self.assertEqual(r.stdout, value)

    def test_run_runscript(self):
        d = os.path.join(self.dir, "def")
        os.mkdir(d)
        with open(os.path.join(d, "entry.sh"), "w") as f:
            f.write('#!/bin/sh\necho "entry $AMQP_URL $*"\n')
        os.chmod(os.path.join(d, "entry.sh"), 0o755)
        with open(os.path.join(d, "t.def"), "w") as f:
            f.write("Bootstrap: docker\nFrom: python:3.11-slim-bookworm\n\n"
                    "%files\n    entry.sh /lithops/entry.sh\n\n"
                    "%runscript\n    exec /lithops/entry.sh \"$@\"\n")
        r = self.sing("build", self.sif, "t.def", cwd=d)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.sing("instance", "start", self.sif, "r").returncode, 0)
        env = dict(self.env, SINGULARITYENV_AMQP_URL="amqp://x")
        r = run([STANDIN, "run", "instance://r", "a", "b"], env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "entry amqp://x a b")
        r = self.sing("run", "instance://r", "--env", "A=1")
        self.assertEqual(r.returncode, 255)

    def test_handler_through_standin(self):
        self.build_default()
        self.assertEqual(self.sing("instance", "start", self.sif, "h").returncode, 0)
        env = dict(self.env, PYTHONPATH=FAKE_LITHOPS)
        r = run([STANDIN, "exec", "instance://h", "python3", "/opt/lithops-hpc/handler.py"],
                env=env, stdin='{"id":5,"action":"ping","payload":[1]}\n')
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(lines[0]["event"], "ready")
        self.assertEqual(lines[1], {"id": 5, "ok": True, "echo": [1], "elapsed": lines[1]["elapsed"]})


def pid_of_child_in(init_pid, comm):
    """PIDs (host view) of processes named comm in init_pid's PID namespace."""
    ns = os.readlink("/proc/%d/ns/pid" % init_pid)
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % p) as f:
                if f.read().strip() == comm and os.readlink("/proc/%s/ns/pid" % p) == ns:
                    yield int(p)
        except OSError:
            continue


class Handler:
    """A handler.py process driven over its pipes."""

    def __init__(self, pythonpath=FAKE_LITHOPS, env=None):
        e = dict(os.environ if env is None else env)
        e["PYTHONPATH"] = pythonpath
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([PYTHON, HANDLER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errfile, env=e)
        self.buf = b""

    def stderr(self):
        self.errfile.seek(0)
        return self.errfile.read().decode("utf-8", "replace")

    def readline(self, timeout=20):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("handler: no line within %ss" % timeout)
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def call(self, req_id, action, payload):
        self.send({"id": req_id, "action": action, "payload": payload})
        return self.readline()

    def close(self, timeout=10):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        rc = self.proc.wait(timeout)
        self.proc.stdout.close()
        return rc


class HandlerTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="handler-test-")
        self.dir = self.tmp.name
        self.handlers = []

    def tearDown(self):
        for h in self.handlers:
            if h.proc.poll() is None:
                h.proc.kill()
                h.proc.wait()
            for s in (h.proc.stdin, h.proc.stdout, h.errfile):
                try:
                    s.close()
                except OSError:
                    pass
        self.tmp.cleanup()

    def start(self, **kw):
        h = Handler(**kw)
        self.handlers.append(h)
        ready = h.readline()
        return h, ready

    def task(self, job_key="J1", call_id="00000", **test):
        return {"job_key": job_key, "call_ids": [call_id], "data_byte_ranges": [[0, 1]],
                "total_calls": 1, "worker_processes": 4, "log_level": "INFO",
                "lhpc_test": test}

    def records(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                with open(os.path.join(self.dir, name)) as f:
                    out.append((name, json.load(f)))
        return out

    def test_ready_line(self):
        h, ready = self.start()
        self.assertEqual(set(ready), {"event", "pid", "python", "lithops"})
        self.assertEqual(ready["event"], "ready")
        self.assertEqual(ready["pid"], h.proc.pid)
        self.assertEqual(ready["python"], "%d.%d" % sys.version_info[:2])
        self.assertEqual(ready["lithops"], "3.7.0+fake")
        self.assertEqual(h.close(), 0)

    def test_ping_echo_and_order(self):
        h, _ = self.start()
        payload = {"nested": {"x": [1, 2, "é"]}}
        for i in range(1, 4):
            h.send({"id": i, "action": "ping", "payload": payload})
        for i in range(1, 4):
            r = h.readline()
            self.assertEqual((r["id"], r["ok"], r["echo"]), (i, True, payload))
            self.assertIsInstance(r["elapsed"], float)
        self.assertEqual(h.close(), 0)

    def test_send_task_writes_record(self):
        h, _ = self.start()
        r = h.call(7, "send_task", self.task(record_dir=self.dir, sleep=0.1))
        self.assertEqual((r["id"], r["ok"]), (7, True), r)
        self.assertNotIn("error", r)
        self.assertGreaterEqual(r["elapsed"], 0.1)
        recs = self.records()
        self.assertEqual(len(recs), 1)
        name, rec = recs[0]
        self.assertTrue(name.startswith("J1-00000-%d-" % h.proc.pid))
        self.assertEqual((rec["job_key"], rec["call_id"], rec["pid"]), ("J1", "00000", h.proc.pid))
        self.assertLessEqual(rec["start"], rec["end"])
        # what the stock entry point sets per task, and one process per call
        self.assertEqual(rec["backend"], "singularity")
        self.assertRegex(rec["activation_id"], r"^[0-9a-f]{12}$")
        self.assertEqual(rec["worker_processes"], 1)
        r = h.call(8, "send_task", self.task(call_id="00001", record_dir=self.dir))
        self.assertTrue(r["ok"])
        ids = {rec["activation_id"] for _, rec in self.records()}
        self.assertEqual(len(ids), 2)
        self.assertEqual(h.close(), 0)

    def test_a_calls_environment_changes_are_undone(self):
        h, _ = self.start()
        r = h.call(1, "send_task", self.task(record_dir=self.dir, setenv={"LHPC_PROBE": "leaked"},
                                             probe_env="LHPC_PROBE"))
        self.assertTrue(r["ok"], r)
        r = h.call(2, "send_task", self.task(call_id="00001", record_dir=self.dir, probe_env="LHPC_PROBE"))
        self.assertTrue(r["ok"], r)
        seen = {rec["call_id"]: (rec["probe"], rec["probe_c"]) for _, rec in self.records()}
        self.assertEqual(seen["00000"], ("leaked", "leaked"), "the change is visible during its call")
        self.assertEqual(seen["00001"], (None, None), "and gone for the next, in os.environ and in children")
        self.assertEqual(h.close(), 0)

    def test_failures_are_ok_false_and_handler_survives(self):
        h, _ = self.start()
        r = h.call(1, "send_task", self.task(fail=True))
        self.assertFalse(r["ok"])
        self.assertIn("RuntimeError", r["error"])
        t0 = time.monotonic()
        r = h.call(2, "send_task", self.task(missing_data=True))
        self.assertFalse(r["ok"])
        self.assertIn("StorageNoSuchKeyError", r["error"])
        self.assertLess(time.monotonic() - t0, 2)
        r = h.call(3, "frobnicate", {})
        self.assertFalse(r["ok"])
        self.assertIn("unknown action", r["error"])
        h.proc.stdin.write(b"this is not json\n")
        h.proc.stdin.flush()
        r = h.readline()
        self.assertEqual((r["id"], r["ok"]), (None, False))
        r = h.call(4, "send_task", {"job_key": "J"})
        self.assertFalse(r["ok"])
        r = h.call(5, "ping", None)
        self.assertEqual((r["id"], r["ok"]), (5, True))
        self.assertEqual(h.close(), 0)

    def test_get_metadata_stores_meta(self):
        h, _ = self.start()
        payload = {"monitoring_interval": 2, "backend": "minio",
                   "minio": {"storage_bucket": "bkt", "storage_dir": self.dir,
                             "endpoint": "http://127.0.0.1:9000"},
                   "runtime_name": "lithops-worker-370-abcdef0123", "log_level": 20}
        r = h.call(11, "get_metadata", payload)
        self.assertTrue(r["ok"], r)
        path = os.path.join(self.dir, "bkt", "lithops.jobs", "lithops-worker-370-abcdef0123.meta")
        with open(path) as f:
            meta = json.load(f)
        self.assertEqual(meta["python_version"], "%d.%d" % sys.version_info[:2])
        self.assertEqual(meta["lithops_version"], "3.7.0+fake")
        self.assertIn("preinstalls", meta)
        r = h.call(12, "get_metadata", {"backend": "minio", "minio": {}, "runtime_name": "x"})
        self.assertFalse(r["ok"])
        self.assertEqual(h.close(), 0)

    def test_print_does_not_corrupt_protocol(self):
        h, _ = self.start()
        r = h.call(1, "send_task", self.task(print='{"id": 1, "ok": false} user output'))
        self.assertEqual((r["id"], r["ok"]), (1, True))
        r = h.call(2, "ping", "after")
        self.assertEqual(r["echo"], "after")
        self.assertEqual(h.close(), 0)
        self.assertEqual(h.buf, b"")
        self.assertEqual(h.stderr().count("user output"), 2)   # print() and os.write(1)

    def test_crash_once(self):
        marker = os.path.join(self.dir, "crash.marker")
        h, _ = self.start()
        h.send({"id": 1, "action": "send_task",
                "payload": self.task(record_dir=self.dir, crash="once", crash_marker=marker)})
        self.assertIsNone(h.readline())           # died without answering
        rc = h.proc.wait(10)
        self.assertNotEqual(rc, 0)
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(self.records(), [])
        h2, _ = self.start()                      # the retry runs normally
        r = h2.call(1, "send_task", self.task(record_dir=self.dir, crash="once",
                                              crash_marker=marker))
        self.assertTrue(r["ok"])
        self.assertEqual(len(self.records()), 1)
        self.assertEqual(h2.close(), 0)

    def test_eof_exits_zero(self):
        h, _ = self.start()
        self.assertEqual(h.close(), 0)

    def test_sigterm_exits_promptly_during_task(self):
        h, _ = self.start()
        h.send({"id": 1, "action": "send_task", "payload": self.task(sleep=30)})
        time.sleep(0.3)
        t0 = time.monotonic()
        h.proc.send_signal(signal.SIGTERM)
        rc = h.proc.wait(5)
        self.assertLess(time.monotonic() - t0, 3)
        self.assertNotEqual(rc, 0)

    def test_forked_children_cannot_reach_protocol(self):
        # A forked child (like Lithops' JobRunner) gets /dev/null on stdin and
        # on the protocol fd, fd 1 is stderr, and it dies with the handler.
        code = (
            "import importlib.util, os\n"
            "spec = importlib.util.spec_from_file_location('lhpc_handler', %r)\n"
            "h = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(h)\n"
            "h._setup_stdio()\n"
            "os.register_at_fork(after_in_child=h._after_fork_in_child)\n"
            "r, w = os.pipe()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.close(r)\n"
            "    nul = os.stat(os.devnull).st_rdev\n"
            "    ok = (os.fstat(h._PROTO_FD).st_rdev == nul and os.fstat(0).st_rdev == nul\n"
            "          and os.readlink('/proc/self/fd/1') == os.readlink('/proc/self/fd/2'))\n"
            "    os.write(w, b'1' if ok else b'0')\n"
            "    os._exit(0)\n"
            "os.close(w)\n"
            "res = os.read(r, 1)\n"
            "os.waitpid(pid, 0)\n"
            "h._write_line({'child_isolated': res == b'1'})\n"
        ) % HANDLER
        r = run([PYTHON, "-c", code], env=dict(os.environ, PYTHONPATH=FAKE_LITHOPS), stdin="")
        self.assertEqual(json.loads(r.stdout), {"child_isolated": True}, r.stderr)

    def test_lithops_missing(self):
        broken = os.path.join(self.dir, "broken")
        os.makedirs(os.path.join(broken, "lithops"))
        with open(os.path.join(broken, "lithops", "__init__.py"), "w") as f:
            f.write("raise ImportError('no lithops here')\n")
        h, ready = self.start(pythonpath=broken)
        self.assertEqual(ready["event"], "ready")
        self.assertIsNone(ready["lithops"])
        r = h.call(1, "ping", {"a": 1})
        self.assertTrue(r["ok"])
        r = h.call(2, "send_task", self.task())
        self.assertFalse(r["ok"])
        self.assertIn("no lithops here", r["error"])
        r = h.call(3, "get_metadata", {"runtime_name": "x"})
        self.assertFalse(r["ok"])
        self.assertEqual(h.close(), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)

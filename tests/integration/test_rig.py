#!/usr/bin/python3
"""Checks of the test rig itself: the real broker and the virtual Slurm cluster.

Run: LHPC_RIG_DIR=<dir outside /tmp> /usr/bin/python3 tests/integration/test_rig.py
LHPC_SKIP_SLURM=1 skips the cluster checks. The rig is left running for the
rest of the run (stop it with the rig scripts' `down`) unless LHPC_RIG_TEARDOWN=1.
Restarts the shared broker: do not run concurrently with other broker tests.
"""
import os
import secrets
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lhpc_test as lt  # noqa: E402

TEARDOWN = os.environ.get("LHPC_RIG_TEARDOWN") == "1"


class Broker(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    @classmethod
    def tearDownClass(cls):
        if TEARDOWN:
            lt._rig("rabbitmq.sh", "down")

    def test_publish_depth_drain(self):
        url = lt.fresh_vhost("rig")
        for i in range(10):
            lt.publish_lithops(url, "send_task", lt.make_send_task(2, f"abc123-0-M{i:03d}"),
                               headers={"n": i})
        self.assertEqual(lt.queue_depth(url, "task_queue"), 10)
        msgs = lt.drain_queue(url, "task_queue")
        self.assertEqual(len(msgs), 10)
        action, payload = lt.decode_lithops(msgs[0].body)
        self.assertEqual(action, "send_task")
        self.assertEqual(payload["call_ids"], ["00000", "00001"])
        self.assertEqual(sorted(m.headers["n"] for m in msgs), list(range(10)))
        self.assertEqual(lt.queue_depth(url, "task_queue"), 0)
        self.assertEqual(lt.drain_queue(url, "task_queue.dead"), [])  # absent queue

    def test_restart_keeps_durable_queue(self):
        url = lt.fresh_vhost("rig-restart")
        for _ in range(3):
            lt.publish_raw(url, b"not json")
        lt.restart_broker()
        self.assertEqual(lt.queue_depth(url, "task_queue"), 3)


def listeners(port):
    """Local addresses listening on TCP `port` (ss -ltnH), e.g. {"127.0.0.1"}."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


class UserBroker(unittest.TestCase):
    """deploy/rabbitmq-user-broker.sh, which the rig runs too: plain AMQP stays
    on loopback unless the user opens it (issue 12, item 6)."""
    SCRIPT = str(Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq-user-broker.sh")

    def setUp(self):
        self.dir = Path(lt.rig_dir()) / f"user-broker-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.addCleanup(self.broker, "stop")

    def broker(self, cmd, *args):
        return subprocess.run([self.SCRIPT, cmd, "--dir", str(self.dir), *args], capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)

    def settings(self):
        return dict(line.split("=", 1) for line in (self.dir / "settings").read_text().splitlines() if "=" in line)

    def test_plain_amqp_listens_on_loopback_unless_opened(self):
        r = self.broker("start")
        self.assertEqual(r.returncode, 0, r.stderr)
        port = self.settings()["AMQP_PORT"]
        self.assertEqual(listeners(port), {"127.0.0.1"})
        self.assertTrue((self.dir / "amqp_url").read_text().strip().endswith(f"@127.0.0.1:{port}"))
        self.assertIn("listening on 127.0.0.1 only (no TLS)", r.stderr)
        self.assertNotIn((self.dir / "password").read_text().strip(), r.stdout + r.stderr)
        self.assertEqual(self.broker("stop").returncode, 0)

        r = self.broker("start", "--bind", "0.0.0.0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("warning: plain AMQP (no TLS) on 0.0.0.0", r.stderr)
        self.assertEqual(listeners(self.settings()["AMQP_PORT"]), {"0.0.0.0"})
        self.assertNotIn("@127.0.0.1:", (self.dir / "amqp_url").read_text(), "the URL names this host")

    def test_help_says_how_to_open_it(self):
        r = subprocess.run([self.SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0)
        for words in ("127.0.0.1 only", "--tls-cert", "--bind ADDR", "--bind 0.0.0.0"):
            self.assertIn(words, r.stdout)

    def test_stale_pid_files_never_name_another_process_of_ours(self):
        # The broker died long ago; its pid files now hold the number of an
        # unrelated process of the same user. stop must not signal it.
        (self.dir / "run").mkdir(parents=True, mode=0o700)
        other = subprocess.Popen(["sleep", "300"])
        self.addCleanup(other.kill)
        for name in ("server", "beam", "epmd"):
            (self.dir / "run" / f"{name}.pid").write_text(f"{other.pid}\n")
        r = self.broker("stop")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIsNone(other.poll(), "stop signalled a process that is not the broker")
        self.assertFalse((self.dir / "run" / "server.pid").exists())

    def test_the_rig_broker_is_this_script_on_loopback(self):
        env = lt.ensure_broker()
        settings = Path(env["RIG_RABBITMQ_DIR"]) / "settings"
        self.assertTrue(settings.exists(), "the rig's broker directory has the user broker's layout")
        self.assertEqual(listeners(env["RIG_AMQP_PORT"]), {"127.0.0.1"})


@unittest.skipIf(os.environ.get("LHPC_SKIP_SLURM") == "1", "LHPC_SKIP_SLURM=1")
class Cluster(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_cluster(3)
        cls.env = lt.slurm_env()

    @classmethod
    def tearDownClass(cls):
        if TEARDOWN:
            lt._rig("slurm-cluster.sh", "down")

    def run_(self, *cmd):
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL).stdout

    def node_has(self, node, path):
        # Look into the node's mount namespace through its slurmd.
        pid = self.env[f"RIG_SLURMD_PID_{node}"]
        return subprocess.run(["nsenter", "-t", pid, "-m", "test", "-e", path]).returncode == 0

    def test_hostnames(self):
        self.assertEqual(sorted(self.run_("srun", "-N3", "hostname").split()), ["n1", "n2", "n3"])

    def test_private_tmp(self):
        path = f"/tmp/lhpc-rig-{secrets.token_hex(4)}"
        self.run_("srun", "-N1", "-w", "n2", "sh", "-c", f"echo hi > {path}")
        try:
            self.assertTrue(self.node_has("n2", path), "file missing in n2's /tmp")
            self.assertFalse(self.node_has("n1", path), "n2's /tmp file visible on n1")
            self.assertFalse(os.path.exists(path), "n2's /tmp file visible on the host")
            self.assertEqual(self.run_("srun", "-N1", "-w", "n1", "sh", "-c",
                                       f"test -e {path} && echo yes || echo no").strip(), "no")
        finally:
            self.run_("srun", "-N1", "-w", "n2", "rm", "-f", path)

    @unittest.skipUnless(shutil.which("mpicc"), "no mpicc")
    def test_mpi_over_pmix(self):
        # Binaries must live outside /tmp: every node has its own.
        work = Path(self.env["RIG_SLURM_DIR"]) / "test-rig-mpi"
        work.mkdir(exist_ok=True)
        (work / "hello.c").write_text(
            '#include <mpi.h>\n#include <stdio.h>\n#include <unistd.h>\n'
            'int main(int c, char **v) { MPI_Init(&c, &v); int r, s = 0, one = 1; char h[64];\n'
            ' gethostname(h, sizeof h); MPI_Comm_rank(MPI_COMM_WORLD, &r);\n'
            ' MPI_Allreduce(&one, &s, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);\n'
            ' printf("%s %d\\n", h, s); MPI_Finalize(); return 0; }\n')
        subprocess.run(["mpicc", "-o", str(work / "hello"), str(work / "hello.c")], check=True)
        out = self.run_("srun", "-N3", "-n3", "--mpi=pmix", str(work / "hello")).split("\n")
        self.assertEqual(sorted(l for l in out if l), ["n1 3", "n2 3", "n3 3"])


if __name__ == "__main__":
    lt.main()

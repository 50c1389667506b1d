#!/usr/bin/env python3
"""`lithops-hpc stage` on the rig's real 3-node Slurm cluster (each node its
own hostname and its own /tmp): sbcast and the MPI broadcast between real
"nodes", launched the way users do (srun --mpi=pmix, one rank per node).

Run: meson test -C build integration/stage-slurm
 or  LHPC_BIN=build/lithops-hpc LHPC_BUILD_ROOT=build LHPC_RIG_DIR=build/rig \
     /usr/bin/python3 tests/integration/test_stage_slurm.py
LHPC_SKIP_SLURM=1 skips it. Images live under the rig directory (nodes see
it; their /tmp is private), copies in each node's /tmp, read through nsenter.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lhpc_test as lt  # noqa: E402

BIN = str(Path(os.environ.get("LHPC_BIN", "build/lithops-hpc")).resolve())
BUILD = Path(os.environ.get("LHPC_BUILD_ROOT", Path(BIN).parent)).resolve()
MAKE_SIF = str(BUILD / "tests" / "tools" / "make-sif")
NODES = ["n1", "n2", "n3"]
MiB = 1 << 20


@unittest.skipIf(os.environ.get("LHPC_SKIP_SLURM") == "1", "LHPC_SKIP_SLURM=1")
class StageOnSlurm(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_cluster(3)
        cls.env = lt.slurm_env()
        cls.env = {k: v for k, v in cls.env.items() if not k.startswith("LITHOPS_HPC_")}
        cls.work = Path(cls.env["RIG_SLURM_DIR"]) / f"test-stage-{os.getpid()}"
        cls.work.mkdir(parents=True)
        cls.env["LITHOPS_HPC_STATE_DIR"] = str(cls.work / "state")
        # Every rig node is 127.0.0.1: keep Open MPI off the machine's other interfaces.
        cls.env.update(OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work, ignore_errors=True)

    def setUp(self):
        # One image name per test: an earlier test's copies on the nodes
        # would otherwise be found (and hard-linked) by a later job.
        self.src = self.work / (self.id().rsplit(".", 1)[-1] + ".sif")
        subprocess.run([MAKE_SIF, str(self.src), str(9 * MiB + 3)], check=True)
        self.addCleanup(self.remove_copies)

    def remove_copies(self):
        for node in NODES:
            self.on_node(node, "sh", "-c", f"rm -f /tmp/lithops-hpc-{os.geteuid()}-*/{self.src.name}* "
                         f"/tmp/lithops-hpc-{os.geteuid()}-*/.{self.src.name}.part-*")

    def on_node(self, node, *cmd):
        pid = self.env[f"RIG_SLURMD_PID_{node}"]
        return subprocess.run(["nsenter", "-t", pid, "-m", *cmd], capture_output=True, text=True, timeout=30)

    # The rig's Open MPI sometimes dies in MPI_Init before any of our code
    # runs (~1 step in 10, a plain MPI hello too): btl/tcp calls a null
    # function pointer; Open MPI's handler then prints only the libc frame.
    # Such a step is run again (up to twice); a crash with a lithops-hpc frame is not.
    STEP = r"""
step() {  # step N srun-args...: runs one srun, retrying the rig's MPI_Init crash
    n=$1; shift
    for try in 1 2 3; do
        srun -K1 "$@" >"$W/$n.out" 2>"$W/$n.err"; rc=$?
        if [ $rc -ne 0 ] && grep -q 'Failing at address: (nil)' "$W/$n.err" \
           && ! grep -q 'lithops-hpc(' "$W/$n.err" && [ $try != 3 ]; then
            cp "$W/$n.err" "$W/$n.retried"; continue
        fi
        echo $rc >"$W/$n.rc"; return 0
    done
}
"""

    def job(self, *steps, per_node=1, timeout=120):
        """One allocation of all three nodes running `steps` (srun argument strings) in order, so they
        share a job id. Returns [(rc, stdout, stderr)] per step."""
        name = f"lhpc-stage-test-{os.getpid()}"
        w = self.work / self.id().rsplit(".", 1)[-1]
        w.mkdir()
        script = f"W={w}\n" + self.STEP + "".join(f"step {i} {st}\n" for i, st in enumerate(steps))
        # A time limit and a name: a hung run must not hold the nodes for later tests.
        argv = ["salloc", "-N3", f"--ntasks-per-node={per_node}", "--time=3", f"--job-name={name}", "--quiet",
                "sh", "-c", script]
        try:
            subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", f"--name={name}"], env=self.env)
            raise
        out = []
        for i in range(len(steps)):
            if (w / f"{i}.retried").exists():
                print(f"\n[rig] step {i} retried after Open MPI crashed in MPI_Init", file=sys.stderr)
            out.append((int((w / f"{i}.rc").read_text()), (w / f"{i}.out").read_text(),
                        (w / f"{i}.err").read_text()))
        return out

    def stage_cmd(self, *args, per_node=1, nodes=3):
        return (f"-N{nodes} -n{nodes * per_node} --ntasks-per-node={per_node} --mpi=pmix {BIN} stage --json "
                f"--sif {self.src} " + " ".join(args))

    def assert_on_every_node(self, result):
        self.assertEqual(sorted(result["paths"]), NODES)
        for node, path in result["paths"].items():
            self.assertTrue(path.startswith("/tmp/lithops-hpc-"), path)
            same = self.on_node(node, "cmp", str(self.src), path)
            self.assertEqual(same.returncode, 0, f"{node}:{path}: {same.stdout}{same.stderr}")
            mode = self.on_node(node, "stat", "-c", "%a", os.path.dirname(path)).stdout.strip()
            self.assertEqual(mode, "700")
            partials = self.on_node(node, "sh", "-c", f"ls -a {os.path.dirname(path)} | grep -c part- || true")
            self.assertEqual(partials.stdout.strip(), "0")

    def test_sbcast_stages_verifies_and_then_skips(self):
        (rc, out, err), (rc2, out2, err2) = self.job(self.stage_cmd("--transfer", "sbcast"),
                                                     self.stage_cmd("--transfer", "sbcast"))
        self.assertEqual(rc, 0, err)
        self.assertEqual(rc2, 0, err2)
        first, second = json.loads(out), json.loads(out2)
        self.assertEqual(first["transfer"], "sbcast")
        self.assertEqual(first["nodes"], 3)
        self.assertEqual(first["nodes_copied"], 3)
        self.assertFalse(first["skipped"])
        self.assert_on_every_node(first)
        self.assertTrue(second["skipped"])
        self.assertEqual(second["xxh3_128"], first["xxh3_128"])
        self.assertIn("running sbcast --force", err)

    def test_sbcast_compress(self):
        [(rc, out, err)] = self.job(self.stage_cmd("--transfer", "sbcast", "--compress"))
        self.assertEqual(rc, 0, err)
        self.assertIn("running sbcast --compress --force", err)
        self.assert_on_every_node(json.loads(out))

    def test_sbcast_needs_a_rank_on_every_allocated_node(self):
        [(rc, _, err)] = self.job(self.stage_cmd("--transfer", "sbcast", nodes=2))
        self.assertEqual(rc, 2, err)
        self.assertIn("ranks run on 2 of them", err)

    def test_sbcast_refuses_a_per_node_sif_path(self):
        [(rc, _, err)] = self.job(self.stage_cmd("--transfer", "sbcast", "--sif-path", "/tmp/%n"))
        self.assertEqual(rc, 2, err)
        self.assertIn("sif_path differs between nodes", err)

    def test_mpi_broadcast_between_real_nodes_with_two_ranks_each(self):
        [(rc, out, err)] = self.job(self.stage_cmd("--chunk-mib", "2", per_node=2), per_node=2)
        self.assertEqual(rc, 0, err)
        result = json.loads(out)
        self.assertEqual(result["nodes"], 3)
        self.assertEqual(result["nodes_copied"], 3)
        self.assert_on_every_node(result)

    def test_a_rank_lost_mid_transfer_ends_the_job_and_leaves_no_partial_copy(self):
        # The sbatch template runs srun with --kill-on-bad-exit=0: the other ranks live on when rank 1
        # dies after its first chunk, and would wait for it forever.
        cfg = self.work / "stall.toml"
        cfg.write_text("[deploy]\nstart_timeout = 5\n")
        env = f"--export=ALL,LITHOPS_HPC_CONFIG={cfg},LITHOPS_HPC_TEST_DIE_IN_STAGE=1,LITHOPS_HPC_STAGE_THROTTLE_MS=200"
        t0 = time.monotonic()
        [(rc, _, err)] = self.job(f"-K0 {env} " + self.stage_cmd("--chunk-mib", "1"), timeout=90)
        self.assertLess(time.monotonic() - t0, 60, err)
        self.assertNotEqual(rc, 0, err)
        self.assertIn("a rank died or hangs", err)
        self.assertIn("waited 5 s for", err)
        for node in ("n1", "n3"):  # the survivors; n2's own leftover goes with the next stage there
            left = self.on_node(node, "sh", "-c", f"ls -a /tmp/lithops-hpc-{os.geteuid()}-*/ 2>/dev/null | grep part- || true")
            self.assertEqual(left.stdout.strip(), "", f"{node}: {left.stdout}")


if __name__ == "__main__":
    unittest.main(verbosity=2)

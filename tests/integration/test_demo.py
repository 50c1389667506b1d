"""README's main command, `deploy/local-demo.sh`, end to end as a user runs it:
its own broker from deploy/rabbitmq-user-broker.sh (not the rig's), two MPI
ranks, Lithops-format tasks, ping, status, stop; then the serverless loop:
`up --local`, tasks published with no worker, the deployment the controller
starts serves them and idles out, `down`. It checks what the demo prints,
that no password shows, and that nothing it started is left running."""
import os
import subprocess
import unittest

SOURCE_ROOT = os.environ["LHPC_SOURCE_ROOT"]
BUILD_ROOT = os.environ["LHPC_BUILD_ROOT"]
DEMO = os.path.join(BUILD_ROOT, "demo")


def processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


class LocalDemo(unittest.TestCase):
    def test_the_readme_main_command_runs_tasks_and_leaves_nothing_running(self):
        env = {k: v for k, v in os.environ.items()
               if k not in ("AMQP_URL", "LITHOPS_HPC_CONFIG", "LITHOPS_HPC_STATE_DIR", "SLURM_JOB_ID")}
        env["LHPC_BUILD_DIR"] = BUILD_ROOT
        r = subprocess.run(["bash", os.path.join(SOURCE_ROOT, "deploy", "local-demo.sh")], env=env,
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out[-6000:])
        self.assertIn("100 of 100 calls ran", out)
        self.assertIn("20/20 pings answered by 2 ranks", out)
        self.assertRegex(out, r"running, 2/2 ranks ready")
        self.assertRegex(out, r"(?m)^rank 1: .*Tasks received")
        self.assertIn("stopped, 2/2 ranks stopped", out)
        with open(os.path.join(DEMO, "broker", "password")) as f:
            password = f.read().strip()
        self.assertTrue(password)
        self.assertNotIn(password, out)
        with open(os.path.join(DEMO, "deploy.log")) as f:
            self.assertNotIn(password, f.read())
        # The serverless loop.
        self.assertRegex(out, r"the controller started deployment local-\d+-\d+-\d+ \(mpirun on this machine\)")
        self.assertIn("100 of 100 calls ran from zero", out)
        self.assertIn("scaled back to zero after", out)
        self.assertIn("nothing of lithops-hpc up is running now", out)
        import yaml
        with open(os.path.join(DEMO, "lithops-config")) as f:
            written = yaml.safe_load(f)
        self.assertNotIn(written["redis"]["password"], out)
        self.assertNotIn(written["rabbitmq"]["amqp_url"].split("@")[0].split(":")[-1], out)
        self.assertEqual(processes_mentioning(DEMO + "/"), [], "demo processes left running")


if __name__ == "__main__":
    unittest.main(verbosity=2)

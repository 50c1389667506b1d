"""The user's Lithops config seen from the command line: `config check` shows
each value with where it came from and the client-side warnings; `runtime
build`, `worker` and `deploy` use <sif_path>/<runtime>.sif when no image is
given; a FIFO or a directory as --config is refused at once.

Runs the real binary ($LHPC_BIN); the engine is the stand-in (tests/stand-in,
first on PATH). No broker: `config check` points at a closed loopback port
and must exit 5 after printing everything. Stdlib only.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import unittest
from pathlib import Path

SOURCE_ROOT = Path(os.environ.get("LHPC_SOURCE_ROOT") or Path(__file__).resolve().parents[2])
LHPC_BIN = os.environ.get("LHPC_BIN") or str(SOURCE_ROOT / "build" / "lithops-hpc")
STANDIN = SOURCE_ROOT / "tests" / "stand-in"

EXIT_USAGE, EXIT_CONFIG, EXIT_IMAGE, EXIT_BROKER = 2, 3, 4, 5
SECRET = "Zq9xK-secret"


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConfigCli(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="lhpc-config-cli-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.sifs = self.tmp / "sifs"
        self.sifs.mkdir()
        self.yaml = self.tmp / "lithops.yaml"
        self.yaml.write_text(
            "lithops:\n"
            "  backend: singularity\n"
            "  storage: localhost\n"
            "singularity:\n"
            "  sif_path: %s\n"
            "  runtime: my-rt\n"
            "  worker_processes: 4\n"
            "rabbitmq:\n"
            "  amqp_url: amqp://alice:%s@127.0.0.1:%d/v\n" % (self.sifs, SECRET, closed_port()))
        self.yaml.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("STANDIN_", "SLURM_", "AMQP_URL", "LITHOPS_"))}
        self.env.update({
            "PATH": "%s:%s" % (STANDIN, os.environ.get("PATH", "/usr/bin:/bin")),
            "STANDIN_LOG": str(self.tmp / "invocations.jsonl"),
            "STANDIN_STATE": str(self.tmp / "standin-state"),
            "HOME": str(self.tmp),
            "XDG_CONFIG_HOME": str(self.tmp / "xdg"),
            "LITHOPS_CONFIG_FILE": str(self.yaml),
            "LITHOPS_HPC_STATE_DIR": str(self.tmp / "state"),
        })

    def lhpc(self, *args, timeout=60):
        return subprocess.run([LHPC_BIN, *map(str, args)], env=self.env, text=True, cwd=self.tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def assert_exit(self, r, code, *fragments):
        msg = "exit %d, stdout:\n%s\nstderr:\n%s" % (r.returncode, r.stdout, r.stderr)
        self.assertEqual(r.returncode, code, msg)
        for f in fragments:
            self.assertIn(f, r.stdout + r.stderr, msg)
        self.assertNotIn(SECRET, r.stdout + r.stderr, "the password is never shown")

    def builds(self):
        log = self.tmp / "invocations.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(l) for l in lines if l.strip() and json.loads(l)["argv"][:1] == ["build"]]

    def test_config_check_shows_each_value_with_its_origin_and_the_client_warnings(self):
        toml = self.tmp / "hpc.toml"
        toml.write_text("[singularity]\nengine = \"apptainer\"\n")
        r = self.lhpc("--config", toml, "config", "check")
        self.assert_exit(r, EXIT_BROKER,
                         "runtime = 'my-rt'  # from %s:6" % self.yaml,
                         "sif_path = '%s'  # from %s:5" % (self.sifs, self.yaml),
                         "engine = 'apptainer'  # from %s:2" % toml,
                         "keys at the default (config check --all lists every key)",
                         "amqp://alice:***@127.0.0.1:",
                         "lithops.storage is 'localhost' with backend singularity: Lithops refuses it",
                         "lithops.log_level is not set",
                         "singularity.worker_processes = 4 is, for the Lithops client, calls per message",
                         "runtime: my-rt, image %s/my-rt.sif" % self.sifs,
                         "image: %s/my-rt.sif (not found on this machine)" % self.sifs)
        self.assertNotIn("# from default", r.stdout)
        self.assertNotIn("[health]", r.stdout)  # nothing set there: no empty section
        r = self.lhpc("--config", toml, "config", "check", "--all")
        self.assert_exit(r, EXIT_BROKER, "transfer = 'mpi'  # from default", "[health]")
        self.assertNotIn("at the default (config check --all", r.stdout)
        env_url = "amqp://bob:%s@127.0.0.1:%d/other" % (SECRET, closed_port())
        self.env["AMQP_URL"] = env_url
        r = self.lhpc("--config", toml, "config", "check")
        self.assert_exit(r, EXIT_BROKER, "# from environment (AMQP_URL)", "differs from the workers'")

    def test_runtime_build_without_a_name_builds_the_configured_runtime(self):
        r = self.lhpc("runtime", "build")
        self.assert_exit(r, 0, "built %s/my-rt.sif" % self.sifs)
        [build] = self.builds()
        self.assertEqual(build["argv"][-2], str(self.sifs / "my-rt.sif"))
        self.assertNotIn("to use it", r.stdout)

    def test_runtime_build_with_another_name_says_which_line_to_write(self):
        r = self.lhpc("runtime", "build", "other-rt")
        self.assert_exit(r, 0, "to use it, put `runtime: other-rt` under `singularity:` in %s" % self.yaml)

    def test_runtime_build_without_a_name_or_a_runtime_says_where_to_set_it(self):
        self.yaml.write_text("singularity:\n  sif_path: %s\n" % self.sifs)
        r = self.lhpc("runtime", "build")
        self.assert_exit(r, EXIT_USAGE, "singularity.runtime is not set", "runtime: NAME")
        self.assertEqual(self.builds(), [])

    def test_worker_and_deploy_run_sif_path_runtime_sif_when_no_image_is_given(self):
        r = self.lhpc("worker")
        self.assert_exit(r, EXIT_IMAGE, "no image at %s/my-rt.sif" % self.sifs)
        self.yaml.write_text("singularity:\n  sif_path: %s\n" % self.sifs)
        r = self.lhpc("deploy")
        self.assert_exit(r, EXIT_CONFIG, "no image given and singularity.runtime is not set", "runtime: NAME")

    def test_malformed_lithops_yaml_is_an_error_at_its_position(self):
        self.yaml.write_text("singularity:\n  runtime: [a\n")
        r = self.lhpc("config", "check")
        self.assert_exit(r, EXIT_CONFIG, str(self.yaml) + ":")

    def test_a_fifo_or_a_directory_as_config_is_refused_at_once(self):
        fifo = self.tmp / "fifo"
        os.mkfifo(fifo)
        r = self.lhpc("--config", fifo, "config", "check", timeout=20)
        self.assert_exit(r, EXIT_CONFIG, "not a regular file")
        r = self.lhpc("--config", self.tmp, "config", "check", timeout=20)
        self.assert_exit(r, EXIT_CONFIG, "is a directory")

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
    def test_another_users_lithops_config_in_the_working_directory_is_refused(self):
        # Issue 20 finding 1: a job started in a shared, sticky directory where nobody left a config
        # naming their broker.
        self.tmp.chmod(0o755)
        shared = self.tmp / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        theirs = shared / ".lithops_config"
        attacker = "amqp://u:p@127.0.0.1:%d/theirs" % closed_port()
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c",
                        "printf 'rabbitmq:\\n  amqp_url: %s\\n' > %s" % (attacker, theirs)], check=True, timeout=30)
        del self.env["LITHOPS_CONFIG_FILE"]
        r = subprocess.run([LHPC_BIN, "config", "check"], env=self.env, text=True, cwd=shared,
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        self.assert_exit(r, EXIT_CONFIG, "Lithops config .lithops_config not read: %s belongs to nobody" % theirs,
                         "hint: have its owner (or root) remove it")
        self.assertNotIn("theirs", r.stdout)


if __name__ == "__main__":
    unittest.main()

"""The one error path, as a user meets it: every refusal is one `error` line
(what and where) and a `hint` line (what to do), reported by main, with the
exit status lithops-hpc(1) documents; a bad value of an enum reads the same
from a flag and from the configuration file."""
import os
import subprocess
import tempfile
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


if __name__ == "__main__":
    unittest.main(verbosity=2)

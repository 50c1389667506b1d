"""`lithops-hpc runtime build`: the engine command line, the default definition,
and every refusal that must happen before any engine runs.

Runs the real binary ($LHPC_BIN) against the singularity/apptainer stand-in
(tests/stand-in, first on PATH), which logs each invocation as a JSON line to
$STANDIN_LOG. Stdlib only; run by /usr/bin/python3.

Exit codes checked (man lithops-hpc, EXIT STATUS):
  0 built; 1 image exists without --force, image directory missing or not
  writable; 2 bad NAME or -f DEF missing; 3 host engine (configuration);
  6 engine not found or the build failed.
"""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

SOURCE_ROOT = Path(os.environ.get("LHPC_SOURCE_ROOT") or Path(__file__).resolve().parents[2])
LHPC_BIN = os.environ.get("LHPC_BIN") or str(SOURCE_ROOT / "build" / "lithops-hpc")
STANDIN = SOURCE_ROOT / "tests" / "stand-in"
DEFAULT_DEF = SOURCE_ROOT / "runtime-defs" / "lithops-default.def"

EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG, EXIT_ENGINE = 1, 2, 3, 6

DEF_TEXT = """Bootstrap: docker
From: python:3.11-slim-bookworm

%files
    payload.txt /opt/payload.txt

%runscript
    cat /opt/payload.txt
"""


class RuntimeBuild(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="lhpc-runtime-build-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.sifs = self.tmp / "sifs"
        self.sifs.mkdir()
        self.log = self.tmp / "invocations.jsonl"
        self.config = self.tmp / "config.toml"
        self.write_config("")
        # A definition whose %files source is relative to its own directory:
        # it only builds when the engine runs there.
        self.defdir = self.tmp / "defs"
        self.defdir.mkdir()
        (self.defdir / "payload.txt").write_text("hello\n")
        self.deffile = self.defdir / "my.def"
        self.deffile.write_text(DEF_TEXT)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("STANDIN_", "SLURM_", "AMQP_URL", "LITHOPS_HPC_"))}
        self.env.update({
            "PATH": "%s:%s" % (STANDIN, os.environ.get("PATH", "/usr/bin:/bin")),
            "STANDIN_LOG": str(self.log),
            "STANDIN_STATE": str(self.tmp / "standin-state"),
            "LITHOPS_HPC_CONFIG": str(self.config),
            "XDG_CONFIG_HOME": str(self.tmp / "xdg"),
        })

    # -- helpers

    def write_config(self, singularity_section):
        self.config.write_text("[singularity]\n" + singularity_section)

    def lhpc(self, *args, env=None):
        return subprocess.run([LHPC_BIN, *map(str, args)], env=env or self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=120)

    def invocations(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def builds(self):
        return [i for i in self.invocations() if i["argv"][:1] == ["build"]]

    def assert_exit(self, r, code, *fragments):
        msg = "exit %d, stdout:\n%s\nstderr:\n%s" % (r.returncode, r.stdout, r.stderr)
        self.assertEqual(r.returncode, code, msg)
        for f in fragments:
            self.assertIn(f, r.stderr, msg)

    def assert_nothing_ran(self):
        self.assertEqual(self.invocations(), [], "the engine must not run")

    # -- command line

    def test_exact_command_line_flags_before_positional_arguments(self):
        out = self.sifs / "rt.sif"
        # Our own flags in any order; the engine's always before OUT and DEF.
        r = self.lhpc("runtime", "build", "--force", "rt", "--fakeroot", "-f", self.deffile,
                      "--sif-path", self.sifs)
        self.assert_exit(r, 0)
        [build] = self.builds()
        self.assertEqual(build["prog"], "singularity")
        self.assertEqual(build["argv"], ["build", "--fakeroot", "--force", str(out), str(self.deffile)])
        self.assertEqual(build["cwd"], str(self.defdir), "%files paths resolve from the def's directory")
        self.assertTrue(out.exists())
        self.assertIn(str(out), r.stdout)
        self.assertIn("lithops-hpc sif inspect", r.stdout)
        self.assertRegex(r.stdout, r"\(\d+(\.\d)? (B|KiB|MiB|GiB)\)")

    def test_without_flags_the_engine_gets_none(self):
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs)
        self.assert_exit(r, 0)
        [build] = self.builds()
        self.assertEqual(build["argv"], ["build", str(self.sifs / "rt.sif"), str(self.deffile)])

    def test_relative_paths_are_made_absolute_before_changing_directory(self):
        r = subprocess.run([LHPC_BIN, "runtime", "build", "rt", "-f", "defs/my.def", "--sif-path", "sifs"],
                           cwd=self.tmp, env=self.env, text=True, capture_output=True, timeout=120)
        self.assert_exit(r, 0)
        [build] = self.builds()
        self.assertEqual(build["argv"][-2:], [str(self.sifs / "rt.sif"), str(self.deffile)])

    def test_default_definition_when_no_file_given(self):
        r = self.lhpc("runtime", "build", "lithops-default", "--sif-path", self.sifs)
        self.assert_exit(r, 0)
        [build] = self.builds()
        self.assertEqual(os.path.realpath(build["argv"][-1]), os.path.realpath(DEFAULT_DEF))
        self.assertEqual(os.path.realpath(build["cwd"]), os.path.realpath(DEFAULT_DEF.parent))
        self.assertTrue((self.sifs / "lithops-default.sif").exists())

    def test_configured_engine_fakeroot_and_sif_path(self):
        user = pwd.getpwuid(os.geteuid()).pw_name
        placeholder_dir = self.tmp / ("sifs-" + user)
        placeholder_dir.mkdir()
        self.write_config('engine = "apptainer"\nfakeroot = true\nsif_path = "%s"\n'
                          % (str(self.tmp) + "/sifs-%u"))
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile)
        self.assert_exit(r, 0)
        r = self.lhpc("runtime", "build", "rt2", "-f", self.deffile, "--no-fakeroot")
        self.assert_exit(r, 0)
        first, second = self.builds()
        self.assertEqual(first["prog"], "apptainer")
        self.assertEqual(first["argv"], ["build", "--fakeroot", str(placeholder_dir / "rt.sif"), str(self.deffile)])
        self.assertEqual(second["argv"], ["build", str(placeholder_dir / "rt2.sif"), str(self.deffile)])

    # -- refusals before anything runs

    def test_existing_image_is_refused_without_force_and_left_alone(self):
        out = self.sifs / "rt.sif"
        out.write_bytes(b"the old image")
        before = out.stat()
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs)
        self.assert_exit(r, EXIT_FAILURE, "already exists", "--force")
        self.assertEqual(out.read_bytes(), b"the old image")
        self.assertEqual(out.stat().st_mtime_ns, before.st_mtime_ns)
        self.assert_nothing_ran()

    def test_force_replaces_an_existing_image(self):
        out = self.sifs / "rt.sif"
        out.write_bytes(b"the old image")
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs, "--force")
        self.assert_exit(r, 0)
        self.assertEqual(out.read_bytes()[32:41], b"SIF_MAGIC")

    def test_missing_definition_file(self):
        r = self.lhpc("runtime", "build", "rt", "-f", self.tmp / "nope.def", "--sif-path", self.sifs)
        self.assert_exit(r, EXIT_USAGE, "nope.def does not exist")
        self.assert_nothing_ran()

    def test_missing_engine(self):
        env = dict(self.env, PATH=str(self.tmp / "empty-bin"))
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs, env=env)
        self.assert_exit(r, EXIT_ENGINE, "singularity not found in PATH", "module load singularity")
        self.write_config('engine = "apptainer"\n')
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs, env=env)
        self.assert_exit(r, EXIT_ENGINE, "apptainer not found in PATH")
        self.assertFalse((self.sifs / "rt.sif").exists())

    def test_missing_image_directory(self):
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.tmp / "no-such-dir")
        self.assert_exit(r, EXIT_FAILURE, "no-such-dir", "does not exist", "mkdir -p")
        self.assert_nothing_ran()

    def test_image_directory_that_is_a_file(self):
        (self.tmp / "a-file").write_text("")
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.tmp / "a-file")
        self.assert_exit(r, EXIT_FAILURE, "is not a directory")
        self.assert_nothing_ran()

    def test_unwritable_image_directory(self):
        locked = self.tmp / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        self.addCleanup(locked.chmod, 0o700)
        cmd = [LHPC_BIN, "runtime", "build", "rt", "-f", str(self.deffile), "--sif-path", str(locked)]
        if os.geteuid() == 0:
            # root writes anywhere: run as nobody, who can read the inputs only.
            if not shutil.which("setpriv"):
                self.skipTest("running as root without setpriv to drop to an unprivileged user")
            for p in (self.tmp, self.defdir):
                p.chmod(0o755)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        r = subprocess.run(cmd, env=self.env, text=True, capture_output=True, stdin=subprocess.DEVNULL,
                           timeout=120)
        self.assert_exit(r, EXIT_FAILURE, "cannot write to image directory", "Permission denied")
        self.assert_nothing_ran()

    def test_host_engine_cannot_build(self):
        self.write_config('engine = "host"\n')
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs)
        self.assert_exit(r, EXIT_CONFIG, "host engine")
        self.assert_nothing_ran()

    def test_unsafe_names_are_refused(self):
        for name in ("../evil", "a/b", "-rf", ".hidden", "rt.sif", "sp ace"):
            with self.subTest(name=name):
                r = self.lhpc("runtime", "build", "--sif-path", self.sifs, "-f", self.deffile, "--", name)
                self.assert_exit(r, EXIT_USAGE)
        self.assert_nothing_ran()

    # -- engine failures

    def test_failed_build_reports_the_engine_status_and_keeps_an_untouched_image(self):
        out = self.sifs / "rt.sif"
        out.write_bytes(b"the old image")
        env = dict(self.env, STANDIN_BUILD_FAIL="1")
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs, "--force", env=env)
        self.assert_exit(r, EXIT_ENGINE, "singularity build exited with code 255")
        self.assertIn("STANDIN_BUILD_FAIL", r.stderr, "the engine's own output is streamed")
        self.assertEqual(out.read_bytes(), b"the old image", "the engine never touched it")

    def test_failed_build_removes_a_partial_image(self):
        # An engine that dies half-way through writing its output.
        fake = self.tmp / "fake-bin"
        fake.mkdir()
        script = fake / "singularity"
        script.write_text('#!/bin/sh\nfor a; do out="$prev"; prev="$a"; done\n'
                          'printf "SIF_MAGIC half" > "$out"\necho "FATAL: disk full" >&2\nexit 3\n')
        script.chmod(0o755)
        env = dict(self.env, PATH="%s:%s" % (fake, os.environ.get("PATH", "/usr/bin:/bin")))
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs, env=env)
        self.assert_exit(r, EXIT_ENGINE, "exited with code 3", "removed the partial image")
        self.assertFalse((self.sifs / "rt.sif").exists())

    # -- the result

    def test_built_image_passes_sif_inspect(self):
        probe = self.lhpc("sif", "inspect", "--help")
        if probe.returncode != 0:
            self.skipTest("`lithops-hpc sif inspect` is not wired into this build yet")
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs)
        self.assert_exit(r, 0)
        inspect = self.lhpc("sif", "inspect", self.sifs / "rt.sif")
        self.assertEqual(inspect.returncode, 0, inspect.stderr)


    def test_gpu_flags_write_labels_the_engine_keeps_and_config_check_takes(self):
        r = self.lhpc("runtime", "build", "rt", "-f", self.deffile, "--sif-path", self.sifs,
                      "--gpus-per-slot", "2", "--gpu-vendor", "amd")
        self.assert_exit(r, 0)
        [build] = self.builds()
        # Built from a labelled copy beside the image (gone now), in the def's directory.
        copy = build["argv"][-1]
        self.assertEqual(os.path.dirname(copy), str(self.sifs))
        self.assertEqual(build["cwd"], str(self.defdir))
        self.assertEqual(sorted(os.listdir(self.sifs)), ["rt.sif"])
        labels = json.loads(subprocess.run([str(STANDIN / "singularity"), "inspect", "--labels", "--json",
                                            str(self.sifs / "rt.sif")], env=self.env, capture_output=True,
                                           text=True, check=True).stdout)["data"]["attributes"]["labels"]
        self.assertEqual(labels["org.lithops-hpc.gpus-per-slot"], "2")
        self.assertEqual(labels["org.lithops-hpc.gpu-vendor"], "amd")
        self.assertEqual((self.deffile).read_text(), DEF_TEXT, "the user's definition is untouched")
        # No key sets them: config check shows the image's labels as their origin.
        self.write_config('sif_path = "%s"\nruntime = "rt"\n' % self.sifs)
        check = self.lhpc("config", "check")
        self.assertIn("gpus_per_slot = 2  # from image label %s (org.lithops-hpc.gpus-per-slot)"
                      % (self.sifs / "rt.sif"), check.stdout)
        self.assertIn("gpu_vendor = 'amd'  # from image label", check.stdout)
        r = self.lhpc("runtime", "build", "rt2", "-f", self.deffile, "--sif-path", self.sifs, "--gpu-vendor", "intel")
        self.assertEqual(r.returncode, 2, r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

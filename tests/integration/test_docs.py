"""The man pages say what --help says: every command and flag of every
subcommand's --help is in lithops-hpc(1), every config key that `config
check` prints (the reader's own key table) is in lithops-hpc.toml(5) with
the default it prints, and both pages render."""
import os
import re
import subprocess
import unittest

SOURCE_ROOT = os.environ["LHPC_SOURCE_ROOT"]
BUILD_ROOT = os.environ["LHPC_BUILD_ROOT"]
BIN = os.environ["LHPC_BIN"]
COMMANDS = ["up", "down", "runtime build", "stage", "deploy", "autoalloc", "worker", "status", "stop", "logs", "ping", "config check", "sif inspect"]


def help_of(cmd):
    r = subprocess.run([BIN, *cmd.split(), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def page(name):
    with open(os.path.join(SOURCE_ROOT, "man", name + ".scd")) as f:
        return f.read()


class DocsTest(unittest.TestCase):
    def test_every_subcommand_is_in_the_top_level_help_and_the_man_page(self):
        top = help_of("")
        man = page("lithops-hpc.1")
        for cmd in COMMANDS:
            self.assertIn(cmd.split()[0], top)
            self.assertIn(f"## {cmd}", man, f"lithops-hpc(1) has a section for '{cmd}'")

    def test_every_flag_of_every_help_is_in_the_man_page(self):
        man = page("lithops-hpc.1")
        for cmd in [""] + COMMANDS:
            for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+|-[a-zA-Z])\b", help_of(cmd))):
                if flag in ("--help", "-h"):
                    continue
                self.assertIn(f"*{flag}", man, f"'{cmd or 'lithops-hpc'} {flag}' is documented in lithops-hpc(1)")

    def test_every_config_key_is_in_the_config_man_page(self):
        env = dict(os.environ, AMQP_URL="amqp://u:p@127.0.0.1:1/")
        env.pop("LITHOPS_HPC_CONFIG", None)
        out = subprocess.run([BIN, "--config", "/dev/null", "config", "check", "--all"], capture_output=True,
                             text=True, env=env).stdout
        man = page("lithops-hpc.toml.5")
        section = None
        keys = defaults = 0
        for line in out.splitlines():
            m = re.match(r"^\[(\w+)\]$", line)
            if m:
                section = m.group(1)
                self.assertIn(f"# [{section}]", man)
                # The section's text: from its heading to the next heading.
                text = man.split(f"# [{section}]", 1)[1].split("\n# ", 1)[0]
                continue
            m = re.match(r"^(\w+) = (.*?)  # from (.*)$", line)
            if m and section:
                key, value, origin = m.groups()
                keys += 1
                self.assertIn(f"*{key}* =", text, f"{section}.{key} is documented under [{section}]")
                if origin == "default":
                    defaults += 1
                    if len(value) >= 2 and value[0] == value[-1] == "'":
                        value = '"' + value[1:-1] + '"'  # a TOML literal string: the page writes "..."
                    self.assertRegex(text, r"\*%s\* = [^\n]*\(default %s[,;)]" % (key, re.escape(value)),
                                     f"{section}.{key}'s documented default is the one config check prints")
        self.assertGreater(keys, 20)
        self.assertGreater(defaults, 20)

    def test_the_pages_render(self):
        for name in ("lithops-hpc.1", "lithops-hpc.toml.5"):
            r = subprocess.run(["man", "-l", os.path.join(BUILD_ROOT, "man", name)], capture_output=True,
                               text=True, env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="100"))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("NAME", r.stdout)
            self.assertIn("EXIT STATUS" if name.endswith(".1") else "PLACEHOLDERS", r.stdout)

    def test_install_is_the_site_assets_deploy_readme_lists(self):
        r = subprocess.run(["meson", "install", "-C", BUILD_ROOT, "--no-rebuild", "--dry-run", "--destdir",
                            "/nonexistent-destdir"], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        installed = set()
        for m in re.finditer(r"^Installing (\S+) to (\S+)$", r.stdout, re.M):
            src = os.path.relpath(m.group(1), SOURCE_ROOT)
            if not src.startswith("..") and os.path.isfile(m.group(1)):
                installed.add(src)
        deploy = {f for f in installed if f.startswith("deploy/")}
        self.assertEqual(deploy, {"deploy/README.md", "deploy/config.example.toml", "deploy/rabbitmq-user-broker.sh",
                                  "deploy/modulefiles/lithops-hpc.lua", "deploy/modulefiles/lithops-hpc.tcl"})
        self.assertIn("LICENSE", installed)
        readme = open(os.path.join(SOURCE_ROOT, "deploy", "README.md")).read()
        for f in deploy:
            self.assertIn(f"`{os.path.relpath(f, 'deploy')}`", readme, f"{f} is listed in deploy/README.md")
        for dev in ("install-deps.sh", "local-demo.sh"):
            self.assertIn(f"`{dev}` | Not installed", readme)


if __name__ == "__main__":
    unittest.main(verbosity=2)

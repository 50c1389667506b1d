"""`lithops-hpc up` / `down` as a user runs them on a login node: a fresh
non-root user (setpriv to an unused uid) with an empty home and an existing
Lithops config of their own. up starts the broker (deploy/rabbitmq-user-broker.sh)
and a Redis, writes their settings into the Lithops config, and a real client
(pika, python3-redis) connects with exactly what was written; up again leaves
them alone; a broker killed with SIGKILL comes back on the same URL; down
leaves no process and no listening port; with --local, tasks published with
nothing serving bring a deployment (mpirun on this machine) that serves them
and idles out; on the Slurm rig, a user made for the test (useradd) with an
empty home runs up, and a stand-in Lithops client that reads only the config
up wrote runs a map whose calls a Slurm job the controller submitted serves.
Needs root (to become the user)."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

import pika
import redis
import yaml

import lhpc_test

# The stand-in Lithops client: it knows only what `up` wrote into ~/.lithops/config
# (as Lithops finds its config). It puts each call's input into the storage
# and publishes one send_task, as Lithops' map does; the calls (the fake
# handler's `square`) read their input from that storage and write their
# result there; the client reads the results back. Prints the results.
CLIENT = r"""
import base64, json, os, sys, time
import pika, redis, yaml
with open(os.path.expanduser("~/.lithops/config")) as f:
    config = yaml.safe_load(f)
assert config["lithops"]["backend"] == "singularity" and config["lithops"]["storage"] == "redis", config
store = redis.Redis(**config["redis"])
job_key, n = "M000-A000", int(sys.argv[1])
calls = [f"{i:05d}" for i in range(n)]
for i, c in enumerate(calls):
    store.set(f"lithops.jobs/{job_key}/{c}/in", str(i + 1))
payload = {"config": config, "job_key": job_key, "executor_id": "M000", "job_id": "A000", "call_ids": calls,
           "data_byte_ranges": [[0, 0]] * n, "total_calls": n, "worker_processes": 1, "log_level": "INFO",
           "execution_timeout": 60, "runtime_name": "rt", "runtime_memory": None, "lithops_version": "3.7.0",
           "lhpc_test": {"square": True}}
conn = pika.BlockingConnection(pika.URLParameters(config["rabbitmq"]["amqp_url"]))
ch = conn.channel()
ch.queue_declare(queue="task_queue", durable=True)
ch.basic_publish("", "task_queue", json.dumps({"action": "send_task", "payload": base64.b64encode(
    json.dumps(payload).encode()).decode()}), pika.BasicProperties(delivery_mode=2))
conn.close()
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    out = [store.get(f"lithops.jobs/{job_key}/{c}/out") for c in calls]
    if all(v is not None for v in out):
        print(json.dumps([int(v) for v in out]))
        sys.exit(0)
    time.sleep(0.1)
sys.exit("no results in time")
"""

BIN = os.environ["LHPC_BIN"]
BUILD_ROOT = os.environ["LHPC_BUILD_ROOT"]
SOURCE_ROOT = os.environ["LHPC_SOURCE_ROOT"]
UID = 47000 + os.getpid() % 1000


def test_hooks():
    with open(os.path.join(BUILD_ROOT, "lhpc_build_config.h")) as f:
        return "#define LHPC_TEST_HOOKS 1" in f.read()


def processes_of(uid):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append((pid, f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            pass
    return found


def listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


ORIGINAL = """# my own Lithops settings: up must keep this comment
lithops:
    log_level: DEBUG
aws:
    region: eu-west-1
"""


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
class Up(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="lhpc-up-", dir=BUILD_ROOT)
        os.chmod(self.root, 0o755)
        self.home = os.path.join(self.root, "home")
        os.mkdir(self.home, 0o700)
        os.makedirs(os.path.join(self.home, ".lithops"), 0o755)
        self.config = os.path.join(self.home, ".lithops", "config")
        with open(self.config, "w") as f:
            f.write(ORIGINAL)
        os.chmod(self.config, 0o644)
        for d, _, files in os.walk(self.home):
            os.chown(d, UID, UID)
            for name in files:
                os.chown(os.path.join(d, name), UID, UID)
        self.services = os.path.join(self.home, ".lithops-hpc", "services")

    def tearDown(self):
        self.run_as("down", check=False)
        for pid, _ in processes_of(UID):
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def run_as(self, *args, env=None, check=True):
        e = {"HOME": self.home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        e.update(env or {})
        r = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", BIN, *args],
                           env=e, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                           cwd=self.home)
        if check:
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r

    def local_setup(self, drain_timeout, idle_timeout):
        """An image, a records directory and a lithops-hpc config (host engine, 2 slots, fake-lithops) of
        the user's, for up --local: (sif, records, environment for run_as)."""
        sif = os.path.join(self.home, "rt.sif")
        subprocess.run([os.path.join(BUILD_ROOT, "tests", "tools", "make-sif"), sif, "1M"], check=True)
        records = os.path.join(self.home, "records")
        os.mkdir(records)
        conf = os.path.join(self.home, "lithops-hpc.toml")
        with open(conf, "w") as f:
            f.write('[singularity]\nengine = "host"\nworker_processes = 2\npython = "/usr/bin/python3"\n'
                    f'[deploy]\ndrain_timeout = {drain_timeout}\n[health]\ninterval = 1\n'
                    f'[autoalloc]\nidle_timeout = {idle_timeout}\npoll = 3\n')
        for p in (sif, records, conf):
            os.chown(p, UID, UID)
        return sif, records, {"LITHOPS_HPC_CONFIG": conf,
                              "PYTHONPATH": os.path.join(SOURCE_ROOT, "tests", "fake-lithops")}

    def written(self):
        with open(self.config) as f:
            return yaml.safe_load(f)

    def client_works(self, cfg):
        params = pika.URLParameters(cfg["rabbitmq"]["amqp_url"])
        params.socket_timeout = 5
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.queue_declare(queue="task_queue", durable=True)
        ch.basic_publish(exchange="", routing_key="task_queue", body=b"x")
        conn.close()
        r = redis.Redis(host=cfg["redis"]["host"], port=cfg["redis"]["port"], password=cfg["redis"]["password"],
                        socket_timeout=5)
        r.set("lithops-test", b"value")
        self.assertEqual(r.get("lithops-test"), b"value")
        r.close()

    def test_first_day_messages_come_before_anything_starts(self):
        r = self.run_as("up", env={"LITHOPS_HPC_REDIS_SERVER": "/nonexistent/redis-server"}, check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("redis-server", r.stderr)
        self.assertIn("apt install redis-server", r.stderr)
        self.assertIn("--storage", r.stderr)
        if test_hooks():
            r = self.run_as("up", env={"LHPC_TEST_FS_TYPE": "0x6969"}, check=False)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("network file system", r.stderr)
            self.assertIn("--data-dir /var/tmp/lithops-hpc-", r.stderr)
        r = self.run_as("up", "--broker-url", "amqp://u:secret@h:5672/v", check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--broker-url -", r.stderr)
        self.assertEqual(processes_of(UID), [])
        with open(self.config) as f:
            self.assertEqual(f.read(), ORIGINAL)

    def test_a_controller_that_ends_at_start_fails_up_with_its_own_words(self):
        # A time limit not above the renewal margin is refused by the
        # controller once it runs; up said "started" and exited 0 before.
        sif = os.path.join(self.home, "rt.sif")
        with open(sif, "wb"):
            pass
        cfg = os.path.join(self.home, "lithops-hpc.toml")
        with open(cfg, "w") as f:
            f.write('[autoalloc]\ntime_limit = "4:00"\n')
        os.chown(cfg, UID, UID)
        r = self.run_as("up", "--sif", sif, env={"LITHOPS_HPC_CONFIG": cfg}, check=False)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("the autoalloc controller ended at start (exit 2)", r.stderr)
        self.assertIn("is not below --time-limit 4:00", r.stderr)
        self.assertIn("run 'lithops-hpc up' again", r.stderr)

    def test_up_writes_a_config_a_client_uses_survives_a_killed_broker_and_down_leaves_nothing(self):
        sif = os.path.join(self.home, "rt.sif")  # the controller runs without Slurm: it only fails to query it
        with open(sif, "wb"):
            pass
        r = self.run_as("up", "--sif", sif, "--max-nodes", "2")
        out = r.stdout + r.stderr
        self.assertRegex(r.stdout, r"controller +started +pid \d+")
        self.assertIn("Try:", out)
        self.assertIn("lithops.FunctionExecutor()", out)
        cfg = self.written()
        self.assertEqual(cfg["lithops"]["backend"], "singularity")
        self.assertEqual(cfg["lithops"]["storage"], "redis")
        self.assertEqual(cfg["lithops"]["log_level"], "DEBUG")
        self.assertEqual(cfg["aws"], {"region": "eu-west-1"})
        self.assertEqual(cfg["redis"]["host"], "127.0.0.1")
        with open(self.config) as f:
            self.assertIn("# my own Lithops settings: up must keep this comment", f.read())
        self.assertEqual(os.stat(self.config).st_mode & 0o777, 0o600)
        with open(self.config + ".bak") as f:
            self.assertEqual(f.read(), ORIGINAL)
        for secret in (cfg["redis"]["password"], pika.URLParameters(cfg["rabbitmq"]["amqp_url"]).credentials.password):
            self.assertNotIn(secret, out)
        self.client_works(cfg)
        url = cfg["rabbitmq"]["amqp_url"]
        amqp_port = pika.URLParameters(url).port
        redis_port = cfg["redis"]["port"]

        # Twice: nothing restarted, the config untouched.
        mtime = os.stat(self.config).st_mtime_ns
        r = self.run_as("up", "--sif", sif)
        self.assertEqual(r.stdout.count("running (left alone)"), 3, r.stdout)
        self.assertEqual(os.stat(self.config).st_mtime_ns, mtime)

        # The same user on another login node is refused, naming this one.
        r = self.run_as("up", env={"LITHOPS_HPC_NODE_ID": "login-other"}, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("already run on", r.stderr)

        # status: the services line above the deployments.
        r = self.run_as("status", check=False)
        self.assertRegex(r.stdout, r"services: broker up amqp://lithops:\*\*\*@127\.0\.0\.1:\d+ \(task_queue: 1 waiting")
        self.assertIn(f"redis up 127.0.0.1:{redis_port}", r.stdout)
        self.assertRegex(r.stdout, r"controller up \(pid \d+\)")

        # A broker killed with SIGKILL: up brings it back on the same URL.
        with open(os.path.join(self.services, "rabbitmq", "run", "beam.pid")) as f:
            beam = int(f.read())
        with open(os.path.join(self.services, "rabbitmq", "run", "server.pid")) as f:
            server = int(f.read())
        os.kill(beam, 9)
        lhpc_test.wait_until(lambda: not os.path.exists(f"/proc/{server}"), timeout=30,
                             what="the broker's start script to end after its VM was killed")
        r = self.run_as("up")
        self.assertRegex(r.stdout, r"broker +started")
        self.assertEqual(self.written()["rabbitmq"]["amqp_url"], url)
        self.client_works(self.written())

        r = self.run_as("down")
        self.assertIn("nothing of lithops-hpc up is running now", r.stdout)
        self.assertEqual(processes_of(UID), [])
        self.assertFalse(listening(amqp_port))
        self.assertFalse(listening(redis_port))
        self.assertEqual(self.written()["aws"], {"region": "eu-west-1"})
        r = self.run_as("status", check=False)
        self.assertIn("services: down", r.stdout)

    def test_local_serverless_loop_tasks_with_no_worker_bring_a_deployment_that_idles_out_and_down_leaves_nothing(self):
        """up --local: no Slurm; tasks published with nothing serving start a deployment (mpirun on this
        machine); it serves them, idles out, and down leaves no process."""
        sif, records, env = self.local_setup(drain_timeout=3, idle_timeout=2)
        r = self.run_as("up", "--local", "--sif", sif, "--max-nodes", "1", env=env)
        self.assertRegex(r.stdout, r"controller +started +pid \d+")
        state = os.path.join(self.home, ".lithops-hpc", "autoalloc", "state.json")

        def controller():
            try:
                with open(state) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None

        lhpc_test.wait_until(lambda: (controller() or {}).get("next", "").find("scaled to zero") >= 0, 30,
                             "the controller at zero")
        # Its looks at the queue before anything was published cost the broker's log nothing
        # (a passive declare of a queue not declared yet is a channel error it logs each time).
        lhpc_test.wait_until(lambda: controller()["counters"]["broker_queries"] >= 2, 30, "2 looks at the queue")
        broker_log = os.path.join(self.services, "rabbitmq", "log", "lithops@localhost.log")
        with open(broker_log) as f:
            self.assertNotIn("not_found", f.read().lower())
        url = self.written()["rabbitmq"]["amqp_url"]
        lhpc_test.publish_lithops_many(url, "send_task", [
            lhpc_test.make_send_task(3, f"loc-job{j}", {"lhpc_test": {"record_dir": records}}) for j in range(2)])
        lhpc_test.wait_until(lambda: len(glob.glob(records + "/*.json")) >= 6, 90,
                             "the 6 calls to run on a deployment the controller started")
        jobs = os.listdir(os.path.join(self.home, ".lithops-hpc", "jobs"))
        self.assertEqual(len(jobs), 1, jobs)  # the deployment's status directory, named by its made-up id
        self.assertRegex(jobs[0], r"^local-\d+-\d+-\d+$")
        # Idle for 2 s: stopped through its stop request, drained, gone; the controller back at zero.
        lhpc_test.wait_until(lambda: controller() and not controller()["jobs"], 60,
                             "the deployment to idle out:\n" + str(controller()))
        lhpc_test.wait_until(lambda: not [c for _, c in processes_of(UID) if " deploy " in c], 30,
                             "the deployment's processes to end")
        self.assertEqual(len(glob.glob(records + "/*.json")), 6)
        with open(os.path.join(self.services, "autoalloc.log")) as f:
            log = f.read()
        self.assertRegex(log, r"submitted job local-\S+ \(mpirun -n 1, no time limit")  # no Slurm --time
        self.assertNotIn("--time=", log)
        r = self.run_as("down")
        self.assertIn("nothing of lithops-hpc up is running now", r.stdout)
        self.assertEqual(processes_of(UID), [])

    def test_down_while_a_local_deployment_serves_drains_it_and_loses_no_task(self):
        """down with calls in flight and a backlog: the deployment drains (the calls in flight end
        and are acked), what had not started is back in the queue (down --keep-data keeps it for
        the next up), and nothing of the user's runs after down."""
        sif, records, env = self.local_setup(drain_timeout=60, idle_timeout=120)
        marker = os.path.join(self.home, "release")
        self.run_as("up", "--local", "--sif", sif, "--max-nodes", "1", env=env)
        url = self.written()["rabbitmq"]["amqp_url"]
        test = {"lhpc_test": {"record_dir": records, "wait_for": marker}}
        lhpc_test.publish_lithops_many(url, "send_task", [
            lhpc_test.make_send_task(1, f"flight-job{j}", test) for j in range(6)])
        jobs = os.path.join(self.home, ".lithops-hpc", "jobs")

        def deployment():
            for path in glob.glob(jobs + "/*/status.json"):
                try:
                    with open(path) as f:
                        return json.load(f)
                except (OSError, ValueError):
                    pass
            return None

        lhpc_test.wait_until(lambda: ((deployment() or {}).get("summary") or {}).get("slots_busy") == 2, 90,
                             "a deployment with both slots on a call")
        down = subprocess.Popen(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", BIN, "down",
                                 "--keep-data"], env={"HOME": self.home, "PATH": "/usr/bin:/bin", **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.home)
        try:
            lhpc_test.wait_until(lambda: (deployment() or {}).get("state") == "draining", 60,
                                 "the deployment to drain")
            with open(marker, "w"):
                pass  # the two calls in flight end now, within the drain
            out = down.communicate(timeout=180)[0]
        finally:
            if down.poll() is None:
                down.kill()
        self.assertEqual(down.returncode, 0, out)
        self.assertIn("nothing of lithops-hpc up is running now", out)
        self.assertEqual(processes_of(UID), [])
        done = glob.glob(records + "/*.json")
        self.assertEqual(len(done), 2, done)  # the calls in flight: finished and acked
        self.assertEqual(deployment()["summary"]["done"], 2)
        # The other 4 are back in the queue: the next up finds them there.
        self.run_as("up", env=env)
        self.assertEqual(lhpc_test.queue_depth(url), 4)

    def test_with_the_brokers_tls_the_store_speaks_tls_only_and_the_config_says_so(self):
        """up --tls-cert/--tls-key/--tls-ca: the broker is amqps, the store speaks TLS only (port 0)
        with the same certificate, and the Lithops config's redis section carries redis-py's TLS
        keys, so the client's redis.Redis(**section) (what Lithops' Redis backend calls) verifies
        the store; plain RESP to its port gets nothing."""
        crt, key = os.path.join(self.home, "cert.pem"), os.path.join(self.home, "key.pem")
        host = subprocess.run(["hostname", "-f"], capture_output=True, text=True).stdout.strip()  # the broker's name
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                        "-days", "1", "-subj", f"/CN={host}",
                        "-addext", f"subjectAltName=DNS:{host},DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        for p in (crt, key):
            os.chown(p, UID, UID)
        os.chmod(key, 0o600)
        r = self.run_as("up", "--tls-cert", crt, "--tls-key", key, "--tls-ca", crt)
        self.assertIn("redis+TLS", r.stdout)
        self.assertNotIn("loopback only", r.stdout)  # both listen on every interface, as TLS allows
        cfg = self.written()
        self.assertTrue(cfg["rabbitmq"]["amqp_url"].startswith("amqps://"), r.stdout)
        section = cfg["redis"]
        self.assertEqual((section["ssl"], section["ssl_check_hostname"], section["ssl_ca_certs"]), (True, True, crt))
        store = redis.Redis(**section, socket_timeout=5)
        store.set("lithops-test", b"over TLS")
        self.assertEqual(store.get("lithops-test"), b"over TLS")
        store.close()
        plain = redis.Redis(host="127.0.0.1", port=section["port"], password=section["password"], socket_timeout=3)
        with self.assertRaises(redis.exceptions.ConnectionError):
            plain.ping()
        r = self.run_as("status", check=False)
        self.assertIn(f"redis+TLS up 127.0.0.1:{section['port']}", r.stdout)
        # up again: left alone (the TLS probe answers), the config unchanged.
        r = self.run_as("up")
        self.assertEqual(r.stdout.count("running (left alone)"), 2, r.stdout)
        self.run_as("down")
        self.assertEqual(processes_of(UID), [])
        self.assertFalse(listening(section["port"]))


def slurm_jobs_of(user, env):
    r = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i %T"], env=env, capture_output=True, text=True,
                       timeout=30)
    return r.stdout.split()


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("useradd") and shutil.which("sbatch"),
                     "needs root, useradd and Slurm")
class UpOnSlurm(unittest.TestCase):
    """A new user with an empty home on the Slurm rig: up, then a map of the stand-in client
    (which reads only the Lithops config up wrote), served by a job the controller submits
    as that user; down leaves no process, job or listening port of theirs."""

    def setUp(self):
        lhpc_test.ensure_cluster(3)
        self.user = f"lhpcup{os.getpid()}"
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", "--user-group",
                        "--home-dir", "/nonexistent", self.user], check=True)
        self.uid = int(subprocess.run(["id", "-u", self.user], capture_output=True, text=True).stdout)
        self.root = tempfile.mkdtemp(prefix="lhpc-up-slurm-", dir=BUILD_ROOT)  # every node sees it
        os.chmod(self.root, 0o755)
        self.home = os.path.join(self.root, "home")
        os.mkdir(self.home, 0o700)
        os.chown(self.home, self.uid, self.uid)
        subprocess.run(["usermod", "--home", self.home, self.user], check=True)
        # The site's part, not the user's: the image (its name is its runtime) with Lithops in it
        # (tests/fake-lithops on PYTHONPATH, the host engine instead of Apptainer), and the site
        # configuration a module would point LITHOPS_HPC_CONFIG at.
        self.sif = os.path.join(self.root, "rt.sif")
        subprocess.run([os.path.join(BUILD_ROOT, "tests", "tools", "make-sif"), self.sif, "1M"], check=True)
        os.chmod(self.sif, 0o644)
        self.site = os.path.join(self.root, "site.toml")
        with open(self.site, "w") as f:
            f.write('[singularity]\nengine = "host"\nworker_processes = 2\npython = "/usr/bin/python3"\n'
                    '[deploy]\ntransfer = "none"\ndrain_timeout = 3\n[health]\ninterval = 1\n'
                    '[autoalloc]\nidle_timeout = 120\ntime_limit = "10:00"\n')
        os.chmod(self.site, 0o644)
        self.env = {"HOME": self.home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "SLURM_CONF": lhpc_test.rig_env()["SLURM_CONF"], "LITHOPS_HPC_CONFIG": self.site,
                    "LITHOPS_HPC_BIN": BIN, "PYTHONPATH": os.path.join(SOURCE_ROOT, "tests", "fake-lithops")}

    def tearDown(self):
        log = os.path.join(self.home, ".lithops-hpc", "services", "autoalloc.log")
        if os.path.exists(log):  # always: unittest tells tearDown nothing reliable about the outcome
            with open(log) as f:
                sys.stderr.write("\n--- controller log (last 30 lines) ---\n" + "".join(f.readlines()[-30:]))
        for out in [p for p in glob.glob(self.home + "/.lithops-hpc/**/*.out", recursive=True) if "rabbitmq" not in p]:
            with open(out) as f:
                sys.stderr.write(f"\n--- {out} (last 20 lines) ---\n" + "".join(f.readlines()[-20:]))
        self.as_user([BIN, "down"], check=False)
        subprocess.run(["scancel", "-u", self.user], env=self.env, check=False)
        for pid, _ in processes_of(self.uid):
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
        lhpc_test.wait_until(lambda: not processes_of(self.uid), 30, "the user's processes to end")
        subprocess.run(["userdel", self.user], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def as_user(self, argv, env=None, check=True, timeout=300):
        r = subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--init-groups", *argv],
                           env=env or {k: v for k, v in self.env.items() if k == "HOME" or k == "PATH"},
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.home)
        if check:
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r

    def test_a_new_users_first_map_runs_on_a_slurm_job_after_up_and_down_leaves_nothing(self):
        self.assertEqual(os.listdir(self.home), [])
        r = self.as_user([BIN, "up", "--sif", self.sif, "--max-nodes", "1"], env=self.env)
        self.assertRegex(r.stdout, r"controller +started +pid \d+")
        with open(os.path.join(self.home, ".lithops", "config")) as f:
            cfg = yaml.safe_load(f)
        amqp_port = pika.URLParameters(cfg["rabbitmq"]["amqp_url"]).port
        redis_port = cfg["redis"]["port"]
        # The client: HOME and PATH only, nothing of the site's or the test's.
        r = self.as_user(["/usr/bin/python3", "-c", CLIENT, "6", "60"], timeout=90)
        self.assertEqual(json.loads(r.stdout), [(i + 1) ** 2 for i in range(6)], r.stderr)
        jobs = slurm_jobs_of(self.user, self.env)
        self.assertEqual(jobs[1::2], ["RUNNING"], "one job of the user's, serving")
        r = self.as_user([BIN, "down"], env=self.env)
        self.assertIn("nothing of lithops-hpc up is running now", r.stdout)
        lhpc_test.wait_until(lambda: not slurm_jobs_of(self.user, self.env), 60, "no job of the user's")
        lhpc_test.wait_until(lambda: not processes_of(self.uid), 30,
                             "no process of the user's: " + str(processes_of(self.uid)))
        self.assertFalse(listening(amqp_port))
        self.assertFalse(listening(redis_port))


if __name__ == "__main__":
    unittest.main(verbosity=2)

#!/usr/bin/python3
"""A Lithops client whose runtime has no image is told so instead of hanging.

`lithops-hpc autoalloc --local` serves runtime rt-missing, whose image
(<sif_path>/rt-missing.sif) does not exist; the client's storage is a Redis
this test starts (with a password). The first use of a runtime publishes a
get_metadata and polls its storage key lithops.jobs/<name>.meta (in the
bucket "storage": Redis key "storage/lithops.jobs/<name>.meta") every 2 s for
10 minutes; the controller writes there an error without 'preinstalls' that
names the runtime and the image path, so the client raises at once. A task
of such a runtime (its metadata known from before) gets, for each call, the
status.json of a call that raised the same message: get_result raises it.

- test_a_get_metadata_...: publishes exactly what the Lithops singularity
  backend publishes (pika) and reads the key exactly as it does (redis-py),
  so it runs in CI without Lithops;
- test_the_real_client_...: the real Lithops client (FunctionExecutor), when
  LHPC_LITHOPS_SRC names a Lithops checkout (see README "Running the real
  Lithops client"); skipped otherwise.

Run: LHPC_BIN=<build>/lithops-hpc LHPC_RIG_DIR=<dir outside /tmp> \
     /usr/bin/python3 tests/integration/test_no_image.py
(meson: `meson test -C build integration/no-image`).
"""
import base64
import hashlib
import json
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import pika
import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lhpc_test as lt  # noqa: E402
from worker_util import Worker  # noqa: E402

ROOT = Path(os.environ.get("LHPC_SOURCE_ROOT") or Path(__file__).resolve().parents[2])
BUILD = Path(os.environ.get("LHPC_BUILD_ROOT") or ROOT / "build")
BIN = os.environ.get("LHPC_BIN") or str(BUILD / "lithops-hpc")
VERSION = "3.7.1.dev0"
RUNTIME = "rt-missing"


def job_name(runtime, memory, version):
    """The Lithops singularity backend's _format_job_name."""
    h = hashlib.sha1(f"{runtime}-{memory}-{version}".encode()).hexdigest()[:10]
    return f"lithops-worker-{version.replace('.', '')}-{h}"


class NoImage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="lhpc-noimage-", dir=BUILD))
        self.sif_path = self.dir / "images"
        self.sif_path.mkdir()
        self.url = lt.fresh_vhost("noimage")
        self.redis_port = lt.free_port()
        self.password = secrets.token_hex(12)
        rdir = self.dir / "redis"
        rdir.mkdir(mode=0o700)
        conf = rdir / "redis.conf"
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"port {self.redis_port}\nbind 127.0.0.1\nsave \"\"\ndir {rdir}\n"
                    f"requirepass {self.password}\n")
        self.redis_proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.redis = redis.Redis(host="127.0.0.1", port=self.redis_port, password=self.password, socket_timeout=5)
        lt.wait_until(self._redis_up, 20, "redis-server to answer")
        # The user's Lithops config, read by the client and by the controller alike.
        self.lithops_config = self.dir / "lithops.yaml"
        with open(os.open(self.lithops_config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"lithops:\n  backend: singularity\n  storage: redis\n  log_level: INFO\n"
                    f"singularity:\n  runtime: {RUNTIME}\n  sif_path: {self.sif_path}\n  worker_processes: 1\n"
                    f"rabbitmq:\n  amqp_url: {self.url}\n"
                    f"redis:\n  host: 127.0.0.1\n  port: {self.redis_port}\n  password: {self.password}\n")
        self.conf = self.dir / "lithops-hpc.toml"
        self.conf.write_text('[singularity]\nengine = "host"\n')
        self.env = dict(os.environ, LITHOPS_CONFIG_FILE=str(self.lithops_config), LITHOPS_HPC_CONFIG=str(self.conf),
                        LITHOPS_HPC_STATE_DIR=str(self.dir / "state"))
        self.env.pop("AMQP_URL", None)
        self.log = self.dir / "controller.log"
        with open(self.log, "w") as out:
            self.ctl = subprocess.Popen([BIN, "autoalloc", "--local", "--poll", "5"], env=self.env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        state = self.dir / "state" / "autoalloc" / "state.json"
        lt.wait_until(lambda: state.exists() and self._polled(state), 30,
                      "the controller's first poll:\n" + self._log())

    def _polled(self, state):
        try:
            return json.loads(state.read_text()).get("counters", {}).get("polls", 0) > 0
        except ValueError:
            return False

    def _redis_up(self):
        try:
            return self.redis.ping()
        except redis.exceptions.RedisError:
            return False

    def _log(self):
        return self.log.read_text() if self.log.exists() else ""

    def tearDown(self):
        self.ctl.terminate()
        self.ctl.wait(30)
        self.redis.close()
        self.redis_proc.terminate()
        self.redis_proc.wait(30)
        self.assertNotIn(self.password, self._log())
        shutil.rmtree(self.dir, ignore_errors=True)

    def storage_config(self):
        """What Lithops' internal_storage.storage.config holds for this config (extract_storage_config)."""
        return {"monitoring_interval": 2, "backend": "redis",
                "redis": {"host": "127.0.0.1", "port": self.redis_port, "password": self.password,
                          "storage_bucket": "storage", "user_agent": f"lithops/{VERSION}"}}

    def client_reads(self, name):
        """What _generate_runtime_meta does after publishing: get_data of lithops.jobs/<name>.meta,
        json.loads of it as ASCII, then del_data; None while the key is missing."""
        raw = self.redis.get(f"storage/lithops.jobs/{name}.meta")
        if raw is None:
            return None
        meta = json.loads(raw.decode("ascii"))
        self.redis.delete(f"storage/lithops.jobs/{name}.meta")
        return meta

    def test_a_get_metadata_for_a_runtime_with_no_image_gets_an_error_at_the_key_the_client_polls(self):
        name = job_name(RUNTIME, 128, VERSION)
        payload = dict(self.storage_config(), runtime_name=name, log_level=20)
        published = time.monotonic()
        lt.publish_lithops(self.url, "get_metadata", payload)
        meta = lt.wait_until(lambda: self.client_reads(name), 30, "the error at the client's key:\n" + self._log())
        took = time.monotonic() - published
        print(f"\nerror written {took:.2f} s after the get_metadata was published", file=sys.stderr)
        self.assertNotIn("preinstalls", meta)  # the client raises "Failed getting runtime metadata: {...}"
        self.assertIn(f"runtime '{RUNTIME}' has no image: looked for {self.sif_path}/{RUNTIME}.sif", meta["error"])
        self.assertIn(f"lithops-hpc runtime build {RUNTIME}", meta["error"])
        lt.wait_until(lambda: lt.queue_depth(self.url) == 0, 10, "the request to be taken off the task queue")
        # A task of that runtime (the client had its metadata from before, the image is gone):
        # each call gets the status.json of a call that raised, where and as the client's job
        # monitor and future read it (list_keys walks the SADD "directories"; exc_info is eval'd
        # and unpickled).
        config = {"lithops": {"backend": "singularity", "storage": "redis"},
                  "redis": self.storage_config()["redis"]}
        task = dict(lt.make_send_task(2, "E01-M000"), runtime_name=RUNTIME, config=config)
        lt.publish_lithops(self.url, "send_task", task)
        status_key = "storage/lithops.jobs/E01-M000/00001/status.json"
        raw = lt.wait_until(lambda: self.redis.get(status_key), 30, "the calls' failed status:\n" + self._log())
        status = json.loads(raw.decode("ascii"))
        self.assertEqual((status["type"], status["exception"], status["call_id"]), ("__end__", True, "00001"))
        exc_type, exc, _ = pickle.loads(eval(status["exc_info"]))  # as lithops/future.py reads it
        self.assertIs(exc_type, Exception)
        self.assertIn(f"runtime '{RUNTIME}' has no image: looked for {self.sif_path}/{RUNTIME}.sif", str(exc))
        self.assertIn(b"E01-M000/", self.redis.smembers("storage/lithops.jobs/"))
        self.assertIn(b"00000/", self.redis.smembers("storage/lithops.jobs/E01-M000/"))
        lt.wait_until(lambda: lt.queue_depth(self.url) == 0, 10, "the task to be taken off the task queue")
        self.assertEqual(lt.queue_depth(self.url, f"task_queue.runtime.{RUNTIME}"), 0)
        lt.publish_lithops(self.url, "get_metadata", payload)
        self.assertIn("has no image", lt.wait_until(lambda: self.client_reads(name), 30, "a second error")["error"])

    def test_a_copy_a_deployment_moved_to_the_runtimes_exchange_is_answered_at_the_next_poll(self):
        """What a deployment of another runtime does with a get_metadata not its own: a copy to
        the fanout exchange task_queue.runtimes (dispatch/runtime.h). The controller's own queue
        bound there gets one; a runtime nobody has an image of is named by its path pattern."""
        name = job_name("rt-unknown", 128, VERSION)
        payload = dict(self.storage_config(), runtime_name=name, log_level=20)
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(exchange="task_queue.runtimes", routing_key="", mandatory=True,
                             body=lt.lithops_body("get_metadata", payload),
                             properties=pika.BasicProperties(delivery_mode=2, expiration="600000"))
        finally:
            conn.close()
        meta = lt.wait_until(lambda: self.client_reads(name), 30, "the error for the copy")
        self.assertNotIn("preinstalls", meta)
        self.assertIn(f"(get_metadata '{name}') has no image: looked for {self.sif_path}/<runtime>.sif", meta["error"])

    def test_a_task_a_deployment_moved_for_a_runtime_the_controller_never_heard_of_fails(self):
        """A deployment of rt-a moves a task of rt-gone (its image deleted since the client cached
        its metadata; never in sif_path) to task_queue.runtime.rt-gone, which nothing consumes: it
        tells the controller (a notice to task_queue.runtimes.wanted), which fails the calls."""
        w = Worker(self.url, slots=1, args=["--runtime", "rt-a"])
        try:
            w.wait_consuming()
            config = {"lithops": {"backend": "singularity", "storage": "redis"},
                      "redis": self.storage_config()["redis"]}
            task = dict(lt.make_send_task(2, "E02-M000"), runtime_name="rt-gone", config=config)
            lt.publish_lithops(self.url, "send_task", task)
            status_key = "storage/lithops.jobs/E02-M000/00001/status.json"
            raw = lt.wait_until(lambda: self.redis.get(status_key), 30,
                                "the calls' failed status:\n" + self._log() + "\n--- worker:\n" + w.log()[-4000:])
            status = json.loads(raw.decode("ascii"))
            self.assertEqual((status["type"], status["exception"], status["call_id"]), ("__end__", True, "00001"))
            _, exc, _ = pickle.loads(eval(status["exc_info"]))
            self.assertIn(f"runtime 'rt-gone' has no image: looked for {self.sif_path}/rt-gone.sif", str(exc))
            lt.wait_until(lambda: lt.queue_depth(self.url, "task_queue.runtime.rt-gone") == 0, 10,
                          "the task to be taken off rt-gone's queue")
            self.assertIn("nothing consumes task_queue.runtime.rt-gone", w.log())
        finally:
            w.cleanup()

    @unittest.skipUnless(os.environ.get("LHPC_LITHOPS_SRC"),
                         "set LHPC_LITHOPS_SRC to a Lithops checkout to run the real client")
    def test_the_real_client_raises_naming_the_runtime_and_the_image_path(self):
        src = os.environ["LHPC_LITHOPS_SRC"]
        self.assertTrue(os.path.exists(os.path.join(src, "lithops", "__init__.py")), src)
        stub = self.dir / "stub"
        stub.mkdir()
        # ps_mem is not packaged; lithops/worker/utils.py imports it at load time.
        (stub / "ps_mem.py").write_text("def get_memory_usage(*a, **k):\n    raise RuntimeError('stub')\n")
        client = self.dir / "client.py"
        # First use of the runtime: call_async raises from the get_metadata path. Then, as if its
        # metadata were known from before the image went away, get_result raises for the call.
        client.write_text(
            "import sys, time, lithops\n"
            "from lithops.version import __version__\n"
            "def attempt(what, fexec):\n"
            "    t = time.monotonic()\n"
            "    try:\n"
            "        fexec.call_async(lambda x: x + 1, 1)\n"
            "        print(what, 'RESULT', fexec.get_result())\n"
            "    except Exception as e:\n"
            "        print(what, 'RAISED', type(e).__name__, e)\n"
            "    print(what, 'AFTER %.2f' % (time.monotonic() - t))\n"
            "attempt('FIRST', lithops.FunctionExecutor())\n"
            "fexec = lithops.FunctionExecutor()\n"
            "memory = fexec.config['singularity']['runtime_memory']\n"
            "key = fexec.compute_handler.get_runtime_key(fexec.config['singularity']['runtime'], memory, __version__)\n"
            "fexec.internal_storage.put_runtime_meta(key, {'preinstalls': [], 'lithops_version': __version__,\n"
            "    'python_version': '%d.%d' % sys.version_info[:2], 'runtime_timeout': 600})\n"
            "attempt('CACHED', fexec)\n")
        env = dict(self.env, PYTHONPATH=f"{src}:{stub}", HOME=str(self.dir))
        r = subprocess.run(["/usr/bin/python3", str(client)], env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, cwd=self.dir)
        print("\n" + r.stdout, file=sys.stderr)
        message = f"runtime '{RUNTIME}' has no image: looked for {self.sif_path}/{RUNTIME}.sif"
        self.assertIn("FIRST RAISED Exception Failed getting runtime metadata:", r.stdout, r.stderr[-3000:])
        self.assertIn(f"CACHED RAISED Exception lithops-hpc: {message}", r.stdout, r.stderr[-3000:])
        self.assertEqual(r.stdout.count(message), 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)

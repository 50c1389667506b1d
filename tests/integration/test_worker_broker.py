#!/usr/bin/python3
"""The worker across a broker restart: it reconnects with backoff and every
task still completes (at-least-once: a call running during the outage may
run twice). Restarts the shared broker: runs alone (is_parallel: false).
"""
import tempfile
import unittest

import lhpc_test as lt
from worker_util import Worker, records, wait_records


class BrokerRestartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        lt.ensure_broker()

    def test_broker_restarted_mid_run_every_task_completes(self):
        url = lt.fresh_vhost("brk")
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = Worker(url, slots=2, heartbeat=5)
        try:
            w.wait_consuming()
            jobs = [f"ex-b{i:02d}" for i in range(20)]
            for j in jobs:
                lt.publish_lithops(url, "send_task",
                                   lt.make_send_task(1, j, {"lhpc_test": {"record_dir": rec, "sleep": 0.5}}))
            wait_records(rec, 3, 60)
            lt.restart_broker()
            lt.wait_until(lambda: {r["job_key"] for r in records(rec)} >= set(jobs), 180,
                          "every task to complete after the restart")
            log = w.log()
            self.assertIn("lost", log)
            self.assertIn("reconnected", log)
            self.assertTrue(w.alive())
            lt.wait_until(lambda: lt.queue_depth(url) == 0, 30, "an empty queue")
            self.assertEqual(w.stop(), 0)
            self.assertEqual(lt.queue_depth(url), 0)
        except BaseException:
            print(w.log()[-8000:])
            raise
        finally:
            w.cleanup()


if __name__ == "__main__":
    lt.main()

#!/usr/bin/python3
"""amqps:// with certificate verification: the worker and `ping` reach the rig
broker through a TLS-terminating proxy (Python ssl, certificates made with the
openssl CLI for this test), so the broker itself needs no TLS listener.
Checks: a CA that signed the broker's certificate is accepted (rabbitmq.ca_cert),
another CA or a host name the certificate does not name is refused (exit 5),
verify_peer = false skips the check.
"""
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import unittest
import urllib.parse

import lhpc_test as lt
from worker_util import BIN, Worker, wait_records


def make_ca(d, name):
    key, crt = os.path.join(d, name + ".key"), os.path.join(d, name + ".crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return key, crt


def make_server_cert(d, ca_key, ca_crt):
    key, csr, crt = (os.path.join(d, "server" + e) for e in (".key", ".csr", ".crt"))
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName = DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", crt, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return key, crt


class TlsProxy:
    """TLS on 127.0.0.1:<port> -> plain TCP to the broker."""

    def __init__(self, cert, key, target_port):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw):
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # the client refused our certificate
            return
        except BaseException:
            raw.close()
            raise
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pipe(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        back = threading.Thread(target=pipe, args=(upstream, tls), daemon=True)
        back.start()
        pipe(tls, upstream)
        back.join(10)
        tls.close()
        upstream.close()

    def close(self):
        self.sock.close()


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        env = lt.ensure_broker()
        cls.tmp = tempfile.mkdtemp(prefix="lhpc-tls-")
        ca_key, cls.ca = make_ca(cls.tmp, "test-ca")
        _, cls.other_ca = make_ca(cls.tmp, "other-ca")
        key, crt = make_server_cert(cls.tmp, ca_key, cls.ca)
        cls.proxy = TlsProxy(crt, key, int(env["RIG_AMQP_PORT"]))

    @classmethod
    def tearDownClass(cls):
        cls.proxy.close()

    def tls_url(self, plain_url, host="localhost"):
        u = urllib.parse.urlsplit(plain_url)
        return f"amqps://{u.username}:{u.password}@{host}:{self.proxy.port}{u.path}"

    def ping(self, url, ca, verify=True, count=1):
        cfg = os.path.join(self.tmp, f"ping-{os.getpid()}.toml")
        with open(cfg, "w") as f:
            f.write(f'[rabbitmq]\nca_cert = "{ca}"\nverify_peer = {"true" if verify else "false"}\n')
        env = dict(os.environ, AMQP_URL=url)
        env.pop("LITHOPS_HPC_CONFIG", None)
        return subprocess.run([BIN, "--config", cfg, "ping", "--count", str(count), "--timeout", "20"], env=env,
                              capture_output=True, text=True, timeout=120)

    def test_amqps_with_certificate_verification(self):
        plain = lt.fresh_vhost("tls")
        url = self.tls_url(plain)
        rec = tempfile.mkdtemp(prefix="lhpc-rec-")
        w = Worker(url, slots=1, rabbitmq_extra=f'ca_cert = "{self.ca}"')
        try:
            w.wait_consuming()
            self.assertIn("amqps://", w.log())
            lt.publish_lithops(plain, "send_task", lt.make_send_task(1, "ex-tls", {"lhpc_test": {"record_dir": rec}}))
            wait_records(rec, 1, 60)

            ok = self.ping(url, self.ca, count=3)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)

            wrong_ca = self.ping(url, self.other_ca)
            self.assertEqual(wrong_ca.returncode, 5, wrong_ca.stdout + wrong_ca.stderr)
            self.assertIn("amqps://", wrong_ca.stderr)
            self.assertNotIn(urllib.parse.urlsplit(plain).password, wrong_ca.stderr)

            wrong_host = self.ping(self.tls_url(plain, host="127.0.0.1"), self.ca)
            self.assertEqual(wrong_host.returncode, 5, wrong_host.stdout + wrong_host.stderr)

            unchecked = self.ping(url, self.other_ca, verify=False)
            self.assertEqual(unchecked.returncode, 0, unchecked.stdout + unchecked.stderr)
            self.assertEqual(w.stop(), 0)
        except BaseException:
            print(w.log()[-5000:])
            raise
        finally:
            w.cleanup()


if __name__ == "__main__":
    lt.main()

"""Helpers for the filter's real-Envoy tests: a broker stand-in, a plain upstream, a running
Envoy, and the build of the release wasm. Fixtures using them are in conftest.py.
(A module name of its own: other test directories have their own conftest.) Envoy is
started, awaited and stopped with tests/stacklib/procs.py, shared with tests/stack and the
benchmarks."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tests.stacklib import procs as proclib  # noqa: E402  the shared process harness
from tests.stacklib.procs import free_port  # noqa: E402,F401

ENVOY_DIR = os.path.join(ROOT, "envoy")
ENVOY_BIN = os.path.join(ROOT, ".venv", "bin", "envoy")
WASM = os.path.join(ROOT, "target", "wasm32-wasip1", "release", "meshiam_filter.wasm")
ROLE = "myapp-iam-role"

sys.path.insert(0, ENVOY_DIR)
from render import render  # noqa: E402


def _newest_source_mtime():
    newest = 0.0
    for base in ("filter", "imds"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith((".rs", ".toml")):
                    newest = max(newest, os.path.getmtime(os.path.join(dirpath, f)))
    for f in ("Cargo.toml", "Cargo.lock"):
        newest = max(newest, os.path.getmtime(os.path.join(ROOT, f)))
    return newest


def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_wasm():
    """The release filter, built if missing or older than its sources."""
    if not os.path.exists(WASM) or os.path.getmtime(WASM) < _newest_source_mtime():
        subprocess.run(
            ["cargo", "build", "--release", "--target", "wasm32-wasip1", "-p", "meshiam-filter"],
            cwd=ROOT,
            check=True,
        )
    return WASM


class _Server:
    """A threaded HTTP server on a free loopback port, stoppable and restartable."""

    def __init__(self, handler_factory):
        self.port = free_port()
        self._factory = handler_factory
        self._httpd = None
        self._connections = set()

    def start(self):
        server = self

        class Tracking(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                server._connections.add(request)
                super().process_request(request, client_address)

        self._httpd = Tracking(("127.0.0.1", self.port), self._factory(self))
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self):
        """Stops listening and cuts kept-alive connections: a stopped server is really down."""
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for sock in list(self._connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._connections.clear()


class Broker(_Server):
    """Stands in for meshiam-broker: answers the credential paths for one role, records
    every read (path and headers) in `requests` and every token PUT in `token_puts`. Like
    the real broker (`--direct-mode required`), reads need a token it issued: 401 otherwise.
    `mode` changes what reads get: "ok", "status:<code>", "slow:<seconds>"."""

    def __init__(self):
        self.requests = []
        self.token_puts = []
        self.issued = set()
        self.mode = "ok"
        self.expiration = time.time() + 3600
        super().__init__(self._handler)

    def forget_tokens(self):
        """As a broker restart does: every token issued so far is refused."""
        self.issued.clear()

    def credentials(self):
        return {
            "Code": "Success",
            "LastUpdated": iso(time.time()),
            "Type": "AWS-HMAC",
            "AccessKeyId": "ASIABROKERKEY",
            "SecretAccessKey": "broker/secret+key",
            "Token": "broker-session-token",
            "Expiration": iso(self.expiration),
        }

    @staticmethod
    def _handler(broker):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, ctype="text/plain", extra=()):
                data = body.encode()
                if broker._httpd is None:
                    return
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                broker.token_puts.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
                )
                ttl = self.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
                if self.path != "/latest/api/token" or not ttl.isdigit():
                    return self._send(400, "Bad Request", extra=[("x-meshiam-reason", "bad-token-ttl")])
                token = f"fake-broker-token-{len(broker.token_puts)}"
                broker.issued.add(token)
                self._send(200, token, extra=[("x-aws-ec2-metadata-token-ttl-seconds", ttl)])

            def do_GET(self):
                broker.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
                )
                token = self.headers.get("x-aws-ec2-metadata-token")
                if token not in broker.issued:
                    reason = "token-invalid" if token else "token-required"
                    return self._send(401, "Unauthorized", extra=[("x-meshiam-reason", reason)])
                mode = broker.mode
                if mode.startswith("slow:"):
                    time.sleep(float(mode[5:]))
                elif mode.startswith("status:"):
                    code = int(mode[7:])
                    return self._send(code, "broker says no", extra=[("x-meshiam-reason", "test")])
                prefix = "/latest/meta-data/iam/security-credentials/"
                if self.path == prefix:
                    return self._send(200, ROLE)
                if self.path == prefix + ROLE:
                    return self._send(200, json.dumps(broker.credentials()), "application/json")
                if self.path == "/latest/meta-data/placement/region":
                    return self._send(200, "eu-west-1")
                self._send(404, "Not Found", extra=[("x-meshiam-reason", "no-role")])

        return H


class Upstream(_Server):
    """A plain HTTP server that echoes what it received as JSON (and serves IMDS-looking
    credentials, to prove they never reach a pod through the passthrough)."""

    def __init__(self):
        self.requests = []
        super().__init__(self._handler)

    @staticmethod
    def _handler(up):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n).decode() if n else ""
                seen = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                up.requests.append(seen)
                data = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-upstream", "plain")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        return H


class Envoy:
    """A running Envoy: `url` is its capture listener; `ordinary_url`, when the config came
    through render.for_direct_clients, its second port for ordinary traffic."""

    def __init__(self, config_path, port, admin_port, log_path, ordinary_port=None, wasm_log="info"):
        self.port = port
        self.admin_port = admin_port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.ordinary_url = f"http://127.0.0.1:{ordinary_port}" if ordinary_port else None
        # In pytest's process group, as before: Ctrl-C ends it too.
        self.proc = proclib.start(
            [
                ENVOY_BIN,
                "-c", config_path,
                "--concurrency", "2",
                "--disable-hot-restart",
                "-l", "warning",
                # wasm:trace logs every call Envoy makes into the VM ("[host->vm] ...").
                "--component-log-level", f"wasm:{wasm_log}",
                # Access-log lines (the sidecar's refusal audit line) written within 0.2 s,
                # not Envoy's default 10 s.
                "--file-flush-interval-msec", "200",
            ],
            log_path,
            new_session=False,
        )
        try:
            proclib.wait_for("envoy ready", self._ready, timeout=20, proc=self.proc, tail=1_000_000)
        except BaseException:
            self.stop()
            raise

    def _ready(self):
        return (proclib.url_ok(f"http://127.0.0.1:{self.admin_port}/ready", timeout=0.5)
                and proclib.port_open("127.0.0.1", self.port))

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stats(self, contains="meshiam"):
        # Straight to the admin port, whatever proxy a test put in the environment.
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(f"http://127.0.0.1:{self.admin_port}/stats", timeout=2)
        out = {}
        for line in r.text.splitlines():
            name, _, value = line.partition(": ")
            if contains in name and value.strip().isdigit():
                out[name] = int(value)
        return out

    def get(self, path, host="169.254.169.254", **kw):
        headers = {"Host": host, **kw.pop("headers", {})}
        return requests.get(self.url + path, headers=headers, timeout=kw.pop("timeout", 5), **kw)

    def stop(self):
        proclib.stop(self.proc.pid, timeout=10, proc=self.proc, group=False)

"""Issue 14, Istio: envoy/istio-shape.yaml (the WasmPlugin shipped before) and
envoy/istio-shape-scoped.yaml (the shipped scoping) in a network namespace of their own, with
Istio's capture: every outbound TCP connection of the application (uid 65534 here; Istio
excludes Envoy's 1337 the same way) redirected to 15001. Run as `unshare -n python
netns_istio_shape.py WASM LOGDIR` (root); prints what each request got as JSON for
test_istio_shape.py to judge."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshiam_filter_harness import ENVOY_DIR, Broker, Envoy, render

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
POD_IP = "198.18.1.10"
ELSEWHERE_IP = "198.18.2.1"  # an ordinary port-80 destination outside the pod
APP_UID = "65534"
STREAM_CALLS = ("proxy_on_context_create(", "proxy_on_request_headers(")


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def app_curl(*args):
    """curl as the application (its traffic is captured); [exit code, status, reason, body]."""
    r = subprocess.run(["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                        "curl", "-s", "-m", "5", "-D", "-", *args], capture_output=True, timeout=10)
    head, _, body = r.stdout.decode(errors="replace").partition("\r\n\r\n")
    status = int(head.split()[1]) if head.startswith("HTTP/") else 0
    reason = next((line.split(":", 1)[1].strip() for line in head.splitlines()
                   if line.lower().startswith("x-meshiam-reason:")), None)
    return [r.returncode, status, reason, body]


class Ordinary(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        data = b"ordinary upstream"
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.send_header("x-upstream", "ordinary")
        self.end_headers()
        self.wfile.write(data)


def vm_calls(envoy):
    return sum(1 for line in envoy.log().splitlines() if "[host->vm]" in line and any(c in line for c in STREAM_CALLS))


def main(wasm, logdir):
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    sh("ip", "link", "set", "eth1", "up")
    sh("ip", "addr", "add", f"{POD_IP}/16", "dev", "eth0")
    sh("ip", "addr", "add", f"{ELSEWHERE_IP}/32", "dev", "eth0")
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "route", "add", "169.254.169.254/32", "dev", "eth0")
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", APP_UID,
       "-j", "REDIRECT", "--to-ports", "15001")
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        os.environ.pop(k, None)
    upstream = ThreadingHTTPServer((ELSEWHERE_IP, 80), Ordinary)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    broker = Broker()
    broker.port = 8181
    broker.start()
    plugin = json.dumps({"brokerCluster": "outbound|8787||meshiam-broker.meshiam.internal",
                         "brokerAuthority": "meshiam-broker.meshiam.internal"})
    out = {}
    try:
        for shape in ("istio-shape", "istio-shape-scoped"):
            config = os.path.join(logdir, f"{shape}.yaml")
            with open(config, "w") as f:
                f.write(render(os.path.join(ENVOY_DIR, f"{shape}.yaml"), WASM_PATH=wasm, POD_NAME="myapp-7d9f",
                               POD_NAMESPACE="default", POD_IPS=POD_IP, CAPTURE_ADDRESS="0.0.0.0",
                               PLUGIN_CONFIG=plugin))
            envoy = Envoy(config, 15001, 15000, os.path.join(logdir, f"{shape}.log"), wasm_log="trace")
            try:
                got = {}
                calls = len(broker.requests)
                got["curl"] = app_curl(f"http://169.254.169.254{ROLE_LIST}")
                got["other_host"] = app_curl("-H", "Host: imds.example", f"http://169.254.169.254{ROLE_LIST}")
                got["broker_calls"] = len(broker.requests) - calls
                # The metadata Host on a connection to another address.
                calls = len(broker.requests)
                # (From the pod's address: 198.18.2.1 is local here, and would be the source.)
                got["host_elsewhere"] = app_curl("--interface", POD_IP, "-H", "Host: 169.254.169.254",
                                                 f"http://{ELSEWHERE_IP}{ROLE_LIST}")
                got["host_elsewhere_broker_calls"] = len(broker.requests) - calls
                before = vm_calls(envoy)
                got["ordinary"] = [app_curl(f"http://{ELSEWHERE_IP}/app") for _ in range(5)]
                envoy.stop()  # the trace lines of the last stream are written by now
                got["ordinary_vm_calls"] = vm_calls(envoy) - before
                out[shape] = got
            finally:
                envoy.stop()
    finally:
        broker.stop()
        upstream.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

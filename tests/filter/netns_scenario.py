"""The pod scenario in a network namespace of its own: run as `unshare -n python
netns_scenario.py WASM LOGDIR` (root). Sets up the capture as a pod would have it (the pod's
address on eth0, the metadata address routed there, an iptables REDIRECT of
169.254.169.254:80 to Envoy's 15001), starts the broker stand-in and Envoy from
envoy/sidecar.yaml with its production settings, runs the origin document's curl and
botocore with its default configuration, tries what another pod would (a second address on
eth0 stands for it), and prints what they got as JSON for test_netns.py to judge."""

import json
import os
import subprocess
import sys
import time

import requests
import yaml

from meshiam_filter_harness import ENVOY_DIR, Broker, Envoy, render
from render import without_loop_guard

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
POD_IP = "198.18.1.10"
OTHER_IP = "198.18.1.99"  # another pod, as far as the sidecar can tell
ELSEWHERE_IP = "198.18.2.1"  # some ordinary destination, redirected to Envoy like all traffic


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def try_curl(*args):
    """curl; returns [exit code, HTTP status, reason header, body]."""
    r = subprocess.run(["curl", "-s", "-m", "5", "-D", "-", *args], capture_output=True, timeout=10)
    head, _, body = r.stdout.decode(errors="replace").partition("\r\n\r\n")
    status = int(head.split()[1]) if head.startswith("HTTP/") else 0
    reason = next((line.split(":", 1)[1].strip() for line in head.splitlines()
                   if line.lower().startswith("x-meshiam-reason:")), None)
    return [r.returncode, status, reason, body]


def start(logdir, name, wasm, loop_guard=True, any_source=False, **values):
    config = os.path.join(logdir, f"{name}.yaml")
    text = render(os.path.join(ENVOY_DIR, "sidecar.yaml"), WASM_PATH=wasm, POD_NAME="myapp-7d9f",
                  POD_NAMESPACE="default", POD_IPS=POD_IP, **values)
    if not loop_guard:
        text = yaml.safe_dump(without_loop_guard(yaml.safe_load(text)), sort_keys=False)
    if any_source:
        # A configuration mistake on purpose: the metadata chain accepts every source.
        doc = yaml.safe_load(text)
        for chain in doc["static_resources"]["listeners"][0]["filter_chains"]:
            if chain.get("name") == "metadata":
                chain["filter_chain_match"].pop("source_prefix_ranges")
        text = yaml.safe_dump(doc, sort_keys=False)
    with open(config, "w") as f:
        f.write(text)
    return config, Envoy(config, 15001, 15000, os.path.join(logdir, f"{name}.log"))


def main(wasm, logdir):
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    sh("ip", "link", "set", "eth1", "up")
    sh("ip", "addr", "add", f"{POD_IP}/16", "dev", "eth0")
    sh("ip", "addr", "add", f"{OTHER_IP}/16", "dev", "eth0")
    sh("ip", "link", "set", "eth0", "up")
    # The metadata addresses (IMDS, the container-credentials endpoint) and an ordinary
    # destination, all redirected to Envoy (the capture of every outbound port-80 connection,
    # as Istio's and a mesh's would be).
    for dest in ("169.254.169.254", "169.254.170.23", ELSEWHERE_IP):
        sh("ip", "route", "add", f"{dest}/32", "dev", "eth0")
        sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dest,
           "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        os.environ.pop(k, None)

    broker = Broker()
    broker.port = 8181
    broker.start()
    config, envoy = start(logdir, "netns-envoy", wasm)
    out = {}
    try:
        curl = subprocess.run(["curl", "-s", "-m", "5", f"169.254.169.254{ROLE_LIST}"],
                              capture_output=True, timeout=10)
        out["curl"] = curl.stdout.decode()

        from botocore.utils import InstanceMetadataFetcher

        creds = InstanceMetadataFetcher(timeout=1, num_attempts=1).retrieve_iam_role_credentials()
        out["botocore"] = {k: creds.get(k) for k in ("role_name", "access_key", "token")}

        # Some other Host, sent to the metadata address: recognised by the original destination.
        r = requests.get(f"http://169.254.169.254{ROLE_LIST}", headers={"Host": "imds.example"},
                         timeout=5)
        out["other_host"] = [r.status_code, r.text]
        out["broker_identity"] = [
            (q["headers"].get("x-meshiam-pod-namespace"), q["headers"].get("x-meshiam-pod-name"))
            for q in broker.requests
        ]

        # Issue 14: the other metadata address reaches the metadata chain too (the filter, and
        # the chain's own routes: never an upstream); a metadata Host on a connection to an
        # ordinary destination is refused by Envoy, never sent on.
        before = envoy.stats("")
        out["container_endpoint"] = try_curl("http://169.254.170.23/v1/credentials")
        out["host_elsewhere"] = try_curl("-H", "Host: 169.254.169.254", f"http://{ELSEWHERE_IP}{ROLE_LIST}")
        after = envoy.stats("")
        out["issue14_stats"] = {k: after.get(k, 0) - before.get(k, 0) for k in (
            "http.meshiam_metadata.downstream_rq_total", "http.meshiam_outbound.rq_direct_response",
            "cluster.passthrough.upstream_cx_total")}

        # Another pod: to the metadata address from its own source (closed: no chain
        # matches), and straight to the pod's address on the listener port (nothing listens).
        calls = len(broker.requests)
        before = envoy.stats("")
        out["other_source"] = try_curl("--interface", OTHER_IP, f"http://169.254.169.254{ROLE_LIST}")
        out["other_direct"] = try_curl("--interface", OTHER_IP, "-H", "Host: 169.254.169.254",
                                   f"http://{POD_IP}:15001{ROLE_LIST}")
        # One request to the listener itself with another Host: closed by the loop guard.
        out["loop"] = try_curl("-H", "Host: example.com", "http://127.0.0.1:15001/")
        after = envoy.stats("")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in (
            "listener.127.0.0.1_15001.no_filter_chain_match",
            "listener.127.0.0.1_15001.downstream_cx_total",
            "tcp.meshiam_loop_guard.downstream_cx_total",
            "cluster.passthrough.upstream_cx_total",
            "wasmcustom.meshiam.callouts")}
        out["attack_stats"] = delta
        out["attack_broker_calls"] = len(broker.requests) - calls

        broker.stop()
        time.sleep(0.1)
        t0 = time.monotonic()
        r = requests.get("http://169.254.169.254/latest/meta-data/iam/security-credentials/other",
                         timeout=5)
        out["broker_down"] = [r.status_code, "AccessKeyId" in r.text, time.monotonic() - t0]
        out["stats"] = envoy.stats()
        envoy.stop()

        # Defence in depth: a filter that does not recognise the traffic (misconfigured on
        # purpose) still cannot send it on: the metadata chain has no upstream.
        _, envoy = start(logdir, "netns-envoy-2", wasm,
                         PLUGIN_CONFIG=json.dumps({"metadataHosts": ["nothing.example"],
                                                   "metadataAddresses": ["192.0.2.1:80"]}))
        r = requests.get(f"http://169.254.169.254{ROLE_LIST}", headers={"Host": "imds.example"},
                         timeout=5)
        out["unrecognised"] = [r.status_code, r.text]
        envoy.stop()

        # Configuration mistakes, one layer at a time. The listener on all addresses: the
        # loop guard still closes a direct connection to the pod's address.
        broker.start()
        calls = len(broker.requests)
        _, envoy = start(logdir, "netns-envoy-3", wasm, CAPTURE_ADDRESS="0.0.0.0")
        out["open_listener_direct"] = try_curl("--interface", OTHER_IP, "-H", "Host: 169.254.169.254",
                                           f"http://{POD_IP}:15001{ROLE_LIST}")
        envoy.stop()
        # ... and without the loop guard too: the connection reaches the passthrough chain,
        # which refuses a metadata Host itself (with or without X-Forwarded-For naming the pod).
        _, envoy = start(logdir, "netns-envoy-4", wasm, loop_guard=False, CAPTURE_ADDRESS="0.0.0.0")
        out["filter_only_direct"] = try_curl("--interface", OTHER_IP, "-H", "Host: 169.254.169.254",
                                         f"http://{POD_IP}:15001{ROLE_LIST}")
        out["filter_only_xff"] = try_curl("--interface", OTHER_IP, "-H", "Host: 169.254.169.254",
                                      "-H", f"X-Forwarded-For: {POD_IP}",
                                      f"http://{POD_IP}:15001{ROLE_LIST}")
        envoy.stop()
        # The metadata chain open to every source: the filter alone refuses the other pod.
        _, envoy = start(logdir, "netns-envoy-5", wasm, any_source=True)
        out["filter_alone"] = try_curl("--interface", OTHER_IP, f"http://169.254.169.254{ROLE_LIST}")
        out["filter_only_stats"] = envoy.stats()
        out["mistakes_broker_calls"] = len(broker.requests) - calls
    finally:
        envoy.stop()
        broker.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

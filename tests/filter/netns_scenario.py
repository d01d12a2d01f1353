"""The pod scenario in a network namespace of its own: run as `unshare -n python
netns_scenario.py WASM LOGDIR` (root). Sets up the capture as a pod would have it (the
metadata address on lo, an iptables REDIRECT of 169.254.169.254:80 to Envoy's 15001), starts
the broker stand-in and Envoy from envoy/sidecar.yaml with its production settings, runs the
origin document's curl and botocore with its default configuration, and prints what they got
as JSON for test_netns.py to judge."""

import json
import os
import subprocess
import sys
import time

import requests

from meshiam_filter_harness import ENVOY_DIR, Broker, Envoy, render

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def main(wasm, logdir):
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
    sh("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "169.254.169.254",
       "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        os.environ.pop(k, None)

    broker = Broker()
    broker.port = 8181
    broker.start()
    config = os.path.join(logdir, "netns-envoy.yaml")
    with open(config, "w") as f:
        f.write(render(os.path.join(ENVOY_DIR, "sidecar.yaml"), WASM_PATH=wasm,
                       POD_NAME="myapp-7d9f", POD_NAMESPACE="default"))
    envoy = Envoy(config, 15001, 15000, os.path.join(logdir, "netns-envoy.log"))
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
        with open(config, "w") as f:
            f.write(render(os.path.join(ENVOY_DIR, "sidecar.yaml"), WASM_PATH=wasm,
                           PLUGIN_CONFIG=json.dumps({"metadataHosts": ["nothing.example"],
                                                     "metadataAddresses": ["192.0.2.1:80"]})))
        envoy = Envoy(config, 15001, 15000, os.path.join(logdir, "netns-envoy-2.log"))
        r = requests.get(f"http://169.254.169.254{ROLE_LIST}", headers={"Host": "imds.example"},
                         timeout=5)
        out["unrecognised"] = [r.status_code, r.text]
    finally:
        envoy.stop()
        broker.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

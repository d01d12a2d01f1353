"""IMDS details in a pod-like network namespace of its own: run as `unshare -n python
netns_imds_details.py WASM LOGDIR` (root). The capture as a pod has it (the metadata address
on lo, an iptables REDIRECT of 169.254.169.254:80 to Envoy's 15001), Envoy from
envoy/sidecar.yaml with its production settings, the broker stand-in; curl sends what
test_imds_details.py judges (HTTP/1.0, a header twice) and the answers are printed as JSON."""

import json
import os
import subprocess
import sys

from meshiam_filter_harness import ENVOY_DIR, Broker, Envoy, render

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def curl(*args):
    """(status, body, ttl header echoed) of one curl to the metadata address."""
    r = subprocess.run(["curl", "-s", "-m", "5", "-D", "/dev/stderr", "-o", "/dev/stdout",
                        "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=10)
    body, _, code = r.stdout.rpartition("\n")
    echoed = [line.split(":", 1)[1].strip() for line in r.stderr.splitlines()
              if line.lower().startswith(TTL.lower() + ":")]
    return [int(code or 0), body, echoed[0] if echoed else None]


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
    config = os.path.join(logdir, "netns-details-envoy.yaml")
    with open(config, "w") as f:
        # The metadata address on lo is this namespace's only address besides loopback, so
        # curl's connections to it come from it: it is the "pod's" own address here.
        f.write(render(os.path.join(ENVOY_DIR, "sidecar.yaml"), WASM_PATH=wasm,
                       POD_NAME="myapp-7d9f", POD_NAMESPACE="default", POD_IPS="169.254.169.254"))
    envoy = Envoy(config, 15001, 15000, os.path.join(logdir, "netns-details-envoy.log"))
    imds = "http://169.254.169.254"
    out = {}
    try:
        out["http10_role_list"] = curl("-0", imds + ROLE_LIST)
        token = curl("-0", "-X", "PUT", "-H", f"{TTL}: 60", imds + "/latest/api/token")
        out["http10_token"] = [token[0], len(token[1]), token[2]]
        out["ttl_twice"] = curl("-X", "PUT", "-H", f"{TTL}: 60", "-H", f"{TTL}: 99999",
                                imds + "/latest/api/token")
        out["ttl_twice_http10"] = curl("-0", "-X", "PUT", "-H", f"{TTL}: 60", "-H", f"{TTL}: 99999",
                                       imds + "/latest/api/token")
        out["token_slash"] = curl("-X", "PUT", "-H", f"{TTL}: 60", imds + "/latest/api/token/")
        out["token_query"] = curl("-X", "PUT", "-H", f"{TTL}: 60", imds + "/latest/api/token?x=1")
        creds = curl(imds + ROLE_LIST + "myapp-iam-role/")
        out["creds_slash"] = [creds[0], "AccessKeyId" in creds[1]]
        out["broker_paths"] = [r["path"] for r in broker.requests]
    finally:
        envoy.stop()
        broker.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

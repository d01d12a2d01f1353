"""Issue 9, item 8, through a real Envoy from envoy/sidecar.yaml: a header sent twice reaches
the filter as two values (and is refused), and HTTP/1.0 is answered on the metadata chain (in
a pod-like network namespace with the iptables capture)."""

import json
import os
import subprocess
import sys

import pytest

from meshiam_filter_harness import ROLE

HERE = os.path.dirname(os.path.abspath(__file__))
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture
def envoy(start_envoy, broker):
    return start_envoy(broker.port, plugin={})


class Secret(str):
    """An IMDSv2 token: compares as the text, shows itself as its length only."""

    def __repr__(self):
        return f"<token, {len(self)} bytes>"

    __str__ = __repr__


def curl(envoy, path, *extra):
    r = subprocess.run(["curl", "-s", "-m", "5", "-D", "/dev/stderr", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                        "-H", "Host: 169.254.169.254", *extra, envoy.url + path],
                       capture_output=True, text=True, timeout=10)
    body, _, code = r.stdout.rpartition("\n")
    reason = [line.split(":", 1)[1].strip() for line in r.stderr.splitlines()
              if line.lower().startswith("x-meshiam-reason:")]
    sent = " ".join("<token>" if a.startswith(TOKEN + ":") else a for a in extra)
    if code == "200" and "PUT" in extra:
        body = Secret(body)  # a token: never printed, not even in an assertion's diff
    print(f"curl {sent} {path} -> {code} reason={reason[0] if reason else '-'} body={body!r}")
    return int(code or 0), body, reason[0] if reason else None


def test_a_repeated_ttl_header_through_envoy_is_400(envoy, broker):
    status, body, reason = curl(envoy, "/latest/api/token", "-X", "PUT", "-H", f"{TTL}: 60", "-H", f"{TTL}: 99999")
    assert (status, body, reason) == (400, "Bad Request", "repeated-imds-header")
    status, body, reason = curl(envoy, "/latest/api/token", "-X", "PUT", "-H", f"{TTL}: 60")
    assert status == 200 and len(body) > 20
    token = str.__str__(body)
    status, body, reason = curl(envoy, ROLE_LIST, "-H", f"{TOKEN}: {token}", "-H", f"{TOKEN}: {token}")
    assert (status, reason) == (400, "repeated-imds-header")
    assert broker.requests == []
    status, body, reason = curl(envoy, ROLE_LIST, "-H", f"{TOKEN}: {token}")
    assert (status, body) == (200, ROLE)


def test_only_the_exact_token_path_through_envoy(envoy):
    for path in ("/latest/api/token/", "/latest/api/token?x=1"):
        status, body, reason = curl(envoy, path, "-X", "PUT", "-H", f"{TTL}: 60")
        assert (status, reason) == (404, "invalid-path"), path


def _can_unshare():
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs root for a network namespace")
def test_http_1_0_and_repeated_headers_on_the_metadata_chain(wasm, tmp_path):
    r = subprocess.run(["unshare", "-n", sys.executable, os.path.join(HERE, "netns_imds_details.py"), wasm,
                        str(tmp_path)], capture_output=True, cwd=HERE, timeout=90)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    # curl -0: Envoy without accept_http_10 answers 426 Upgrade Required.
    assert out["http10_role_list"][:2] == [200, ROLE]
    assert out["http10_token"][0] == 200 and out["http10_token"][1] > 20 and out["http10_token"][2] == "60"
    assert out["ttl_twice"][:2] == [400, "Bad Request"] and out["ttl_twice"][2] is None
    assert out["ttl_twice_http10"][:2] == [400, "Bad Request"]
    assert out["token_slash"][:2] == [404, "Not Found"] and out["token_slash"][2] is None
    assert out["token_query"][:2] == [404, "Not Found"] and out["token_query"][2] is None
    assert out["creds_slash"] == [404, False]
    assert out["broker_paths"] == [ROLE_LIST]

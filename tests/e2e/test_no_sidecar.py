"""Issue 11: pods without a sidecar, and kube2iam's --iam-role-key.

A pod without Envoy (`sidecar.istio.io/inject: "false"`) gets its role from its node's
broker when its pod template sets `AWS_EC2_METADATA_SERVICE_ENDPOINT` to the broker's
node-local address (docs/install.md, "Pods without a sidecar"); the stack sets it for such
pods as an operator would. Its SDKs — boto3, the AWS CLI, aws-sdk-rust — work with nothing
else set. The broker applies the same rules as to the sidecar's call-outs: identity by
source address (another pod cannot get this pod's role, nor use its token), IMDSv2 only
under `--direct-mode required`, and the staleness bound.

The stack runs the broker with a non-default role key (`--iam-role-key
meshiam.example/role`): the pods here name their role with it, through either door, and a
pod that uses the standard key gets no role.

Each test prints what it tried and what came back (secrets and tokens redacted).
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, Body, bring_up, creds_of, stack  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="pods without a sidecar are network namespaces of their own: needs root")

ROLE_KEY = "meshiam.example/role"
LONE = "default/lone"          # no sidecar, role myapp-iam-role
OTHER = "default/lone-other"   # no sidecar, role other-role
MESHED = "default/meshed"      # a sidecar, role named with the custom key
OLD_KEY = "default/old-key"    # a sidecar, role named with the standard key only
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
TOKEN_PATH = "/latest/api/token"
TTL = ("X-aws-ec2-metadata-token-ttl-seconds", "300")
MAX_STALENESS = 2  # seconds (--max-staleness for this stack)
sys.path.insert(0, str(ROOT))
from tests.stacklib.artifacts import SDK_CLIENT_BIN as SDK_CLIENT  # noqa: E402

NO_SIDECAR = {"sidecar.istio.io/inject": "false"}
PODS = {
    "pods": [
        {"namespace": "default", "name": "lone", "ips": ["198.18.3.10"], "node": "node-1",
         "annotations": {**NO_SIDECAR, ROLE_KEY: "myapp-iam-role"}},
        {"namespace": "default", "name": "lone-other", "ips": ["198.18.3.11"], "node": "node-1",
         "annotations": {**NO_SIDECAR, ROLE_KEY: "other-role"}},
        {"namespace": "default", "name": "meshed", "ips": ["198.18.3.12"], "node": "node-1",
         "annotations": {ROLE_KEY: "myapp-iam-role"}},
        {"namespace": "default", "name": "old-key", "ips": ["198.18.3.13"], "node": "node-1",
         "annotations": {"iam.amazonaws.com/role": "myapp-iam-role"}},
    ],
    "namespaces": [
        {"name": "default",
         "annotations": {"iam.amazonaws.com/allowed-roles": '["myapp-iam-role", "other-role"]'}},
    ],
}


@pytest.fixture(scope="module")
def s():
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(PODS, f)  # JSON is YAML
    try:
        st = bring_up("--pods", f.name, f"--broker-arg=--iam-role-key={ROLE_KEY}",
                      f"--broker-arg=--max-staleness={MAX_STALENESS}s")
    finally:
        os.unlink(f.name)
    yield st
    stack("down", "--keep-logs", check=False)


def shown(headers):
    return {k: (f"<token: {len(v)} chars>" if k.lower() == "x-aws-ec2-metadata-token" else v)
            for k, v in headers}


def call(s, pod, url, headers=(), method="GET"):
    """curl inside `pod`; returns (status, x-meshiam-reason, body)."""
    argv = ["curl", "-s", "-m", "10", "-X", method, "-o", "/dev/stdout",
            "-w", "\n%{http_code} %header{x-meshiam-reason}"]
    for k, v in headers:
        argv += ["-H", f"{k}: {v}"]
    res = s.exec(pod, *argv, url)
    body, _, tail = res.stdout.rpartition("\n")
    code, _, reason = tail.partition(" ")
    body = Body(body)
    what = "<a token>" if url.endswith(TOKEN_PATH) and code == "200" else body
    print(f"tried: {pod} {method} {url} headers={shown(headers)}\n"
          f"   got: {code} reason={reason or '-'} body={what!s:.160}")
    return int(code or 0), reason, body


def broker(s):
    return s.status["BROKER_URL"]


def token(s, pod):
    code, reason, body = call(s, pod, broker(s) + TOKEN_PATH, [TTL], method="PUT")
    assert code == 200, (code, reason)
    return str.__str__(body)


def identity(res, pod):
    print(f"tried: {pod} {res.args[-1] if res.args else ''}\n   got: rc={res.returncode} "
          f"stdout={res.stdout.strip()[:200]} stderr={res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["Arn"]


def test_the_pod_has_no_sidecar_and_no_way_to_the_nodes_imds(s):
    assert s.pods[LONE].get("SIDECAR") == "none" and s.pods[MESHED].get("SIDECAR") is None
    res = s.exec(LONE, "sh", "-c", "env | grep ^AWS_EC2_METADATA_SERVICE_ENDPOINT=")
    print(f"tried: {LONE} env\n   got: {res.stdout.strip()}")
    assert res.stdout.strip() == f"AWS_EC2_METADATA_SERVICE_ENDPOINT={broker(s)}"
    # Nothing captures 169.254.169.254 in this pod: the guard refuses it (as the node's IMDS
    # refuses pods), so whatever works below went to the broker.
    code, _, _ = call(s, LONE, "http://169.254.169.254" + ROLE_LIST)
    assert code == 0


def test_boto3_in_a_pod_without_a_sidecar_gets_its_role(s):
    res = s.caller_identity(LONE)
    assert identity(res, LONE).endswith(":assumed-role/myapp-iam-role/default.lone")


def test_aws_cli_in_a_pod_without_a_sidecar_gets_its_role(s):
    res = s.exec(LONE, "aws", "sts", "get-caller-identity", "--output", "json")
    assert identity(res, LONE).endswith(":assumed-role/myapp-iam-role/default.lone")


def test_aws_sdk_rust_in_a_pod_without_a_sidecar_gets_its_role(s):
    assert SDK_CLIENT.exists(), "build it: make build"
    # aws-sdk-rust takes the region from IMDS too: leave AWS_DEFAULT_REGION out.
    res = s.exec(LONE, "env", "-u", "AWS_DEFAULT_REGION", str(SDK_CLIENT), "1", "1000", timeout=60)
    print(f"tried: {LONE} sdk_client 1 1000\n   got: rc={res.returncode} {res.stdout.strip()[-200:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0 and summary["calls"] >= 1, summary
    assert summary["arn"].endswith(":assumed-role/myapp-iam-role/default.lone")


def test_imdsv1_is_refused_without_a_sidecar(s):
    for path in (ROLE_LIST, ROLE_LIST + "myapp-iam-role"):
        code, reason, body = call(s, LONE, broker(s) + path)
        assert (code, reason) == (401, "token-required") and "AccessKeyId" not in body
    # With a token from the broker the same reads work.
    t = token(s, LONE)
    code, _, body = call(s, LONE, broker(s) + ROLE_LIST, [("X-aws-ec2-metadata-token", t)])
    assert (code, body) == (200, "myapp-iam-role")
    code, _, body = call(s, LONE, broker(s) + ROLE_LIST + "myapp-iam-role", [("X-aws-ec2-metadata-token", t)])
    assert code == 200 and creds_of(body)["AccessKeyId"]


def test_another_pod_cannot_get_its_role_that_way(s):
    # The other pod, also without a sidecar, gets its own role with the same settings.
    res = s.caller_identity(OTHER)
    assert identity(res, OTHER).endswith(":assumed-role/other-role/default.lone-other")
    # Asking for the first pod's role by name, with its own token: refused.
    t = token(s, OTHER)
    code, reason, body = call(s, OTHER, broker(s) + ROLE_LIST + "myapp-iam-role",
                              [("X-aws-ec2-metadata-token", t)])
    assert code == 404 and reason == "not-pod-role" and "AccessKeyId" not in body
    # The first pod's token is bound to that pod: useless elsewhere.
    stolen = token(s, LONE)
    for pod in (OTHER, MESHED):
        code, reason, body = call(s, pod, broker(s) + ROLE_LIST, [("X-aws-ec2-metadata-token", stolen)])
        assert code == 401 and "myapp-iam-role" not in body, (pod, code, reason)


def test_a_non_default_role_key_names_the_role_through_the_sidecar(s):
    code, _, body = call(s, MESHED, "http://169.254.169.254" + ROLE_LIST)
    assert (code, body) == (200, "myapp-iam-role")
    res = s.caller_identity(MESHED)
    assert identity(res, MESHED).endswith(":assumed-role/myapp-iam-role/default.meshed")
    # The standard key means nothing once another one is configured.
    code, reason, body = call(s, OLD_KEY, "http://169.254.169.254" + ROLE_LIST)
    assert code == 404 and "myapp-iam-role" not in body, (code, reason)
    debug = json.loads(s.admin("/debug/pods/default/meshed"))
    print(f"/debug/pods/default/meshed: roleAnnotationKey={debug.get('roleAnnotationKey')} "
          f"roleAnnotation={debug.get('roleAnnotation')}")
    assert debug["roleAnnotationKey"] == ROLE_KEY and debug["roleAnnotation"] == "myapp-iam-role"


def test_the_staleness_bound_holds_without_a_sidecar(s):
    """Last: it stops and restarts the API double."""
    stack("stop", "kube")
    down_at = time.monotonic()
    print("stopped the Kubernetes API double")
    try:
        time.sleep(MAX_STALENESS + 1.5)
        code, reason, _ = call(s, LONE, broker(s) + TOKEN_PATH, [TTL], method="PUT")
        assert (code, reason) == (503, "pod-store-stale")
        res = s.caller_identity(LONE)
        print(f"tried: {LONE} boto3 after {time.monotonic() - down_at:.1f}s without the API\n"
              f"   got: rc={res.returncode} {res.stderr.strip()[-200:]}")
        assert res.returncode != 0 and "AccessKeyId" not in res.stdout
    finally:
        stack("start", "kube")
    deadline = time.monotonic() + 30
    while True:
        code, reason, _ = call(s, LONE, broker(s) + TOKEN_PATH, [TTL], method="PUT")
        if code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert code == 200, (code, reason)

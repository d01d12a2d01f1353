"""The container-credentials endpoint (EKS Pod Identity's door), end to end.

A pod whose SDKs are given only AWS_CONTAINER_CREDENTIALS_FULL_URI and
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (its projected service-account token, audience
`meshiam`, which the stack writes as a kubelet would), with IMDS disabled, gets its role from
http://169.254.170.23/v1/credentials: the pod's iptables capture sends the connection to its
sidecar, the filter asks the broker, and the broker checks the token with the Kubernetes API
(TokenReview, against the API double) and that it is bound to the pod at the caller's address.
Without a token, with a bad one, or with another pod's, nothing.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Body, ROOT, STACK

sys.path.insert(0, str(ROOT))
from tests.stacklib.state import STATE_FILE  # noqa: E402

pytestmark = pytest.mark.usefixtures("default_stack")

FULL_URI = "http://169.254.170.23/v1/credentials"
from tests.stacklib.artifacts import SDK_CLIENT_BIN as SDK_CLIENT  # noqa: E402


@pytest.fixture(scope="module")
def st(default_stack):
    if not default_stack.netns:
        pytest.skip("the container-credentials address is captured only with network namespaces (root)")
    return default_stack


def token_file(pod):
    """Where the stack put the pod's projected token (tests/stacklib/stack.py write_pod_token)."""
    entry = json.loads(STATE_FILE.read_text())["pods"][pod]
    path = Path(entry["token_file"])
    assert path.exists() and not path.read_text().endswith("\n"), path
    return path


def container_env(pod):
    """Only the container provider's two variables, and IMDS off."""
    return {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": FULL_URI,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file(pod)),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def door(st, pod, *headers):
    """curl GET on the door inside `pod`: (status, x-meshiam-reason, body)."""
    argv = ["curl", "-s", "-m", "5", "-D", "/dev/stderr", "-w", "\n%{http_code}"]
    for h in headers:
        argv += ["-H", h]
    res = st.exec(pod, *argv, FULL_URI)
    body, _, code = res.stdout.rpartition("\n")
    reason = ""
    for line in res.stderr.splitlines():
        if line.lower().startswith("x-meshiam-reason:"):
            reason = line.split(":", 1)[1].strip()
    return int(code or 0), reason, Body(body)


def envoy_stat(st, pod, name):
    res = st.exec(pod, "curl", "-s", "-m", "5", "http://127.0.0.1:15000/stats?filter=" + name)
    for line in res.stdout.splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":", 1)[1])
    return 0


def test_boto3_gets_its_role_through_the_container_door(st):
    before = envoy_stat(st, "default/myapp", "wasmcustom.meshiam.requests.container.200")
    code = ("import boto3, json; s = boto3.Session(); c = s.get_credentials(); "
            "print(json.dumps({'method': c.method, "
            "'arn': s.client('sts').get_caller_identity()['Arn']}))")
    res = st.python("default/myapp", code, env=container_env("default/myapp"))
    print("boto3 with only the container variables:", res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["method"] == "container-role", "botocore must have used the container provider"
    assert "assumed-role/myapp-iam-role/" in out["arn"]
    after = envoy_stat(st, "default/myapp", "wasmcustom.meshiam.requests.container.200")
    print(f"sidecar container.200 answers: {before} -> {after}")
    assert after > before, "the answer came through the sidecar's container door"


def test_aws_sdk_rust_gets_its_role_through_the_container_door(st):
    if not SDK_CLIENT.exists():
        pytest.fail(f"{SDK_CLIENT} missing: make broker")
    # Region from the environment: IMDS is off for the SDK.
    env = dict(container_env("default/myapp"), AWS_REGION="us-east-1")
    res = st.exec("default/myapp", str(SDK_CLIENT), "1", "200", env=env, timeout=60)
    print("aws-sdk-rust:", res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["failures"] == 0 and out["calls"] >= 1, out
    assert "assumed-role/myapp-iam-role/" in out["arn"]


def test_missing_and_wrong_tokens_are_refused(st):
    mine = token_file("default/myapp").read_text()
    plain = token_file("default/plain").read_text()
    cases = [
        ("no Authorization", [], 401, "container-token-missing"),
        ("not a token", ["Authorization: not-a-token"], 401, "container-token-invalid"),
        ("another pod's token", [f"Authorization: {plain}"], 403, "container-token-other-pod"),
        ("sent twice", [f"Authorization: {mine}", f"Authorization: {mine}"], 400, "container-token-repeated"),
    ]
    for what, headers, want_code, want_reason in cases:
        code, reason, body = door(st, "default/myapp", *headers)
        print(f"myapp, {what}: {code} {reason} {body!r}")
        assert (code, reason) == (want_code, want_reason), what
        assert "AccessKeyId" not in body
    code, reason, body = door(st, "default/myapp", f"Authorization: {mine}")
    print(f"myapp, its own token: {code} {body!r}")
    assert code == 200
    doc = json.loads(body)
    assert set(doc) == {"AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration"}
    assert doc["Expiration"].endswith("Z")


def test_another_pod_cannot_use_the_door_for_myapps_role(st):
    mine = token_file("default/myapp").read_text()
    # myapp's token, from the pod `plain` (which has no role): refused, whoever's token it is.
    code, reason, body = door(st, "default/plain", f"Authorization: {mine}")
    print(f"plain with myapp's token: {code} {reason}")
    assert (code, reason) == (403, "container-token-other-pod")
    assert "AccessKeyId" not in body
    # plain's own token: plain's role, which is none.
    plain = token_file("default/plain").read_text()
    code, reason, _ = door(st, "default/plain", f"Authorization: {plain}")
    print(f"plain with its own token: {code} {reason}")
    assert (code, reason) == (404, "no-role")
    # An SDK in `plain` pointed at myapp's token file gets no credentials at all.
    env = dict(container_env("default/plain"),
               AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file("default/myapp")))
    res = st.python("default/plain", "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])",
                    env=env)
    print("boto3 in plain with myapp's token:", res.returncode, res.stderr.strip().splitlines()[-1:])
    assert res.returncode != 0
    assert "myapp-iam-role" not in res.stdout
    echoed = mine in res.stdout + res.stderr  # a bool: a failure must not print the token
    assert not echoed, "the token must not be echoed"


def test_no_token_in_any_log(st):
    """The pods' tokens are secrets: no component logs them (broker, filter, Envoy, API double
    aside, which issued them and logs no body)."""
    tokens = [token_file(p).read_text() for p in ("default/myapp", "default/plain")]
    logs = subprocess.run([STACK, "logs"], capture_output=True, text=True, timeout=60).stdout
    for name in ("broker", "envoy"):
        assert name in logs
    for t in tokens:
        # The signature part alone is enough to recognise a token.
        leaked = t.rsplit(".", 1)[1] in logs  # a bool: a failure must not print the token
        assert not leaked, "a service-account token reached a log"

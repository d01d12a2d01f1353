"""The end-to-end scenarios of the local stack with its default configuration.

Every test acts from inside a pod (tests/stack exec), as an application would.
"""
import json
import subprocess
import tempfile
import time

import pytest

from conftest import STACK, creds_of, parse_time, stack

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
MYAPP = "default/myapp"
ACCOUNT = "123456789012"


# 1. The origin document, and real AWS clients with their default configuration.

def test_origin_document_curl(default_stack):
    s = default_stack
    if s.netns:
        # Exactly the command of the origin document, inside the pod's network namespace.
        res = s.exec(MYAPP, "curl", "-s", "169.254.169.254/latest/meta-data/iam/security-credentials/")
        assert res.returncode == 0, res.stderr
        assert res.stdout == "myapp-iam-role"
    else:
        code, body, _ = s.curl(MYAPP, ROLE_LIST)
        assert (code, body) == (200, "myapp-iam-role")


def test_credentials_document_is_what_sdks_parse(default_stack):
    code, body, _ = default_stack.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
    assert code == 200
    doc = creds_of(body)
    assert doc["Type"] == "AWS-HMAC"
    assert doc["AccessKeyId"] and doc["SecretAccessKey"] and doc["Token"]
    # Second precision, Z suffix: botocore parses %Y-%m-%dT%H:%M:%SZ.
    time.strptime(doc["Expiration"], "%Y-%m-%dT%H:%M:%SZ")


def test_boto3_default_chain_gets_the_pod_role_over_imdsv2(default_stack):
    # AWS_EC2_METADATA_V1_DISABLED makes botocore fail rather than fall back to IMDSv1.
    res = default_stack.caller_identity(MYAPP, env={"AWS_EC2_METADATA_V1_DISABLED": "true"})
    assert res.returncode == 0, res.stderr
    ident = json.loads(res.stdout.strip().splitlines()[-1])
    assert ident["Account"] == ACCOUNT
    assert ident["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/myapp-iam-role/default.myapp"


def test_aws_cli_default_config(default_stack):
    res = default_stack.exec(MYAPP, "aws", "sts", "get-caller-identity", "--output", "json")
    assert res.returncode == 0, res.stderr
    ident = json.loads(res.stdout)
    assert ident["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/myapp-iam-role/default.myapp"


# 2. Who gets nothing.

def test_unannotated_pod_gets_no_credentials(default_stack):
    code, body, _ = default_stack.curl("default/plain", ROLE_LIST)
    assert code == 404
    assert "AccessKeyId" not in body
    res = default_stack.caller_identity("default/plain")
    assert res.returncode != 0
    assert "NoCredentialsError" in res.stderr or "Unable to locate credentials" in res.stderr


def test_pod_asking_for_another_pods_role_gets_nothing(default_stack):
    code, body, _ = default_stack.curl("default/plain", ROLE_LIST + "myapp-iam-role")
    assert code == 404 and "AccessKeyId" not in body
    code, body, _ = default_stack.curl(MYAPP, ROLE_LIST + "reports-reader")
    assert code == 404 and "AccessKeyId" not in body


def test_namespace_restriction(default_stack):
    code, body, _ = default_stack.curl("restricted/allowed", ROLE_LIST + "reports-reader")
    assert code == 200, body
    assert creds_of(body)["AccessKeyId"]
    code, body, _ = default_stack.curl("restricted/forbidden", ROLE_LIST)
    assert code in (403, 404) and "admin" not in body
    code, body, _ = default_stack.curl("restricted/forbidden", ROLE_LIST + "admin")
    assert code in (403, 404) and "AccessKeyId" not in body


# 3. Identity.

def test_app_headers_cannot_claim_another_identity(default_stack):
    forged = ["-H", "x-meshiam-pod-namespace: default", "-H", "x-meshiam-pod-name: myapp",
              "-H", "x-meshiam-filter: forged"]
    code, body, _ = default_stack.curl("default/plain", ROLE_LIST, *forged)
    assert code == 404 and body != "myapp-iam-role"
    forged = ["-H", "x-meshiam-pod-namespace: default", "-H", "x-meshiam-pod-name: plain"]
    code, body, _ = default_stack.curl(MYAPP, ROLE_LIST, *forged)
    assert (code, body) == (200, "myapp-iam-role")


def test_direct_call_to_the_broker_with_forged_identity_is_refused(default_stack):
    s = default_stack
    url = s.status["BROKER_URL"] + ROLE_LIST
    res = s.exec("default/plain", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                 "-H", "x-meshiam-filter: 0.1.0", "-H", "x-meshiam-pod-namespace: default",
                 "-H", "x-meshiam-pod-name: myapp", url)
    assert res.stdout == "403"


def test_token_from_one_pod_is_refused_in_another(default_stack):
    s = default_stack
    token = s.token(MYAPP)
    code, body, _ = s.curl(MYAPP, ROLE_LIST, "-H", f"X-aws-ec2-metadata-token: {token}")
    assert (code, body) == (200, "myapp-iam-role")
    code, _, _ = s.curl("restricted/allowed", ROLE_LIST, "-H", f"X-aws-ec2-metadata-token: {token}")
    assert code == 401


# 4. A pod that asks before the broker has seen it.

def test_pod_created_while_its_first_request_waits(default_stack):
    s = default_stack
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("pods:\n  - namespace: default\n    name: latecomer\n    ips: [\"198.18.1.40\"]\n"
                "    serviceAccount: default\n    node: node-1\n"
                "    annotations:\n      iam.amazonaws.com/role: myapp-iam-role\n")
    stack("pod", "add", f.name, "--defer-api")
    try:
        s.refresh()
        url = s.imds("default/latecomer") + ROLE_LIST
        waiting = subprocess.Popen([STACK, "exec", "default/latecomer", "--", "curl", "-s", "-m", "10",
                                    "-w", "\n%{http_code}", url], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiting.poll() is None, "the request did not wait for the pod to appear"
        t0 = time.monotonic()
        stack("pod", "register", "default/latecomer")
        out, _ = waiting.communicate(timeout=15)
        body, _, code = out.rpartition("\n")
        assert (code, body) == ("200", "myapp-iam-role")
        assert time.monotonic() - t0 < 3
    finally:
        stack("pod", "delete", "default/latecomer", check=False)


# 5. Broker restart and broker down.

def test_broker_restart_keeps_running_pods_served(default_stack):
    s = default_stack
    code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
    assert code == 200
    before = creds_of(body)["AccessKeyId"]
    stack("stop", "broker")
    try:
        for _ in range(3):
            code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
            assert code == 200, body
            assert creds_of(body)["AccessKeyId"] == before
        # Nothing cached for this pod's credentials: a quick error, never anything else.
        code, body, took = s.curl("restricted/allowed", ROLE_LIST + "reports-reader-never-asked")
        assert code in (404, 502, 503, 504)
        code, body, took = s.curl("default/plain", ROLE_LIST)
        assert code in (502, 503, 504), (code, body)
        assert took < 3
        assert "AccessKeyId" not in body
    finally:
        stack("start", "broker")
    code, body, _ = s.curl(MYAPP, ROLE_LIST)
    assert (code, body) == (200, "myapp-iam-role")


# 6. STS down or slow.

def recovers(s, pod, role, within):
    """Polls the pod's credentials until they come, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        code, body, _ = s.curl(pod, ROLE_LIST + role)
        if code == 200:
            return creds_of(body)
        assert time.monotonic() < deadline, f"{pod}: no recovery: {code} {body}"
        time.sleep(1)


def test_sts_outage(default_stack):
    s = default_stack
    code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
    assert code == 200
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("pods:\n  - namespace: default\n    name: newcomer\n    ips: [\"198.18.1.41\"]\n"
                "    node: node-1\n    annotations:\n      iam.amazonaws.com/role: newcomer-role\n")
    stack("stop", "sts")
    try:
        # Cached credentials keep being served.
        code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
        assert code == 200 and creds_of(body)
        stack("pod", "add", f.name)
        s.refresh()
        # A new pod gets a clear error within an SDK's 1 s timeout.
        code, body, took = s.curl("default/newcomer", ROLE_LIST + "newcomer-role", max_time=3)
        assert code in (502, 503, 504), (code, body)
        assert took < 1.5
    finally:
        stack("start", "sts")
    # Service resumes by itself (within the node-wide backoff, at most --sts-backoff-max).
    recovers(s, "default/newcomer", "newcomer-role", within=75)
    stack("pod", "delete", "default/newcomer")


def test_slow_sts_answers_within_the_sdk_timeout(default_stack):
    s = default_stack
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("pods:\n  - namespace: default\n    name: slowpoke\n    ips: [\"198.18.1.42\"]\n"
                "    node: node-1\n    annotations:\n      iam.amazonaws.com/role: slow-role\n")
    stack("sts-delay", "5000")
    try:
        stack("pod", "add", f.name)
        s.refresh()
        code, body, took = s.curl("default/slowpoke", ROLE_LIST + "slow-role", max_time=4)
        assert code in (502, 503, 504), (code, body)
        assert took < 1.5
        # Cached credentials are not affected.
        code, body, took = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
        assert code == 200 and took < 1
    finally:
        stack("sts-delay", "0")
    recovers(s, "default/slowpoke", "slow-role", within=75)
    stack("pod", "delete", "default/slowpoke")


# 8 (first half). Every credential handed out has at least 30 minutes left.

def test_every_answer_has_thirty_minutes_left(default_stack):
    s = default_stack
    for pod, role in ((MYAPP, "myapp-iam-role"), ("restricted/allowed", "reports-reader")):
        code, body, _ = s.curl(pod, ROLE_LIST + role)
        assert code == 200
        left = parse_time(creds_of(body)["Expiration"]) - time.time()
        assert left >= 30 * 60, f"{pod}: only {left:.0f}s left"


# Containment.

@pytest.mark.skipif("os.geteuid() != 0", reason="network namespaces need root")
def test_metadata_traffic_never_leaves_even_without_redirect(default_stack):
    s = default_stack
    ns = s.pods["default/plain"]["NETNS"]
    rule = ["OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "--dport", "80", "-m", "owner",
            "!", "--uid-owner", "1337", "-j", "REDIRECT", "--to-ports", "15001"]
    iptables = ["ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat"]
    # Remove the pod's redirect, as a broken or missing init container would.
    subprocess.run([*iptables, "-D", *rule], check=True)
    try:
        res = s.exec("default/plain", "curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                     "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
        assert res.stdout in ("000", ""), res.stdout
        # The node namespace has no route anywhere but the pods' bridge.
        routes = subprocess.run(["ip", "-n", "msh-node", "route", "show"], capture_output=True, text=True).stdout
        assert "default" not in routes
        links = subprocess.run(["ip", "-n", "msh-node", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            assert name == "lo" or name.startswith("mshbr") or name.startswith("mshv"), line
    finally:
        subprocess.run([*iptables, "-I", *rule], check=True)

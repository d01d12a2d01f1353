"""Scenarios that need a stack with another configuration: IMDSv2 required, and credential
rotation with a session duration shortened for the test."""
import json
import sys
import time

import pytest

from conftest import ROOT, Stack, bring_up, creds_of, parse_time, stack

sys.path.insert(0, str(ROOT))
from tests.stacklib.artifacts import SDK_CLIENT_BIN  # noqa: E402

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
MYAPP = "default/myapp"


@pytest.fixture(scope="module")
def v2_stack():
    s = bring_up("--filter-option", "requireImdsv2=true")
    yield s
    stack("down", "--keep-logs", check=False)


# 7. IMDSv2 required.

def test_imdsv2_required(v2_stack):
    s = v2_stack
    code, _, _ = s.curl(MYAPP, ROLE_LIST)
    assert code == 401
    code, _, _ = s.curl(MYAPP, "/latest/meta-data/placement/region")
    assert code == 401
    token = s.token(MYAPP, ttl=60)
    auth = ["-H", f"X-aws-ec2-metadata-token: {token}"]
    code, body, _ = s.curl(MYAPP, ROLE_LIST, *auth)
    assert (code, body) == (200, "myapp-iam-role")
    # Allow-listed paths are answered (from the node's metadata service, via the broker).
    code, body, _ = s.curl(MYAPP, "/latest/meta-data/placement/region", *auth)
    assert (code, body) == (200, "us-east-1")
    code, body, _ = s.curl(MYAPP, "/latest/meta-data/placement/availability-zone", *auth)
    assert (code, body) == (200, "us-east-1a")
    # Everything else is 404, even paths the node's IMDS has.
    for path in ("/latest/meta-data/local-ipv4", "/latest/user-data", "/latest/meta-data/"):
        code, _, _ = s.curl(MYAPP, path, *auth)
        assert code == 404, path
    # And boto3, which always uses a token first, still works.
    res = s.caller_identity(MYAPP)
    assert res.returncode == 0, res.stderr
    assert ":assumed-role/myapp-iam-role/default.myapp" in res.stdout


# 8. Rotation with a short session.

SHORT_SESSION = 60  # seconds the test's STS sessions last (STS's own minimum is 900)
MIN_LEFT = 30       # the broker refreshes ahead so every answer has this much left
SDK_CLIENT = SDK_CLIENT_BIN


@pytest.fixture(scope="module")
def short_stack():
    s = bring_up("--broker-arg=--allow-short-sessions",
                 f"--broker-arg=--session-duration={SHORT_SESSION}",
                 f"--broker-arg=--min-remaining={MIN_LEFT}",
                 "--broker-arg=--refresh-margin=10s",
                 "--broker-arg=--maintenance-interval=5s",
                 "--filter-option", "cacheFreshSeconds=5")
    yield s
    stack("down", "--keep-logs", check=False)


def test_every_answer_keeps_the_configured_margin(short_stack):
    s = short_stack
    for _ in range(3):
        code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
        assert code == 200
        left = parse_time(creds_of(body)["Expiration"]) - time.time()
        assert left >= MIN_LEFT - 2, f"only {left:.0f}s left"
        time.sleep(SHORT_SESSION / 4)


def test_long_running_sdk_client_rolls_over_without_a_failed_call(short_stack):
    """aws-sdk-rust (IMDSv2 only, default configuration) keeps calling STS for longer than a
    session lasts: every call succeeds, and it signs with more than one set of credentials."""
    s = short_stack
    assert SDK_CLIENT.exists(), "build it: make build"
    run_for = SHORT_SESSION + 30
    res = s.exec(MYAPP, str(SDK_CLIENT), str(run_for), "1000", timeout=run_for + 60)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0, res.stderr
    assert summary["calls"] >= run_for // 2
    assert summary["arn"].endswith(":assumed-role/myapp-iam-role/default.myapp")
    assert summary["keys"] >= 2, f"the client never rolled over to new credentials: {summary}"


# Without root the stack runs on loopback; root can ask for it too.

def test_loopback_stack_serves_the_same_answers():
    stack("down", check=False)
    up = stack("up", "--loopback", timeout=300)
    try:
        assert "running on loopback" in up.stderr
        s = Stack(stack("status").stdout)
        assert s.status["MODE"] == "loopback"
        assert s.pods[MYAPP]["IP"].startswith("127.1.0.")
        code, body, _ = s.curl(MYAPP, ROLE_LIST)
        assert (code, body) == (200, "myapp-iam-role")
        code, _, _ = s.curl("default/plain", ROLE_LIST)
        assert code == 404
        res = s.caller_identity(MYAPP)
        assert res.returncode == 0, res.stderr
        assert ":assumed-role/myapp-iam-role/default.myapp" in res.stdout
    finally:
        stack("down", "--keep-logs")
    # Safe to run twice.
    assert stack("down").returncode == 0

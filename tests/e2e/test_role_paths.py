"""Issue 12: a role annotation with `.` or `..` path segments.

The kube2iam restriction's globs match across `/` (`reports-*` matches
`reports-x/../admin`), and IAM role paths hold no `.` or `..` segments. Before, the broker
accepted such an annotation, the namespace glob permitted it and STS was asked for it; now it
is refused as malformed (`403 invalid-annotation`) and STS is not called.
"""
import os
import subprocess
import time

import pytest

from conftest import ROOT, Body, bring_up, stack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: pods in network namespaces")

ROLE = "iam.amazonaws.com/role"
POD = "restricted/allowed"  # namespace allowed-roles: ["reports-*"]
GOOD = "reports-reader"
CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture(scope="module")
def s():
    st = bring_up()
    if not st.netns:
        stack("down", "--keep-logs", check=False)
        pytest.skip("the stack did not come up in netns mode")
    yield st
    stack("down", "--keep-logs", check=False)


def get(path):
    """GET through the pod's sidecar with a token; (status, x-meshiam-reason, body)."""
    script = (
        "t=$(curl -s -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "
        "http://169.254.169.254/latest/api/token); "
        f"curl -s -m 5 -H \"X-aws-ec2-metadata-token: $t\" -o /dev/stdout "
        "-w '\\n%{http_code}\\n%header{x-meshiam-reason}' "
        f"http://169.254.169.254{path}"
    )
    res = subprocess.run([str(ROOT / "tests/stack"), "exec", POD, "--", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    body, code, reason = (res.stdout.rsplit("\n", 2) + ["", ""])[:3]
    answer = (int(code or 0), reason.strip(), Body(body))
    print(f"{POD}: GET {path} -> {answer[0]} reason={answer[1] or '-'} body={str(answer[2])[:200]!r}")
    return answer


def until(what, fn, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.5)


@pytest.mark.parametrize("role", ["reports-x/../admin", "reports-x/./admin"])
def test_dot_segments_in_the_role_are_refused_not_assumed(s, role):
    until("the pod's own role", lambda: get(CREDS)[:1] == (200,))
    try:
        stack("pod", "annotate", POD, f"{ROLE}={role}")
        print(f"annotated {POD} {ROLE}={role}")
        status, reason, _ = until(
            "the role list to stop naming the old role",
            lambda: (a := get(CREDS))[0] != 200 and a)
        assert (status, reason) == (403, "invalid-annotation")
        for name in ("admin", GOOD):
            status, reason, body = get(CREDS + name)
            assert status == 403 and reason == "invalid-annotation"
            assert "AccessKeyId" not in body
    finally:
        stack("pod", "annotate", POD, f"{ROLE}={GOOD}")
    until("the pod's own role again", lambda: get(CREDS)[:1] == (200,))

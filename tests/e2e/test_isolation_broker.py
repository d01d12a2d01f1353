"""Issue 9, items 3 and 7: the broker trusts only what it can verify, and its tokens die with
their pod.

Every request a pod (or an SSRF through an app) sends straight to the broker's address gets
the same rules as the sidecar's call-outs: the `x-meshiam-filter` marker relaxes nothing,
and where IMDSv2 is required no read is answered without a valid broker token. Broker
tokens are bound to the pod's UID, so a token of a deleted pod is refused for the next pod
at its address. The sidecar path (aws CLI, boto3) keeps working with `requireImdsv2` on and
off. Each test prints what it tried and what came back (secrets and tokens redacted).
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, Body, bring_up, creds_of, stack  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the broker is reached from pod network namespaces: needs root")

MYAPP = "default/myapp"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
CREDS = ROLE_LIST + "myapp-iam-role"
TOKEN_PATH = "/latest/api/token"
MARKER = ("x-meshiam-filter", "0.1.0")
sys.path.insert(0, str(ROOT))
from tests.stacklib.artifacts import BROKER_BIN  # noqa: E402


def shown(headers):
    """Headers for the log line: a token's value is never printed."""
    return {k: (f"<token: {len(v)} chars>" if k.lower() == "x-aws-ec2-metadata-token" else v)
            for k, v in headers}


def direct(s, pod, path, headers=(), method="GET"):
    """A request from inside `pod` straight to the broker's address, not through the sidecar.
    Returns (status, reason, body)."""
    url = s.status["BROKER_URL"] + path
    argv = ["curl", "-s", "-m", "10", "-X", method, "-o", "/dev/stdout",
            "-w", "\n%{http_code} %header{x-meshiam-reason}"]
    for k, v in headers:
        argv += ["-H", f"{k}: {v}"]
    res = s.exec(pod, *argv, url)
    body, _, tail = res.stdout.rpartition("\n")
    code, _, reason = tail.partition(" ")
    body = Body(body)
    what = "<a token>" if path == TOKEN_PATH and code == "200" else body
    print(f"tried: {pod} {method} {url} headers={shown(headers)}\n"
          f"   got: {code} reason={reason or '-'} body={what!s:.160}")
    return int(code or 0), reason, body


def broker_token(s, pod, ttl=300):
    code, reason, body = direct(s, pod, TOKEN_PATH, [("x-aws-ec2-metadata-token-ttl-seconds", str(ttl))],
                                method="PUT")
    assert code == 200, (code, reason)
    return str.__str__(body)


def pod_file(name, ip, role, annotations=None):
    ann = {"iam.amazonaws.com/role": role, **(annotations or {})}
    lines = ["pods:", "  - namespace: default", f"    name: {name}", f'    ips: ["{ip}"]',
             "    serviceAccount: default", "    node: node-1", "    annotations:"]
    lines += [f"      {k}: {v!r}" for k, v in ann.items()]
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    f.write("\n".join(lines) + "\n")
    f.close()
    return f.name


def add_pod(s, name, ip, role, annotations=None):
    path = pod_file(name, ip, role, annotations)
    try:
        stack("pod", "add", path)
    finally:
        os.unlink(path)
    s.refresh()


def cli_identity(s, pod):
    res = s.exec(pod, "aws", "sts", "get-caller-identity", "--output", "json")
    print(f"tried: {pod} aws sts get-caller-identity\n   got: rc={res.returncode} "
          f"{(res.stdout or res.stderr).strip()[:200]}")
    return res


def sidecar_broker_tokens(s, pod):
    """How many broker tokens the pod's sidecar has asked the broker for (its Envoy stats)."""
    res = s.exec(pod, "curl", "-s", "-m", "5", "http://127.0.0.1:15000/stats?filter=meshiam.broker_tokens$")
    for line in res.stdout.splitlines():
        name, _, value = line.partition(": ")
        if name.strip() == "wasmcustom.meshiam.broker_tokens":
            return int(value)
    return 0


def boto3_identity(s, pod):
    res = s.caller_identity(pod)
    print(f"tried: {pod} boto3 sts.get_caller_identity()\n   got: rc={res.returncode} "
          f"{(res.stdout or res.stderr).strip()[:200]}")
    return res


# ------------------------------------------------------------------ the default: required

@pytest.fixture(scope="module")
def default_stack():
    s = bring_up()
    yield s
    stack("down", "--keep-logs", check=False)


@needs_root
def test_marker_without_token_is_refused_under_the_default(default_stack):
    """(a) The filter's marker on a direct request skips nothing: no token, no credentials."""
    s = default_stack
    for path in (ROLE_LIST, CREDS):
        for headers in ([MARKER], [MARKER, ("x-meshiam-pod-namespace", "default"), ("x-meshiam-pod-name", "myapp")]):
            code, reason, body = direct(s, MYAPP, path, headers)
            assert (code, reason) == (401, "token-required")
            assert "AccessKeyId" not in body and "myapp-iam-role" not in body


@needs_root
def test_tokenless_direct_read_is_refused_under_the_default(default_stack):
    """(b) An SSRF-style GET straight to the broker's address, no marker, no token."""
    s = default_stack
    for path in (ROLE_LIST, CREDS):
        code, reason, body = direct(s, MYAPP, path)
        assert (code, reason) == (401, "token-required")
        assert "AccessKeyId" not in body
    # A made-up token is no better.
    code, reason, _ = direct(s, MYAPP, CREDS, [("x-aws-ec2-metadata-token", "0" * 90), MARKER])
    assert (code, reason) == (401, "token-invalid")


@needs_root
def test_direct_imdsv2_flow_still_works(default_stack):
    """(d) A proper token PUT, then the GETs: credentials, as from real IMDS."""
    s = default_stack
    token = broker_token(s, MYAPP, ttl=21600)
    auth = [("x-aws-ec2-metadata-token", token)]
    code, _, body = direct(s, MYAPP, ROLE_LIST, auth)
    assert (code, body) == (200, "myapp-iam-role")
    code, _, body = direct(s, MYAPP, CREDS, auth)
    assert code == 200
    assert creds_of(body)["AccessKeyId"].startswith("ASIA")
    # Tokens are unique: several asked for in a row (some within the same second, with the
    # same TTL) all differ.
    more = [broker_token(s, MYAPP, ttl=600) for _ in range(5)]
    assert len(set(more)) == len(more)
    # Another pod cannot use it.
    code, reason, _ = direct(s, "restricted/allowed", ROLE_LIST, auth)
    assert (code, reason) == (401, "token-invalid")


@needs_root
def test_token_of_a_deleted_pod_is_refused_for_the_next_pod_at_its_address(default_stack):
    """(e) Item 7: a token dies with its pod, also when a new pod gets the same address."""
    s = default_stack
    ip = "198.18.1.60"
    add_pod(s, "reuse-first", ip, "myapp-iam-role")
    try:
        old = broker_token(s, "default/reuse-first", ttl=21600)
        code, _, body = direct(s, "default/reuse-first", ROLE_LIST, [("x-aws-ec2-metadata-token", old)])
        assert (code, body) == (200, "myapp-iam-role")
    finally:
        stack("pod", "delete", "default/reuse-first")
    add_pod(s, "reuse-second", ip, "newcomer-role")
    try:
        # The broker knows the new pod (its own token shows its own role) ...
        fresh = broker_token(s, "default/reuse-second")
        code, _, body = direct(s, "default/reuse-second", ROLE_LIST, [("x-aws-ec2-metadata-token", fresh)])
        assert (code, body) == (200, "newcomer-role")
        # ... and refuses the token of the pod that had its address before.
        for path in (ROLE_LIST, ROLE_LIST + "newcomer-role", CREDS):
            code, reason, body = direct(s, "default/reuse-second", path, [("x-aws-ec2-metadata-token", old), MARKER])
            assert (code, reason) == (401, "token-invalid"), path
            assert "AccessKeyId" not in body
    finally:
        stack("pod", "delete", "default/reuse-second", check=False)


@needs_root
def test_sidecar_path_works_with_imdsv2_optional(default_stack):
    """The sidecar holds its own broker token: the app's SDKs notice nothing."""
    s = default_stack
    res = cli_identity(s, MYAPP)
    assert res.returncode == 0, res.stderr
    assert ":assumed-role/myapp-iam-role/default.myapp" in res.stdout
    res = boto3_identity(s, MYAPP)
    assert res.returncode == 0, res.stderr
    assert ":assumed-role/myapp-iam-role/default.myapp" in res.stdout
    # IMDSv1 through the sidecar (requireImdsv2 is off): the sidecar checks the app's token
    # rule, the broker checks the sidecar's.
    code, body, _ = s.curl(MYAPP, ROLE_LIST)
    print(f"tried: {MYAPP} GET 169.254.169.254{ROLE_LIST} (sidecar, no token)\n   got: {code} {body!s:.80}")
    assert (code, body) == (200, "myapp-iam-role")
    # The sidecar asked with a broker token of its own (one for all its workers).
    n = sidecar_broker_tokens(s, MYAPP)
    print(f"sidecar of {MYAPP}: wasmcustom.meshiam.broker_tokens = {n}")
    assert n >= 1


def test_direct_mode_off_is_refused_with_a_reason():
    """`off` could only be told apart by the forgeable marker: the broker will not start."""
    res = subprocess.run([BROKER_BIN, "--direct-mode", "off", "--pods-file", "/dev/null",
                          "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=10)
    print(f"tried: meshiam-broker --direct-mode off\n   got: rc={res.returncode} {res.stderr.strip()[:300]}")
    assert res.returncode == 2
    assert "no longer supported" in res.stderr and "required" in res.stderr


# ------------------------------------ optional, with requireImdsv2 in the sidecar

STRICT = "default/strict"
STRICT_IP = "198.18.1.61"


@pytest.fixture(scope="module")
def optional_stack():
    s = bring_up("--broker-arg=--direct-mode=optional", "--filter-option", "requireImdsv2=true")
    add_pod(s, "strict", STRICT_IP, "myapp-iam-role", {"meshiam.io/imdsv2": "required"})
    yield s
    stack("down", "--keep-logs", check=False)


@needs_root
def test_annotated_pod_needs_a_token_on_the_direct_path_too(optional_stack):
    """(c) and (a) under `optional`: the pod demands IMDSv2, so the broker refuses its
    tokenless reads whatever header they carry."""
    s = optional_stack
    for headers in ([], [MARKER], [MARKER, ("x-meshiam-pod-namespace", "default"), ("x-meshiam-pod-name", "strict")]):
        for path in (ROLE_LIST, CREDS):
            code, reason, body = direct(s, STRICT, path, headers)
            assert (code, reason) == (401, "token-required")
            assert "AccessKeyId" not in body
    token = broker_token(s, STRICT)
    code, _, body = direct(s, STRICT, CREDS, [("x-aws-ec2-metadata-token", token)])
    assert code == 200
    assert creds_of(body)["AccessKeyId"].startswith("ASIA")


@needs_root
def test_optional_is_what_the_docs_say(optional_stack):
    """Documented weakening: under `optional` a pod without the annotation is answered
    tokenless (IMDSv1 for pods without a sidecar); a bad token is still refused."""
    s = optional_stack
    code, _, body = direct(s, MYAPP, ROLE_LIST)
    assert (code, body) == (200, "myapp-iam-role")
    # A bad token is refused, and the filter's marker does not make it acceptable.
    for headers in ([], [MARKER]):
        code, reason, _ = direct(s, MYAPP, ROLE_LIST, [("x-aws-ec2-metadata-token", "junk"), *headers])
        assert (code, reason) == (401, "token-invalid")


@needs_root
def test_sidecar_path_works_with_imdsv2_required(optional_stack):
    s = optional_stack
    for pod, session in ((MYAPP, "default.myapp"), (STRICT, "default.strict")):
        code, _, _ = s.curl(pod, ROLE_LIST)
        print(f"tried: {pod} GET 169.254.169.254{ROLE_LIST} (sidecar, no token)\n   got: {code}")
        assert code == 401
        res = cli_identity(s, pod)
        assert res.returncode == 0, res.stderr
        assert f":assumed-role/myapp-iam-role/{session}" in res.stdout
        res = boto3_identity(s, pod)
        assert res.returncode == 0, res.stderr
        assert f":assumed-role/myapp-iam-role/{session}" in res.stdout
        # The sidecar asked with a broker token of its own.
        n = sidecar_broker_tokens(s, pod)
        print(f"sidecar of {pod}: wasmcustom.meshiam.broker_tokens = {n}")
        assert n >= 1

"""Issue 15: the call-out carries the pod's workload certificate (broker --mtls).

One netns stack with the mesh CA (`tests/stack up --mtls required`): every pod's sidecar
presents a certificate for its own service account, and the broker requires that the
SPIFFE ID names the pod at the caller's address. As an attacker would try it:
- a pod calling from pod A's address with pod B's certificate (what a pod that spoofs A's
  address holds: its own certificate) is refused, `peer-identity-mismatch`;
- a pod replaced at the same address by a pod of another service account: the old pod's
  sidecar, still at the address, is refused;
- a certificate from a CA the broker does not trust is refused, `peer-certificate-invalid`;
- rotation of the pod certificates and of the mesh root while a pod keeps asking loses no
  request;
- direct callers (no sidecar) under each mode: `required` refuses plain HTTP and TLS without
  a certificate (`peer-certificate-missing`) unless the namespace allows plain callers;
  `preferred` serves them, still refusing a bad certificate (`off`, no TLS at all, is what
  every other e2e module runs).
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import ROOT, Body, bring_up, stack

sys.path.insert(0, str(ROOT))
from tests.stacklib import meshca  # noqa: E402
from tests.stacklib import stack as stacklib  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: pods in network namespaces, calling the broker from their own address")

ROLES = "/latest/meta-data/iam/security-credentials/"
TOKEN = "/latest/api/token"
MYAPP = "default/myapp"
PLAIN = "default/plain"
ALLOWED = "restricted/allowed"
SIDECAR = "http://169.254.169.254"
TTL = ["-H", "X-aws-ec2-metadata-token-ttl-seconds: 60"]
# A new certificate is used from the sidecar's next broker connection on: an idle one is
# closed after 3 s by the sidecar (a busy one after an answer once its verdict is 10 s old,
# by the broker). IDLE lets the sidecar's connections go before a check.
SWITCH = 20
IDLE = 3.5


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory):
    doc = yaml.safe_load((ROOT / "tests/pods.yaml").read_text())
    for ns in doc["namespaces"]:
        if ns["name"] == "restricted":
            ns.setdefault("annotations", {})["meshiam.io/allow-plain-callers"] = "true"
    pods = tmp_path_factory.mktemp("mtls") / "pods.yaml"
    pods.write_text(yaml.safe_dump(doc))
    # cacheFreshSeconds=0: every request is a call-out, so each one is judged by the broker.
    s = bring_up("--mtls", "required", "--pods", pods, "--filter-option", "cacheFreshSeconds=0")
    if not s.netns:
        stack("down", "--keep-logs", check=False)
        pytest.skip("the stack did not come up in netns mode")
    yield s
    stack("down", "--keep-logs", check=False)


def curl(s, pod, url, *extra, method="GET"):
    """curl in the pod's network namespace; returns (status, x-meshiam-reason, body), and
    prints what it tried."""
    argv = ["ip", "netns", "exec", s.pods[pod]["NETNS"], "curl", "-s", "-m", "10", "-X", method,
            "-o", "/dev/stdout", "-w", "\n%{http_code}\n%header{x-meshiam-reason}", *extra, url]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    body, code, reason = (res.stdout.rsplit("\n", 2) + ["", ""])[:3]
    answer = (int(code or 0), reason.strip(), Body(body))
    text = f"<token, {len(body)} characters>" if method == "PUT" and answer[0] == 200 else str(answer[2])[:200]
    shown = [os.path.basename(a) if a.startswith("/") else
             "X-aws-ec2-metadata-token: <redacted>" if a.lower().startswith("x-aws-ec2-metadata-token:") else a
             for a in extra]
    print(f"{pod}: {method} {url} {' '.join(shown)} -> {answer[0]} reason={answer[1] or '-'} body={text!r}")
    return answer


def until(what, probe, want, timeout=SWITCH, times=4):
    """Asks `probe` until its answer's (status, reason) is `want` `times` times in a row (the
    sidecar's workers each hold a broker connection of their own)."""
    deadline = time.monotonic() + timeout
    streak = 0
    while True:
        got = probe()
        streak = streak + 1 if got[:2] == want else 0
        if streak >= times:
            return got
        assert time.monotonic() < deadline, f"{what}: {got[:2]} after {timeout}s, want {want} {times} times in a row"
        time.sleep(0.3)


def pod_entry(key):
    return stacklib.load_state()["pods"][key]


def cert_args(key):
    d = meshca.pod_dir(pod_entry(key))
    # -k: the broker's certificate names its SPIFFE ID, not the address curl dials (the
    # sidecar checks that ID; here the broker's side is under test).
    return ["-k", "--cert", str(d / "cert-chain.pem"), "--key", str(d / "key.pem")]


def broker_https(s):
    return s.status["BROKER_URL"].replace("http://", "https://")


def metrics(s):
    return s.admin("/metrics")


def counter(text, name, **labels):
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(sel)}}} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def broker_log():
    return ANSI.sub("", (stacklib.LOGS / "broker.log").read_text(errors="replace"))


def audit_lines(needle):
    return [line for line in broker_log().splitlines() if "meshiam::audit" in line and needle in line]


def test_call_out_presents_the_pods_certificate_and_is_audited(mtls_stack):
    s = mtls_stack
    code, reason, body = curl(s, MYAPP, SIDECAR + ROLES)
    assert (code, body) == (200, "myapp-iam-role"), reason
    code, _, body = curl(s, MYAPP, SIDECAR + ROLES + "myapp-iam-role")
    assert code == 200 and json.loads(body)["Code"] == "Success"
    lines = audit_lines('peer_identity="spiffe://cluster.local/ns/default/sa/myapp"')
    print(f"audit lines with myapp's SPIFFE ID: {len(lines)}; last: {lines[-1][-300:] if lines else None}")
    assert lines, "the audit line does not carry the verified SPIFFE ID"
    m = metrics(s)
    assert counter(m, "meshiam_broker_mtls_checks_total", result="verified") >= 2
    assert counter(m, "meshiam_broker_mtls_connections_total", result="tls") >= 1


def test_wrong_certificates_are_refused(mtls_stack):
    """myapp's sidecar with a valid certificate for another pod (what a pod that spoofs
    myapp's address holds: its own), then with one from a CA the broker does not trust."""
    s = mtls_stack
    try:
        stack("mesh", "issue", MYAPP, "--spiffe", "spiffe://cluster.local/ns/restricted/sa/default")
        time.sleep(IDLE)
        until("myapp with restricted/default's certificate", lambda: curl(s, MYAPP, SIDECAR + ROLES),
              (403, "peer-identity-mismatch"))
        code, reason, body = curl(s, MYAPP, SIDECAR + ROLES + "myapp-iam-role")
        assert (code, reason) == (403, "peer-identity-mismatch") and "AccessKeyId" not in body
        assert [line for line in broker_log().splitlines()
                if "meshiam::security" in line and 'event="peer-identity-mismatch"' in line]

        stack("mesh", "issue", MYAPP, "--foreign-ca")
        time.sleep(IDLE)
        until("myapp with a certificate from a foreign CA", lambda: curl(s, MYAPP, SIDECAR + ROLES),
              (403, "peer-certificate-invalid"))
        # The same, called directly over TLS with that certificate.
        code, reason, _ = curl(s, MYAPP, broker_https(s) + TOKEN, *cert_args(MYAPP), *TTL, method="PUT")
        assert (code, reason) == (403, "peer-certificate-invalid")
    finally:
        stack("mesh", "issue", MYAPP)
    time.sleep(IDLE)
    until("myapp with its own certificate again", lambda: curl(s, MYAPP, SIDECAR + ROLES), (200, ""))


def test_direct_callers_in_required_mode(mtls_stack):
    s = mtls_stack
    broker = s.status["BROKER_URL"]
    # Plain HTTP from a pod of a namespace without the annotation.
    assert curl(s, MYAPP, broker + TOKEN, *TTL, method="PUT")[:2] == (403, "peer-certificate-missing")
    assert curl(s, PLAIN, broker + ROLES)[:2] == (403, "peer-certificate-missing")
    # TLS without a client certificate counts as plain.
    assert curl(s, MYAPP, broker_https(s) + TOKEN, "-k", *TTL, method="PUT")[:2] == \
        (403, "peer-certificate-missing")
    # The pod's own certificate, called directly: a token, then its role.
    code, _, token = curl(s, MYAPP, broker_https(s) + TOKEN, *cert_args(MYAPP), *TTL, method="PUT")
    assert code == 200
    code, _, body = curl(s, MYAPP, broker_https(s) + ROLES, *cert_args(MYAPP), "-H",
                         f"X-aws-ec2-metadata-token: {token}")
    assert (code, body) == (200, "myapp-iam-role")
    # A namespace annotated meshiam.io/allow-plain-callers: "true" keeps plain direct calls.
    code, _, token = curl(s, ALLOWED, broker + TOKEN, *TTL, method="PUT")
    assert code == 200
    code, _, body = curl(s, ALLOWED, broker + ROLES, "-H", f"X-aws-ec2-metadata-token: {token}")
    assert (code, body) == (200, "reports-reader")
    # ... but not a wrong certificate.
    code, reason, _ = curl(s, ALLOWED, broker_https(s) + TOKEN, *cert_args(MYAPP), *TTL, method="PUT")
    assert (code, reason) == (403, "peer-identity-mismatch")


def test_pod_replaced_at_the_same_address_by_another_service_account(mtls_stack):
    """kiam#119's IP reuse: plain's address now belongs to a pod of another service account
    (with a role), while plain's sidecar is still there. Without the certificate check that
    sidecar would get the newcomer's credentials."""
    s = mtls_stack
    state = stacklib.load_state()
    entry = state["pods"][PLAIN]
    spec = dict(entry["spec"], name="successor", serviceAccount="successor",
                annotations={"iam.amazonaws.com/role": "myapp-iam-role"})
    stacklib.api_delete_pod(state, PLAIN)
    stacklib.api_add_pod(state, spec)
    try:
        got = until("plain's sidecar at the successor's address", lambda: curl(s, PLAIN, SIDECAR + ROLES),
                    (403, "peer-identity-mismatch"))
        assert "myapp-iam-role" not in got[2]
        code, reason, body = curl(s, PLAIN, SIDECAR + ROLES + "myapp-iam-role")
        assert (code, reason) == (403, "peer-identity-mismatch") and "AccessKeyId" not in body
        # Called directly with the old pod's certificate, claiming nothing: the certificate
        # alone refuses it.
        code, reason, _ = curl(s, PLAIN, broker_https(s) + TOKEN, *cert_args(PLAIN), *TTL, method="PUT")
        assert (code, reason) == (403, "peer-identity-mismatch")
    finally:
        stacklib.api_delete_pod(stacklib.load_state(), "default/successor")
        stacklib.api_add_pod(stacklib.load_state(), entry["spec"])


def test_rotation_of_pod_certificates_and_root_loses_no_request(mtls_stack):
    s = mtls_stack
    before = (meshca.pod_dir(pod_entry(MYAPP)) / "cert-chain.pem").read_bytes()
    reloads_before = counter(metrics(s), "meshiam_broker_mtls_reloads_total", what="roots", result="ok")
    loop = (
        "import json, time, urllib.request\n"
        "ok = bad = 0; seen = {}\n"
        "end = time.monotonic() + 9\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        r = urllib.request.urlopen('http://169.254.169.254/latest/meta-data/iam/security-credentials/', timeout=5)\n"
        "        body = r.read().decode(); ok += body == 'myapp-iam-role'; bad += body != 'myapp-iam-role'\n"
        "    except Exception as e:\n"
        "        bad += 1; seen[str(e)[:80]] = seen.get(str(e)[:80], 0) + 1\n"
        "    time.sleep(0.02)\n"
        "print(json.dumps({'ok': ok, 'bad': bad, 'errors': seen}))\n"
    )
    result = {}
    t = threading.Thread(target=lambda: result.update(res=s.python(MYAPP, loop, timeout=60)))
    t.start()
    time.sleep(1.5)
    t0 = time.monotonic()
    stack("mesh", "rotate", "--root")
    print(f"rotated the root, the broker's and every pod's certificate in {time.monotonic() - t0:.1f}s")
    t.join()
    res = result["res"]
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"requests during the rotation: {summary}")
    assert summary["bad"] == 0, summary
    assert summary["ok"] > 100
    assert (meshca.pod_dir(pod_entry(MYAPP)) / "cert-chain.pem").read_bytes() != before
    state = stacklib.load_state()
    assert state["mesh"]["roots"] == [state["mesh"]["issuer"]] and state["mesh"]["issuer"] != "root-1"
    m = metrics(s)
    # Two root changes: the new root added, the old one removed.
    assert counter(m, "meshiam_broker_mtls_reloads_total", what="roots", result="ok") >= reloads_before + 2
    assert re.search(r"^meshiam_broker_mtls_root_certificates 1$", m, re.M), "the old root is still trusted"
    # And the new certificates are the ones in use.
    until("myapp's call-out with the new certificate", lambda: curl(s, MYAPP, SIDECAR + ROLES), (200, ""))


def restart_broker(mode):
    state = stacklib.load_state()
    state["mtls"] = mode
    stacklib.save_state(state)
    stack("stop", "broker")
    stack("start", "broker")


def test_direct_callers_in_preferred_mode(mtls_stack):
    """Last: it leaves the broker in `preferred`. (`off` is every other e2e module's mode.)"""
    s = mtls_stack
    broker = s.status["BROKER_URL"]
    restart_broker("preferred")
    print("broker restarted with --mtls preferred")
    code, _, token = curl(s, MYAPP, broker + TOKEN, *TTL, method="PUT")
    assert code == 200
    assert curl(s, MYAPP, broker + ROLES, "-H", f"X-aws-ec2-metadata-token: {token}")[::2] == \
        (200, "myapp-iam-role")
    # A presented certificate must still be right.
    assert curl(s, PLAIN, broker_https(s) + TOKEN, *cert_args(MYAPP), *TTL, method="PUT")[:2] == \
        (403, "peer-identity-mismatch")
    # The sidecars' call-outs keep working.
    assert curl(s, MYAPP, SIDECAR + ROLES)[::2] == (200, "myapp-iam-role")

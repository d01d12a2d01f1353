"""Issue 9, items 4 and 5, as an attacker would try them on the netns stack.

4. A stale pod store and IP reuse: with the Kubernetes API down, pod A is deleted (the broker
   cannot learn it) and a new pod comes up at A's address and calls the broker directly. The
   broker must refuse once its view has been out of date longer than --max-staleness
   (503 pod-store-stale), say so in /readyz, keep the sidecars serving still-valid cached
   credentials, and serve again by itself when the API is back.
5. The admin port from a pod: nothing there lists roles or access key ids; /readyz and
   /metrics still answer for probes and Prometheus.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Body, bring_up, stack

sys.path.insert(0, str(ROOT))
from tests.stacklib import stack as stacklib  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: pods in network namespaces, calling the broker from their own address")

CREDS = "/latest/meta-data/iam/security-credentials/"
MYAPP = "default/myapp"
PLAIN = "default/plain"
ALLOWED = "restricted/allowed"
NEWCOMER = "default/newcomer"
MYAPP_IP = "198.18.1.10"
BOUND = 5  # the broker's default --max-staleness, seconds
TTL = ["-H", "X-aws-ec2-metadata-token-ttl-seconds: 60"]
# Never on the admin port for a pod to read.
ROLE_WORDS = ("myapp-iam-role", "reports-reader", "arn:aws:iam", "AccessKeyId", "accessKeyId", "ASIA")


@pytest.fixture(scope="module")
def store_stack():
    # cacheFreshSeconds=0: the sidecars ask the broker every time, so an answer from their
    # cache while the broker refuses is the filter's broker-failed path, not a cache hit.
    s = bring_up("--filter-option", "cacheFreshSeconds=0")
    if not s.netns:
        stack("down", "--keep-logs", check=False)
        pytest.skip("the stack did not come up in netns mode")
    yield s
    stack("down", "--keep-logs", check=False)


def curl(argv_prefix, url, *extra, method="GET"):
    """curl from a network namespace; returns (status, x-meshiam-reason, x-meshiam-source,
    body)."""
    argv = argv_prefix + ["curl", "-s", "-m", "10", "-X", method, "-o", "/dev/stdout",
                          "-w", "\n%{http_code}\n%header{x-meshiam-reason}\n%header{x-meshiam-source}",
                          *extra, url]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    body, code, reason, source = (res.stdout.rsplit("\n", 3) + ["", "", ""])[:4]
    return int(code or 0), reason.strip(), source.strip(), Body(body)


def in_pod(s, pod):
    return [str(ROOT / "tests/stack"), "exec", pod, "--"]


def in_node():
    return ["ip", "netns", "exec", stacklib.NODE_NS]


def show(who, method, url, answer):
    code, reason, source, body = answer
    text = str(body)
    if method == "PUT" and code == 200:
        text = f"<token redacted, {len(text)} characters>"
    if len(text) > 300:
        text = text[:300] + "…"
    print(f"{who}: {method} {url} -> {code} reason={reason or '-'} source={source or '-'} body={text!r}")


def key_id(body):
    return json.loads(body)["AccessKeyId"]


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def broker_pid():
    return stacklib.load_state()["procs"]["broker"]["pid"]


# 5. The admin port, from a pod.

def test_admin_port_lists_no_roles_or_key_ids_to_a_pod(store_stack):
    s = store_stack
    admin = s.status["BROKER_ADMIN_URL"]  # the node's address, as a pod reaches it
    # myapp has credentials in the broker's cache: the per-pod view used to show their key id.
    answer = curl(in_pod(s, MYAPP), "http://169.254.169.254" + CREDS + "myapp-iam-role")
    assert answer[0] == 200, answer
    myapp_key = key_id(answer[3])

    for path in ("/debug/pods", "/debug/pods/default/myapp", "/debug/pods/restricted/allowed"):
        answer = curl(in_pod(s, PLAIN), admin + path)
        show(PLAIN, "GET", admin + path, answer)
        code, _, _, body = answer
        assert code in (403, 404), f"{path} answered {code} to a pod"
        for word in ROLE_WORDS + (myapp_key, MYAPP_IP):
            assert word not in body, f"{path} shows {word!r} to a pod"

    # Probes and Prometheus keep working, from the node and from anywhere, and name no
    # role, key or pod address.
    for who, prefix in (("node", in_node()), (PLAIN, in_pod(s, PLAIN))):
        for path in ("/readyz", "/metrics", "/healthz"):
            answer = curl(prefix, admin + path)
            code, _, _, body = answer
            print(f"{who}: GET {admin}{path} -> {code} ({len(body)} bytes)")
            assert code == 200, (who, path, answer)
            for word in ROLE_WORDS + (myapp_key, MYAPP_IP):
                assert word not in body, f"{path} shows {word!r}"
        assert "meshiam_broker_requests_total" in curl(prefix, admin + "/metrics")[3]

    # The node itself (its loopback) still gets the explanation, without the key id.
    view = s.admin("/debug/pods/default/myapp")
    print(f"node loopback: GET /debug/pods/default/myapp -> {view[:200]!r}…")
    doc = json.loads(view)
    assert doc["decision"]["roleArn"].endswith(":role/myapp-iam-role")
    assert "accessKeyId" not in doc["cache"] and myapp_key not in view


# 4. A stale pod store and a new pod at a deleted pod's address.

def test_a_stale_pod_store_refuses_a_new_pod_at_a_deleted_pods_address(store_stack, tmp_path):
    s = store_stack
    broker = s.status["BROKER_URL"]
    admin = s.status["BROKER_ADMIN_URL"]
    sidecar = "http://169.254.169.254"
    pid = broker_pid()

    answer = curl(in_pod(s, MYAPP), sidecar + CREDS + "myapp-iam-role")
    show(MYAPP, "GET", sidecar + CREDS + "myapp-iam-role", answer)
    assert answer[0] == 200
    answer = curl(in_pod(s, ALLOWED), sidecar + CREDS + "reports-reader")
    show(ALLOWED, "GET", sidecar + CREDS + "reports-reader", answer)
    assert answer[:3] == (200, "", "broker")
    allowed_key = key_id(answer[3])

    # The API goes away; then pod A (myapp) is deleted, which the broker cannot learn.
    stack("stop", "kube")
    down_at = time.monotonic()
    print("stopped the Kubernetes API double")
    stack("pod", "delete", MYAPP, "--keep-api")
    print(f"deleted {MYAPP} ({MYAPP_IP}): network and sidecar gone, the API never told")
    newcomer = tmp_path / "newcomer.yaml"
    newcomer.write_text(json.dumps({"pods": [{
        "namespace": "default", "name": "newcomer", "ips": [MYAPP_IP], "serviceAccount": "default",
        "node": "node-1", "annotations": {"iam.amazonaws.com/role": "newcomer-role"}}]}))
    stack("pod", "add", newcomer, "--defer-api")
    print(f"started {NEWCOMER} at {MYAPP_IP} (not in the API: it is down)")

    wait = down_at + BOUND + 1.5 - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    print(f"{time.monotonic() - down_at:.1f}s since the API went down (bound {BOUND}s)")

    # The new pod calls the broker directly, as an SDK would: token, then credentials.
    put = curl(in_pod(s, NEWCOMER), broker + "/latest/api/token", *TTL, method="PUT")
    show(NEWCOMER, "PUT", broker + "/latest/api/token", put)
    token = ["-H", f"X-aws-ec2-metadata-token: {put[3]}"] if put[0] == 200 else []
    got = {}
    for path in (CREDS, CREDS + "myapp-iam-role"):
        got[path] = curl(in_pod(s, NEWCOMER), broker + path, *token)
        show(NEWCOMER, "GET", broker + path, got[path])
    for path, (code, _, _, body) in got.items():
        assert "AccessKeyId" not in body and "myapp-iam-role" not in body, \
            f"the new pod at {MYAPP_IP} got the deleted pod's role from {path}"
    assert put[:2] == (503, "pod-store-stale"), put
    for path, answer in got.items():
        assert answer[:2] == (503, "pod-store-stale"), (path, answer)

    # A live pod keeps its still-valid credentials: the broker's 503 makes its sidecar
    # serve them from its cache.
    answer = curl(in_pod(s, ALLOWED), sidecar + CREDS + "reports-reader")
    show(ALLOWED, "GET", sidecar + CREDS + "reports-reader", answer)
    assert answer[0] == 200 and answer[2] == "stale", answer
    assert key_id(answer[3]) == allowed_key

    # Readiness says why; the gauge says for how long.
    ready = curl(in_node(), admin + "/readyz")
    show("node", "GET", admin + "/readyz", ready)
    assert ready[0] == 503 and "pod-store-stale" in ready[3] and "watch has been down" in ready[3]
    metrics = curl(in_node(), admin + "/metrics")[3]
    stale_for = metric(metrics, "meshiam_broker_pod_store_stale_seconds")
    print(f"meshiam_broker_pod_store_stale_seconds {stale_for}")
    assert stale_for is not None and stale_for >= BOUND
    assert 'outcome="pod-store-stale"' in metrics

    # The API comes back. The broker re-lists and answers again by itself, without a
    # restart. (`tests/stack start kube` creates the stack's namespaces and registered pods
    # again in the restarted double, as a real API would still have them; the newcomer is
    # created now.)
    stack("start", "kube")
    up_at = time.monotonic()
    deadline = up_at + 30
    while curl(in_node(), admin + "/readyz")[0] != 200:
        assert time.monotonic() < deadline, curl(in_node(), admin + "/readyz")
        time.sleep(0.2)
    print(f"started the API double; /readyz 200 after {time.monotonic() - up_at:.1f}s")
    assert broker_pid() == pid and stacklib.alive(pid), "the broker was restarted"
    state = stacklib.load_state()
    stacklib.register_pod(state, NEWCOMER)
    print(f"in the API now: {', '.join(sorted(state['pods']))}")

    # Served again: the newcomer gets its own role, never myapp's; the live pod gets fresh
    # answers from the broker.
    deadline = time.monotonic() + 15
    while True:
        answer = curl(in_pod(s, ALLOWED), sidecar + CREDS + "reports-reader")
        if answer[:3] == (200, "", "broker") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    show(ALLOWED, "GET", sidecar + CREDS + "reports-reader", answer)
    assert answer[:3] == (200, "", "broker"), answer
    put = curl(in_pod(s, NEWCOMER), broker + "/latest/api/token", *TTL, method="PUT")
    show(NEWCOMER, "PUT", broker + "/latest/api/token", put)
    assert put[0] == 200, put
    token = ["-H", f"X-aws-ec2-metadata-token: {put[3]}"]
    role_list = curl(in_pod(s, NEWCOMER), broker + CREDS, *token)
    show(NEWCOMER, "GET", broker + CREDS, role_list)
    assert role_list[:2] == (200, "") and role_list[3] == "newcomer-role"
    theft = curl(in_pod(s, NEWCOMER), broker + CREDS + "myapp-iam-role", *token)
    show(NEWCOMER, "GET", broker + CREDS + "myapp-iam-role", theft)
    assert theft[:2] == (404, "not-pod-role")
    assert curl(in_node(), admin + "/readyz")[0] == 200

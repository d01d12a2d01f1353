"""The Kubernetes API double restarted under a running stack (issue 10, item 3).

Before: a restarted double was empty and accepted the broker's resumed watch at a
resourceVersion it never issued, so the broker never re-listed and kept every pod while the
API had none. Now the double answers such a watch with 410 Gone (the broker re-lists), and
`tests/stack start kube` re-registers the stack's pods, so after a restart the broker's pods
are the API's pods again — and follow the API's changes.
"""
import json
import subprocess
import time

import pytest

from conftest import bring_up, creds_of, stack

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
MYAPP = "default/myapp"
GONE = "default/plain"


@pytest.fixture(scope="module")
def api_stack():
    s = bring_up()
    yield s
    stack("down", "--keep-logs", check=False)


def on_node(s, *argv):
    if s.netns:
        argv = ("ip", "netns", "exec", "msh-node") + argv
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20)


def api_pods(s):
    res = on_node(s, "curl", "-s", "-m", "5", s.status["KUBE_API_URL"] + "/api/v1/pods")
    try:
        return sorted(f"{p['metadata']['namespace']}/{p['metadata']['name']}"
                      for p in json.loads(res.stdout)["items"])
    except (ValueError, KeyError):
        return None


def broker_pods(s):
    try:
        return sorted(p["pod"] for p in json.loads(s.admin("/debug/pods"))["pods"])
    except (ValueError, KeyError):
        return None


def converge(s, within, what):
    """Waits until the broker holds exactly the API's pods; returns them."""
    deadline = time.monotonic() + within
    while True:
        api, broker = api_pods(s), broker_pods(s)
        if api is not None and api == broker:
            print(f"{what}: API and broker agree on {len(api)} pods")
            return api
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: after {within} s the broker has {broker}, the API has {api}")
        time.sleep(0.5)


def test_broker_converges_to_the_api_after_the_api_restarts(api_stack):
    s = api_stack
    before = converge(s, 10, "before the restart")
    assert MYAPP in before and GONE in before
    stack("stop", "kube")
    stack("start", "kube")
    after = converge(s, 30, "after the restart")
    print(f"API pods after the restart: {after}")
    # The stack re-registered its pods: the restarted API says what the stack is.
    assert after == before
    code, body, _ = s.curl(MYAPP, ROLE_LIST)
    print(f"{MYAPP} role list after the restart: {code} {body}")
    assert (code, body) == (200, "myapp-iam-role")

    # The broker follows the restarted API: a pod deleted there is gone from the broker
    # (its resumed watch was not silently accepted at a stale resourceVersion).
    res = on_node(s, "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                  s.status["KUBE_API_URL"] + "/api/v1/namespaces/default/pods/plain")
    print(f"DELETE {GONE} in the API: {res.stdout}")
    assert res.stdout == "200"
    now = converge(s, 15, "after deleting a pod in the API")
    assert GONE not in now and MYAPP in now
    code, body, _ = s.curl(GONE, ROLE_LIST)
    print(f"{GONE} role list once the API no longer has it: {code} {body}")
    assert code != 200 and "AccessKeyId" not in body
    code, body, _ = s.curl(MYAPP, ROLE_LIST + "myapp-iam-role")
    assert code == 200, body
    assert creds_of(body)["AccessKeyId"]

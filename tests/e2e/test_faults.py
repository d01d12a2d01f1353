"""Faults, end to end (issue 10): the system recovers by itself and no pod ever gets another
pod's or the node's credentials.

1. A watch that hangs without closing: the API double's watches go silent (no events, no
   bookmarks, no end) while a pod is deleted and its address reused by a pod with another
   role. The broker's read timeout (--watch-idle-timeout) drops the silent watch, marks the
   store down and re-lists, so it learns of the new pod within the bound instead of kube's
   ~5 min watch timeout; meanwhile the new pod's sidecar is refused (identity cross-check),
   never served the old pod's role. With the API wedged entirely (lists hang too) the store
   goes stale and the broker refuses (503 pod-store-stale, /readyz) until the API is back.
2. STS throttling: a fault proxy answers AssumeRole as STS does when it throttles. Pods with
   cached credentials keep being served; a pod needing fresh ones gets a well-formed refusal;
   the broker's STS calls during the window are few (node-wide backoff), not one per
   request; all is well once STS stops throttling.
3. The broker killed mid-request: SIGKILL while a sidecar call-out waits on a slow STS. The
   pod gets a status at once (no hang), cached pods keep being served by their sidecars, and
   after a restart the pod gets its role again by itself (the sidecar's broker session from
   the dead process is refused 401 and replaced).

Every step checks the role each pod answers with (its own, or a refusal), and every command
run in a pod fails the test if the node's credentials reach it (conftest.Stack.exec).
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, STACK, Body, bring_up, stack

sys.path.insert(0, str(ROOT))
from tests.stacklib import stack as stacklib  # noqa: E402

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
IDLE = 4  # the stack's --watch-idle-timeout, seconds
BACKOFF_MAX = 4  # the stack's --sts-backoff-max, seconds

MYAPP, PLAIN, ALLOWED, FORBIDDEN = "default/myapp", "default/plain", "restricted/allowed", "restricted/forbidden"
NEWCOMER = "default/newcomer"
FRESH = "faults/fresh"
SLOWPOKE = "faults/slowpoke"

# What each pod's role list must answer: its own role, or None for a refusal.
EXPECTED = {MYAPP: "myapp-iam-role", PLAIN: None, ALLOWED: "reports-reader", FORBIDDEN: None}


@pytest.fixture(scope="module")
def fs():
    s = bring_up(
        # Bookmarks every second, as a real API server sends them every minute.
        "--kube-arg=--bookmark-interval-ms=1000",
        f"--broker-arg=--watch-idle-timeout={IDLE}s",
        f"--broker-arg=--sts-backoff-max={BACKOFF_MAX}s",
        "--broker-arg=--negative-cache-ttl=1s",
        # Call-outs stay in flight long enough to kill the broker under one (item 3).
        "--broker-arg=--request-wait=2s",
    )
    yield s
    stack("down", "--keep-logs", check=False)


# ---------------------------------------------------------------------------- helpers


def ask(s, pod, path, *extra, max_time=5):
    """GET from inside the pod through its sidecar: (status, reason, source, body, seconds)."""
    argv = ["curl", "-s", "-m", str(max_time), "-o", "/dev/stdout", *extra,
            "-w", "\n%{http_code}\n%header{x-meshiam-reason}\n%header{x-meshiam-source}\n%{time_total}",
            s.imds(pod) + path]
    res = s.exec(pod, *argv, timeout=max_time + 30)
    body, code, reason, source, took = (res.stdout.rsplit("\n", 4) + ["", "", "", ""])[:5]
    # curl's own measure of the request, not the time to start a process in the pod.
    return int(code or 0), reason.strip(), source.strip(), Body(body), float(took or "inf")


def show(pod, path, answer):
    code, reason, source, body, took = answer
    text = str(body)
    text = text if len(text) <= 200 else text[:200] + "…"
    print(f"  {pod}: GET {path} -> {code} reason={reason or '-'} source={source or '-'} "
          f"({took:.2f} s) body={text!r}")


def check_roles(s, expected, when):
    """Every pod answers with its own role and that role's credentials, or is refused."""
    print(f"roles {when}:")
    for pod, role in sorted(expected.items()):
        answer = ask(s, pod, ROLE_LIST)
        show(pod, ROLE_LIST, answer)
        code, _, _, body, _ = answer
        if role is None:
            assert code != 200 and "AccessKeyId" not in body, (pod, answer)
            continue
        assert (code, str(body)) == (200, role), (pod, answer)
        answer = ask(s, pod, ROLE_LIST + role)
        show(pod, ROLE_LIST + role, answer)
        assert answer[0] == 200 and json.loads(answer[3])["AccessKeyId"], (pod, answer)


def on_node(s, *argv, timeout=20):
    if s.netns:
        argv = ("ip", "netns", "exec", stacklib.NODE_NS) + argv
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def double(s, method, path):
    res = on_node(s, "curl", "-s", "-m", "5", "-X", method, "-w", "\n%{http_code}", s.status["KUBE_API_URL"] + path)
    body, _, code = res.stdout.rpartition("\n")
    print(f"API double: {method} {path} -> {code} {body}")
    return int(code or 0), body


def add_pods(s, text):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        stack("pod", "add", f.name)
    finally:
        os.unlink(f.name)
    s.refresh()


def log_lines(name, since_marker, *words):
    path = stacklib.LOGS / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    text = text[since_marker:] if since_marker else text
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the broker's colours
    return [line for line in text.splitlines() if all(w in line for w in words)]


def log_size(name):
    path = stacklib.LOGS / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


FAULTS_NS = """
namespaces:
  - name: faults
    annotations:
      iam.amazonaws.com/allowed-roles: '["fault-*"]'
"""


class StsFault:
    """tests/stacklib/stsfault.py in place of the stack's STS proxy, on its port."""

    def __init__(self, s):
        self.s = s
        state = stacklib.load_state()
        self.port = stacklib.port(state, "sts")
        moto = stacklib.port(state, "moto")
        host = "0.0.0.0" if s.netns else "127.0.0.1"
        stack("stop", "sts")
        argv = [str(ROOT / ".venv/bin/python"), "-m", "tests.stacklib.stsfault", host, str(self.port),
                "127.0.0.1", str(moto)]
        if s.netns:
            argv = ["ip", "netns", "exec", stacklib.NODE_NS] + argv
        self.log = open(stacklib.LOGS / "stsfault.log", "ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while self.stats() is None:
            assert time.monotonic() < deadline, "the STS fault proxy did not start"
            time.sleep(0.2)

    def control(self, method, path):
        res = on_node(self.s, "curl", "-s", "-m", "5", "-X", method, f"http://127.0.0.1:{self.port}{path}")
        try:
            return json.loads(res.stdout)
        except ValueError:
            return None

    def stats(self):
        doc = self.control("GET", "/_fault/stats")
        return None if doc is None else doc["stats"]

    def assume_role(self, outcome):
        return ((self.stats() or {}).get("AssumeRole") or {}).get(outcome, 0)

    def set(self, what):
        doc = self.control("POST", what)
        print(f"STS fault proxy: POST {what} -> {doc}")
        assert doc is not None

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()
        stack("start", "sts")


@pytest.fixture(scope="module")
def sts_fault(fs):
    f = StsFault(fs)
    yield f
    f.close()


# ---------------------------------------------------------------------------- 1. a hung watch


def test_a_hung_watch_is_dropped_and_an_address_reused_meanwhile_never_gets_the_old_role(fs):
    s = fs
    if not s.netns:
        pytest.skip("needs the netns stack: on loopback a new pod gets a new address")
    check_roles(s, EXPECTED, "before")
    myapp_ip = s.pods[MYAPP]["IP"]
    mark = log_size("broker")

    code, _ = double(s, "POST", "/_double/hang-watches")
    assert code == 200, "the API double cannot hang its watches"
    t0 = time.monotonic()
    # While every watch is silent: myapp goes, and a pod with another role takes its address.
    stack("pod", "delete", MYAPP)
    add_pods(s, f"""
pods:
  - namespace: default
    name: newcomer
    ips: ["{myapp_ip}"]
    serviceAccount: default
    node: node-1
    annotations:
      iam.amazonaws.com/role: newcomer-role
""")
    print(f"{NEWCOMER} is up at {myapp_ip}, {time.monotonic() - t0:.1f} s after the watches hung")

    # The newcomer asks until it gets its own role; never myapp's.
    answers = []
    while True:
        answer = ask(s, NEWCOMER, ROLE_LIST)
        answers.append(answer)
        show(NEWCOMER, ROLE_LIST, answer)
        code, reason, _, body, _ = answer
        assert "myapp-iam-role" not in body and "AccessKeyId" not in body, answer
        if code == 200:
            assert str(body) == "newcomer-role", answer
            break
        # Until the broker has re-listed, its store says the address is myapp's: the
        # sidecar's identity (default/newcomer) does not match, and it is refused.
        assert code == 403, answer
        assert time.monotonic() - t0 < IDLE + 10, \
            f"the broker did not learn of {NEWCOMER} within {IDLE + 10} s of the watches hanging"
        time.sleep(0.3)
    took = time.monotonic() - t0
    print(f"{NEWCOMER} got its own role {took:.1f} s after the watches hung "
          f"(--watch-idle-timeout {IDLE} s; {len(answers) - 1} refusals before)")

    failed = log_lines("broker", mark, "watch failed")
    print("broker:", *(line[-220:] for line in failed[:3]), sep="\n  ")
    assert failed, "the broker never noticed the silent watch"
    answer = ask(s, NEWCOMER, ROLE_LIST + "newcomer-role")
    show(NEWCOMER, ROLE_LIST + "newcomer-role", answer)
    assert answer[0] == 200 and json.loads(answer[3])["AccessKeyId"]
    answer = ask(s, NEWCOMER, ROLE_LIST + "myapp-iam-role")
    show(NEWCOMER, ROLE_LIST + "myapp-iam-role", answer)
    assert answer[0] != 200 and "AccessKeyId" not in answer[3]

    # Still hung: new watches hang too, the broker keeps re-listing and stays ready.
    ready = readyz(s)
    print(f"broker /readyz while the watches hang: {ready}")
    assert ready.endswith(" 200")

    # Wedged entirely (lists hang too): the re-lists fail on the same read timeout, and
    # once the store has been down for --max-staleness (5 s) the broker refuses.
    code, _ = double(s, "POST", "/_double/slow?delayMs=60000")
    assert code == 200
    t1 = time.monotonic()
    while not (ready := readyz(s)).endswith(" 503"):
        assert time.monotonic() - t1 < IDLE + 5 + 8, f"the broker stayed ready with a wedged API: {ready}"
        time.sleep(0.5)
    print(f"broker /readyz {time.monotonic() - t1:.1f} s after the API wedged: {ready}")
    assert "pod-store-stale" in ready
    answer = ask(s, PLAIN, ROLE_LIST)
    show(PLAIN, ROLE_LIST, answer)
    assert answer[:2] == (503, "pod-store-stale"), answer
    # A pod with cached credentials keeps them (its sidecar serves them while the broker
    # refuses), and they are its own.
    answer = ask(s, NEWCOMER, ROLE_LIST + "newcomer-role")
    show(NEWCOMER, ROLE_LIST + "newcomer-role", answer)
    assert answer[0] == 200 and answer[2] in ("cache", "stale"), answer

    code, _ = double(s, "POST", "/_double/recover")
    assert code == 200
    t2 = time.monotonic()
    while not (ready := readyz(s)).endswith(" 200"):
        assert time.monotonic() - t2 < 20, f"the broker did not recover: {ready}"
        time.sleep(0.5)
    print(f"broker ready again {time.monotonic() - t2:.1f} s after the API recovered")
    expected = dict(EXPECTED, **{NEWCOMER: "newcomer-role"})
    del expected[MYAPP]
    check_roles(s, expected, "after the API recovered")
    _, stats = double(s, "GET", "/_double/stats")


def readyz(s):
    return on_node(s, "curl", "-s", "-m", "5", "-w", " %{http_code}", "http://127.0.0.1:"
                   + s.status["BROKER_ADMIN_URL"].rsplit(":", 1)[1] + "/readyz").stdout


# ---------------------------------------------------------------------------- 2. STS throttling


def asks_in_pod(s, pod, path, count, pause):
    """`count` GETs from inside the pod, `pause` seconds apart, in one shell: their statuses."""
    url = s.imds(pod) + path
    script = (f"for i in $(seq {count}); do curl -s -m 5 -o /dev/null -w '%{{http_code}} ' {url}; "
              f"sleep {pause}; done")
    res = s.exec(pod, "sh", "-c", script, timeout=count * (pause + 6) + 30)
    return [int(c) for c in res.stdout.split()]


def test_sts_throttling_is_survived_with_few_sts_calls(fs, sts_fault):
    s, sts = fs, sts_fault
    expected = {p: r for p, r in EXPECTED.items() if p in s.pods}
    if NEWCOMER in s.pods:
        expected[NEWCOMER] = "newcomer-role"
    check_roles(s, expected, "before STS throttles")

    sts.set("/_fault/throttle?code=Throttling")
    before = sts.assume_role("throttled")
    t0 = time.monotonic()
    add_pods(s, FAULTS_NS + """
pods:
  - namespace: faults
    name: fresh
    ips: ["198.18.1.30"]
    node: node-1
    annotations:
      iam.amazonaws.com/role: fault-reader
""")
    # A pod needing fresh credentials: refused, with a status and a reason, at once.
    answer = ask(s, FRESH, ROLE_LIST)
    show(FRESH, ROLE_LIST, answer)
    assert (answer[0], str(answer[3])) == (200, "fault-reader"), answer
    answer = ask(s, FRESH, ROLE_LIST + "fault-reader")
    show(FRESH, ROLE_LIST + "fault-reader", answer)
    code, reason, _, body, took = answer
    assert code == 503 and "AccessKeyId" not in body, answer
    assert reason == "sts-throttled", answer
    assert took < 3, answer
    # The broker says so directly too (a pod without a sidecar): 503 sts-throttled.

    # It keeps asking (as SDKs retry); pods with cached credentials keep being served.
    statuses = asks_in_pod(s, FRESH, ROLE_LIST + "fault-reader", 30, 0.2)
    print(f"  {FRESH}: 30 more asks during the throttling: {statuses}")
    assert set(statuses) == {503}, statuses
    check_roles(s, expected, "while STS throttles (cached credentials)")

    # ThrottlingException (other AWS query services' code) is throttling too.
    sts.set("/_fault/throttle?code=ThrottlingException")
    statuses = asks_in_pod(s, FRESH, ROLE_LIST + "fault-reader", 10, 0.2)
    print(f"  {FRESH}: 10 asks while STS answers ThrottlingException: {statuses}")
    assert set(statuses) == {503}, statuses
    window = time.monotonic() - t0
    calls = sts.assume_role("throttled") - before
    asked = 2 + 30 + 10 + len(expected)
    print(f"throttled AssumeRole calls in {window:.1f} s: {calls} (for {asked}+ pod requests; "
          f"backoff 0.5 s doubling to {BACKOFF_MAX} s)")
    # Node-wide backoff: 0.5, 1, 2, 4, 4 … s between calls, jittered down by up to half.
    assert 1 <= calls <= 4 + window / (BACKOFF_MAX / 2), calls
    assert calls < asked / 3, calls

    metrics = on_node(s, "curl", "-s", "-m", "5", "http://127.0.0.1:"
                      + s.status["BROKER_ADMIN_URL"].rsplit(":", 1)[1] + "/metrics").stdout
    for line in metrics.splitlines():
        if "throttled" in line and not line.startswith("#"):
            print(f"  broker metric: {line}")

    # STS is back: the pod gets its credentials by itself, within the backoff.
    sts.set("/_fault/clear")
    t1 = time.monotonic()
    while True:
        answer = ask(s, FRESH, ROLE_LIST + "fault-reader")
        if answer[0] == 200:
            break
        assert answer[0] == 503 and time.monotonic() - t1 < BACKOFF_MAX * 2 + 5, answer
        time.sleep(0.5)
    show(FRESH, ROLE_LIST + "fault-reader", answer)
    print(f"{FRESH} served {time.monotonic() - t1:.1f} s after STS stopped throttling")
    assert json.loads(answer[3])["AccessKeyId"]
    check_roles(s, dict(expected, **{FRESH: "fault-reader"}), "after STS stopped throttling")


# ---------------------------------------------------------------------------- 3. the broker killed


def envoy_active_callouts(s, pod):
    entry = stacklib.load_state()["pods"][pod]
    url = (f"http://127.0.0.1:{entry.get('admin_port', stacklib.ENVOY_ADMIN)}"
           "/stats?filter=cluster.meshiam_broker.upstream_rq_active")
    argv = ["curl", "-s", "-m", "2", url]
    if entry.get("netns"):
        argv = ["ip", "netns", "exec", entry["netns"]] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        name, _, value = line.partition(": ")
        if name == "cluster.meshiam_broker.upstream_rq_active":
            return int(value)
    return 0


def test_the_broker_killed_mid_request_gives_an_answer_and_recovers(fs, sts_fault):
    s, sts = fs, sts_fault
    expected = {p: r for p, r in EXPECTED.items() if p in s.pods}
    for pod, role in ((NEWCOMER, "newcomer-role"), (FRESH, "fault-reader")):
        if pod in s.pods:
            expected[pod] = role
    check_roles(s, expected, "before the broker is killed")

    sts.set("/_fault/delay?ms=8000")
    add_pods(s, FAULTS_NS + """
pods:
  - namespace: faults
    name: slowpoke
    ips: ["198.18.1.31"]
    node: node-1
    annotations:
      iam.amazonaws.com/role: fault-writer
""")
    answer = ask(s, SLOWPOKE, ROLE_LIST)
    show(SLOWPOKE, ROLE_LIST, answer)
    assert (answer[0], str(answer[3])) == (200, "fault-writer"), answer

    # The credentials call-out waits on STS (held 8 s) when the broker dies.
    argv = [STACK, "exec", SLOWPOKE, "--", "curl", "-s", "-m", "10", "-o", "/dev/stdout",
            "-w", "\n%{http_code}\n%header{x-meshiam-reason}\n%{time_total}", s.imds(SLOWPOKE) + ROLE_LIST + "fault-writer"]
    pod_call = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while envoy_active_callouts(s, SLOWPOKE) < 1:
        assert pod_call.poll() is None, pod_call.communicate()
        assert time.monotonic() < deadline, "the call-out never started"
        time.sleep(0.02)
    pid = stacklib.load_state()["procs"]["broker"]["pid"]
    stack("stop", "broker", "--kill")
    killed = time.monotonic()
    print(f"broker (pid {pid}) SIGKILLed with a call-out from {SLOWPOKE} in flight")
    out, err = pod_call.communicate(timeout=30)
    waited = time.monotonic() - killed
    body, code, reason, total = (out.rsplit("\n", 3) + ["", "", ""])[:4]
    print(f"  {SLOWPOKE}: GET {ROLE_LIST}fault-writer -> {code} reason={reason or '-'} "
          f"(curl {total} s, {waited:.2f} s after the kill) body={Body(body)!r}")
    for marker in ("NODE-ROLE-MUST-NOT-LEAK", "AKIANODEMUSTNOTLEAK0", "node-secret-must-not-leak"):
        assert marker not in out
    assert (code, reason) == ("503", "broker-unavailable"), (code, reason, Body(body), err)
    assert "AccessKeyId" not in body
    assert waited < 4, "the pod waited past the sidecar's call-out timeout"

    # With the broker down, sidecars serve still-valid cached credentials.
    for pod, role in sorted(expected.items()):
        if role:
            answer = ask(s, pod, ROLE_LIST + role)
            show(pod, ROLE_LIST + role, answer)
            assert answer[0] == 200 and answer[2] in ("cache", "stale"), answer
    answer = ask(s, SLOWPOKE, ROLE_LIST + "fault-writer")
    show(SLOWPOKE, ROLE_LIST + "fault-writer", answer)
    assert answer[:2] == (503, "broker-unavailable") and "AccessKeyId" not in answer[3], answer

    sts.set("/_fault/clear")
    mark = log_size("broker")
    stack("start", "broker")
    t0 = time.monotonic()
    while True:
        answer = ask(s, SLOWPOKE, ROLE_LIST + "fault-writer")
        if answer[0] == 200:
            break
        assert time.monotonic() - t0 < 15, answer
        time.sleep(0.5)
    show(SLOWPOKE, ROLE_LIST + "fault-writer", answer)
    print(f"{SLOWPOKE} served {time.monotonic() - t0:.1f} s after the broker restarted")
    assert json.loads(answer[3])["AccessKeyId"]
    # Its sidecar's broker session was the dead broker's: refused, replaced, asked again.
    refused = log_lines("broker", mark, "token-invalid")
    print("broker after the restart:", *(line[-200:] for line in refused[:3]), sep="\n  ")
    assert refused, "no sidecar's old broker token was refused: the 401 retry path was not exercised"
    check_roles(s, dict(expected, **{SLOWPOKE: "fault-writer"}), "after the broker restarted")


# ---------------------------------------------------------------------------- 4. Envoy's VM reloaded

WASM_VM = "wasm.envoy.wasm.runtime.v8"


def envoy_stats(pod, prefix):
    entry = stacklib.load_state()["pods"][pod]
    argv = ["curl", "-s", "-m", "2", f"http://127.0.0.1:{stacklib.ENVOY_ADMIN}/stats?filter={prefix}"]
    out = subprocess.run(["ip", "netns", "exec", entry["netns"]] + argv, capture_output=True, text=True,
                         timeout=10).stdout
    stats = {}
    for line in out.splitlines():
        name, _, value = line.partition(": ")
        try:
            stats[name] = int(value)
        except ValueError:
            pass
    return stats


def wasm_configs(node):
    """Every wasm filter config in a (listener) document."""
    if isinstance(node, dict):
        if "vm_config" in node and "configuration" in node:
            yield node
        for v in node.values():
            yield from wasm_configs(v)
    elif isinstance(node, list):
        for v in node:
            yield from wasm_configs(v)


def write_lds(lds_dir, listeners, generation):
    """The listeners as an LDS file, with the wasm VM's configuration naming `generation`:
    a VM configuration Envoy has no VM for makes it start new ones (its VM key is the vm_id,
    the VM configuration and the code). The plugin configuration changes too."""
    listeners = json.loads(json.dumps(listeners))
    for cfg in wasm_configs(listeners):
        cfg["vm_config"]["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                             "value": f"generation-{generation}"}
        plugin = json.loads(cfg["configuration"]["value"])
        plugin["brokerTimeoutMs"] = 2500 - generation  # any change will do
        cfg["configuration"]["value"] = json.dumps(plugin, separators=(",", ":"))
    doc = {"resources": [dict(item, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"})
                         for item in listeners]}
    tmp = lds_dir / "lds.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(lds_dir / "lds.json")  # a move in the watched directory: Envoy reloads


def broker_token_puts(s):
    """Token PUTs the broker has answered 200: sidecars asking for a broker session."""
    metrics = on_node(s, "curl", "-s", "-m", "5", "http://127.0.0.1:"
                      + s.status["BROKER_ADMIN_URL"].rsplit(":", 1)[1] + "/metrics").stdout
    total = 0
    for line in metrics.splitlines():
        if line.startswith("meshiam_broker_requests_total{") and 'path="token"' in line and 'outcome="ok"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def sidecar_from_lds_file(pod):
    """Restarts the pod's sidecar with its listeners taken from a file (LDS
    `path_config_source`) instead of the bootstrap; returns (listeners, lds directory)."""
    import yaml
    state = stacklib.load_state()
    entry = state["pods"][pod]
    rendered = stacklib.STATE_DIR / "envoy" / f"{entry['index']}.yaml"
    doc = yaml.safe_load(rendered.read_text())
    listeners = doc["static_resources"].pop("listeners")
    lds_dir = stacklib.STATE_DIR / "envoy" / f"lds-{entry['index']}"
    lds_dir.mkdir(parents=True, exist_ok=True)
    write_lds(lds_dir, listeners, 0)
    doc["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": str(lds_dir / "lds.json"), "watched_directory": {"path": str(lds_dir)}}}}
    bootstrap = stacklib.STATE_DIR / "envoy" / f"{entry['index']}-lds.json"
    bootstrap.write_text(json.dumps(doc))
    name = stacklib.envoy_name(entry)
    stacklib.stop_proc(state, name)
    argv = [stacklib.VENV / "bin/envoy", "-c", bootstrap, "--disable-hot-restart", "--log-level", "warning",
            "--concurrency", "2"]
    stacklib.spawn(state, name, argv, netns=entry["netns"], uid=stacklib.ENVOY_UID)
    admin = f"http://127.0.0.1:{stacklib.ENVOY_ADMIN}/ready"
    stacklib.wait_until(f"Envoy of {pod} (listeners from a file)",
                        lambda: stacklib.http_ok(state, entry["netns"], admin), timeout=30)
    return listeners, lds_dir, name


def test_a_reloaded_wasm_vm_keeps_serving_credentials(fs):
    s = fs
    if not s.netns:
        pytest.skip("needs the netns stack")
    pod, role = ALLOWED, "reports-reader"
    listeners, lds_dir, envoy = sidecar_from_lds_file(pod)
    creds = ROLE_LIST + role
    token = s.token(pod, ttl=600)
    ttl_hdr = f"x-aws-ec2-metadata-token: {token}"
    code, body, _ = s.curl(pod, creds, "-H", ttl_hdr)
    print(f"  {pod}: GET {creds} with a token -> {code} {body}")
    assert code == 200
    key_before = json.loads(body)["AccessKeyId"]
    vms = envoy_stats(pod, WASM_VM)
    print(f"{envoy} before the reload: {vms}")
    log_mark, token_puts = log_size(envoy), broker_token_puts(s)

    # Asks every 0.1 s with that token while the listeners (and the VM) are replaced.
    url = s.imds(pod) + creds
    script = (f"for i in $(seq 50); do curl -s -m 5 -o /dev/null -H '{ttl_hdr}' "
              f"-w '%{{http_code}}/%header{{x-meshiam-source}} ' {url}; sleep 0.1; done")
    env = stacklib.pod_env(stacklib.load_state(), stacklib.load_state()["pods"][pod])
    loop = subprocess.Popen(["ip", "netns", "exec", s.pods[pod]["NETNS"], "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    updates = envoy_stats(pod, "listener_manager.lds.update_success").get("listener_manager.lds.update_success", 0)
    time.sleep(1)
    write_lds(lds_dir, listeners, 1)
    deadline = time.monotonic() + 10
    while envoy_stats(pod, "listener_manager.lds.update_success").get(
            "listener_manager.lds.update_success", 0) <= updates:
        assert time.monotonic() < deadline, "Envoy did not take the new listeners"
        time.sleep(0.1)
    print(f"{envoy}: listeners replaced from the file")
    out, err = loop.communicate(timeout=120)
    answers = out.split()
    print(f"  {pod}: 50 asks across the reload: {' '.join(answers)}")
    assert len(answers) == 50 and all(a.startswith("200/") for a in answers), (out, err)

    vms_after = envoy_stats(pod, WASM_VM)
    print(f"{envoy} after the reload: {vms_after}")
    assert vms_after.get(f"{WASM_VM}.created", 0) > vms.get(f"{WASM_VM}.created", 0), \
        "Envoy did not start a new wasm VM"
    # Shared data outlives the VM (same vm_id): the token from before the reload is still
    # good, the cached credentials are the same, and the new VM needs no new broker session.
    # Past the cache's freshness (3 s) the new VM asks the broker, with the broker session
    # the old VMs got.
    time.sleep(3.5)
    answer = ask(s, pod, creds, "-H", ttl_hdr)
    show(pod, creds + " (with the token from before the reload)", answer)
    assert answer[:3] == (200, "", "broker"), answer
    assert json.loads(answer[3])["AccessKeyId"] == key_before
    sessions = broker_token_puts(s) - token_puts
    print(f"broker token PUTs (node-wide) during and after the reload: {sessions}")
    assert sessions == 0
    bad = [line for line in log_lines(envoy, log_mark)
           if any(w in line.lower() for w in ("panic", "critical", "vm failed", "wasm vm"))]
    print(f"{envoy} log after the reload: {len(bad)} panic/critical/VM failure lines")
    assert not bad, bad[:3]
    check_roles(s, {ALLOWED: role, FORBIDDEN: None, PLAIN: None}, "after the VM reload")

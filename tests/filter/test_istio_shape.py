"""Issue 14, Istio: the filter answers metadata in the shape of Istio's generated sidecar
configuration (envoy/istio-shape*.yaml), reached through Istio's capture (a network namespace,
every outbound TCP connection of the application redirected to 15001), and in the shipped
scoping ordinary port-80 traffic never enters the wasm VM."""

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
def test_filter_answers_metadata_in_istios_shape(wasm, tmp_path):
    r = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(HERE, "netns_istio_shape.py"), wasm, str(tmp_path)],
        capture_output=True, cwd=HERE, timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    for shape, got in out.items():
        print(f"{shape}: curl 169.254.169.254{'/latest/meta-data/iam/security-credentials/'} -> {got['curl']}")
        print(f"{shape}: the same with Host imds.example -> {got['other_host']}")
        print(f"{shape}: 5 ordinary GETs to 198.18.2.1:80 -> {[g[1] for g in got['ordinary']]}; "
              f"calls into the VM: {got['ordinary_vm_calls']}")
        # The filter answers, by Host and by destination alike, with the broker's role.
        assert got["curl"][1:] == [200, None, ROLE], shape
        assert got["other_host"][1:] == [200, None, ROLE], shape
        assert got["broker_calls"] >= 1, shape
        # Ordinary traffic goes where it was sent.
        assert [g[1:] for g in got["ordinary"]] == [[200, None, "ordinary upstream"]] * 5, shape
    # The WasmPlugin on port 80 runs on every port-80 request; the shipped scoping on none.
    assert out["istio-shape"]["ordinary_vm_calls"] >= 10
    assert out["istio-shape-scoped"]["ordinary_vm_calls"] == 0

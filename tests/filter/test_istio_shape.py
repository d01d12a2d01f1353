"""Issue 14, Istio: the filter answers metadata in the shape of Istio's generated sidecar
configuration (envoy/istio-shape*.yaml), reached through Istio's capture (a network namespace,
every outbound TCP connection of the application redirected to 15001), and in the shipped
scoping ordinary port-80 traffic never enters the wasm VM."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from meshiam_filter_harness import ROLE, ROOT, Envoy, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"


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
    # A metadata Host sent to another address: the WasmPlugin's filter answers it by Host; under
    # the shipped scoping it is ordinary traffic to that address (not the IMDS, not the broker).
    print("Host 169.254.169.254 to 198.18.2.1:80:", {k: v["host_elsewhere"] for k, v in out.items()})
    assert out["istio-shape"]["host_elsewhere"][1:] == [200, None, ROLE]
    assert out["istio-shape-scoped"]["host_elsewhere"][1:] == [200, None, "ordinary upstream"]
    assert out["istio-shape-scoped"]["host_elsewhere_broker_calls"] == 0
    # The WasmPlugin on port 80 runs on every port-80 request; the shipped scoping on none.
    assert out["istio-shape"]["ordinary_vm_calls"] >= 10
    assert out["istio-shape-scoped"]["ordinary_vm_calls"] == 0


def test_shipped_envoyfilter_refuses_until_the_filter_arrives(wasm, broker, tmp_path):
    """The EnvoyFilter's listener, as shipped (manifests/overlays/istio/namespace), in a real
    Envoy: until ECDS has delivered the filter (a file here, Istio's ADS there) every request
    is refused by the default RBAC filter, never passed on; once the EXTENSION_CONFIG arrives
    (its oci:// module a local file, as the istio-agent hands it to Envoy) the filter answers."""
    manifest = os.path.join(ROOT, "manifests", "overlays", "istio", "namespace", "envoyfilter.yaml")
    with open(manifest) as f:
        patches = yaml.safe_load(f)["spec"]["configPatches"]
    (ext,) = [p["patch"]["value"] for p in patches if p["applyTo"] == "EXTENSION_CONFIG"]
    # One listener patch per metadata address, identical but for the listener's name
    # (tests/deploy checks that): the first, 169.254.169.254_80's.
    hcm = [p["patch"]["value"] for p in patches if p["applyTo"] == "NETWORK_FILTER"][0]
    ecds = tmp_path / "ecds.yaml"
    ecds.write_text(yaml.safe_dump({"version_info": "0", "resources": []}))
    discovery = hcm["typed_config"]["http_filters"][0]["config_discovery"]
    discovery["config_source"] = {"path_config_source": {"path": str(ecds)}, "resource_api_version": "V3",
                                  "initial_fetch_timeout": "0s"}
    port, admin = free_port(), free_port()
    broker_cluster = json.loads(ext["typed_config"]["config"]["configuration"]["value"])["brokerCluster"]
    bootstrap = {
        "node": {"id": "sidecar~127.0.0.1~myapp-7d9f.default", "cluster": "meshiam-sidecar",
                 "metadata": {"NAME": "myapp-7d9f", "NAMESPACE": "default"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "169.254.169.254_80",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [hcm]}]}],
            "clusters": [{"name": broker_cluster, "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": broker_cluster, "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": broker.port}}}}]}]}}],
        },
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    envoy = Envoy(str(config), port, admin, str(tmp_path / "envoy.log"))
    try:
        r = envoy.get(ROLE_LIST)
        print(f"before the filter arrives: GET {ROLE_LIST} -> {r.status_code} {r.text!r}")
        assert (r.status_code, r.text) == (403, "RBAC: access denied")
        assert broker.requests == [] and broker.token_puts == []

        delivered = copy.deepcopy(ext)
        delivered["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": wasm}}
        delivered["@type"] = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
        staged = tmp_path / "ecds.new"
        staged.write_text(yaml.safe_dump({"version_info": "1", "resources": [delivered]}))
        os.rename(staged, ecds)  # Envoy watches the file for a move onto it
        deadline = time.monotonic() + 15
        while True:
            r = envoy.get(ROLE_LIST)
            if r.status_code != 403 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"after the EXTENSION_CONFIG arrives: GET {ROLE_LIST} -> {r.status_code} {r.text!r}")
        assert (r.status_code, r.text) == (200, ROLE)
    finally:
        envoy.stop()

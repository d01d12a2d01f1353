"""The plain-Envoy component's init container fills the rendered sidecar configuration in for
its pod: name, namespace, and addresses (node metadata INSTANCE_IPS and the metadata chain's
accepted sources). Its shell script is taken from the patch and run here with the files
pointed at a temporary directory; the result must be a valid Envoy configuration that answers
metadata only to loopback and the pod's own addresses."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import MANIFESTS, REPO, SIDECAR_RENDER_SETS

PATCH = MANIFESTS / "overlays" / "plain-envoy" / "sidecar" / "sidecar-patch.yaml"
ENVOY_BIN = REPO / ".venv" / "bin" / "envoy"
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "meshiam_filter.wasm"


def init_script():
    doc = yaml.safe_load(PATCH.read_text())
    (init,) = [c for c in doc["spec"]["template"]["spec"]["initContainers"] if c["name"] == "meshiam-capture"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_IPS": "status.podIPs"}
    assert init["command"][:2] == ["/bin/sh", "-ec"]
    return init["command"][2]


def fill(tmp_path, pod_ips):
    template = tmp_path / "template.yaml"
    cmd = [sys.executable, str(REPO / "envoy" / "render.py"), str(REPO / "envoy" / "sidecar.yaml"),
           "-o", str(template)]
    for k, v in SIDECAR_RENDER_SETS.items():
        cmd += ["--set", f"{k}={v}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    assert "@POD_IPS@" in template.read_text() and "@POD_IPS_RANGES@" in template.read_text()
    out = tmp_path / "envoy.yaml"
    script = (init_script()
              .replace("/usr/local/bin/meshiam-iptables", "true")
              .replace("cp /usr/local/share/meshiam/plugin.wasm /meshiam/filter/plugin.wasm", "true")
              .replace("/meshiam/template/envoy.yaml", str(template))
              .replace("/meshiam/envoy/envoy.yaml", str(out)))
    env = {"PATH": os.environ["PATH"], "POD_NAME": "myapp-7d9f", "POD_NAMESPACE": "default", "POD_IPS": pod_ips}
    res = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=30)
    return res, out


def test_init_container_fills_in_the_pods_addresses(tmp_path):
    res, out = fill(tmp_path, "10.1.0.7,fd00::7")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "@" not in text.replace("@type", "")
    doc = yaml.safe_load(text)
    meta = doc["node"]["metadata"]
    assert meta == {"NAME": "myapp-7d9f", "NAMESPACE": "default", "INSTANCE_IPS": "10.1.0.7,fd00::7"}
    (listener,) = [l for l in doc["static_resources"]["listeners"] if l["name"] == "outbound_capture"]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert chains["loop_guard"]["filter_chain_match"] == {"destination_port": 15001}
    assert chains["metadata"]["filter_chain_match"]["source_prefix_ranges"] == [
        {"address_prefix": "127.0.0.0", "prefix_len": 8},
        {"address_prefix": "::1", "prefix_len": 128},
        {"address_prefix": "10.1.0.7", "prefix_len": 32},
        {"address_prefix": "fd00::7", "prefix_len": 128},
    ]
    if not (ENVOY_BIN.exists() and WASM.exists()):
        pytest.skip("no .venv Envoy or release wasm to validate the result with")
    checked = tmp_path / "checked.yaml"
    checked.write_text(text.replace("/meshiam/filter/plugin.wasm", str(WASM)))
    r = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(checked), "--disable-hot-restart",
                        "-l", "error"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


@pytest.mark.parametrize("pod_ips", ["", ",", "10.1.0.7,x:y\" }, {", "10.1.0.7 $(id)"])
def test_init_container_refuses_missing_or_odd_addresses(tmp_path, pod_ips):
    res, out = fill(tmp_path, pod_ips)
    assert res.returncode != 0
    assert "meshiam:" in res.stderr

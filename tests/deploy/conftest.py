"""Shared helpers for the deployment checks: where things are, rendering kustomizations."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

# Kubernetes versions the manifests are validated against. 1.30 is the oldest we target
# (native sidecars, `restartPolicy: Always` on init containers, on by default since 1.29);
# 1.34 a recent one.
KUBE_VERSIONS = ["1.30.0", "1.34.0"]

# The plain-Envoy component embeds envoy/sidecar.yaml rendered by envoy/render.py with
# these values (the command in manifests/overlays/plain-envoy/sidecar/kustomization.yaml).
SIDECAR_RENDER_SETS = {
    "BROKER_ADDRESS": "169.254.170.52",
    "BROKER_PORT": "8787",
    "WASM_PATH": "/meshiam/filter/plugin.wasm",
    "POD_NAME": "@POD_NAME@",
    "POD_NAMESPACE": "@POD_NAMESPACE@",
    "NODE_ID": "sidecar~@POD_NAME@.@POD_NAMESPACE@",
    "POD_IPS": "@POD_IPS@",
}


def kustomization_dirs():
    """Every directory under manifests/ holding a kustomization (Components included)."""
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def is_component(path: Path) -> bool:
    return yaml.safe_load((path / "kustomization.yaml").read_text()).get("kind") == "Component"


def render(path: Path) -> list[dict]:
    """`kubectl kustomize` a directory; returns the rendered objects."""
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root (network namespaces, iptables, buildah)")

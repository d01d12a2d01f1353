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

# Kustomizations that read files outside their own directory (envoy/sidecar.yaml) and so
# need kustomize's load restrictor off.
NEEDS_UNRESTRICTED_LOAD = {"examples/myapp-plain-envoy"}


def kustomization_dirs():
    """Every directory under manifests/ holding a kustomization (Components included)."""
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def is_component(path: Path) -> bool:
    return yaml.safe_load((path / "kustomization.yaml").read_text()).get("kind") == "Component"


def render(path: Path) -> list[dict]:
    """`kubectl kustomize` a directory; returns the rendered objects."""
    rel = path.relative_to(MANIFESTS).as_posix()
    cmd = [KUBECTL, "kustomize"]
    if rel in NEEDS_UNRESTRICTED_LOAD:
        cmd += ["--load-restrictor", "LoadRestrictionsNone"]
    out = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {rel} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root (network namespaces, iptables, buildah)")

#!/usr/bin/env python3
"""Vendors the OpenAPI schemas of the Prometheus Operator kinds meshiam ships (PodMonitor,
PrometheusRule, monitoring.coreos.com/v1) from the operator's own CRDs
(example/prometheus-operator-crd/*.yaml at a release tag) into crds.json here.

Usage: tests/deploy/prometheus_crds/vendor.py /path/to/prometheus-operator-checkout [TAG]
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TAG = "v0.93.0"
FILES = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
         "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}


def main(repo, tag=TAG):
    out = {"_source": f"prometheus-operator/prometheus-operator {tag} example/prometheus-operator-crd"}
    for kind, name in FILES.items():
        text = subprocess.run(["git", "-C", repo, "show", f"{tag}:example/prometheus-operator-crd/{name}"],
                              capture_output=True, text=True, check=True).stdout
        crd = yaml.safe_load(text)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[f"monitoring.coreos.com/v1 {kind}"] = v1["schema"]["openAPIV3Schema"]
    (HERE / "crds.json").write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])

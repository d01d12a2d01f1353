"""The optional monitoring component (manifests/overlays/monitoring): its PodMonitors and
PrometheusRule validate against the Prometheus Operator's own CRD schemas (vendored in
prometheus_crds/, closed to unknown fields as istio_schema.py does for Istio), it renders
with the broker, and its alert expressions name only series meshiam exports (by the names
tests/e2e/test_observability.py checks against a real scrape)."""

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import MANIFESTS, render
from istio_schema import _METADATA, _closed
from test_docs import BROKER, FILTER

CRDS = json.loads((Path(__file__).resolve().parent / "prometheus_crds" / "crds.json").read_text())
COMPONENT = MANIFESTS / "overlays" / "monitoring"
# Series from elsewhere the alerts may use.
EXTERNAL = {"kube_daemonset_status_number_unavailable"}  # kube-state-metrics


def _python_patterns(node):
    """Go's regexp takes inline flags anywhere (`^(?i)...`); Python only at the start."""
    if isinstance(node, dict):
        return {k: (re.sub(r"^\^\(\?i\)", "(?i)^", v) if k == "pattern" and isinstance(v, str)
                    else _python_patterns(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_python_patterns(v) for v in node]
    return node


def schema(api_version, kind):
    crd = _closed(_python_patterns(copy.deepcopy(CRDS[f"{api_version} {kind}"])))
    props = crd["properties"]
    props.pop("status", None)
    props.update(apiVersion={"const": api_version}, kind={"const": kind}, metadata=_METADATA)
    crd["required"] = sorted(set(crd.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    crd["additionalProperties"] = False
    return crd


def validate(obj):
    jsonschema.validate(obj, schema(obj["apiVersion"], obj["kind"]))


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    k = tmp_path_factory.mktemp("mon")
    (k / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS / "overlays" / "istio", k)],
        "components": [os.path.relpath(COMPONENT, k)]}))
    return render(k)


def test_component_validates_against_the_operator_crds(objects):
    mon = [o for o in objects if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in mon) == [
        ("PodMonitor", "meshiam-broker"), ("PodMonitor", "meshiam-sidecars"), ("PrometheusRule", "meshiam")]
    for o in mon:
        print(f"validating {o['kind']}/{o['metadata']['name']} against {CRDS['_source']}")
        assert o["metadata"]["namespace"] == "meshiam-system"
        validate(o)
    # A typo must fail: the check is worth something only then.
    bad = copy.deepcopy([o for o in mon if o["kind"] == "PodMonitor"][0])
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy([o for o in mon if o["kind"] == "PrometheusRule"][0])
    bad["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def test_broker_podmonitor_matches_the_daemonset(objects):
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    (pm,) = [o for o in objects if o["kind"] == "PodMonitor" and o["metadata"]["name"] == "meshiam-broker"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"]: p for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in ports and ep["path"] == "/metrics"


def alert_exprs(objects):
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def metric_names(expr):
    """The series names in a PromQL expression (label matchers, ranges, by-clauses removed)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|by \([^)]*\)", "", expr)
    words = set(re.findall(r"[a-z_][a-z0-9_]*", expr))
    return words - {"sum", "rate", "increase", "histogram_quantile", "max", "by"}


def test_alerts_use_exported_series_only(objects):
    exprs = alert_exprs(objects)
    for name, expr in exprs.items():
        for metric in metric_names(expr):
            assert metric in BROKER | FILTER | EXTERNAL, f"{name}: unknown series {metric}"
    # The alerts docs/operations.md describes are the ones shipped.
    ops = (MANIFESTS.parent / "docs" / "operations.md").read_text()
    for name, expr in exprs.items():
        assert f"`{name}`" in ops, f"docs/operations.md does not describe {name}"
        assert " ".join(expr.split()) in ops, f"docs/operations.md shows another expression for {name}"

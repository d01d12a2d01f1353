"""The dashboard (docs/grafana/meshiam.json) and the shipped alerts
(manifests/overlays/monitoring/prometheusrule.yaml) query series that exist: the stack runs,
its pods are made to exercise every counter the two use (call-outs, cache hits, tokens, a
broker cache miss and prefetches, stale serves and call-out failures while the broker is
down), then a real Envoy 1.39.3's /stats/prometheus (a pod's sidecar) and the broker's
/metrics are scraped, and every series name and label the queries use must be in the
scrape, or be one of the target labels Prometheus adds itself."""

import json
import re
import subprocess
import tempfile
import time

import pytest
import yaml

from conftest import ROOT, bring_up, stack

MYAPP = "default/myapp"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
# Labels Prometheus attaches to every scraped series (a PodMonitor adds namespace and pod).
TARGET_LABELS = {"instance", "job", "namespace", "pod"}
# Series of other exporters the alerts may use.
EXTERNAL = {"kube_daemonset_status_number_unavailable"}  # kube-state-metrics
PROMQL = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "label_values"}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+")


def parse(text):
    """Prometheus text format -> {series name: set of label names}."""
    series = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            series.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
    return series


def queries():
    """(where, PromQL) of every dashboard panel and every shipped alert."""
    out = []
    dash = json.loads((ROOT / "docs" / "grafana" / "meshiam.json").read_text())
    for panel in dash["panels"]:
        out += [(f"dashboard: {panel['title']}", t["expr"]) for t in panel["targets"]]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"])
            assert m, var["query"]
            out.append((f"dashboard variable {var['name']}", f"sum by ({m.group(2)}) ({m.group(1)})"))
    rule = yaml.safe_load((ROOT / "manifests" / "overlays" / "monitoring" / "prometheusrule.yaml").read_text())
    out += [(f"alert {r['alert']}", r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]
    return out


def used(expr):
    """{series name: label names it is filtered or grouped by} in a PromQL expression."""
    expr = re.sub(r"\$\w+|\[[^\]]*\]", "", expr)
    by = set()
    for group in re.findall(r"by \(([^)]*)\)", expr):
        by |= {label.strip() for label in group.split(",") if label.strip()}
    expr = re.sub(r"by \([^)]*\)", "", expr)
    out = {}
    for name, matchers in re.findall(r"([a-z_][a-z0-9_]*)\s*(\{[^}]*\})?", re.sub(r'"[^"]*"', '""', expr)):
        if name in PROMQL:
            continue
        out.setdefault(name, set()).update(re.findall(r"(\w+)\s*[=!~]", matchers or ""))
    for labels in out.values():
        labels |= by
    return out


def curl(s, pod, path, *extra, **kw):
    code, body, _ = s.curl(pod, path, *extra, **kw)
    print(f"{pod} GET {path} -> {code}")
    return code, body


@pytest.fixture(scope="module")
def scraped():
    # A long prefetch jitter, so the new pod's first request below is a cache miss (its
    # prefetch comes up to 30 s later); the initial prefetches are waited for.
    s = bring_up("--broker-arg=--prefetch-jitter=30s")
    try:
        if not s.netns:
            pytest.skip("needs the netns stack (root): the sidecar's admin port is the pod's loopback")
        assert curl(s, MYAPP, ROLE_LIST)[0] == 200
        assert curl(s, MYAPP, ROLE_LIST + "myapp-iam-role")[0] == 200
        assert curl(s, MYAPP, ROLE_LIST + "myapp-iam-role")[0] == 200  # from the filter's cache
        code, token = s.curl(MYAPP, "/latest/api/token", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                             method="PUT")[:2]
        print(f"{MYAPP} PUT /latest/api/token -> {code}")
        assert code == 200
        # A broker cache miss: a pod the broker has not prefetched for yet.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("pods:\n  - namespace: default\n    name: observed\n    ips: [\"198.18.1.42\"]\n"
                    "    node: node-1\n    annotations:\n      iam.amazonaws.com/role: newcomer-role\n")
        stack("pod", "add", f.name)
        s.refresh()
        code, body, _ = s.curl("default/observed", ROLE_LIST + "newcomer-role", "-D", "/dev/stderr")
        print(f"default/observed GET {ROLE_LIST}newcomer-role -> {code} {body}")
        assert code == 200
        # The delayed prefetches (refreshes), then the broker's scrape: before it is stopped
        # below, which resets its counters.
        deadline = time.monotonic() + 45
        while True:
            broker = parse(s.admin("/metrics"))
            if "meshiam_broker_cache_refreshes_total" in broker or time.monotonic() > deadline:
                break
            time.sleep(2)
        # The broker down: the filter serves its stale cache and counts a failed call-out.
        stack("stop", "broker")
        try:
            time.sleep(4)  # past the filter's cacheFreshSeconds (3)
            assert curl(s, MYAPP, ROLE_LIST + "myapp-iam-role")[0] == 200  # stale
            assert curl(s, MYAPP, "/latest/meta-data/placement/region")[0] >= 500  # never cached
        finally:
            stack("start", "broker")
        envoy = s.exec(MYAPP, "curl", "-s", "-m", "5", "http://127.0.0.1:15000/stats/prometheus").stdout
        yield broker, parse(envoy)
    finally:
        stack("down", "--keep-logs", check=False)


def test_every_series_the_dashboard_and_alerts_use_is_exported(scraped):
    broker, envoy = scraped
    exported = {**broker, **envoy}
    print("broker exports:", sorted(broker))
    print("sidecar Envoy exports (meshiam_*):", sorted(n for n in envoy if n.startswith("meshiam")))
    missing = []
    for where, expr in queries():
        for name, labels in used(expr).items():
            if name in EXTERNAL:
                continue
            if name not in exported:
                missing.append(f"{where}: series {name} is not exported")
                continue
            for label in labels - exported[name] - TARGET_LABELS:
                missing.append(f"{where}: {name} has no label {label!r} (it has {sorted(exported[name])})")
    assert not missing, "\n".join(missing)


def test_filter_counters_are_named_as_envoy_exports_them(scraped):
    """Envoy exports wasmcustom.meshiam.* without the envoy_ prefix and without labels."""
    _, envoy = scraped
    for name in ["meshiam_callouts", "meshiam_callout_failures", "meshiam_cache_hits", "meshiam_stale_serves",
                 "meshiam_tokens_issued", "meshiam_broker_tokens", "meshiam_requests_credentials_200"]:
        assert name in envoy, f"{name} not in the sidecar's /stats/prometheus"
        assert envoy[name] == set(), f"{name} has labels {envoy[name]}"
    assert not [n for n in envoy if n.startswith("envoy_wasmcustom")]


def test_broker_exports_no_node_label(scraped):
    """Nodes are told apart by the target's instance label; a `node` filter would match nothing."""
    broker, _ = scraped
    assert not [n for n, labels in broker.items() if "node" in labels]

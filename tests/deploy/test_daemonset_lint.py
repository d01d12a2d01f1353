"""The broker DaemonSet's security and placement settings stay as the issue requires."""

import pytest

from conftest import MANIFESTS, render

LINK_ADDRESS = "169.254.170.52"
# Addresses the node-local address must never take: IMDS, Amazon Time Sync, Route 53
# Resolver, ECS task credentials, EKS Pod Identity Agent, node-local DNS (two variants),
# the Calico / VPC CNI pod gateway.
TAKEN = {"169.254.169.254", "169.254.169.123", "169.254.169.253", "169.254.170.2",
         "169.254.170.23", "169.254.20.10", "169.254.25.10", "169.254.1.1"}


@pytest.fixture(scope="module", params=["base", "overlays/istio", "overlays/plain-envoy"])
def pod(request):
    objs = render(MANIFESTS / request.param)
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    assert ds["metadata"]["namespace"] == "meshiam-system"
    return ds["spec"]["template"]["spec"]


def _all_containers(pod):
    return pod.get("initContainers", []) + pod["containers"]


def test_placement(pod):
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"], "must tolerate every taint"
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_node_name_from_downward_api(pod):
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MESHIAM_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_broker_container_hardened(pod):
    (broker,) = pod["containers"]
    sc = broker["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["capabilities"] == {"drop": ["ALL"]}, "the broker needs no capability"
    assert not sc.get("privileged")


def test_probes_on_admin_port(pod):
    (broker,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert "admin" in ports
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = broker[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("admin", ports["admin"])
    assert any(f"--admin-listen=0.0.0.0:{ports['admin']}" == a or a.endswith(f":{ports['admin']}")
               for a in broker["args"] if a.startswith("--admin-listen="))


def test_resources_set(pod):
    for c in _all_containers(pod):
        res = c["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"], c["name"]
        assert res["limits"]["memory"], c["name"]


def test_only_net_admin_on_init_container(pod):
    inits = pod["initContainers"]
    assert len(inits) == 1
    (link,) = inits
    sc = link["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged")
    # Stays up with the broker and removes the interface on shutdown.
    assert link["restartPolicy"] == "Always"
    assert "startupProbe" in link
    env = {e["name"]: e["value"] for e in link["env"]}
    assert env["MESHIAM_LINK_ADDRESS"] == f"{LINK_ADDRESS}/32"
    assert env["MESHIAM_LINK_NAME"] == "meshiam0"


def test_link_address_clashes_with_nothing_known(pod):
    assert LINK_ADDRESS not in TAKEN
    assert LINK_ADDRESS.startswith("169.254.")
    (broker,) = pod["containers"]
    assert f"--listen={LINK_ADDRESS}:8787" in broker["args"]


def test_no_host_paths_or_privileged(pod):
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    for c in _all_containers(pod):
        assert not c.get("securityContext", {}).get("privileged"), c["name"]
        assert "hostPort" not in str(c.get("ports", [])), c["name"]


def test_rbac_is_read_only_pods_and_namespaces():
    objs = render(MANIFESTS / "base")
    roles = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 1
    (rule, review) = roles[0]["rules"]
    assert rule["apiGroups"] == [""]
    assert sorted(rule["resources"]) == ["namespaces", "pods"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    # TokenReview (the container-credentials endpoint's token check) creates no object.
    assert review == {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                      "verbs": ["create"]}
    (binding,) = [o for o in objs if o["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshiam-broker", "namespace": "meshiam-system"}
    ]


def test_node_affinity(pod):
    """Only nodes the image runs on and a DaemonSet can use: Linux, the architectures the
    image is built for (amd64), not Fargate. A Pending or crash-looping broker pod holds
    the rollout's maxUnavailable: 1 and stalls every update."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 1, "one term: all its expressions must hold (terms are ORed)"
    exprs = {e["key"]: (e["operator"], e["values"]) for e in terms[0]["matchExpressions"]}
    print(f"node affinity: {exprs}")
    assert exprs == {
        "kubernetes.io/os": ("In", ["linux"]),
        "kubernetes.io/arch": ("In", ["amd64"]),
        "eks.amazonaws.com/compute-type": ("NotIn", ["fargate"]),
    }
    assert not pod.get("nodeSelector")

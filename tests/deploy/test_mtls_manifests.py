"""Issue 15 on Istio: the mTLS install (manifests/overlays/istio-mtls and the namespace-mtls
component) makes the sidecars present their workload certificates to the broker, and gives
the broker what it needs to verify them and to be verified: the mesh root and a mesh-issued
certificate. The plain install stays as it was (test_manifests.py checks DISABLE there)."""
from conftest import MANIFESTS, render

BROKER_ID = "spiffe://cluster.local/ns/meshiam-system/sa/meshiam-broker"


def broker_pod():
    (ds,) = [o for o in render(MANIFESTS / "overlays" / "istio-mtls") if o["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_namespace_call_outs_use_istio_mutual_with_the_brokers_identity():
    objs = render(MANIFESTS / "examples" / "istio-enable-myapp-mtls")
    hosts = {h for o in objs if o["kind"] == "ServiceEntry" for h in o["spec"]["hosts"]}
    rules = {o["spec"]["host"]: o for o in objs if o["kind"] == "DestinationRule"}
    assert set(rules) == hosts
    for host, rule in rules.items():
        tls = rule["spec"]["trafficPolicy"]["tls"]
        print(f"{host}: {tls}")
        assert tls == {"mode": "ISTIO_MUTUAL", "subjectAltNames": [BROKER_ID]}, host
        assert rule["spec"]["exportTo"] == ["."] and rule["metadata"]["namespace"] == "myapp"
    # The idle timeout below the broker's header-read timeout stays.
    pool = rules["meshiam-broker.meshiam.internal"]["spec"]["trafficPolicy"]["connectionPool"]
    assert pool == {"http": {"idleTimeout": "3s"}}


def test_broker_verifies_against_the_mesh_root_and_holds_a_mesh_certificate():
    pod = broker_pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mesh-root"]["configMap"]["name"] == "istio-ca-root-cert"
    assert volumes["mesh-certs"]["emptyDir"]["medium"] == "Memory"
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca"
    containers = {c["name"]: c for c in pod["containers"]}
    broker, agent = containers["broker"], containers["istio-agent"]
    env = env_of(broker)
    assert env["MESHIAM_MTLS"] in ("preferred", "required")
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    assert env["MESHIAM_MTLS_ROOTS"] == mounts["mesh-root"]
    assert env["MESHIAM_MTLS_CERT"].startswith(mounts["mesh-certs"] + "/")
    assert env["MESHIAM_MTLS_KEY"].startswith(mounts["mesh-certs"] + "/")
    # The DestinationRule's expected identity is in the broker's trust domain.
    assert BROKER_ID.startswith(f"spiffe://{env['MESHIAM_MTLS_TRUST_DOMAIN']}/")
    # The agent: CSR only, no Envoy, certificates where the broker reads them.
    aenv = env_of(agent)
    assert aenv["DISABLE_ENVOY"] == "true"
    assert aenv["OUTPUT_CERTS"] == mounts["mesh-certs"]
    assert agent["image"].startswith("docker.io/istio/proxyv2:")
    sc = agent["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert pod["serviceAccountName"] == "meshiam-broker"


def test_plain_install_is_unchanged():
    (ds,) = [o for o in render(MANIFESTS / "overlays" / "istio") if o["kind"] == "DaemonSet"]
    names = [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]
    assert names == ["broker"]
    assert "MESHIAM_MTLS" not in env_of(ds["spec"]["template"]["spec"]["containers"][0])

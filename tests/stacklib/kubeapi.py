"""tests/stack's client of the Kubernetes API double (kube-double/): a pods-file entry as a
Pod object, and creating, replacing and deleting pods and namespaces in the double (reached
from the node namespace in netns mode)."""
import json
import urllib.error
import urllib.request

from tests.stacklib.procs import in_ns
from tests.stacklib.state import NODE_NAME, NODE_NS, StackError, port


def pod_key(p):
    return f"{p['namespace']}/{p['name']}"


def k8s_pod(p):
    ips = p["ips"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p["name"],
            "namespace": p["namespace"],
            "annotations": p.get("annotations") or {},
            "labels": {"app": p["name"]},
        },
        "spec": {
            # A pod with no node is on the stack's one node.
            "nodeName": p.get("node", NODE_NAME),
            "serviceAccountName": p.get("serviceAccount", "default"),
            "hostNetwork": bool(p.get("hostNetwork", False)),
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {
            "phase": p.get("phase", "Running"),
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
        },
    }


def kube_request(state, method, path, body=None):
    url = f"http://127.0.0.1:{port(state, 'kube')}{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    # The API double lives in the node namespace: reach it from there.
    if state["mode"] == "netns":
        argv = ["curl", "-s", "-o", "/dev/stderr", "-w", "%{http_code}", "-X", method, url]
        if data is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        res = in_ns(state, NODE_NS, argv, check=False, capture=True, input=data.decode() if data else None)
        code = int(res.stdout or 0)
    else:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        except OSError as e:
            raise StackError(f"Kubernetes API double unreachable: {e}")
    return code


def kube_json(state, method, path, body=None):
    """Like kube_request, and the answer's JSON body too: (code, object or None)."""
    url = f"http://127.0.0.1:{port(state, 'kube')}{path}"
    data = json.dumps(body) if body is not None else None
    argv = ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", "-X", method, url]
    if data is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    res = in_ns(state, NODE_NS if state["mode"] == "netns" else None, argv, check=False, capture=True,
                input=data)
    text, _, code = (res.stdout or "").rpartition("\n")
    try:
        obj = json.loads(text) if text else None
    except ValueError:
        obj = None
    return int(code or 0), obj


# The audience of the pods' container-credentials tokens: the broker's default
# --container-token-audience.
TOKEN_AUDIENCE = "meshiam"


def api_pod_token(state, p, audience=TOKEN_AUDIENCE, seconds=3600):
    """A projected service-account token for the pod, as the kubelet gets one: TokenRequest
    for the pod's service account, bound to the pod (name and uid)."""
    ns, name = p["namespace"], p["name"]
    code, pod = kube_json(state, "GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    if code != 200 or not pod:
        raise StackError(f"pod {pod_key(p)} is not in the API double ({code}): cannot issue its token")
    sa = pod["spec"].get("serviceAccountName") or "default"
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name,
                                        "uid": pod["metadata"]["uid"]}}}
    code, tr = kube_json(state, "POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", body)
    if code != 201 or not tr:
        raise StackError(f"TokenRequest for {pod_key(p)} answered {code}")
    return tr["status"]["token"]


def api_add_namespace(state, ns):
    body = {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns["name"], "annotations": ns.get("annotations") or {}}}
    code = kube_request(state, "POST", "/api/v1/namespaces", body)
    if code == 409:
        code = kube_request(state, "PUT", f"/api/v1/namespaces/{ns['name']}", body)
    if code not in (200, 201):
        raise StackError(f"creating namespace {ns['name']} in the API double answered {code}")


def api_add_pod(state, p):
    ns = p["namespace"]
    code = kube_request(state, "POST", f"/api/v1/namespaces/{ns}/pods", k8s_pod(p))
    if code == 404:  # namespace unknown to the double: create it first
        api_add_namespace(state, {"name": ns})
        code = kube_request(state, "POST", f"/api/v1/namespaces/{ns}/pods", k8s_pod(p))
    if code == 409:
        code = kube_request(state, "PUT", f"/api/v1/namespaces/{ns}/pods/{p['name']}", k8s_pod(p))
    if code not in (200, 201):
        raise StackError(f"creating pod {pod_key(p)} in the API double answered {code}")


def api_delete_pod(state, key):
    ns, name = key.split("/", 1)
    code = kube_request(state, "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}")
    if code not in (200, 202, 404):
        raise StackError(f"deleting pod {key} in the API double answered {code}")

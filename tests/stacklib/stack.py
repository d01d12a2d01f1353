"""tests/stack: the meshiam local stack.

A "node" network namespace runs the broker, the STS emulator (moto, behind a proxy that can
be slowed down), a stand-in for the node's own IMDS and the Kubernetes API test double; each
pod is a network namespace of its own with an Envoy sidecar carrying the meshiam filter, and
iptables capturing its port-80 traffic to 169.254.169.254 into that Envoy, as Istio does.
The namespaces are linked only to each other (a bridge in the node namespace) and addressed
from 198.18.0.0/15: nothing routes to the machine's real network.

Without root the same components run on loopback: each pod's Envoy listens on its own port
and reaches the broker from its own 127.1.0.x address, and the filter matches the metadata
host by the Host header.

State lives in .stack/ (state.json, logs/, rendered configs).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.stacklib import podsfile

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("MESHIAM_STACK_DIR", ROOT / ".stack"))
STATE_FILE = STATE_DIR / "state.json"
LOGS = STATE_DIR / "logs"
VENV = ROOT / ".venv"
WASM = ROOT / "target/wasm32-wasip1/release/meshiam_filter.wasm"
BROKER_BIN = ROOT / "target/release/meshiam-broker"
KUBE_DOUBLE_BIN = ROOT / "target/release/meshiam-kube-double"
DEFAULT_PODS = ROOT / "tests/pods.yaml"

NODE_NS = "msh-node"
BRIDGE = "mshbr0"
BRIDGE_MAC = "02:6d:73:68:00:01"  # locally administered
NODE_IP = "198.18.0.1"
POD_PREFIX_LEN = 16
ENVOY_UID = 1337
NODE_NAME = "node-1"
ACCOUNT = "123456789012"
REGION = "us-east-1"
# The broker's own (node role) credentials. Fake, and marked so tests can prove they never
# reach a pod.
NODE_ACCESS_KEY = "AKIANODEMUSTNOTLEAK0"
NODE_SECRET_KEY = "node-secret-must-not-leak"

# Ports: (netns mode, loopback mode).
PORTS = {
    "sts": (5000, 18500),
    "moto": (5001, 18501),
    "kube": (6443, 18443),
    "nodeimds": (8254, 18254),
    "broker": (8181, 18181),
    "admin": (8182, 18182),
}
ENVOY_LISTEN = 15001
ENVOY_ADMIN = 15000
LOOP_ENVOY_BASE = 18600
LOOP_ADMIN_BASE = 18700

COMPONENTS = ["moto", "sts", "nodeimds", "kube", "broker"]


class StackError(Exception):
    pass


def say(msg):
    print(f"stack: {msg}", file=sys.stderr, flush=True)


def run(*argv, check=True, capture=False, input=None):
    res = subprocess.run(
        [str(a) for a in argv],
        check=False,
        text=True,
        input=input,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if check and res.returncode != 0:
        raise StackError(f"{' '.join(map(str, argv))} failed: {res.stderr.strip()}")
    return res


# ---------------------------------------------------------------------------- state


def load_state():
    if not STATE_FILE.exists():
        return None
    return json.loads(STATE_FILE.read_text())


def save_state(state):
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def need_state():
    state = load_state()
    if state is None:
        raise StackError("the stack is not up (run: tests/stack up)")
    return state


def port(state, name):
    return PORTS[name][0 if state["mode"] == "netns" else 1]


def node_addr(state):
    return NODE_IP if state["mode"] == "netns" else "127.0.0.1"


# ---------------------------------------------------------------------------- processes


def spawn(state, name, argv, netns=None, uid=None, env=None):
    LOGS.mkdir(parents=True, exist_ok=True)
    full = [str(a) for a in argv]
    if uid is not None:
        full = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + full
    if netns:
        full = ["ip", "netns", "exec", netns] + full
    log = open(LOGS / f"{name}.log", "ab")
    log.write(f"\n--- {time.strftime('%H:%M:%S')} start: {shlex.join(full)}\n".encode())
    log.flush()
    penv = dict(os.environ)
    for k in list(penv):
        if k.startswith("AWS_"):
            del penv[k]
    penv.update(env or {})
    proc = subprocess.Popen(
        full,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=penv,
        cwd=ROOT,
        start_new_session=True,
    )
    state["procs"][name] = {"pid": proc.pid, "argv": full, "netns": netns, "uid": uid, "env": env or {}}
    save_state(state)
    return proc.pid


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_proc(state, name, sig=signal.SIGTERM):
    info = state["procs"].pop(name, None)
    save_state(state)
    if not info:
        return
    pid = info["pid"]
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + 5
    while time.time() < deadline and alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(what, check, timeout=30.0, interval=0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # the thing is not up yet
            last = e
        time.sleep(interval)
    raise StackError(f"timed out waiting for {what}" + (f" ({last})" if last else ""))


def in_ns(state, netns, argv, **kw):
    if state["mode"] == "netns" and netns:
        argv = ["ip", "netns", "exec", netns] + list(argv)
    return run(*argv, **kw)


def http_ok(state, netns, url):
    res = in_ns(state, netns, ["curl", "-sf", "-o", "/dev/null", "-m", "2", url], check=False)
    return res.returncode == 0


# ---------------------------------------------------------------------------- pods


def read_pods(path):
    """The pods file (docs/pods.schema.json, defaults filled in). The stack also needs an
    address for every pod: it builds the pod's network from the first."""
    try:
        pods, namespaces = podsfile.read(path)
    except podsfile.PodsFileError as e:
        raise StackError(str(e))
    for p in pods:
        if not p["ips"]:
            raise StackError(f"{path}: pod {p['namespace']}/{p['name']} has no 'ips': the stack needs its address")
    return pods, namespaces


def pod_key(p):
    return f"{p['namespace']}/{p['name']}"


def short(idx):
    return f"msh-p{idx}"


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


# ---------------------------------------------------------------------------- network


def make_node_netns():
    run("ip", "netns", "add", NODE_NS)
    run("ip", "-n", NODE_NS, "link", "set", "lo", "up")
    run("ip", "-n", NODE_NS, "link", "add", BRIDGE, "type", "bridge")
    # A fixed address: a bridge otherwise takes the lowest address of its ports, so adding a
    # pod (a new veth) can change it, and every pod that still has the old one in its ARP
    # cache cannot reach the node (the broker) until that entry is refreshed, up to ~45 s.
    run("ip", "-n", NODE_NS, "link", "set", BRIDGE, "address", BRIDGE_MAC)
    run("ip", "-n", NODE_NS, "addr", "add", f"{NODE_IP}/{POD_PREFIX_LEN}", "dev", BRIDGE)
    run("ip", "-n", NODE_NS, "link", "set", BRIDGE, "up")
    # No forwarding out of the node namespace: it has no other link anyway.
    run("ip", "netns", "exec", NODE_NS, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")


def capture_rules(ns, install=True):
    """Istio-style capture: the app's port-80 traffic to IMDS goes to Envoy; Envoy's own
    traffic (uid 1337) is not captured; and anything to IMDS that was not redirected is
    rejected, so a missing redirect fails closed."""
    op = "-A" if install else "-D"
    rules = [
        ["-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", "169.254.169.254", "--dport", "80",
         "-m", "owner", "!", "--uid-owner", str(ENVOY_UID), "-j", "REDIRECT", "--to-ports", str(ENVOY_LISTEN)],
    ]
    for r in rules:
        run("ip", "netns", "exec", ns, "iptables", "-w", *r, check=install)


def guard_rules(ns):
    run("ip", "netns", "exec", ns, "iptables", "-w", "-A", "OUTPUT", "-d", "169.254.169.254",
        "-j", "REJECT", "--reject-with", "tcp-reset", "-p", "tcp")
    run("ip", "netns", "exec", ns, "iptables", "-w", "-A", "OUTPUT", "-d", "169.254.169.254", "-j", "DROP")


def make_pod_netns(state, entry):
    ns, ip, veth = entry["netns"], entry["ip"], entry["veth"]
    run("ip", "netns", "add", ns)
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", veth, "netns", NODE_NS)
    run("ip", "-n", NODE_NS, "link", "set", veth, "master", BRIDGE, "up")
    run("ip", "-n", ns, "addr", "add", f"{ip}/{POD_PREFIX_LEN}", "dev", "eth0")
    run("ip", "-n", ns, "link", "set", "eth0", "up")
    run("ip", "-n", ns, "route", "add", "default", "via", NODE_IP)
    capture_rules(ns)
    guard_rules(ns)


def delete_netns(ns):
    res = run("ip", "netns", "pids", ns, check=False, capture=True)
    for pid in (res.stdout or "").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run("ip", "netns", "del", ns, check=False)


# ---------------------------------------------------------------------------- envoy


def plugin_config(state, entry):
    """The filter's plugin config for a pod's sidecar, with --filter-option overrides."""
    cfg = {
        "brokerCluster": "meshiam_broker",
        "brokerAuthority": "meshiam-broker",
        "allowPaths": ["meta-data/placement/region", "meta-data/placement/availability-zone"],
        "identity": {"source": "nodeMetadata"},
    }
    if state["mode"] == "loopback":
        # No iptables capture: the pod addresses its sidecar directly, so the sidecar's own
        # listener address is this pod's metadata address.
        cfg["metadataAddresses"] = ["169.254.169.254:80", "[fd00:ec2::254]:80", f"127.0.0.1:{entry['port']}"]
    for item in state.get("filter_options", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise StackError(f"--filter-option wants KEY=JSON, got {item!r}")
        try:
            cfg[key] = json.loads(value)
        except ValueError:
            cfg[key] = value
    return cfg


def render_envoy(state, entry):
    sys.path.insert(0, str(ROOT / "envoy"))
    from render import render, without_loop_guard  # envoy/render.py

    spec = entry["spec"]
    loop = state["mode"] == "loopback"
    values = {
        "NODE_ID": f"sidecar~{entry['ip']}~{spec['name']}.{spec['namespace']}",
        "POD_NAME": spec["name"],
        "POD_NAMESPACE": spec["namespace"],
        "ADMIN_ADDRESS": "127.0.0.1",
        "ADMIN_PORT": entry["admin_port"] if loop else ENVOY_ADMIN,
        # Loopback in both modes: the REDIRECT lands on 127.0.0.1; nothing outside the pod
        # reaches the listener.
        "CAPTURE_ADDRESS": "127.0.0.1",
        "CAPTURE_PORT": entry["port"] if loop else ENVOY_LISTEN,
        # The kubelet's probe listener: any free port when all pods share loopback.
        "HEALTH_PORT": 0 if loop else 15021,
        # The sources besides loopback the sidecar answers metadata to.
        "POD_IPS": ",".join(spec["ips"]),
        "BROKER_ADDRESS": node_addr(state),
        "BROKER_PORT": port(state, "broker"),
        "WASM_PATH": WASM,
        "PLUGIN_CONFIG": json.dumps(plugin_config(state, entry), separators=(",", ":")),
    }
    text = render(str(ROOT / "envoy/sidecar.yaml"), **values)
    if loop:
        # The broker knows a pod by its address: on loopback each sidecar calls it from the
        # pod's own 127.1.0.x. And the pods call their sidecar's listener directly, which the
        # loop guard (for connections to the listener's own port) would close.
        doc = without_loop_guard(yaml.safe_load(text))
        for c in doc["static_resources"]["clusters"]:
            if c["name"] == "meshiam_broker":
                c["upstream_bind_config"] = {"source_address": {"address": entry["ip"], "port_value": 0}}
        text = yaml.safe_dump(doc, sort_keys=False)
    out = STATE_DIR / "envoy" / f"{entry['index']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def envoy_name(entry):
    return f"envoy-{entry['spec']['namespace']}-{entry['spec']['name']}"


def start_envoy(state, key):
    entry = state["pods"][key]
    cfg = render_envoy(state, entry)
    name = envoy_name(entry)
    argv = [VENV / "bin/envoy", "-c", cfg, "--disable-hot-restart", "--log-level", "warning",
            "--concurrency", "2"]
    if state["mode"] == "netns":
        spawn(state, name, argv, netns=entry["netns"], uid=ENVOY_UID)
        admin = f"http://127.0.0.1:{ENVOY_ADMIN}/ready"
        wait_until(f"Envoy of {key}", lambda: http_ok(state, entry["netns"], admin), timeout=30)
    else:
        spawn(state, name, argv)
        admin = f"http://127.0.0.1:{entry['admin_port']}/ready"
        wait_until(f"Envoy of {key}", lambda: http_ok(state, None, admin), timeout=30)


# ---------------------------------------------------------------------------- components


def broker_argv(state):
    kubeconfig = STATE_DIR / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stack",
        "clusters": [{"name": "stack", "cluster": {"server": f"http://127.0.0.1:{port(state, 'kube')}"}}],
        "users": [{"name": "stack", "user": {}}],
        "contexts": [{"name": "stack", "context": {"cluster": "stack", "user": "stack"}}],
    }))
    listen = "0.0.0.0" if state["mode"] == "netns" else "127.0.0.1"
    argv = [
        BROKER_BIN,
        "--listen", f"{listen}:{port(state, 'broker')}",
        "--admin-listen", f"{listen}:{port(state, 'admin')}",
        "--pod-source", "kube",
        "--node-name", NODE_NAME,
        "--base-role-arn", f"arn:aws:iam::{ACCOUNT}:role/",
        "--namespace-restriction", "allowed-roles",
        "--region", REGION,
        "--node-imds-url", f"http://127.0.0.1:{port(state, 'nodeimds')}",
        *state.get("broker_args", []),
    ]
    env = {
        "KUBECONFIG": str(kubeconfig),
        # The node's own credentials (fake, marked): the broker assumes pod roles with them.
        "AWS_ACCESS_KEY_ID": NODE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": NODE_SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{port(state, 'sts')}",
        "MESHIAM_LOG": "info,meshiam_broker=debug",
        # /debug/pods for the demo and the tests; the broker answers it on the node
        # namespace's loopback only (http://127.0.0.1:<admin port> there).
        "MESHIAM_DEBUG_ENDPOINTS": "true",
    }
    return argv, env


def start_component(state, name):
    mode = state["mode"]
    ns = NODE_NS if mode == "netns" else None
    host_any = "0.0.0.0" if mode == "netns" else "127.0.0.1"
    if name == "moto":
        spawn(state, "moto", [VENV / "bin/moto_server", "-H", "127.0.0.1", "-p", port(state, "moto")], netns=ns)
        wait_until("the STS emulator", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'moto')}/moto-api/"))
    elif name == "sts":
        control = STATE_DIR / "sts-control.json"
        if not control.exists():
            control.write_text('{"delay_ms": 0}')
        spawn(state, "sts", [VENV / "bin/python", "-m", "tests.stacklib.stsproxy", host_any, port(state, "sts"),
                             "127.0.0.1", port(state, "moto"), control], netns=ns)
        wait_until("the STS proxy", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'sts')}/moto-api/"))
    elif name == "nodeimds":
        spawn(state, "nodeimds", [VENV / "bin/python", "-m", "tests.stacklib.nodeimds", "127.0.0.1",
                                  port(state, "nodeimds")], netns=ns)
        wait_until("the node IMDS stand-in",
                   lambda: in_ns(state, ns, ["curl", "-sf", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                                             f"http://127.0.0.1:{port(state, 'nodeimds')}/latest/api/token"],
                                 check=False).returncode == 0)
    elif name == "kube":
        spawn(state, "kube", [KUBE_DOUBLE_BIN, "--listen", f"{host_any}:{port(state, 'kube')}",
                              *state.get("kube_args", [])], netns=ns)
        wait_until("the Kubernetes API double", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'kube')}/version"))
        # The double keeps nothing across a restart: give it the stack's namespaces and
        # registered pods again, as a real API server would still have them.
        for n in state.get("namespaces", []):
            api_add_namespace(state, n)
        for entry in state["pods"].values():
            if entry.get("registered"):
                api_add_pod(state, entry["spec"])
    elif name == "broker":
        argv, env = broker_argv(state)
        spawn(state, "broker", argv, netns=ns, env=env)
        wait_until("the broker to be ready",
                   lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'admin')}/readyz"), timeout=30)
    else:
        raise StackError(f"unknown component {name!r} (components: {', '.join(COMPONENTS)})")


# ---------------------------------------------------------------------------- pods in the stack


def add_pod(state, p, register=True):
    key = pod_key(p)
    if key in state["pods"]:
        raise StackError(f"pod {key} is already in the stack")
    idx = state["next_index"]
    state["next_index"] = idx + 1
    entry = {"index": idx, "spec": p, "registered": False}
    if state["mode"] == "netns":
        entry.update(netns=short(idx), veth=f"mshv{idx}", ip=p["ips"][0])
    else:
        # Loopback: the pod "is" its own 127.1.0.x address, which its Envoy binds to when it
        # calls the broker.
        ip = f"127.1.0.{10 + idx}"
        entry.update(netns=None, ip=ip, port=LOOP_ENVOY_BASE + idx, admin_port=LOOP_ADMIN_BASE + idx)
        p = dict(p, ips=[ip])
        entry["spec"] = p
    state["pods"][key] = entry
    save_state(state)
    if state["mode"] == "netns":
        make_pod_netns(state, entry)
    start_envoy(state, key)
    if register:
        register_pod(state, key)
    return entry


def register_pod(state, key):
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    api_add_pod(state, entry["spec"])
    entry["registered"] = True
    save_state(state)


def annotate_pod(state, key, changes):
    """Sets (`KEY=VALUE`) or removes (`KEY-`) annotations of a pod, in the stack's record and
    in the Kubernetes API double (a PUT of the whole pod: the broker's watch sees MODIFIED)."""
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    annotations = dict(entry["spec"].get("annotations") or {})
    for change in changes:
        name, sep, value = change.partition("=")
        if sep:
            annotations[name] = value
        elif change.endswith("-"):
            annotations.pop(change[:-1], None)
        else:
            raise StackError(f"annotation change {change!r}: want KEY=VALUE or KEY-")
    entry["spec"] = dict(entry["spec"], annotations=annotations)
    save_state(state)
    if entry.get("registered"):
        ns, name = key.split("/", 1)
        code = kube_request(state, "PUT", f"/api/v1/namespaces/{ns}/pods/{name}", k8s_pod(entry["spec"]))
        if code != 200:
            raise StackError(f"updating pod {key} in the API double answered {code}")


def delete_pod(state, key, api=True):
    """Removes the pod's sidecar and network; with api=False the API keeps the pod (as if
    the broker missed the deletion, e.g. while the API double is stopped)."""
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    if api and entry.get("registered"):
        api_delete_pod(state, key)
    stop_proc(state, envoy_name(entry))
    if entry["netns"]:
        delete_netns(entry["netns"])
    state["pods"].pop(key, None)
    save_state(state)


# ---------------------------------------------------------------------------- commands


def cmd_up(args):
    if load_state() is not None:
        raise StackError("the stack is already up (tests/stack down first)")
    for binary, how in ((WASM, "make wasm"), (BROKER_BIN, "make broker"), (KUBE_DOUBLE_BIN, "make broker")):
        if not binary.exists():
            raise StackError(f"{binary.relative_to(ROOT)} is missing: run `{how}` (or `make build`)")
    if not (VENV / "bin/envoy").exists():
        raise StackError(".venv is missing: run scripts/setup")
    pods, namespaces = read_pods(args.pods)
    mode = "loopback" if (args.loopback or os.geteuid() != 0) else "netns"
    if mode == "loopback":
        say("not root (or --loopback): running on loopback; the filter matches the metadata host by "
            "the Host header and pods are 127.1.0.x addresses")
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    state = {"mode": mode, "procs": {}, "pods": {}, "next_index": 0,
             "broker_args": args.broker_arg or [], "kube_args": args.kube_arg or [],
             "filter_options": args.filter_option or [],
             "namespaces": namespaces, "started": time.time()}
    save_state(state)
    try:
        if mode == "netns":
            make_node_netns()
        for c in COMPONENTS:
            say(f"starting {c}")
            start_component(state, c)
        for p in pods:
            say(f"starting pod {pod_key(p)}")
            add_pod(state, p)
    except BaseException:
        say("start failed; taking down what was started (logs kept in .stack/logs)")
        teardown(keep_logs=True)
        raise
    print_status(state)
    say("ready")


def teardown(keep_logs=False):
    state = load_state()
    if state is not None:
        for name in list(state["procs"]):
            stop_proc(state, name)
        for entry in state["pods"].values():
            if entry.get("netns"):
                delete_netns(entry["netns"])
    if os.geteuid() == 0:
        # Also whatever a crashed run left behind.
        res = run("ip", "netns", "list", check=False, capture=True)
        for line in (res.stdout or "").splitlines():
            name = line.split()[0] if line.split() else ""
            if name == NODE_NS or name.startswith("msh-p"):
                delete_netns(name)
    if keep_logs:
        STATE_FILE.unlink(missing_ok=True)
    else:
        shutil.rmtree(STATE_DIR, ignore_errors=True)


def cmd_down(args):
    teardown(keep_logs=args.keep_logs)
    say("down")


def print_status(state):
    na = node_addr(state)
    print(f"MODE={state['mode']}")
    print(f"STS_URL=http://{na}:{port(state, 'sts')}")
    print(f"BROKER_URL=http://{na}:{port(state, 'broker')}")
    print(f"BROKER_ADMIN_URL=http://{na}:{port(state, 'admin')}")
    print(f"KUBE_API_URL=http://{na}:{port(state, 'kube')}")
    print(f"LOGS={LOGS}")
    for key, entry in sorted(state["pods"].items()):
        role = (entry["spec"].get("annotations") or {}).get("iam.amazonaws.com/role", "")
        extra = f" IMDS_URL=http://127.0.0.1:{entry['port']}" if entry.get("port") else ""
        extra += f" NETNS={entry['netns']}" if entry.get("netns") else ""
        print(f"POD={key} IP={entry['ip']} ROLE={role}{extra}")


def cmd_status(args):
    state = need_state()
    print_status(state)
    down = [n for n, i in state["procs"].items() if not alive(i["pid"])]
    for n in down:
        print(f"DOWN={n}")
    return 1 if down else 0


def pod_env(state, entry):
    """An environment like a pod's: no AWS credentials, no AWS config files, the region set
    as pod specs usually do, and the emulator as the STS endpoint (a pod would reach the real
    one)."""
    home = STATE_DIR / "home" / str(entry["index"])
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_ENDPOINT_URL_STS": f"http://{node_addr(state)}:{port(state, 'sts')}",
        # As most pod specs set it: botocore and the AWS CLI do not take the region from IMDS
        # (aws-sdk-rust does; the tests run it with this unset).
        "AWS_DEFAULT_REGION": REGION,
        "POD_NAME": entry["spec"]["name"],
        "POD_NAMESPACE": entry["spec"]["namespace"],
    }
    if state["mode"] == "loopback":
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://127.0.0.1:{entry['port']}"
        env["MESHIAM_IMDS_URL"] = f"http://127.0.0.1:{entry['port']}"
    else:
        env["MESHIAM_IMDS_URL"] = "http://169.254.169.254"
    return env


def cmd_exec(args):
    state = need_state()
    entry = state["pods"].get(args.pod)
    if entry is None:
        raise StackError(f"no pod {args.pod} in the stack (tests/stack status lists them)")
    argv = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise StackError("usage: tests/stack exec NAMESPACE/POD -- COMMAND [ARG…]")
    env = pod_env(state, entry)
    if entry.get("netns"):
        argv = ["ip", "netns", "exec", entry["netns"]] + argv
    try:
        return subprocess.run(argv, env=env).returncode
    except FileNotFoundError as e:
        raise StackError(f"cannot run {argv[0]}: {e}")


def cmd_logs(args):
    if not LOGS.exists():
        raise StackError("no logs (the stack has not run)")
    files = sorted(LOGS.glob("*.log"))
    if args.component:
        files = [f for f in files if f.stem == args.component or f.stem.startswith(args.component)]
        if not files:
            raise StackError(f"no log for {args.component!r}; have: {', '.join(f.stem for f in sorted(LOGS.glob('*.log')))}")
    for f in files:
        print(f"==> {f.stem} <==")
        sys.stdout.write(f.read_text(errors="replace"))
    return 0


def cmd_pod(args):
    state = need_state()
    if args.pod_cmd == "add":
        pods, namespaces = read_pods(args.file)
        for ns in namespaces:
            api_add_namespace(state, ns)
        for p in pods:
            entry = add_pod(state, p, register=not args.defer_api)
            print(f"POD={pod_key(p)} IP={entry['ip']}")
    elif args.pod_cmd == "register":
        register_pod(state, args.pod)
    elif args.pod_cmd == "delete":
        delete_pod(state, args.pod, api=not args.keep_api)
    elif args.pod_cmd == "annotate":
        annotate_pod(state, args.pod, args.changes)
    return 0


def cmd_stop(args):
    state = need_state()
    if args.component not in state["procs"]:
        raise StackError(f"{args.component} is not running (running: {', '.join(state['procs'])})")
    stop_proc(state, args.component, signal.SIGKILL if args.kill else signal.SIGTERM)
    return 0


def cmd_start(args):
    state = need_state()
    if args.component in state["procs"] and alive(state["procs"][args.component]["pid"]):
        raise StackError(f"{args.component} is already running")
    start_component(state, args.component)
    return 0


def cmd_sts_delay(args):
    need_state()
    (STATE_DIR / "sts-control.json").write_text(json.dumps({"delay_ms": args.ms}))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tests/stack", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack in the background; exits when it is ready")
    up.add_argument("--pods", default=str(DEFAULT_PODS), help="pods file (default tests/pods.yaml)")
    up.add_argument("--loopback", action="store_true", help="run on loopback even as root")
    up.add_argument("--broker-arg", action="append", metavar="ARG",
                    help="extra broker argument, e.g. --broker-arg=--session-duration=900 (repeatable)")
    up.add_argument("--kube-arg", action="append", metavar="ARG",
                    help="extra API double argument, e.g. --kube-arg=--bookmark-interval-ms=1000 (repeatable)")
    up.add_argument("--filter-option", action="append", metavar="KEY=JSON",
                    help="override a filter plugin option, e.g. --filter-option requireImdsv2=true")
    down = sub.add_parser("down", help="stop everything and remove every namespace (safe to run twice)")
    down.add_argument("--keep-logs", action="store_true")
    sub.add_parser("status", help="KEY=value lines: STS_URL, BROKER_URL, KUBE_API_URL, one POD= line per pod")
    ex = sub.add_parser("exec", help="run a command in a pod: tests/stack exec NS/POD -- CMD…")
    ex.add_argument("pod")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    lg = sub.add_parser("logs", help="print the logs (of one component)")
    lg.add_argument("component", nargs="?")
    pod = sub.add_parser("pod", help="add, register or delete pods while the stack runs")
    psub = pod.add_subparsers(dest="pod_cmd", required=True)
    pa = psub.add_parser("add", help="add the pods of a pods file")
    pa.add_argument("file")
    pa.add_argument("--defer-api", action="store_true",
                    help="start the pod's network and sidecar but do not create it in the API yet")
    pr = psub.add_parser("register", help="create an added pod in the Kubernetes API")
    pr.add_argument("pod")
    pd = psub.add_parser("delete", help="delete a pod from the API and the stack")
    pd.add_argument("pod")
    pd.add_argument("--keep-api", action="store_true",
                    help="remove the pod's network and sidecar but leave it in the API (works with the API down)")
    pn = psub.add_parser("annotate", help="set (KEY=VALUE) or remove (KEY-) a pod's annotations in the API, "
                                          "as kubectl annotate --overwrite does")
    pn.add_argument("pod")
    pn.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    st = sub.add_parser("stop", help=f"stop a component ({', '.join(COMPONENTS)})")
    st.add_argument("component")
    st.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    sa = sub.add_parser("start", help="start a stopped component")
    sa.add_argument("component")
    sd = sub.add_parser("sts-delay", help="delay every new STS connection by MS milliseconds")
    sd.add_argument("ms", type=int)
    args = ap.parse_args(argv)
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "exec": cmd_exec, "logs": cmd_logs,
                "pod": cmd_pod, "stop": cmd_stop, "start": cmd_start, "sts-delay": cmd_sts_delay}
    try:
        return handlers[args.cmd](args) or 0
    except StackError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""tests/stack's constants (paths, names, addresses, ports) and its state file,
.stack/state.json: what runs, which pods the stack has, and in which mode."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("MESHIAM_STACK_DIR", ROOT / ".stack"))
STATE_FILE = STATE_DIR / "state.json"
LOGS = STATE_DIR / "logs"
VENV = ROOT / ".venv"
from tests.stacklib.artifacts import BROKER_BIN, KUBE_DOUBLE_BIN, WASM  # noqa: E402,F401
DEFAULT_PODS = ROOT / "tests/pods.yaml"

NODE_NS = "msh-node"
BRIDGE = "mshbr0"
BRIDGE_MAC = "02:6d:73:68:00:01"  # locally administered
NODE_IP = "198.18.0.1"
POD_PREFIX_LEN = 16
# Dual stack: a unique-local prefix that is never routed anywhere (RFC 4193; the stack's
# namespaces are linked only to each other anyway). Pods listed with an IPv6 address get it
# on eth0 with a route via the node's, as IPv4.
NODE_IP6 = "fd00:198:18::1"
POD_PREFIX_LEN6 = 64
# What the capture sends to the sidecar (and the guard refuses otherwise), per family: IMDS
# and the container-credentials endpoint (EKS Pod Identity's addresses).
# IMDS, and the container-credentials endpoint (EKS Pod Identity's address), per family.
METADATA_V4 = ["169.254.169.254", "169.254.170.23"]
METADATA_V6 = ["fd00:ec2::254", "fd00:ec2::23"]
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


def node_addr(state, family=4):
    """The node's address as pods reach it (the broker, STS); family 6 in netns mode is its
    IPv6 address, for pods without an IPv4 one."""
    if state["mode"] != "netns":
        return "127.0.0.1"
    return NODE_IP6 if family == 6 else NODE_IP


def url_host(addr):
    """An address as the host part of a URL (IPv6 in brackets)."""
    return f"[{addr}]" if ":" in addr else addr


def families(ips):
    """The IP families (4, 6) among a pod's addresses."""
    return {6 if ":" in ip else 4 for ip in ips}

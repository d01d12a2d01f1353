"""tests/stack's network (as root): the node namespace with its bridge, one namespace per
pod on it, and the Istio-style iptables capture of a pod's IMDS traffic into its sidecar."""
import os
import signal

from tests.stacklib.procs import run
from tests.stacklib.state import BRIDGE, BRIDGE_MAC, ENVOY_LISTEN, ENVOY_UID, NODE_IP, NODE_NS, POD_PREFIX_LEN


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
        ["-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", addr, "--dport", "80",
         "-m", "owner", "!", "--uid-owner", str(ENVOY_UID), "-j", "REDIRECT", "--to-ports", str(ENVOY_LISTEN)]
        # IMDS, and the container-credentials endpoint (EKS Pod Identity's address).
        for addr in ("169.254.169.254", "169.254.170.23")
    ]
    for r in rules:
        run("ip", "netns", "exec", ns, "iptables", "-w", *r, check=install)


def guard_rules(ns):
    for addr in ("169.254.169.254", "169.254.170.23"):
        run("ip", "netns", "exec", ns, "iptables", "-w", "-A", "OUTPUT", "-d", addr,
            "-j", "REJECT", "--reject-with", "tcp-reset", "-p", "tcp")
        run("ip", "netns", "exec", ns, "iptables", "-w", "-A", "OUTPUT", "-d", addr, "-j", "DROP")


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

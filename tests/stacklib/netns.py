"""tests/stack's network (as root): the node namespace with its bridge, one namespace per
pod on it, and the Istio-style iptables capture of a pod's IMDS traffic into its sidecar.

Dual stack: the bridge has an IPv4 and an IPv6 address (fd00:198:18::/64, never routed
anywhere), a pod gets each address its pods-file entry lists, and the capture and the guard
exist for both families (ip6tables for fd00:ec2::254 and fd00:ec2::23) in every pod, with
or without an IPv6 address."""
import os
import signal

from tests.stacklib.procs import run
from tests.stacklib.state import (BRIDGE, BRIDGE_MAC, ENVOY_LISTEN, ENVOY_UID, METADATA_V4, METADATA_V6, NODE_IP,
                                  NODE_IP6, NODE_NS, POD_PREFIX_LEN, POD_PREFIX_LEN6)

# (iptables tool, metadata addresses) per family.
FAMILIES = (("iptables", METADATA_V4), ("ip6tables", METADATA_V6))


def make_node_netns():
    run("ip", "netns", "add", NODE_NS)
    run("ip", "-n", NODE_NS, "link", "set", "lo", "up")
    run("ip", "-n", NODE_NS, "link", "add", BRIDGE, "type", "bridge")
    # A fixed address: a bridge otherwise takes the lowest address of its ports, so adding a
    # pod (a new veth) can change it, and every pod that still has the old one in its ARP
    # cache cannot reach the node (the broker) until that entry is refreshed, up to ~45 s.
    run("ip", "-n", NODE_NS, "link", "set", BRIDGE, "address", BRIDGE_MAC)
    run("ip", "-n", NODE_NS, "addr", "add", f"{NODE_IP}/{POD_PREFIX_LEN}", "dev", BRIDGE)
    # nodad: usable at once (duplicate address detection would hold it "tentative" ~1 s).
    run("ip", "-n", NODE_NS, "addr", "add", f"{NODE_IP6}/{POD_PREFIX_LEN6}", "dev", BRIDGE, "nodad")
    run("ip", "-n", NODE_NS, "link", "set", BRIDGE, "up")
    # No forwarding out of the node namespace: it has no other link anyway.
    run("ip", "netns", "exec", NODE_NS, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    run("ip", "netns", "exec", NODE_NS, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0")
    # And should forwarding ever be on, the metadata addresses lead nowhere from here.
    for addr in METADATA_V6:
        run("ip", "-n", NODE_NS, "-6", "route", "add", "unreachable", f"{addr}/128")


def redirect_rule(addr):
    """The nat OUTPUT rule (without -A/-D) that sends the app's port-80 traffic to `addr` to
    Envoy; an IPv6 REDIRECT lands on [::1], where the sidecar listens too."""
    return ["OUTPUT", "-p", "tcp", "-d", addr, "--dport", "80", "-m", "owner", "!", "--uid-owner",
            str(ENVOY_UID), "-j", "REDIRECT", "--to-ports", str(ENVOY_LISTEN)]


def capture_rules(ns, install=True):
    """Istio-style capture, IPv4 and IPv6: the app's port-80 traffic to the metadata
    addresses goes to Envoy; Envoy's own traffic (uid 1337) is not captured; and anything to
    them that was not redirected is rejected (guard_rules), so a missing redirect fails
    closed."""
    op = "-A" if install else "-D"
    for tool, addrs in FAMILIES:
        for addr in addrs:
            run("ip", "netns", "exec", ns, tool, "-w", "-t", "nat", op, *redirect_rule(addr), check=install)


def guard_rules(ns):
    for tool, addrs in FAMILIES:
        for addr in addrs:
            run("ip", "netns", "exec", ns, tool, "-w", "-A", "OUTPUT", "-d", addr,
                "-j", "REJECT", "--reject-with", "tcp-reset", "-p", "tcp")
            run("ip", "netns", "exec", ns, tool, "-w", "-A", "OUTPUT", "-d", addr, "-j", "DROP")


def make_pod_netns(state, entry):
    """The pod's namespace with every address of its entry (IPv4 and/or IPv6) on eth0 and a
    default route per family it has. A pod without a sidecar gets no capture, only the guard:
    its IMDS traffic is refused, as a node's IMDS refuses pods (IMDSv2, hop limit 1)."""
    ns, veth = entry["netns"], entry["veth"]
    ips = entry["spec"]["ips"]
    run("ip", "netns", "add", ns)
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", veth, "netns", NODE_NS)
    run("ip", "-n", NODE_NS, "link", "set", veth, "master", BRIDGE, "up")
    for ip in ips:
        if ":" in ip:
            run("ip", "-n", ns, "addr", "add", f"{ip}/{POD_PREFIX_LEN6}", "dev", "eth0", "nodad")
        else:
            run("ip", "-n", ns, "addr", "add", f"{ip}/{POD_PREFIX_LEN}", "dev", "eth0")
    run("ip", "-n", ns, "link", "set", "eth0", "up")
    if any(":" not in ip for ip in ips):
        run("ip", "-n", ns, "route", "add", "default", "via", NODE_IP)
    if any(":" in ip for ip in ips):
        run("ip", "-n", ns, "-6", "route", "add", "default", "via", NODE_IP6)
    if entry.get("sidecar", True):
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

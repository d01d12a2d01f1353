"""The pod capture (meshiam-iptables.sh) and the node link (meshiam-link.sh), checked by
syntax everywhere and, as root, for real in throwaway network namespaces named
meshiam-t-*, always deleted afterwards. Nothing here touches the host's own namespace."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from conftest import REPO, needs_root

IPTABLES_SH = REPO / "deploy" / "init" / "meshiam-iptables.sh"
LINK_SH = REPO / "deploy" / "init" / "meshiam-link.sh"


@pytest.mark.parametrize("script", [IPTABLES_SH, LINK_SH], ids=lambda p: p.name)
def test_bash_syntax(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.fixture
def netns():
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs ip (iproute2) and iptables")
    name = f"meshiam-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nsrun(ns, *cmd, check=True, env=None, timeout=30):
    out = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def save(ns, tool="iptables-save"):
    return nsrun(ns, tool).stdout


def meshiam_lines(dump):
    return sorted(line for line in dump.splitlines() if "MESHIAM_" in line)


# A client that connects as a given UID and reports what happened, in one word.
CLIENT = textwrap.dedent("""
    import os, socket, sys
    host, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if uid:
        os.setgid(uid); os.setuid(uid)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.5)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print(s.recv(100).decode() or "empty")
    except ConnectionRefusedError:
        print("refused")
    except (socket.timeout, TimeoutError):
        print("timeout")
""")

# Stands in for Envoy's capture listener (on [::1] too: where an ip6tables REDIRECT lands).
LISTENER = textwrap.dedent("""
    import select, socket
    socks = []
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 15001)); s.listen(8); socks.append(s)
    print("ready", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            c, _ = s.accept(); c.recv(100); c.sendall(b"captured"); c.close()
""")


def connect(ns, host, port, uid=0):
    return nsrun(ns, sys.executable, "-c", CLIENT, host, str(port), str(uid)).stdout.strip()


@needs_root
def test_iptables_apply_idempotent_and_clean(netns):
    first = nsrun(netns, "bash", str(IPTABLES_SH))
    assert "IPv4" in first.stderr
    once = meshiam_lines(save(netns))
    nsrun(netns, "bash", str(IPTABLES_SH))
    assert meshiam_lines(save(netns)) == once, "running twice must not duplicate rules"

    joined = "\n".join(once)
    assert "-A OUTPUT -j MESHIAM_OUTPUT" in joined
    assert "-A OUTPUT -j MESHIAM_GUARD" in joined
    assert ("-A MESHIAM_OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
            "-m owner --uid-owner 1337 -j RETURN") in joined
    assert ("-A MESHIAM_OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
            "-j REDIRECT --to-ports 15001") in joined
    assert "-A MESHIAM_GUARD -d 169.254.169.254/32 -p tcp -j REJECT --reject-with tcp-reset" in joined
    # The container-credentials address (EKS Pod Identity's) is captured the same way.
    assert ("-A MESHIAM_OUTPUT -d 169.254.170.23/32 -p tcp -m tcp --dport 80 "
            "-j REDIRECT --to-ports 15001") in joined
    assert "-A MESHIAM_GUARD -d 169.254.170.23/32 -p tcp -j REJECT --reject-with tcp-reset" in joined
    assert sum(1 for line in once if line.startswith("-A OUTPUT")) == 2

    v6 = meshiam_lines(save(netns, "ip6tables-save"))
    if v6:  # the kernel has ip6tables nat
        for addr in ("fd00:ec2::254/128", "fd00:ec2::23/128"):
            assert any(addr in line and "REDIRECT --to-ports 15001" in line for line in v6), addr
            assert any(addr in line and "MESHIAM_GUARD" in line and "tcp-reset" in line for line in v6), addr

    nsrun(netns, "bash", str(IPTABLES_SH), "--clean")
    assert meshiam_lines(save(netns)) == []
    assert meshiam_lines(save(netns, "ip6tables-save")) == []
    nsrun(netns, "bash", str(IPTABLES_SH), "--clean")  # cleaning twice is fine too


@needs_root
def test_iptables_captures_and_guards_traffic(netns):
    # A route to IMDS through a dummy link, so connections leave the socket layer at all;
    # nothing answers there, so whatever is not captured times out or is refused.
    nsrun(netns, "ip", "link", "set", "lo", "up")
    nsrun(netns, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    nsrun(netns, "ip", "addr", "add", "10.254.0.2/24", "dev", "d0")
    nsrun(netns, "ip", "link", "set", "d0", "up")
    nsrun(netns, "ip", "link", "set", "d1", "up")
    nsrun(netns, "ip", "route", "add", "default", "dev", "d0")
    listener = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        assert connect(netns, "169.254.169.254", 80) == "timeout", "no capture before the rules"

        nsrun(netns, "bash", str(IPTABLES_SH))
        assert connect(netns, "169.254.169.254", 80) == "captured"
        assert connect(netns, "169.254.169.254", 80, uid=4242) == "captured"
        # The guard: other ports, and Envoy itself, are refused at once.
        assert connect(netns, "169.254.169.254", 81) == "refused"
        assert connect(netns, "169.254.169.254", 80, uid=1337) == "refused"
        assert connect(netns, "169.254.170.23", 80) == "captured"
        assert connect(netns, "169.254.170.23", 81) == "refused"
        # Other destinations are not the script's business.
        assert connect(netns, "10.254.0.9", 80) == "timeout"

        nsrun(netns, "bash", str(IPTABLES_SH), "--clean")
        assert connect(netns, "169.254.169.254", 80) == "timeout"
    finally:
        listener.kill()
        listener.wait()


def ip6tables_nat(ns):
    return shutil.which("ip6tables") is not None and \
        nsrun(ns, "ip6tables", "-w", "-t", "nat", "-S", "OUTPUT", check=False).returncode == 0


@needs_root
def test_iptables_captures_and_guards_ipv6_traffic(netns):
    """IMDS's and the container endpoint's IPv6 addresses, as the IPv4 one (which also
    checks what is not captured before the rules and for other addresses)."""
    if not ip6tables_nat(netns):
        pytest.skip("the kernel has no ip6tables nat table")
    nsrun(netns, "ip", "link", "set", "lo", "up")
    nsrun(netns, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    nsrun(netns, "ip", "addr", "add", "fd00:fe::2/64", "dev", "d0", "nodad")
    nsrun(netns, "ip", "link", "set", "d0", "up")
    nsrun(netns, "ip", "link", "set", "d1", "up")
    nsrun(netns, "ip", "-6", "route", "add", "default", "dev", "d0")
    listener = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"

        nsrun(netns, "bash", str(IPTABLES_SH))
        for addr in ("fd00:ec2::254", "fd00:ec2::23"):
            assert connect(netns, addr, 80) == "captured", addr
            assert connect(netns, addr, 80, uid=4242) == "captured", addr
            assert connect(netns, addr, 81) == "refused", addr
            assert connect(netns, addr, 80, uid=1337) == "refused", addr

        # Without the container address: only IMDS is captured, and only IMDS guarded.
        nsrun(netns, "bash", str(IPTABLES_SH), env=dict(os.environ, MESHIAM_CONTAINER_V6=""))
        assert connect(netns, "fd00:ec2::254", 80) == "captured"
        assert connect(netns, "fd00:ec2::23", 80) != "captured"

        nsrun(netns, "bash", str(IPTABLES_SH), "--clean")
        assert connect(netns, "fd00:ec2::254", 80) != "captured"
    finally:
        listener.kill()
        listener.wait()


def link_type(ns):
    """dummy, as on nodes; bridge where the kernel was built without the dummy driver."""
    probe = nsrun(ns, "ip", "link", "add", "probe0", "type", "dummy", check=False)
    if probe.returncode == 0:
        nsrun(ns, "ip", "link", "del", "probe0")
        return "dummy"
    return "bridge"


@needs_root
def test_link_takes_an_ipv6_address_usable_at_once(netns):
    """IPv6-only clusters: the broker binds the node-local IPv6 address right after `up`."""
    env = dict(os.environ, MESHIAM_LINK_NAME="meshiam0", MESHIAM_LINK_ADDRESS="fd6d:7368::52/128",
               MESHIAM_LINK_TYPE=link_type(netns))
    nsrun(netns, "bash", str(LINK_SH), "up", env=env)
    nsrun(netns, "bash", str(LINK_SH), "up", env=env)  # idempotent
    nsrun(netns, "bash", str(LINK_SH), "check", env=env)
    addrs = nsrun(netns, "ip", "-o", "addr", "show", "dev", "meshiam0").stdout
    ours = [line for line in addrs.splitlines() if "fd6d:7368::52/128" in line]
    assert len(ours) == 1 and "tentative" not in ours[0], addrs
    bind = "import socket; s = socket.socket(socket.AF_INET6); s.bind(('fd6d:7368::52', 8787)); print('bound')"
    assert nsrun(netns, sys.executable, "-c", bind).stdout.strip() == "bound"
    nsrun(netns, "bash", str(LINK_SH), "down", env=env)
    assert nsrun(netns, "ip", "link", "show", "meshiam0", check=False).returncode != 0


@needs_root
def test_link_up_check_down_and_hold(netns):
    kind = link_type(netns)
    env = dict(os.environ, MESHIAM_LINK_NAME="meshiam0", MESHIAM_LINK_ADDRESS="169.254.170.52/32",
               MESHIAM_LINK_TYPE=kind)
    assert nsrun(netns, "bash", str(LINK_SH), "check", check=False, env=env).returncode != 0
    nsrun(netns, "bash", str(LINK_SH), "up", env=env)
    nsrun(netns, "bash", str(LINK_SH), "up", env=env)  # idempotent
    nsrun(netns, "bash", str(LINK_SH), "check", env=env)
    addrs = nsrun(netns, "ip", "-o", "addr", "show", "dev", "meshiam0").stdout
    assert addrs.count("169.254.170.52/32") == 1
    assert kind in nsrun(netns, "ip", "-d", "link", "show", "meshiam0").stdout
    nsrun(netns, "bash", str(LINK_SH), "down", env=env)
    nsrun(netns, "bash", str(LINK_SH), "down", env=env)  # idempotent
    assert nsrun(netns, "ip", "link", "show", "meshiam0", check=False).returncode != 0

    # hold: up while running, gone after SIGTERM (what the DaemonSet's sidecar does).
    holder = subprocess.Popen(["ip", "netns", "exec", netns, "bash", str(LINK_SH), "hold"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            if nsrun(netns, "bash", str(LINK_SH), "check", check=False, env=env).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("hold never brought the link up")
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert nsrun(netns, "ip", "link", "show", "meshiam0", check=False).returncode != 0

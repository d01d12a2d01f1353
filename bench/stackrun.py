"""The local stack (tests/stack) as benchmarks 8–9 and the soak use it: bring it up with a
pods file, find the broker's and the sidecars' processes, run programs inside pods, read the
broker's metrics, take it down. As root the pods are network namespaces with Envoy sidecars
and iptables capture; otherwise everything runs on loopback and a pod is its 127.1.0.x
address (programs bind to it).

The stack has fixed netns names and ports: run anything that uses this under
`flock /tmp/meshiam-stack.lock`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.stacklib import stack as S  # noqa: E402  tests/stacklib/stack.py

STACK = os.path.join(ROOT, "tests", "stack")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


class StackDown(RuntimeError):
    pass


def stack_cmd(*args, timeout=180, check=True):
    res = subprocess.run([STACK, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and res.returncode != 0:
        raise StackDown(f"tests/stack {' '.join(map(str, args))} failed ({res.returncode}):\n"
                        f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Stack:
    """A stack this process brought up (and takes down)."""

    def __init__(self, pods_file, broker_args=(), log=print):
        self.log = log
        if S.load_state() is not None:
            raise StackDown(f"a stack is already up ({S.STATE_FILE}): take it down first (tests/stack down)")
        t = time.monotonic()
        args = ["up", "--pods", pods_file] + [f"--broker-arg={a}" for a in broker_args]
        try:
            stack_cmd(*args)
        except BaseException:
            stack_cmd("down", "--keep-logs", check=False)
            raise
        self.up_seconds = time.monotonic() - t
        self.refresh()

    def refresh(self):
        self.state = S.load_state()
        self.netns = self.state["mode"] == "netns"
        na = S.node_addr(self.state)
        self.broker_addr = f"{na}:{S.port(self.state, 'broker')}"
        self.admin_port = S.port(self.state, "admin")

    def down(self):
        stack_cmd("down", "--keep-logs", check=False)

    # -------------------------------------------------------------- pods and processes
    def pod(self, key):
        self.refresh()
        return self.state["pods"][key]

    def pods(self):
        self.refresh()
        return dict(self.state["pods"])

    def broker_pid(self):
        self.refresh()
        return self.state["procs"]["broker"]["pid"]

    def envoy_pid(self, key):
        self.refresh()
        info = self.state["procs"].get(S.envoy_name(self.state["pods"][key]))
        return info["pid"] if info else None

    def in_pod(self, key, argv):
        """argv run in the pod's network (as root), or as is (loopback: bind to the pod's IP)."""
        entry = self.pod(key)
        if entry.get("netns"):
            return ["ip", "netns", "exec", entry["netns"], *map(str, argv)]
        return list(map(str, argv))

    def in_netns(self, netns, argv):
        if self.netns and netns:
            return ["ip", "netns", "exec", netns, *map(str, argv)]
        return list(map(str, argv))

    # -------------------------------------------------------------- the broker's admin port
    def admin_get(self, path, timeout=5):
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        res = subprocess.run(self.in_netns(S.NODE_NS, ["curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url]),
                             capture_output=True, text=True, timeout=timeout + 5)
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body

    def metrics(self, prefixes=("meshiam_broker_",)):
        """The broker's metrics whose names start with one of prefixes: {name{labels}: value}."""
        st, text = self.admin_get("/metrics")
        out = {}
        if st != 200:
            return out
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(prefixes):
                continue
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
        return out

    def knows(self, key):
        ns, name = key.split("/", 1)
        return self.admin_get(f"/debug/pods/{ns}/{name}")[0] == 200

    # -------------------------------------------------------------- an extra address
    def add_unknown_address(self, ip="198.18.2.250", netns="msh-pghost", veth="mshvghost"):
        """An address on the stack's network that no pod has (netns mode: a namespace of its own
        on the node bridge, not in the Kubernetes API double; loopback: a 127.1.0.x address
        no pod uses). Returns (netns or None, ip)."""
        if not self.netns:
            return None, "127.1.0.250"
        S.make_pod_netns(self.state, {"netns": netns, "veth": veth, "spec": {"ips": [ip]}})
        return netns, ip

    def remove_unknown_address(self, netns):
        if netns:
            S.delete_netns(netns)


class Child:
    """A program this process started (own process group), its stdout read line by line:
    `READY`, `TICK {json}` and `RESULT {json}` lines (bench/hostile.py)."""

    def __init__(self, name, argv, logdir):
        os.makedirs(logdir, exist_ok=True)
        self.name = name
        self.err = open(os.path.join(logdir, f"{name}.log"), "wb")
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.PIPE, text=True,
                                  start_new_session=True, cwd=ROOT)
        self.ready = threading.Event()
        self.ticks, self.result, self.other = [], None, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            kind, _, rest = line.partition(" ")
            if kind == "READY":
                self.ready.set()
            elif kind == "TICK":
                self.ticks.append(json.loads(rest))
            elif kind == "RESULT":
                self.result = json.loads(rest)
            else:
                self.other.append(line)

    def go(self):
        """The line a program started with --wait-go waits for."""
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.2):
                return
            if self.p.poll() is not None:
                break
        self.thread.join(2)
        raise RuntimeError(f"{self.name} not ready (exit {self.p.poll()}): {self.result} {self.tail()}")

    def wait(self, timeout):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        self.thread.join(5)
        if self.result is None:
            raise RuntimeError(f"{self.name} gave no result (exit {self.p.returncode}): {self.tail()}")
        if "error" in self.result:
            raise RuntimeError(f"{self.name}: {self.result['error']}")
        return self.result

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
            except ProcessLookupError:
                pass
        self.err.close() if not self.err.closed else None

    def tail(self):
        self.err.flush()
        try:
            with open(self.err.name, "rb") as f:
                return f.read()[-1500:].decode(errors="replace") + "\n".join(self.other[-10:])
        except OSError:
            return ""


class Sampler:
    """RSS of some processes every `every` seconds, in a thread: {label: [(t, kib), …]}."""

    def __init__(self, pids, every=0.25):
        self.pids = dict(pids)
        self.every = every
        self.series = {k: [] for k in self.pids}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def set(self, label, pid):
        with self.lock:
            self.pids[label] = pid
            self.series.setdefault(label, [])

    def drop(self, label):
        with self.lock:
            self.pids.pop(label, None)

    def _run(self):
        while not self._stop.is_set():
            t = round(time.monotonic() - self.t0, 2)
            with self.lock:
                for k, pid in self.pids.items():
                    v = rss_kib(pid)
                    if v is not None:
                        self.series[k].append((t, v))
            self._stop.wait(self.every)

    def peak(self, label, since=0.0, until=None):
        vals = [v for t, v in self.series[label] if t >= since and (until is None or t <= until)]
        return max(vals) if vals else None

    def now(self):
        return round(time.monotonic() - self.t0, 2)

    def stop(self):
        self._stop.set()
        self.thread.join(5)

"""Process handling and load generation for the benchmarks (bench/run.py).

Every process the harness starts gets its own session (process group) and is remembered in
`Procs`; `Procs.stop_all()` ends exactly those groups, by id, also on an error or Ctrl-C.
Starting, waiting and stopping are tests/stacklib/procs.py's, shared with tests/stack and
the filter's Envoy tests.
Load comes from wrk: throughput and latency through a Lua `done` hook that prints one JSON
line, and a paced form (each connection waits after each answer) for latency at about a
fixed rate.
"""

import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.stacklib import artifacts  # noqa: E402  where the build puts the binaries
from tests.stacklib import procs as proclib  # noqa: E402  the shared process harness
from tests.stacklib.procs import free_port, http_get  # noqa: E402,F401

BENCH = os.path.join(ROOT, "bench")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
ENVOY_BIN = os.path.join(VENV_BIN, "envoy")
PYTHON = os.path.join(VENV_BIN, "python")
# MESHIAM_BENCH_BROKER / MESHIAM_BENCH_WASM / MESHIAM_BENCH_MINIMAL_WASM measure other
# builds with this harness (an older commit's, for BENCHMARKS.md's before/after tables, or
# other modules in benchmark 6's two places: bench/compile_cost.py, or A/B builds).
BROKER_BIN = os.environ.get("MESHIAM_BENCH_BROKER") or str(artifacts.BROKER_BIN)
FLOOR_BIN = str(artifacts.FLOOR_BIN)
WASM = os.environ.get("MESHIAM_BENCH_WASM") or str(artifacts.WASM)
# Benchmark 6's baseline: the smallest proxy-wasm HTTP filter (bench/minimal-filter).
MINIMAL_WASM = os.environ.get("MESHIAM_BENCH_MINIMAL_WASM") or str(artifacts.MINIMAL_WASM)
WRK_LUA = os.path.join(BENCH, "wrk_report.lua")

# Envoy (and the servers under test) on one core, the load generator on the other.
SERVER_CPU = "0"
LOAD_CPU = "1" if (os.cpu_count() or 1) > 1 else "0"

PERCENTILES = [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pinned(cpu, argv):
    return ["taskset", "-c", cpu, *map(str, argv)]


class Procs:
    """The processes this run started. Each runs in its own process group."""

    def __init__(self, logdir):
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        self.procs = {}

    def start(self, name, argv, env=None, cpu=None):
        if cpu is not None:
            argv = pinned(cpu, argv)
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = proclib.start(argv, os.path.join(self.logdir, f"{name}.log"), env=full_env)
        self.procs[name] = p
        return p

    def log_tail(self, name, n=2000):
        return proclib.log_tail(os.path.join(self.logdir, f"{name}.log"), n)

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is not None:
            proclib.stop(p.pid, timeout=10, proc=p)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)

    def check_alive(self, name):
        p = self.procs[name]
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited {p.returncode}:\n{self.log_tail(name)}")


def wait_until(what, pred, timeout=30, procs=None, name=None):
    """Polls pred until true; with procs and name, fails at once if that process exits."""
    proc = procs.procs[name] if procs is not None and name is not None else None
    proclib.wait_for(what, pred, timeout=timeout, proc=proc)


def http_ok(url):
    return proclib.url_ok(url, timeout=1)


def rss_kib(pid):
    """VmRSS of a process (the server itself, not the taskset wrapper: taskset execs)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# ------------------------------------------------------------------------------- wrk


def wrk(url, seconds, connections, headers=(), method=None, delay_ms=None):
    """wrk on the load core: requests/s and latency percentiles (µs, wrk's 1 µs resolution).
    `delay_ms` paces it: each connection waits that long after each answer."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", WRK_LUA]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    env = dict(os.environ)
    if method:
        env["WRK_METHOD"] = method
    if delay_ms is not None:
        env["WRK_DELAY_MS"] = str(delay_ms)
    out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True, timeout=seconds + 60, env=env)
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    if r["requests"] == 0:
        raise RuntimeError(f"wrk made no requests to {url}:\n{out.stdout}")
    bad = r["errors"]["status"] + r["errors"]["connect"] + r["errors"]["read"] + r["errors"]["timeout"]
    if bad:
        raise RuntimeError(f"wrk saw {bad} failed requests to {url} ({r['errors']}):\n{out.stdout}")
    return {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "requests": r["requests"],
        "latency_us": {str(p): r["p"][str(p)] for p in PERCENTILES},
    }


def percentiles(samples_us):
    s = sorted(samples_us)
    out = {}
    for p in PERCENTILES:
        k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
        out[str(p)] = round(s[k], 1)
    return out


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def median_run(runs):
    """The median of several wrk runs, per figure."""
    return {
        "rps": median([r["rps"] for r in runs]),
        "requests": sum(r["requests"] for r in runs),
        "latency_us": {p: median([r["latency_us"][p] for r in runs]) for p in runs[0]["latency_us"]},
        "rounds": len(runs),
    }


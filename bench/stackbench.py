"""Benchmarks 8 and 9 of BENCHMARKS.md: one pod's hostile load against the broker, on the
local stack (tests/stack: netns pods, real Envoy sidecars, the broker, the Kubernetes API
double, moto), and what another pod's credential call-out sees meanwhile. Each attack is
measured side by side with an unattacked run of the same probe just before it, in the same
run; RSS is the broker's VmRSS from /proc.

8. Slowloris: N connections from a pod with no role, each sending a partial request and then
   a header line every ~10 s (bench/hostile.py slowloris).
9. Unknown address: N requests in flight at once from an address on the stack's network that
   no pod has (bench/hostile.py flood).

The victim's probe is the filter's credential call-out sent from the victim pod's network
namespace straight to the broker (bench/hostile.py probe), so it measures the broker, not
the sidecar's cache.
"""

import os
import re
import threading
import time

import yaml

from harness import log
from stackrun import PYTHON, Child, Sampler, Stack

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTILE = os.path.join(HERE, "hostile.py")
MB = 1_000_000

VICTIM = {"namespace": "bench", "name": "victim", "ip": "198.18.2.10", "role": "bench-victim-role"}
NOISY = {"namespace": "bench", "name": "noisy", "ip": "198.18.2.11", "role": None}
UNKNOWN_IP = "198.18.2.250"

# The figures the issue asks for (issue 10), printed next to what was measured.
GOAL_RSS_DURING_MB = 64
GOAL_RSS_AFTER_MB = 10
GOAL_P99_RATIO = 3.0

FULL = {"slowloris_connections": 10_000, "flood_concurrency": 3_000, "probe_s": 20, "probe_rate": 50,
        "ramp_s": 5, "settle_s": 10}
QUICK = {"slowloris_connections": 500, "flood_concurrency": 300, "probe_s": 3, "probe_rate": 50,
         "ramp_s": 1, "settle_s": 2}


def filter_broker_timeout_ms():
    """The filter's default brokerTimeoutMs (filter/src/config.rs): how long a sidecar waits
    for the broker before it answers 504."""
    with open(os.path.join(os.path.dirname(HERE), "filter", "src", "config.rs")) as f:
        m = re.search(r"DEFAULT_BROKER_TIMEOUT_MS: u32 = (\d+);", f.read())
    return int(m.group(1)) if m else 2500


def pods_doc():
    pods = []
    for p in (VICTIM, NOISY):
        d = {"namespace": p["namespace"], "name": p["name"], "ips": [p["ip"]], "serviceAccount": "default",
             "node": "node-1"}
        if p["role"]:
            d["annotations"] = {"iam.amazonaws.com/role": p["role"]}
        pods.append(d)
    return {"pods": pods, "namespaces": [
        {"name": "bench", "annotations": {"iam.amazonaws.com/allowed-roles": '["bench-*"]'}}]}


def key(p):
    return f"{p['namespace']}/{p['name']}"


class Run:
    def __init__(self, stack, logdir, hc):
        self.stack, self.logdir, self.hc = stack, logdir, hc

    def hostile(self, name, where, bind, *args):
        argv = [PYTHON, HOSTILE, *args, "--broker", self.stack.broker_addr, "--bind", bind]
        return Child(name, where(argv), self.logdir)

    def probe(self, label, seconds):
        """The victim's probe, ready (broker token, warm cache) but waiting: .go() starts it."""
        v = self.stack.pod(key(VICTIM))
        c = self.hostile(f"probe-{label}", lambda a: self.stack.in_pod(key(VICTIM), a), v["ip"], "probe",
                         "--role", VICTIM["role"], "--namespace", VICTIM["namespace"], "--pod", VICTIM["name"],
                         "--seconds", seconds, "--rate", self.hc["probe_rate"],
                         "--timeout", filter_broker_timeout_ms() / 1000, "--wait-go")
        try:
            c.wait_ready(30)
        except BaseException:
            c.stop()
            raise
        return c

    def measure(self, probe, seconds):
        try:
            probe.go()
            return probe.wait(seconds + 30)
        finally:
            probe.stop()


def _peak(peaks, name):
    v = peaks.get(name)
    return "n/a (no such metric)" if v is None else f"{v:,.0f}"


def ratio(a, b):
    return a / b if b else None


def fmt_probe(r):
    lat = r["latency_us"]
    return (f"p50 {lat['50'] / 1000:.2f} ms, p99 {lat['99'] / 1000:.2f} ms, {r['requests']} call-outs, "
            f"{r['5xx']} 5xx, {r['failed']} not 200")


class GaugePeaks:
    """The broker's connection and pod-waiter gauges, read every second in a thread: peaks."""

    NAMES = ("meshiam_broker_connections", "meshiam_broker_pod_waiters")

    def __init__(self, stack):
        self.stack, self.peaks = stack, {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.stack.metrics(prefixes=self.NAMES)
            for n in self.NAMES:
                if n in m:
                    self.peaks[n] = max(self.peaks.get(n, 0), m[n])
            self._stop.wait(1.0)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        return self.peaks


def watched_metrics(stack):
    return stack.metrics(prefixes=("meshiam_broker_connections", "meshiam_broker_pod_waiters",
                                   "meshiam_broker_requests_total", "meshiam_broker_inflight"))


def bench_slowloris(run):
    hc, stack = run.hc, run.stack
    n, d = hc["slowloris_connections"], hc["probe_s"]
    noisy = stack.pod(key(NOISY))
    log(f"8/9 slowloris: {n:,} connections from pod {key(NOISY)} (no role), a header line every ~10 s; "
        f"victim {key(VICTIM)} call-outs {hc['probe_rate']}/s for {d} s unattacked, then under attack")
    pid = stack.broker_pid()
    sampler = Sampler({"broker": pid})
    try:
        unattacked = run.measure(run.probe("slowloris-unattacked", d), d)
        log(f"    unattacked: {fmt_probe(unattacked)}")
        victim = run.probe("slowloris-attacked", d)
        time.sleep(1)
        start_kib = sampler.series["broker"][-1][1]
        t_attack = sampler.now()
        attack_s = hc["ramp_s"] + d + 3
        attacker = run.hostile("slowloris", lambda a: stack.in_pod(key(NOISY), a), noisy["ip"], "slowloris",
                               "--connections", n, "--seconds", attack_s, "--interval", 10,
                               "--ramp-seconds", hc["ramp_s"])
        gauges = GaugePeaks(stack)
        try:
            attacker.wait_ready(hc["ramp_s"] + 30)
            attacked = run.measure(victim, d)
            during = watched_metrics(stack)
            held_now = attacker.ticks[-1]["held"] if attacker.ticks else None
            result = attacker.wait(attack_s + 60)
        finally:
            attacker.stop()
            victim.stop()
            peaks = gauges.stop()
        t_end = sampler.now()
        time.sleep(hc["settle_s"])
        after_kib = sampler.series["broker"][-1][1]
        after = watched_metrics(stack)
    finally:
        sampler.stop()
    peak_kib = sampler.peak("broker", since=t_attack, until=t_end + 1)
    series = [(round(t - t_attack, 1), v) for t, v in sampler.series["broker"][::4] if t >= t_attack - 2]
    out = {
        "connections": n, "header_interval_s": 10, "attack_s": round(t_end - t_attack, 1),
        "probe_rate": hc["probe_rate"], "probe_s": d, "probe_timeout_ms": filter_broker_timeout_ms(),
        "rss_kib": {"start": start_kib, "peak_during": peak_kib, "after": after_kib, "after_s": hc["settle_s"]},
        "rss_series_kib": series,
        "probe": {"unattacked": unattacked, "attacked": attacked},
        "p50_ratio": ratio(attacked["latency_us"]["50"], unattacked["latency_us"]["50"]),
        "p99_ratio": ratio(attacked["latency_us"]["99"], unattacked["latency_us"]["99"]),
        "attacker": result | {"held_while_probing": held_now},
        "broker_metrics_during": during, "broker_metrics_after": after, "broker_gauge_peaks": peaks,
    }
    log(f"    attacked:   {fmt_probe(attacked)}")
    log(f"    victim p99 {out['p99_ratio']:.2f}× unattacked (goal ≤ {GOAL_P99_RATIO:g}×), "
        f"p50 {out['p50_ratio']:.2f}×")
    log(f"    broker RSS {start_kib * 1024 / MB:.1f} MB before, peak {peak_kib * 1024 / MB:.1f} MB during "
        f"(goal ≤ {GOAL_RSS_DURING_MB} MB), {after_kib * 1024 / MB:.1f} MB {hc['settle_s']} s after "
        f"(goal within {GOAL_RSS_AFTER_MB} MB of before: {(after_kib - start_kib) * 1024 / MB:+.1f} MB)")
    log(f"    attacker: {result['opened']:,} connections opened, at most {result['peak_held']:,} held at once "
        f"(open ≥ 1 s unanswered; longest {result['longest_held_s']} s), refused or closed by the broker: "
        f"{result['refused']:,} {result['outcomes']}; broker's open connections at most "
        f"{_peak(peaks, 'meshiam_broker_connections')}")
    return out


def bench_unknown_flood(run):
    hc, stack = run.hc, run.stack
    n, d = hc["flood_concurrency"], hc["probe_s"]
    netns, ip = stack.add_unknown_address(UNKNOWN_IP)
    try:
        log(f"9/9 unknown address: {n:,} requests in flight from {ip} (no pod has it); victim "
            f"{key(VICTIM)} call-outs {hc['probe_rate']}/s for {d} s unattacked, then under attack")
        unattacked = run.measure(run.probe("flood-unattacked", d), d)
        log(f"    unattacked: {fmt_probe(unattacked)}")
        victim = run.probe("flood-attacked", d)
        attack_s = hc["ramp_s"] + d + 3
        attacker = run.hostile("flood", lambda a: stack.in_netns(netns, a), ip, "flood", "--concurrency", n,
                               "--seconds", attack_s, "--ramp-seconds", hc["ramp_s"])
        gauges = GaugePeaks(stack)
        try:
            attacker.wait_ready(hc["ramp_s"] + 30)
            attacked = run.measure(victim, d)
            during = watched_metrics(stack)
            result = attacker.wait(attack_s + 60)
        finally:
            attacker.stop()
            victim.stop()
            peaks = gauges.stop()
    finally:
        stack.remove_unknown_address(netns)
    out = {
        "concurrency": n, "unknown_address": ip, "probe_rate": hc["probe_rate"], "probe_s": d,
        "probe_timeout_ms": filter_broker_timeout_ms(),
        "probe": {"unattacked": unattacked, "attacked": attacked},
        "p50_ratio": ratio(attacked["latency_us"]["50"], unattacked["latency_us"]["50"]),
        "p99_ratio": ratio(attacked["latency_us"]["99"], unattacked["latency_us"]["99"]),
        "victim_5xx": attacked["5xx"], "victim_not_200": attacked["failed"],
        "attacker": result, "broker_metrics_during": during, "broker_gauge_peaks": peaks,
    }
    log(f"    attacked:   {fmt_probe(attacked)}")
    log(f"    victim p99 {out['p99_ratio']:.2f}× unattacked (goal ≤ {GOAL_P99_RATIO:g}×), p50 "
        f"{out['p50_ratio']:.2f}×; victim 5xx {out['victim_5xx']} (goal 0)")
    log(f"    attacker: {result['answered']:,} answers ({result['answers_per_s']:,}/s) {result['answers']}; "
        f"broker's open connections at most {_peak(peaks, 'meshiam_broker_connections')}, requests waiting "
        f"for an unknown address at most {_peak(peaks, 'meshiam_broker_pod_waiters')}")
    return out


def bench_hostile(cfg, logdir, parts):
    """Brings the stack up once for both benchmarks; returns (benchmark 8, benchmark 9)."""
    hc = QUICK if cfg["mode"] == "quick" else FULL
    os.makedirs(logdir, exist_ok=True)
    pods_file = os.path.join(logdir, "stack-pods.yaml")
    with open(pods_file, "w") as f:
        yaml.safe_dump(pods_doc(), f, sort_keys=False)
    log("8–9: bringing the local stack up (tests/stack up)")
    # The broker at its production log level (the stack's default adds debug lines).
    stack = Stack(pods_file, broker_args=["--log=info"], log=log)
    b8 = b9 = None
    try:
        run = Run(stack, logdir, hc)
        mode = {"stack_mode": stack.state["mode"]}
        if 8 in parts:
            b8 = bench_slowloris(run) | mode
        if 9 in parts:
            b9 = bench_unknown_flood(run) | mode
    finally:
        stack.down()
    return b8, b9

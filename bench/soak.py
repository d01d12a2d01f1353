"""`make soak`: pods running SDK-like loops for a few minutes while pods churn, on the local
stack (tests/stack; run under `flock /tmp/meshiam-stack.lock`). Not part of `make test`.

    .venv/bin/python bench/soak.py [--seconds 180] [--stable 4] [--churn-slots 2]
                                   [--churn-every 20] [--rate 2] [--record]

`--stable` pods live the whole run; `--churn-slots` more are replaced every `--churn-every`
seconds, one slot at a time: the pod's loop is stopped, the pod deleted
(`tests/stack pod delete`) and a new pod with a new name and a new role added at the same
address (`tests/stack pod add`; Kubernetes reuses addresses too), its loop started once the
broker knows it, as a container starts after its pod is scheduled. Every pod runs
bench/soak_client.py: credentials from scratch through botocore's provider chain via IMDS
and its sidecar, then STS GetCallerIdentity, checked to be the pod's own role and session.

Prints and writes (bench/out/soak/summary.json; with `--record` also bench/soak.json and
the Soak section of BENCHMARKS.md): iterations, errors (any error: exit 1), the broker's and
each sidecar Envoy's RSS sampled every 2 s (start after warm-up, max, end) and whether each
stayed flat: end within FLAT_BOUND_MB of its start after the warm-up (not judged for
churned pods that lived less than twice the warm-up). Memory that is not flat also exits 1.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stackrun import PYTHON, ROOT, Child, S, Sampler, Stack, stack_cmd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "soak_client.py")
MB = 1_000_000
FLAT_BOUND_MB = 5
NAMESPACE = "soak"


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pod_spec(name, ip, role):
    return {"namespace": NAMESPACE, "name": name, "ips": [ip], "serviceAccount": "default", "node": "node-1",
            "annotations": {"iam.amazonaws.com/role": role}}


def write_pods(path, pods, with_namespace=True):
    doc = {"pods": pods}
    if with_namespace:
        doc["namespaces"] = [{"name": NAMESPACE, "annotations": {"iam.amazonaws.com/allowed-roles": '["soak-*"]'}}]
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


class Soak:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.workers = {}   # pod key -> (Child, spec)
        self.results = []   # RESULT of every loop that ended
        self.lifetimes = {}  # pod key -> (start t, end t)
        self.churns = 0

    def key(self, spec):
        return f"{spec['namespace']}/{spec['name']}"

    def start_worker(self, spec):
        k = self.key(spec)
        entry = self.stack.pod(k)
        env = S.pod_env(self.stack.state, entry)
        argv = self.stack.in_pod(k, ["env", "-i", *[f"{a}={b}" for a, b in env.items()], PYTHON, CLIENT,
                                     "--role", spec["annotations"]["iam.amazonaws.com/role"],
                                     "--namespace", spec["namespace"], "--pod", spec["name"],
                                     "--rate", self.args.rate])
        c = Child(f"soak-{spec['name']}", argv, os.path.join(self.workdir, "logs"))
        c.wait_ready(30)
        self.workers[k] = (c, spec)
        pid = self.stack.envoy_pid(k)
        if pid:
            self.sampler.set(f"envoy {k}", pid)
        self.lifetimes[k] = [self.sampler.now(), None]

    def stop_worker(self, k):
        c, spec = self.workers.pop(k)
        c.stop()
        try:
            self.results.append(c.wait(10))
        except RuntimeError as e:
            self.results.append({"pod": k, "iterations": 0, "errors": 1, "error_samples": {str(e)[:200]: 1}})
        self.lifetimes[k][1] = self.sampler.now()
        self.sampler.drop(f"envoy {k}")

    def churn(self, slot, gen):
        old_key = self.slots[slot]
        _, old = self.workers[old_key]
        ip = old["ips"][0] if self.stack.netns else None
        self.stop_worker(old_key)
        stack_cmd("pod", "delete", old_key)
        new = pod_spec(f"churn-{slot}-{gen}", ip or "198.18.3.1", f"soak-churn-{slot}-{gen}")
        path = os.path.join(self.workdir, f"churn-{slot}-{gen}.yaml")
        write_pods(path, [new], with_namespace=False)
        stack_cmd("pod", "add", path)
        k = self.key(new)
        deadline = time.monotonic() + 15
        while not self.stack.knows(k):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not learn of {k} within 15 s")
            time.sleep(0.1)
        self.start_worker(new)
        self.slots[slot] = k
        self.churns += 1
        log(f"    churn {self.churns}: {old_key} → {k} ({new['annotations']['iam.amazonaws.com/role']}"
            f"{', same address' if ip else ''})")

    def run(self):
        a = self.args
        stable = [pod_spec(f"stable-{i}", f"198.18.3.{10 + i}", f"soak-stable-{i}") for i in range(a.stable)]
        churning = [pod_spec(f"churn-{s}-0", f"198.18.3.{100 + s}", f"soak-churn-{s}-0") for s in range(a.churn_slots)]
        pods_file = os.path.join(self.workdir, "pods.yaml")
        write_pods(pods_file, stable + churning)
        log(f"bringing the stack up: {a.stable} stable pods, {a.churn_slots} churning")
        self.stack = Stack(pods_file, broker_args=["--log=info"], log=log)
        self.sampler = Sampler({"broker": self.stack.broker_pid()}, every=2.0)
        try:
            for spec in stable + churning:
                self.start_worker(spec)
            self.slots = [self.key(s) for s in churning]
            log(f"{len(self.workers)} loops running for {a.seconds} s at {a.rate}/s each; a pod replaced every "
                f"{a.churn_every} s")
            t_start = time.monotonic()
            next_churn, gen, slot = t_start + a.churn_every, 1, 0
            last_report = t_start
            while time.monotonic() - t_start < a.seconds:
                time.sleep(0.5)
                for k, (c, _) in list(self.workers.items()):
                    if c.p.poll() is not None:
                        raise RuntimeError(f"the loop of {k} ended by itself: {c.tail()}")
                if a.churn_slots and time.monotonic() >= next_churn:
                    self.churn(slot, gen)
                    slot = (slot + 1) % a.churn_slots
                    if slot == 0:
                        gen += 1
                    next_churn += a.churn_every
                if time.monotonic() - last_report >= 30:
                    last_report = time.monotonic()
                    its = sum(c.ticks[-1]["iterations"] for c, _ in self.workers.values() if c.ticks)
                    errs = sum(c.ticks[-1]["errors"] for c, _ in self.workers.values() if c.ticks)
                    rss = self.sampler.series["broker"][-1][1] if self.sampler.series["broker"] else 0
                    log(f"    {time.monotonic() - t_start:.0f} s: running loops {its:,} iterations, {errs} errors; "
                        f"broker RSS {rss * 1024 / MB:.1f} MB")
            for k in list(self.workers):
                self.stop_worker(k)
            elapsed = time.monotonic() - t_start
        finally:
            for k in list(self.workers):
                self.workers.pop(k)[0].stop()
            self.sampler.stop()
            self.stack.down()
        return self.summary(elapsed)

    def summary(self, elapsed):
        a = self.args
        warm = min(30.0, a.seconds / 4)
        rss = {}
        for label, series in self.sampler.series.items():
            if not series:
                continue
            t_first = series[0][0]
            after = [(t, v) for t, v in series if t >= t_first + warm]
            judged = label == "broker" or not label.startswith("envoy") or (series[-1][0] - t_first) >= 2 * warm
            base = after if after else series
            start, end = base[0][1], base[-1][1]
            r = {"start_kib": start, "max_kib": max(v for _, v in base), "end_kib": end,
                 "first_kib": series[0][1], "samples": len(series), "lived_s": round(series[-1][0] - t_first, 1)}
            r["flat"] = (end - start) * 1024 <= FLAT_BOUND_MB * MB if (judged and after) else None
            rss[label] = r
        per_pod = {r["pod"]: r for r in self.results}
        iterations = sum(r["iterations"] for r in self.results)
        errors = sum(r["errors"] for r in self.results)
        samples = {}
        for r in self.results:
            for msg, n in r.get("error_samples", {}).items():
                samples[f"{r['pod']}: {msg}"] = n
        not_flat = [k for k, r in rss.items() if r["flat"] is False]
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip(),
            "command": f"make soak SOAK_SECONDS={a.seconds:g}",
            "stack_mode": self.stack.state["mode"],
            "seconds": round(elapsed, 1), "rate_per_pod": a.rate, "stable_pods": a.stable,
            "churn_slots": a.churn_slots, "churn_every_s": a.churn_every, "churns": self.churns,
            "pods_run": len(per_pod), "iterations": iterations, "imds_requests": 3 * iterations,
            "errors": errors, "error_samples": samples,
            "warmup_s": warm, "flat_bound_mb": FLAT_BOUND_MB, "rss": rss, "not_flat": not_flat,
            "per_pod": per_pod, "load": os.getloadavg(),
            "ok": errors == 0 and not not_flat and iterations > 0,
        }


def print_summary(s):
    print()
    print(f"soak: {s['seconds']:.0f} s, {s['pods_run']} pods ({s['stable_pods']} stable, {s['churns']} churns), "
          f"{s['iterations']:,} iterations (each: IMDS token PUT, role list, credential GET through the sidecar, "
          f"STS GetCallerIdentity), errors: {s['errors']}")
    for msg, n in s["error_samples"].items():
        print(f"  error ×{n}: {msg}")
    print(f"memory (RSS MB; start = {s['warmup_s']:.0f} s after the process was first seen; flat = end within "
          f"{s['flat_bound_mb']} MB of start):")
    for label, r in s["rss"].items():
        flat = {True: "flat", False: "NOT FLAT", None: "not judged (short-lived)"}[r["flat"]]
        print(f"  {label:32} start {r['start_kib'] * 1024 / MB:6.1f}  max {r['max_kib'] * 1024 / MB:6.1f}  "
              f"end {r['end_kib'] * 1024 / MB:6.1f}  ({r['end_kib'] - r['start_kib']:+,} KiB, lived {r['lived_s']} s) "
              f"{flat}")
    print(f"soak: {'OK' if s['ok'] else 'FAILED'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 180)))
    ap.add_argument("--stable", type=int, default=4)
    ap.add_argument("--churn-slots", type=int, default=2)
    ap.add_argument("--churn-every", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=2.0, help="iterations per second per pod")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "soak"))
    ap.add_argument("--record", action="store_true",
                    help="also write bench/soak.json and the Soak section of BENCHMARKS.md")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    s = Soak(args, args.out).run()
    if args.record:
        s["command"] = f".venv/bin/python bench/soak.py --seconds {args.seconds:g} --record"
    print_summary(s)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    log(f"wrote {os.path.relpath(os.path.join(args.out, 'summary.json'), ROOT)}")
    if args.record:
        import report
        with open(os.path.join(HERE, "soak.json"), "w") as f:
            json.dump(s, f, indent=2)
        with open(os.path.join(HERE, "results.json")) as f:
            results = json.load(f)
        results["targets"] = report.targets(results)
        report.write_markdown(results, os.path.join(ROOT, "BENCHMARKS.md"), "bench/latency.svg")
        log("wrote bench/soak.json and BENCHMARKS.md")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: the stack was taken down")

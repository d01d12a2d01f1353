"""meshiam benchmarks: `make bench` (full) or `make bench-quick` (CI: checks the harness).

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--only 1,2,...] [--merge]

One benchmark alone, keeping the others' figures: `--only 2 --merge` measures benchmark 2,
takes every other benchmark from bench/results.json, notes the partial run in BENCHMARKS.md
and rewrites it.

Runs benchmarks 1–9 (see BENCHMARKS.md; 8 and 9 bring up the local stack, tests/stack: run
them under `flock /tmp/meshiam-stack.lock`), each against a baseline measured side by side in
this run, prints progress and a table, and writes DIR/results.json, DIR/latency.svg and
(full mode, default DIR) BENCHMARKS.md at the top of the repository.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmarks as B  # noqa: E402
import mtlsbench  # noqa: E402
import report  # noqa: E402
import stackbench  # noqa: E402
import stsmodel  # noqa: E402
from harness import BROKER_BIN, FLOOR_BIN, MINIMAL_WASM, ROOT, WASM, Procs, log  # noqa: E402

FULL = {"mode": "full", "rounds": 3, "seconds": 5, "overhead_rounds": 7, "overhead_seconds": 3,
        "large_pods": 10_000, "cold_trials": 3, "cold_start_after_s": 3.0, "cold_jitter": "2s", "sim": stsmodel.FULL}
QUICK = {"mode": "quick", "rounds": 1, "seconds": 1, "large_pods": 10_000, "cold_trials": 1,
         "cold_start_after_s": 0.6, "cold_jitter": "200ms", "sim": stsmodel.QUICK}


def machine():
    model, mhz = "unknown", None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    envoy = subprocess.run([B.ENVOY_BIN, "--version"], capture_output=True, text=True).stdout.strip()
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "cpu_model": model, "cpu_mhz": mhz, "nproc": int(nproc or 0), "mem_total_mib": mem_kib // 1024,
        "kernel": platform.release(), "envoy": envoy.split("version:")[-1].strip()[:80], "rustc": rustc,
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "wrk",
        "load": os.getloadavg(),
    }


def merged(partial, only):
    """bench/results.json with the benchmarks of this partial run replaced, and the run noted."""
    with open(os.path.join(ROOT, "bench", "results.json")) as f:
        full = json.load(f)
    names = set(partial["benchmarks"])
    full["benchmarks"].update(partial["benchmarks"])
    runs = [r for r in full.get("partial_runs", []) if not set(r["benchmarks"]) <= names]
    runs.append({k: partial[k] for k in ("date", "git", "command", "elapsed_s", "machine")}
                | {"benchmarks": sorted(names), "numbers": sorted(only)})
    full["partial_runs"] = runs
    return full


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="brief runs that only check the harness (CI)")
    ap.add_argument("--out", default=None, help="results directory (default bench/ for full, bench/out/quick)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="benchmarks to run, e.g. 1,2,7")
    ap.add_argument("--merge", action="store_true",
                    help="keep the benchmarks not in --only from bench/results.json (full mode) and note "
                         "this partial run in BENCHMARKS.md")
    ap.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the chart and BENCHMARKS.md from bench/results.json")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(ROOT, "bench", "results.json")) as f:
            results = json.load(f)
        results["targets"] = report.targets(results)
        chart = os.path.join(ROOT, "bench", "latency.svg")
        report.write_chart(results, chart)
        report.write_markdown(results, os.path.join(ROOT, "BENCHMARKS.md"), os.path.relpath(chart, ROOT))
        print(report.table(results))
        return
    cfg = QUICK if args.quick else FULL
    only = {int(x) for x in args.only.split(",") if x}
    if args.out:
        out_dir = args.out
    else:
        out_dir = os.path.join(ROOT, "bench", "out", "quick") if args.quick else os.path.join(ROOT, "bench")
    os.makedirs(out_dir, exist_ok=True)
    # Process logs are scratch: under bench/out (git-ignored) unless --out says otherwise.
    log_dir = os.path.join(args.out, "logs") if args.out else os.path.join(ROOT, "bench", "out", cfg["mode"], "logs")
    for binary, how in ((WASM, "make wasm"), (MINIMAL_WASM, "make bench-wasm"), (BROKER_BIN, "make broker"),
                        (FLOOR_BIN, "make broker")):
        if not os.path.exists(binary):
            sys.exit(f"missing {binary}: run {how} (make bench builds everything)")
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool} on PATH")

    if args.merge and args.quick:
        sys.exit("--merge is for full runs: quick figures are not to be mixed with full ones")
    started = time.time()
    command = "make bench-quick" if args.quick else "make bench"
    if args.merge:
        command = f".venv/bin/python bench/run.py --only {','.join(map(str, sorted(only)))} --merge"
    results = {
        "schema": 1,
        "mode": cfg["mode"],
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "machine": machine(),
        "config": {k: v for k, v in cfg.items() if k != "sim"},
        "benchmarks": {},
    }
    log(f"{cfg['mode']} run: server core 0, load core 1; logs in {os.path.relpath(log_dir, ROOT)}")

    procs = Procs(log_dir)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    bm = results["benchmarks"]
    try:
        stack = B.Stack(procs, cfg)
        if only & {1, 2, 3, 4, 5, 6, 10}:
            stack.start_moto()
        if only & {1, 2, 3, 6}:
            broker = stack.start_broker("broker", [B.SIDECAR_POD, B.DIRECT_POD])
        if only & {1, 2}:
            b1, b2 = B.bench_envoy(stack, broker, cfg, parts=only & {1, 2})
            if b1 is not None:
                bm["1_filter_overhead"] = b1
            if b2 is not None:
                bm["2_answer_latency"] = b2
        if 3 in only:
            bm["3_broker_throughput"] = B.bench_broker_throughput(stack, broker, cfg)
        if 6 in only:
            bm["6_size"] = B.bench_sizes(stack, broker, cfg)
        if only & {1, 2, 3, 6}:
            procs.stop("broker")
        if 4 in only:
            bm["4_broker_memory"] = B.bench_broker_memory(stack, cfg)
        if 5 in only:
            bm["5_cold_start"] = B.bench_cold_start(stack, cfg)
        if 10 in only:
            bm["10_mtls"] = mtlsbench.bench_mtls(stack, cfg)
        procs.stop_all()
        if only & {8, 9}:
            b8, b9 = stackbench.bench_hostile(cfg, os.path.join(log_dir, "stack"), only & {8, 9})
            if b8 is not None:
                bm["8_slowloris"] = b8
            if b9 is not None:
                bm["9_unknown_address_flood"] = b9
    finally:
        procs.stop_all()
    if 7 in only:
        log("7/9 STS load at cluster scale: simulation (bench/stsmodel.py)")
        bm["7_sts_cluster_scale"] = stsmodel.run(cfg["sim"], progress=log)

    results["elapsed_s"] = elapsed = round(time.time() - started, 1)
    if args.merge:
        results = merged(results, only)
    results["targets"] = report.targets(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    chart = os.path.join(out_dir, "latency.svg")
    report.write_chart(results, chart)
    print()
    print(report.table(results))
    if not args.no_markdown and not args.quick:
        md = os.path.join(ROOT, "BENCHMARKS.md")
        report.write_markdown(results, md, os.path.relpath(chart, ROOT))
        log(f"wrote {os.path.relpath(md, ROOT)}")
    log(f"wrote {os.path.relpath(os.path.join(out_dir, 'results.json'), ROOT)} in {elapsed} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every process this run started was stopped")

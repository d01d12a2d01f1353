"""The benchmark harness works: `bench/run.py --quick` runs every benchmark briefly and
writes results.json of the expected shape. Timings are not judged here (see BENCHMARKS.md).
Benchmarks 8 and 9 bring up the local stack (tests/stack): run under the stack lock."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tests.stacklib.artifacts import BROKER_BIN, FLOOR_BIN, MINIMAL_WASM, WASM  # noqa: E402

ARTEFACTS = [WASM, MINIMAL_WASM, BROKER_BIN, FLOOR_BIN]
LATENCY_KEYS = {"1", "5", "10", "25", "50", "75", "90", "95", "99", "99.9"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not all(os.path.exists(a) for a in ARTEFACTS):
        # What `make build` builds.
        subprocess.run(["make", "build"], cwd=ROOT, check=True)
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "targets:" in run.stdout and "[bench" in run.stdout  # progress and the table were printed
    assert (out / "latency.svg").read_text().startswith("<svg")
    return json.loads((out / "results.json").read_text())


def run_shape(r):
    assert r["rps"] > 0 and r["requests"] > 0
    assert set(r["latency_us"]) == LATENCY_KEYS
    values = [r["latency_us"][k] for k in sorted(LATENCY_KEYS, key=float)]
    assert values == sorted(values) and values[0] > 0


def test_top_level(results):
    assert results["mode"] == "quick" and results["command"] == "make bench-quick"
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]
    assert results["date"] and results["elapsed_s"] > 0
    assert {t["benchmark"] for t in results["targets"]} == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
    assert all(isinstance(t["met"], bool) for t in results["targets"])


def test_filter_overhead_and_answer_latency(results):
    b1 = results["benchmarks"]["1_filter_overhead"]
    for part in ("throughput", "latency"):
        for v in ("with_filter", "without_filter"):
            run_shape(b1[part][v])
    assert b1["throughput_ratio"] > 0
    # Istio's shape (envoy/istio-shape-scoped.yaml), with and without the filter.
    b1i = b1["istio"]["istio-shape-scoped"]
    for part in ("throughput", "latency"):
        for v in ("with_filter", "without_filter"):
            run_shape(b1i[part][v])
    assert b1i["throughput_ratio"] > 0
    b2 = results["benchmarks"]["2_answer_latency"]
    assert set(b2["latency"]) == {"floor_direct_response", "sidecar_cache_hit", "broker_cache_hit",
                                  "floor_token_direct_response", "token_put", "sidecar_cache_hit_fresh30"}
    for r in b2["latency"].values():
        run_shape(r)
    assert b2["body_bytes"] > 100
    # The cache hit at the default freshness against the old 30 s, in the same run.
    assert b2["cache_fresh_seconds"] == {"sidecar_cache_hit": 3, "sidecar_cache_hit_fresh30": 30}
    assert b2["fresh_default_vs_30_rps"] > 0 and b2["fresh_default_vs_30_p99"] > 0
    assert set(b2["callouts_per_s"]) == {"sidecar_cache_hit", "sidecar_cache_hit_fresh30"}
    assert all(v >= 0 for v in b2["callouts_per_s"].values())


def test_broker_throughput(results):
    b3 = results["benchmarks"]["3_broker_throughput"]
    for part in ("throughput", "at_1000_rps"):
        for v in ("broker", "hyper_floor"):
            run_shape(b3[part][v])
    assert 0 < b3["throughput_ratio"]
    # The paced run is paced: well below what the same server does unpaced.
    for v in ("broker", "hyper_floor"):
        assert b3["at_1000_rps"][v]["rps"] < b3["throughput"][v]["rps"] / 2


def test_memory_cold_start_size(results):
    b4 = results["benchmarks"]["4_broker_memory"]
    assert 0 < b4["idle_rss_kib"] < b4["large_store_rss_kib"] and b4["large_store_pods"] == 10_000
    b5 = results["benchmarks"]["5_cold_start"]
    for mode in ("with_prefetch", "without_prefetch"):
        assert b5["modes"][mode]["worst_first_credentials_ms"] > 0
    # Without prefetch the first call waits on the slowed STS emulator.
    assert b5["modes"]["without_prefetch"]["worst_first_credentials_ms"] >= b5["sts_delay_ms"]
    b6 = results["benchmarks"]["6_size"]
    assert b6["wasm_bytes"] > 0 and b6["broker_bytes"] > 0
    # The minimal filter (the baseline of the VM's memory) is smaller than meshiam's.
    assert 0 < b6["minimal_wasm_bytes"] < b6["wasm_bytes"]
    assert set(b6["envoy_rss_kib"]) == {"filter-1", "minimal-1", "nofilter-1", "filter-2", "nofilter-2",
                                        "filter-1-release", "minimal-1-release", "nofilter-1-release"}
    # Each side measured in every round, and a wasm VM costs Envoy memory.
    assert all(len(s) == b6["rounds"] for s in b6["envoy_rss_1_worker_samples_kib"].values())
    assert b6["minimal_cost_1_worker_kib"] > 0 and b6["filter_vs_minimal_cost"] > 0
    assert b6["filter_vs_minimal_cost_release"] > 0
    # Envoy's /memory (tcmalloc) of each one-worker Envoy: the filter's VM holds live memory.
    heap = b6["envoy_heap_kib"]
    assert set(heap) == {"nofilter", "minimal", "filter", "nofilter-release", "minimal-release", "filter-release"}
    assert all(h["allocated"] > 0 and h["total_physical_bytes"] >= h["allocated"] for h in heap.values())
    assert heap["filter"]["allocated"] > heap["nofilter"]["allocated"]


def test_sts_model(results):
    b7 = results["benchmarks"]["7_sts_cluster_scale"]
    assert b7["model"]["sts_rate"] == 5.0 and b7["model"]["sts_burst"] == 10
    for s in b7["scenarios"]:
        assert s["limiter_holds"]
        assert s["meshiam_restart_limited"]["peak_calls_in_a_second"] <= s["meshiam_restart_unlimited"]["peak_calls_in_a_second"]
        for k in ("meshiam_steady", "kube2iam_steady", "kiam_steady"):
            assert s[k]["mean_calls_per_s"] > 0


def probe_shape(r):
    assert r["requests"] > 0 and r["requests"] == sum(r["statuses"].values())
    assert r["ok"] == r["statuses"].get("200", 0) and r["failed"] == r["requests"] - r["ok"]
    values = [r["latency_us"][k] for k in sorted(LATENCY_KEYS, key=float)]
    assert values == sorted(values) and values[0] > 0


def test_hostile_load(results):
    b8 = results["benchmarks"]["8_slowloris"]
    for v in ("unattacked", "attacked"):
        probe_shape(b8["probe"][v])
    # The victim's broker works before the attack: every unattacked call-out got credentials.
    assert b8["probe"]["unattacked"]["ok"] == b8["probe"]["unattacked"]["requests"]
    r = b8["rss_kib"]
    assert r["start"] > 0 and r["peak_during"] > 0 and r["after"] > 0
    # The peak is the largest sample taken during the attack (RSS may dip below the sample
    # taken just before it, so the peak is not compared with that one).
    during = [kib for t, kib in b8["rss_series_kib"] if 0 <= t <= b8["attack_s"] + 1]
    assert during and r["peak_during"] >= max(during)
    a = b8["attacker"]
    assert a["opened"] > 0 and 0 < a["peak_held"] <= b8["connections"]
    b9 = results["benchmarks"]["9_unknown_address_flood"]
    for v in ("unattacked", "attacked"):
        probe_shape(b9["probe"][v])
    assert b9["probe"]["unattacked"]["ok"] == b9["probe"]["unattacked"]["requests"]
    assert b9["attacker"]["answered"] > 0
    # No answer to an address no pod has is ever credentials.
    assert not any(k.startswith("200") for k in b9["attacker"]["answers"])


def test_mtls_call_out(results):
    x = results["benchmarks"]["10_mtls"]
    for side in ("plain", "mtls"):
        run_shape(x["latency"][side])
        run_shape(x["throughput"][side])
    assert x["p50_ratio"] > 0 and x["throughput_ratio"] > 0
    # The mTLS sidecar's call-outs were verified by the broker, over few connections.
    assert x["verified_requests"] > 0 and 1 <= x["tls_connections"] < x["verified_requests"]

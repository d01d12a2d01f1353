"""The measured benchmarks 1–6 of BENCHMARKS.md. Each returns a dict for results.json with
the subject and its baseline measured side by side, in alternating rounds, in this run.

Topology (loopback only): the STS emulator (moto), the broker with a file pod source whose
pods have 127.0.0.x addresses, and Envoy sidecars rendered from envoy/sidecar.yaml whose
broker cluster binds to the sidecar pod's address (`upstream_bind_config`), as the pod's
network namespace would. Servers under test run on core 0, the load generator on core 1.
"""

import http.client
import json
import os
import sys
import time

import yaml

from harness import (
    BROKER_BIN, ENVOY_BIN, FLOOR_BIN, LOAD_CPU, MINIMAL_WASM, PYTHON, ROOT, SERVER_CPU, VENV_BIN, WASM,
    free_port, http_get, http_ok, log, median, median_run, rss_kib, wait_until, wrk,
)

sys.path.insert(0, os.path.join(ROOT, "envoy"))
from render import for_direct_clients, render  # noqa: E402  envoy/render.py

ACCOUNT = "123456789012"
BASE_ARN = f"arn:aws:iam::{ACCOUNT}:role/"
METADATA = "169.254.169.254"
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"
SIDECAR_POD = {"namespace": "bench", "name": "sidecar", "ip": "127.0.0.2", "role": "bench-sidecar-role"}
DIRECT_POD = {"namespace": "bench", "name": "direct", "ip": "127.0.0.1", "role": "bench-direct-role"}


def pod_doc(pods):
    return {"pods": [
        {"namespace": p["namespace"], "name": p["name"], "ips": [p["ip"]], "serviceAccount": "default",
         "annotations": {"iam.amazonaws.com/role": p["role"]}}
        for p in pods
    ]}


def write_pods(path, pods):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(pod_doc(pods), f, sort_keys=False)
    os.replace(tmp, path)


class Stack:
    """moto, the broker(s), Envoys, floor servers of one run."""

    def __init__(self, procs, cfg):
        self.procs = procs
        self.cfg = cfg
        self.work = procs.logdir
        self.moto_port = None

    # ------------------------------------------------------------------ components
    def start_moto(self):
        self.moto_port = free_port()
        self.procs.start("moto", [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", self.moto_port],
                         cpu=LOAD_CPU)
        wait_until("the STS emulator", lambda: http_ok(f"http://127.0.0.1:{self.moto_port}/moto-api/"),
                   procs=self.procs, name="moto")

    def start_sts_delay(self, delay_ms):
        port = free_port()
        self.procs.start("stsdelay", [PYTHON, os.path.join(ROOT, "bench", "stsdelay.py"), port, self.moto_port,
                                      delay_ms], cpu=LOAD_CPU)
        wait_until("the STS delay proxy", lambda: http_ok(f"http://127.0.0.1:{port}/moto-api/"),
                   procs=self.procs, name="stsdelay")
        return port

    def start_broker(self, name, pods, extra=(), sts_port=None):
        port, admin = free_port(), free_port()
        pods_file = os.path.join(self.work, f"{name}-pods.yaml")
        write_pods(pods_file, pods)
        argv = [BROKER_BIN, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                "--pod-source", "file", "--pods-file", pods_file, "--pods-file-poll", "100ms",
                "--base-role-arn", BASE_ARN, "--region", "us-east-1",
                "--node-imds-url", "http://127.0.0.1:9", "--log", "warn",
                # The broker benches call it as a sidecar-less IMDSv1 pod would; sidecars still
                # send their broker token (and the broker checks it) on every call-out.
                "--direct-mode", "optional", *extra]
        env = {
            "AWS_ACCESS_KEY_ID": "AKIABENCHNODEKEY", "AWS_SECRET_ACCESS_KEY": "bench-node-secret",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{sts_port or self.moto_port}",
        }
        p = self.procs.start(name, argv, env=env, cpu=SERVER_CPU)
        wait_until(f"{name} ready", lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"),
                   procs=self.procs, name=name)
        return {"name": name, "port": port, "admin": admin, "pid": p.pid, "pods_file": pods_file}

    def start_floor(self, name, body, cpu=SERVER_CPU):
        port = free_port()
        body_file = os.path.join(self.work, f"{name}.body")
        with open(body_file, "wb") as f:
            f.write(body)
        p = self.procs.start(name, [FLOOR_BIN, f"127.0.0.1:{port}", body_file], cpu=cpu)
        wait_until(name, lambda: http_ok(f"http://127.0.0.1:{port}/"), procs=self.procs, name=name)
        return {"port": port, "pid": p.pid}

    def envoy_config(self, name, broker, plugin=None, floor=None, with_filter=True, wasm=WASM):
        """envoy/sidecar.yaml for the bench pod, for direct clients (render.for_direct_clients:
        the listener's port is the metadata door, `ordinary` the door for ordinary traffic);
        without the filter, the metadata route answers `floor` (the filter's own answers, byte
        for byte) with a direct_response. `wasm` is the module in the filter's place
        (benchmark 6 puts the minimal filter there)."""
        port, admin, ordinary = free_port(), free_port(), free_port()
        cfg = {"brokerCluster": "meshiam_broker", "brokerAuthority": "meshiam-broker", **(plugin or {})}
        text = render(os.path.join(ROOT, "envoy", "sidecar.yaml"),
                      NODE_ID=f"bench~{name}", POD_NAME=SIDECAR_POD["name"], POD_NAMESPACE=SIDECAR_POD["namespace"],
                      ADMIN_ADDRESS="127.0.0.1", ADMIN_PORT=admin, CAPTURE_ADDRESS="127.0.0.1", CAPTURE_PORT=port,
                      BROKER_ADDRESS="127.0.0.1", BROKER_PORT=broker["port"], WASM_PATH=wasm,
                      PLUGIN_CONFIG=json.dumps(cfg, separators=(",", ":")), PASSTHROUGH_USE_HEADER="true", HEALTH_PORT=0)
        # The load generators connect to the listener directly: no loop guard.
        doc = for_direct_clients(yaml.safe_load(text), ordinary)
        res = doc["static_resources"]
        for c in res["clusters"]:
            if c["name"] == "meshiam_broker":
                c["upstream_bind_config"] = {"source_address": {"address": SIDECAR_POD["ip"], "port_value": 0}}
        if not with_filter:
            for listener in res["listeners"]:
                for chain in listener["filter_chains"]:
                    for nf in chain["filters"]:
                        hcm = nf["typed_config"]
                        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "meshiam"]
                        for vh in hcm["route_config"]["virtual_hosts"]:
                            if chain.get("name") == "direct_metadata" and floor:
                                vh["routes"] = [
                                    {"match": {"path": path},
                                     "direct_response": {"status": 200, "body": {"inline_string": body.decode()}},
                                     "response_headers_to_add": [{"header": {"key": "content-type", "value": ctype}}]}
                                    for path, (body, ctype) in floor.items()
                                ]
        path = os.path.join(self.work, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path, port, admin, ordinary

    def istio_config(self, name, broker, shape, with_filter=True):
        """envoy/<shape>.yaml (the shape of Istio's generated sidecar config) for a direct
        client: the shared port-80 HTTP listener, 0.0.0.0_80, bound on a loopback port (in
        Istio 15001 hands connections to it; wrk keeps its connections, so the hand-off is not
        per request). Without the filter: every meshiam HTTP filter removed."""
        port, admin = free_port(), free_port()
        cfg = {"brokerCluster": "outbound|8787||meshiam-broker.meshiam.internal",
               "brokerAuthority": "meshiam-broker.meshiam.internal"}
        text = render(os.path.join(ROOT, "envoy", f"{shape}.yaml"), NODE_ID=f"bench~{name}",
                      POD_NAME=SIDECAR_POD["name"], POD_NAMESPACE=SIDECAR_POD["namespace"], ADMIN_PORT=admin,
                      CAPTURE_PORT=free_port(), BROKER_ADDRESS="127.0.0.1", BROKER_PORT=broker["port"],
                      WASM_PATH=WASM, PLUGIN_CONFIG=json.dumps(cfg, separators=(",", ":")),
                      PASSTHROUGH_USE_HEADER="true")
        doc = yaml.safe_load(text)
        for listener in doc["static_resources"]["listeners"]:
            if listener["name"] == "0.0.0.0_80":
                listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
                listener.pop("bind_to_port")
            if not with_filter:
                for chain in listener.get("filter_chains", []):
                    for nf in chain["filters"]:
                        hcm = nf["typed_config"]
                        if "http_filters" in hcm:
                            hcm["http_filters"] = [f for f in hcm["http_filters"] if "meshiam" not in f["name"]]
        path = os.path.join(self.work, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path, port, admin, None

    def start_envoy(self, name, broker, concurrency=1, istio_shape=None, release_free_memory=False, **kw):
        if istio_shape:
            path, port, admin, ordinary = self.istio_config(name, broker, istio_shape, **kw)
        else:
            path, port, admin, ordinary = self.envoy_config(name, broker, **kw)
        if release_free_memory:
            with open(path) as f:
                doc = yaml.safe_load(f)
            doc["memory_allocator_manager"] = {"bytes_to_release": 1 << 20, "memory_release_interval": "0.1s"}
            with open(path, "w") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
        p = self.procs.start(name, [ENVOY_BIN, "-c", path, "--disable-hot-restart", "--concurrency", concurrency,
                                    "-l", "warning"], cpu=SERVER_CPU)
        wait_until(f"{name} ready", lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=60,
                   procs=self.procs, name=name)
        return {"name": name, "port": port, "admin": admin, "pid": p.pid, "ordinary": ordinary or port}


def cpu_seconds(pid):
    """CPU time (user + system) a process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def imds_get(port, path, source=None, method="GET", headers=None, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, headers={"Host": METADATA, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read(), dict((k.lower(), v) for k, v in r.getheaders())
    finally:
        conn.close()


def rounds_of(cfg, variants, measure):
    """Alternating rounds (A B, B A, …) so slow phases of a shared machine hit both sides."""
    runs = {v: [] for v in variants}
    for r in range(cfg["rounds"]):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for v in order:
            runs[v].append(measure(v))
    return {v: median_run(rs) for v, rs in runs.items()}


# --------------------------------------------------------------------------- 1 and 2


def envoy_counter(admin, name):
    """A counter from Envoy's admin /stats (0 when not yet defined)."""
    st, text = http_get(f"http://127.0.0.1:{admin}/stats?filter={name}")
    for line in text.decode().splitlines():
        k, _, v = line.partition(": ")
        if k.strip() == name:
            return int(v)
    return 0


# The filter's cacheFreshSeconds before role changes had to reach pods within 5 s.
OLD_CACHE_FRESH_SECONDS = 30


def bench_envoy(stack, broker, cfg, parts=(1, 2)):
    """1: ordinary traffic with and without the filter; 2: metadata answers vs the floor."""
    filt = stack.start_envoy("envoy-filter", broker)
    creds_path = CREDS_PATH + SIDECAR_POD["role"]
    st, creds, hdr = imds_get(filt["port"], creds_path)
    if st != 200 or hdr.get("content-type") != "application/json":
        raise RuntimeError(f"sidecar credentials: {st} {hdr} {creds[:200]!r}")
    st, token, _ = imds_get(filt["port"], "/latest/api/token", method="PUT",
                            headers={"x-aws-ec2-metadata-token-ttl-seconds": "21600"})
    if st != 200:
        raise RuntimeError(f"token PUT: {st} {token!r}")
    floor = {creds_path: (creds, "application/json"), "/latest/api/token": (token, "text/plain")}
    bare = stack.start_envoy("envoy-nofilter", broker, with_filter=False, floor=floor)
    fresh0 = stack.start_envoy("envoy-filter-nocache", broker, plugin={"cacheFreshSeconds": 0})
    fresh30 = stack.start_envoy("envoy-filter-fresh30", broker,
                                plugin={"cacheFreshSeconds": OLD_CACHE_FRESH_SECONDS})
    st, body, hdr = imds_get(fresh0["port"], creds_path)
    if st != 200 or hdr.get("x-meshiam-source") != "broker":
        raise RuntimeError(f"broker-cache path: {st} {hdr}")
    st, body, _ = imds_get(bare["port"], creds_path)
    if st != 200 or body != creds:
        raise RuntimeError("the floor does not answer the filter's bytes")
    upstream = stack.start_floor("upstream", b"ordinary application traffic\n", cpu=LOAD_CPU)

    d = cfg["seconds"]
    app_headers = [f"x-envoy-original-dst-host: 127.0.0.1:{upstream['port']}"]

    # Ordinary traffic costs the two Envoys the same code now, so the shared machine's noise is
    # what a ratio of medians would show: more, shorter rounds, and the median of the
    # per-round ratios (each round measures both Envoys back to back).
    r1 = {**cfg, "rounds": cfg.get("overhead_rounds", cfg["rounds"])}
    d1 = cfg.get("overhead_seconds", d)

    def overhead(envoys, what):
        """Ordinary traffic through each Envoy's ordinary door, with and without the filter."""
        log(f"1/9 filter overhead, {what}: wrk -c16 throughput and -c1 latency, {r1['rounds']} round(s) × {d1}s")
        runs = {"tput": {v: [] for v in envoys}, "lat": {v: [] for v in envoys}}

        cpu = {v: [] for v in envoys}  # Envoy's CPU µs per request, per throughput round

        def measure(kind, conns):
            def run(v):
                before = cpu_seconds(envoys[v]["pid"])
                r = wrk(f"http://127.0.0.1:{envoys[v]['ordinary']}/app", d1, conns, app_headers)
                if kind == "tput":
                    cpu[v].append((cpu_seconds(envoys[v]["pid"]) - before) * 1e6 / max(r["requests"], 1))
                runs[kind][v].append(r)
                return r
            return run

        tput = rounds_of(r1, list(envoys), measure("tput", 16))
        lat = rounds_of(r1, list(envoys), measure("lat", 1))
        w, wo = runs["tput"]["with_filter"], runs["tput"]["without_filter"]
        lw, lwo = runs["lat"]["with_filter"], runs["lat"]["without_filter"]
        out = {
            "throughput": tput,
            "latency": lat,
            "throughput_ratio": median([a["rps"] / b["rps"] for a, b in zip(w, wo)]),
            "added_p50_us": median([a["latency_us"]["50"] - b["latency_us"]["50"] for a, b in zip(lw, lwo)]),
            "added_p99_us": median([a["latency_us"]["99"] - b["latency_us"]["99"] for a, b in zip(lw, lwo)]),
            "per_round_throughput_ratios": [round(a["rps"] / b["rps"], 3) for a, b in zip(w, wo)],
            # The Envoy's own CPU time per request (utime + stime from /proc, 10 ms ticks over
            # thousands of requests): what the filter costs, less moved by other processes
            # than wall-clock throughput on a shared machine.
            "cpu_us_per_request": {v: median(c) for v, c in cpu.items()},
            "cpu_ratio": median([a / b for a, b in zip(cpu["with_filter"], cpu["without_filter"]) if b]),
        }
        log(f"    throughput ratio {out['throughput_ratio']:.3f}, p50 added {out['added_p50_us']:.0f} µs, "
            f"Envoy CPU per request {out['cpu_ratio']:.3f}×")
        return out

    b1 = None
    if 1 in parts:
        b1 = overhead({"with_filter": filt, "without_filter": bare}, "envoy/sidecar.yaml")
        # Istio's shape (envoy/istio-shape*.yaml): the shipped scoping, and the WasmPlugin on
        # port 80 shipped before, each against the same shape without the filter.
        b1["istio"] = {}
        # (Quick runs check the harness with the shipped shape alone.)
        for shape in ("istio-shape-scoped",) if cfg["mode"] == "quick" else ("istio-shape-scoped", "istio-shape"):
            envoys = {"with_filter": stack.start_envoy(f"envoy-{shape}", broker, istio_shape=shape),
                      "without_filter": stack.start_envoy(f"envoy-{shape}-nofilter", broker, istio_shape=shape,
                                                          with_filter=False)}
            b1["istio"][shape] = overhead(envoys, f"envoy/{shape}.yaml")
            for e in envoys.values():
                stack.procs.stop(e["name"])
    if 2 not in parts:
        for n in ("envoy-filter", "envoy-nofilter", "envoy-filter-nocache", "envoy-filter-fresh30", "upstream"):
            stack.procs.stop(n)
        return b1, None

    md = [f"Host: {METADATA}"]
    # The sidecar-cache hit path at the default freshness and at the old 30 s, side by side:
    # what a pod that asks without pause pays for role changes that reach it within 5 s. The
    # call-outs each Envoy made during its runs are counted from its admin stats.
    callouts = {"sidecar_cache_hit": [filt["admin"], 0, 0.0],
                "sidecar_cache_hit_fresh30": [fresh30["admin"], 0, 0.0]}

    def counted(name, port):
        def run():
            c = callouts[name]
            # Warm first: between rounds more than 30 s may pass, and the run should see the
            # steady state of a pod that keeps asking, not the first miss after a pause.
            imds_get(port, creds_path)
            before = envoy_counter(c[0], "wasmcustom.meshiam.callouts")
            r = wrk(f"http://127.0.0.1:{port}{creds_path}", d, 1, md)
            c[1] += envoy_counter(c[0], "wasmcustom.meshiam.callouts") - before
            c[2] += d
            return r
        return run

    scen = {
        "floor_direct_response": lambda: wrk(f"http://127.0.0.1:{bare['port']}{creds_path}", d, 1, md),
        "sidecar_cache_hit": counted("sidecar_cache_hit", filt["port"]),
        "sidecar_cache_hit_fresh30": counted("sidecar_cache_hit_fresh30", fresh30["port"]),
        "broker_cache_hit": lambda: wrk(f"http://127.0.0.1:{fresh0['port']}{creds_path}", d, 1, md),
        "floor_token_direct_response": lambda: wrk(f"http://127.0.0.1:{bare['port']}/latest/api/token", d, 1,
                                                   md + ["x-aws-ec2-metadata-token-ttl-seconds: 21600"], "PUT"),
        "token_put": lambda: wrk(f"http://127.0.0.1:{filt['port']}/latest/api/token", d, 1,
                                 md + ["x-aws-ec2-metadata-token-ttl-seconds: 21600"], "PUT"),
    }
    log(f"2/9 credential answer latency: wrk -c1, {len(scen)} paths, {cfg['rounds']} round(s) × {d}s")
    lat2 = rounds_of(cfg, list(scen), lambda v: scen[v]())
    f50 = lat2["floor_direct_response"]["latency_us"]["50"]
    t50 = lat2["floor_token_direct_response"]["latency_us"]["50"]
    hit, old = lat2["sidecar_cache_hit"], lat2["sidecar_cache_hit_fresh30"]
    b2 = {
        "latency": lat2,
        "cache_fresh_seconds": {"sidecar_cache_hit": envoy_plugin_default_fresh(),
                                "sidecar_cache_hit_fresh30": OLD_CACHE_FRESH_SECONDS},
        "callouts_per_s": {k: round(c[1] / c[2], 3) if c[2] else 0.0 for k, c in callouts.items()},
        "fresh_default_vs_30_rps": hit["rps"] / old["rps"],
        "fresh_default_vs_30_p50": hit["latency_us"]["50"] / old["latency_us"]["50"],
        "fresh_default_vs_30_p99": hit["latency_us"]["99"] / old["latency_us"]["99"],
        "sidecar_cache_hit_p50_vs_floor": lat2["sidecar_cache_hit"]["latency_us"]["50"] / f50,
        "broker_cache_hit_p50_vs_floor": lat2["broker_cache_hit"]["latency_us"]["50"] / f50,
        "token_put_p50_vs_floor": lat2["token_put"]["latency_us"]["50"] / t50,
        "broker_cache_hit_p99_us": lat2["broker_cache_hit"]["latency_us"]["99"],
        "body_bytes": len(creds),
    }
    log(f"    cache hit {b2['sidecar_cache_hit_p50_vs_floor']:.2f}× floor, broker hit p99 "
        f"{b2['broker_cache_hit_p99_us']:.0f} µs, token {b2['token_put_p50_vs_floor']:.2f}× floor")
    log(f"    cache hit at {b2['cache_fresh_seconds']['sidecar_cache_hit']} s vs {OLD_CACHE_FRESH_SECONDS} s "
        f"freshness: {b2['fresh_default_vs_30_rps']:.3f}× req/s, {b2['fresh_default_vs_30_p50']:.2f}× p50, "
        f"{b2['fresh_default_vs_30_p99']:.2f}× p99; call-outs/s {b2['callouts_per_s']}")
    for n in ("envoy-filter", "envoy-nofilter", "envoy-filter-nocache", "envoy-filter-fresh30", "upstream"):
        stack.procs.stop(n)
    return b1, b2


def envoy_plugin_default_fresh():
    """The filter's default cacheFreshSeconds, read from its source (filter/src/config.rs)."""
    import re
    with open(os.path.join(ROOT, "filter", "src", "config.rs")) as f:
        m = re.search(r"DEFAULT_CACHE_FRESH_SECONDS: u64 = (\d+);", f.read())
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- 3


def bench_broker_throughput(stack, broker, cfg):
    path = CREDS_PATH + DIRECT_POD["role"]
    st, body, _ = imds_get(broker["port"], path)
    if st != 200:
        raise RuntimeError(f"broker direct answer: {st} {body[:200]!r}")
    floor = stack.start_floor("broker-floor", body, cpu=SERVER_CPU)
    urls = {"broker": f"http://127.0.0.1:{broker['port']}{path}", "hyper_floor": f"http://127.0.0.1:{floor['port']}{path}"}
    d = cfg["seconds"]
    log(f"3/9 broker throughput on one core: wrk -c16, and wrk paced to about 1000 req/s, "
        f"{cfg['rounds']} round(s) × {d}s")
    tput = rounds_of(cfg, list(urls), lambda v: wrk(urls[v], d, 16))
    # 10 connections, each waiting 10 ms after each answer: about 1,000 req/s.
    at_rate = rounds_of(cfg, list(urls), lambda v: wrk(urls[v], d, 10, delay_ms=10))
    stack.procs.stop("broker-floor")
    out = {
        "throughput": tput,
        "at_1000_rps": at_rate,
        "throughput_ratio": tput["broker"]["rps"] / tput["hyper_floor"]["rps"],
        "p99_at_1000_rps_us": at_rate["broker"]["latency_us"]["99"],
    }
    log(f"    {out['throughput_ratio']:.2f} of the floor, p99 at 1000 req/s {out['p99_at_1000_rps_us']:.0f} µs")
    return out


# --------------------------------------------------------------------------- 4


def _metric(admin, name):
    st, text = http_get(f"http://127.0.0.1:{admin}/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def settle_rss(pid, seconds=1.0):
    time.sleep(seconds)
    return rss_kib(pid)


def bench_broker_memory(stack, cfg):
    n_large = cfg["large_pods"]
    log(f"4/9 broker memory: idle, 110 pods / 50 roles with credentials, {n_large} pods in the store")
    fast = ["--sts-rate", "10000", "--sts-burst", "10000", "--prefetch-jitter", "0s"]
    idle = stack.start_broker("broker-mem-idle", [], extra=fast)
    idle_kib = settle_rss(idle["pid"])
    stack.procs.stop("broker-mem-idle")

    pods = [{"namespace": f"ns{i % 7}", "name": f"pod-{i}", "ip": f"127.0.1.{i + 1}", "role": f"role-{i % 50}"}
            for i in range(110)]
    small = stack.start_broker("broker-mem-110", pods, extra=fast)
    wait_until("110 prefetched credentials", lambda: (_metric(small["admin"], "meshiam_broker_cache_entries") or 0) >= 110,
               timeout=120, procs=stack.procs, name="broker-mem-110")
    for p in pods:  # every pod asks once, as its SDK would
        st, _, _ = imds_get(small["port"], CREDS_PATH + p["role"], source=p["ip"])
        if st != 200:
            raise RuntimeError(f"{p['name']}: {st}")
    small_kib = settle_rss(small["pid"])
    stack.procs.stop("broker-mem-110")

    many = [{"namespace": f"ns{i % 40}", "name": f"pod-{i}", "ip": f"10.{i // 62500}.{(i // 250) % 250}.{i % 250 + 1}",
             "role": f"role-{i % 50}"} for i in range(n_large)]
    big = stack.start_broker("broker-mem-large", many, extra=["--prefetch", "false"])
    wait_until(f"{n_large} pods in the store",
               lambda: (_metric(big["admin"], "meshiam_broker_pods_tracked") or 0) >= n_large,
               timeout=120, procs=stack.procs, name="broker-mem-large")
    big_kib = settle_rss(big["pid"])
    stack.procs.stop("broker-mem-large")
    out = {
        "idle_rss_kib": idle_kib,
        "pods110_roles50_rss_kib": small_kib,
        "large_store_pods": n_large,
        "large_store_rss_kib": big_kib,
    }
    log(f"    idle {idle_kib / 1024:.1f} MiB, 110 pods {small_kib / 1024:.1f} MiB, "
        f"{n_large} pods {big_kib / 1024:.1f} MiB")
    return out


# --------------------------------------------------------------------------- 5


def bench_cold_start(stack, cfg):
    delay_ms = 200
    sts = stack.start_sts_delay(delay_ms)
    trials, start_after, jitter = cfg["cold_trials"], cfg["cold_start_after_s"], cfg["cold_jitter"]
    log(f"5/9 cold start: STS +{delay_ms} ms, {trials} new pod(s) per mode, first request "
        f"{start_after}s after the broker sees the pod (prefetch jitter {jitter})")
    out = {"sts_delay_ms": delay_ms, "first_request_after_s": start_after, "prefetch_jitter": jitter, "modes": {}}
    for mode, flag in (("with_prefetch", "true"), ("without_prefetch", "false")):
        b = stack.start_broker(f"broker-cold-{mode}", [], sts_port=sts,
                               extra=["--prefetch", flag, "--prefetch-jitter", jitter, "--debug-endpoints"])
        pods, results = [], []
        for i in range(trials):
            pod = {"namespace": "cold", "name": f"{mode}-{i}", "ip": f"127.0.2.{i + 1}", "role": f"cold-role-{i}"}
            pods.append(pod)
            write_pods(b["pods_file"], pods)
            wait_until("the broker to see the new pod",
                       lambda: http_get(f"http://127.0.0.1:{b['admin']}/debug/pods/cold/{pod['name']}")[0] == 200,
                       timeout=10, procs=stack.procs, name=b["name"])
            time.sleep(start_after)
            t0 = time.perf_counter()
            st1, role, _ = imds_get(b["port"], CREDS_PATH, source=pod["ip"])
            t1 = time.perf_counter()
            st2, _, _ = imds_get(b["port"], CREDS_PATH + role.decode(), source=pod["ip"])
            t2 = time.perf_counter()
            if st1 != 200 or st2 != 200:
                raise RuntimeError(f"cold start {mode}: {st1} {st2}")
            results.append({"role_list_ms": (t1 - t0) * 1e3, "credentials_ms": (t2 - t1) * 1e3,
                            "first_credentials_ms": (t2 - t0) * 1e3})
        stack.procs.stop(b["name"])
        worst = max(r["first_credentials_ms"] for r in results)
        out["modes"][mode] = {"trials": results, "worst_first_credentials_ms": worst,
                              "median_first_credentials_ms": sorted(r["first_credentials_ms"] for r in results)[len(results) // 2]}
        log(f"    {mode}: first credentials in {worst:.1f} ms (worst of {trials})")
    stack.procs.stop("stsdelay")
    return out


# --------------------------------------------------------------------------- 6


def bench_sizes(stack, broker, cfg):
    """Sizes, and what the filter's wasm VM adds to Envoy's memory: the same Envoy without a
    filter, with the minimal proxy-wasm filter (bench/minimal-filter: an HTTP context that
    only continues, V8's floor) in the filter's place, and with meshiam's filter, one worker,
    in alternating rounds; then 1 and 2 workers for the cost of each further worker's VM."""
    rounds = max(cfg["rounds"], 1) + (2 if cfg["mode"] == "full" else 0)
    log(f"6/9 sizes: wasm, broker binary; Envoy RSS without a filter / minimal filter / meshiam "
        f"(1 worker, {rounds} round(s)), and with 2 workers")
    out = {"wasm_bytes": os.path.getsize(WASM), "minimal_wasm_bytes": os.path.getsize(MINIMAL_WASM),
           "broker_bytes": os.path.getsize(BROKER_BIN), "envoy_rss_kib": {}, "rounds": rounds}

    heap = {}  # Envoy's /memory (tcmalloc), KiB, of each variant's last one-worker round

    def rss(name, workers, variant, release=False):
        kw = {"nofilter": {"with_filter": False}, "minimal": {"wasm": MINIMAL_WASM}, "filter": {}}[variant]
        e = stack.start_envoy(name, broker, concurrency=workers, release_free_memory=release, **kw)
        for _ in range(20):
            imds_get(e["port"], "/latest/api/token", method="PUT",
                     headers={"x-aws-ec2-metadata-token-ttl-seconds": "60"})
        kib = settle_rss(e["pid"], 0.5)
        if workers == 1:
            _, text = http_get(f"http://127.0.0.1:{e['admin']}/memory")
            heap[variant + ("-release" if release else "")] = {
                k: int(v) // 1024 for k, v in json.loads(text).items() if str(v).isdigit()}
        stack.procs.stop(name)
        return kib

    variants = ["nofilter", "minimal", "filter"]
    samples = {v: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else list(reversed(variants))):
            samples[v].append(rss(f"envoy-size-{v}-1", 1, v))
    r1 = {f"{v}-1": median(samples[v]) for v in variants}
    out["envoy_rss_kib"].update(r1)
    out["envoy_rss_1_worker_samples_kib"] = samples
    # The same three with tcmalloc's free pages handed back to the system every 100 ms
    # (bootstrap `memory_allocator_manager`): what an operator's setting could win, one round.
    for v in variants:
        out["envoy_rss_kib"][f"{v}-1-release"] = rss(f"envoy-size-{v}-1r", 1, v, release=True)
    out["envoy_heap_kib"] = heap
    for v in ("filter", "nofilter"):
        out["envoy_rss_kib"][f"{v}-2"] = rss(f"envoy-size-{v}-2", 2, v)
    r = out["envoy_rss_kib"]
    out["filter_cost_1_worker_kib"] = r["filter-1"] - r["nofilter-1"]
    out["minimal_cost_1_worker_kib"] = r["minimal-1"] - r["nofilter-1"]
    out["filter_vs_minimal_cost"] = out["filter_cost_1_worker_kib"] / out["minimal_cost_1_worker_kib"]
    out["filter_vs_minimal_cost_release"] = ((r["filter-1-release"] - r["nofilter-1-release"])
                                             / (r["minimal-1-release"] - r["nofilter-1-release"]))
    out["filter_cost_per_extra_worker_kib"] = (r["filter-2"] - r["filter-1"]) - (r["nofilter-2"] - r["nofilter-1"])
    log(f"    wasm {out['wasm_bytes']} B (minimal {out['minimal_wasm_bytes']} B); Envoy "
        f"+{out['filter_cost_1_worker_kib'] / 1024:.1f} MiB with the filter, "
        f"+{out['minimal_cost_1_worker_kib'] / 1024:.1f} MiB with the minimal filter "
        f"({out['filter_vs_minimal_cost']:.2f}×), "
        f"{out['filter_cost_per_extra_worker_kib'] / 1024:+.1f} MiB per extra worker")
    return out

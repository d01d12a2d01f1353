"""Benchmark 7: STS calls at cluster scale, a discrete-event model (seeded, reproducible).

What is modelled, per system, for N nodes with P pods each (pods choose one of ROLES roles
uniformly):

meshiam (broker flags, broker/src/config.rs and cache.rs):
  * one STS session per pod (session name namespace.pod), DurationSeconds 3600;
  * background refresh once a session has less than --min-remaining + --refresh-margin
    (30 m + 5 m) left, i.e. 25 minutes after it was issued, found by the maintenance tick
    (--maintenance-interval 15 s, random phase per node) and delayed by a random
    0..--prefetch-jitter (2 s);
  * prefetch when a pod appears (also after a broker restart: every pod at once), after the
    same jitter;
  * pods churn: each lives an exponential time (mean POD_LIFETIME) and is replaced by a new
    pod, which gets a new session;
  * the node-wide limiter, a token bucket of --sts-rate 5/s and --sts-burst 10 (GCRA
    virtual scheduling below): a call waits for a token rather than being dropped.

kube2iam (jtblin/kube2iam iam/iam.go, read for this model): credentials cached in the node
agent keyed by role ARN only (`cache.Fetch(roleARN, sessionTTL, …)`), so all pods of a role
on a node share one session; TTL --iam-role-session-ttl (default 15m) with
DurationSeconds = 2 × TTL; fetched lazily when a pod asks and the entry has expired; no
prefetch, no rate limit. Model: every (node, role in use on that node) pair calls STS once
per 15 minutes at a random phase (SDKs re-ask well within that time, as the credentials
they get have 15–30 minutes left).

kiam (uswitch/kiam pkg/aws/sts/cache.go and cmd/kiam/server.go): the calls go through a
few central servers; each server caches per role identity (role, session name — default
"kiam" — and external id), TTL = --session-duration (15m) − --session-refresh (5m) = 10
minutes, and its prefetch manager re-fetches an entry when it expires. Model: each of
KIAM_SERVERS replicas (its own cache) calls once per role per 10 minutes, phase random.

Both alternatives make far fewer STS calls than per-pod sessions: they share one session
between pods (kube2iam per node and role, kiam per role cluster-wide), which is exactly
what makes their CloudTrail entries unable to name the pod (kube2iam#98, kiam#38). The model
shows what meshiam's per-pod sessions cost in STS calls and that the node-wide limiter
bounds the bursts.

Output per (nodes, pods per node): mean calls/s and the busiest second, for steady state
(hour-long window, churn) and, for meshiam, for every broker of the cluster restarting at
once (worst case of a DaemonSet roll-out with no surge limit), with and without the limiter,
plus the largest number of calls any one node made in any 1-second window against the
limiter's budget (burst + rate × 1 s).
"""

import math
import random

SESSION = 3600.0
REFRESH_AGE = SESSION - (30 + 5) * 60  # refresh once less than min_remaining + margin is left
TICK = 15.0
JITTER = 2.0
STS_RATE = 5.0
STS_BURST = 10
ROLES = 50
POD_LIFETIME = 6 * 3600.0
KUBE2IAM_TTL = 15 * 60.0
KIAM_TTL = 15 * 60.0 - 5 * 60.0
KIAM_SERVERS = 3

FULL = {"nodes": [1000, 5000], "pods": [30, 110], "steady_s": 3600, "restart_s": 120, "seed": 6}
QUICK = {"nodes": [20], "pods": [30, 110], "steady_s": 1800, "restart_s": 60, "seed": 6}


def limit(times, rate=STS_RATE, burst=STS_BURST):
    """Token bucket as GCRA: a call waits until the bucket has a token (sorted input)."""
    t_emit = 1.0 / rate
    tau = (burst - 1) * t_emit
    tat = -math.inf
    out = []
    for a in times:
        issue = max(a, tat - tau)
        tat = max(issue, tat) + t_emit
        out.append(issue)
    return out


def max_in_window(times, window=1.0):
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def meshiam_node(rng, pods, horizon, restart):
    """Requested STS call times of one node's broker (before the limiter)."""
    phase = rng.uniform(0, TICK)

    def after_tick(t):
        return phase + math.ceil((t - phase) / TICK) * TICK + rng.uniform(0, JITTER)

    calls = []
    for _ in range(pods):
        if restart:
            t = rng.uniform(0, JITTER)  # prefetch_all on start
        else:
            t = after_tick(rng.uniform(0, REFRESH_AGE))  # a session of random age is due
        death = rng.expovariate(1 / POD_LIFETIME)
        while t < horizon:
            if death <= t:  # the pod was replaced: the new one is prefetched
                t = death + rng.uniform(0, JITTER)
                death += rng.expovariate(1 / POD_LIFETIME)
                continue
            calls.append(t)
            t = after_tick(t + REFRESH_AGE)
    calls.sort()
    return calls


def bins(per_second, times, horizon):
    for t in times:
        if 0 <= t < horizon:
            per_second[int(t)] += 1


def summarise(per_second, seconds):
    total = sum(per_second[:seconds])
    return {"mean_calls_per_s": round(total / seconds, 2), "peak_calls_in_a_second": max(per_second[:seconds])}


def shared_sessions(rng, sessions, period, horizon):
    per_second = [0] * horizon
    for _ in range(sessions):
        t = rng.uniform(0, period)
        while t < horizon:
            per_second[int(t)] += 1
            t += period
    return summarise(per_second, horizon)


def scenario(cfg, nodes, pods, progress):
    rng = random.Random(f"{cfg['seed']}-{nodes}-{pods}")
    steady, restart = cfg["steady_s"], cfg["restart_s"]
    s_limited = [0] * steady
    r_limited, r_unlimited = [0] * restart, [0] * restart
    node_peak_steady = node_peak_restart = 0
    drain = 0.0
    for _ in range(nodes):
        issued = limit(meshiam_node(rng, pods, steady, restart=False))
        bins(s_limited, issued, steady)
        node_peak_steady = max(node_peak_steady, max_in_window(issued))
        wanted = meshiam_node(rng, pods, restart, restart=True)
        issued = limit(wanted)
        bins(r_unlimited, wanted, restart)
        bins(r_limited, issued, restart)
        node_peak_restart = max(node_peak_restart, max_in_window(issued))
        drain = max(drain, issued[pods - 1] if len(issued) >= pods else 0.0)
    distinct_roles = ROLES * (1 - (1 - 1 / ROLES) ** pods)
    budget_1s = STS_BURST + STS_RATE
    out = {
        "nodes": nodes,
        "pods_per_node": pods,
        "meshiam_steady": summarise(s_limited, steady),
        "meshiam_restart_limited": summarise(r_limited, restart),
        "meshiam_restart_unlimited": summarise(r_unlimited, restart),
        "meshiam_restart_drain_s": round(drain, 1),
        "node_peak_1s": {"steady": node_peak_steady, "restart": node_peak_restart, "budget": budget_1s},
        "cluster_budget_per_s": {"sustained": nodes * STS_RATE, "first_second": nodes * budget_1s},
        "kube2iam_steady": shared_sessions(rng, round(nodes * distinct_roles), KUBE2IAM_TTL, steady),
        "kiam_steady": shared_sessions(rng, KIAM_SERVERS * ROLES, KIAM_TTL, steady),
        "analytic": {
            "meshiam_calls_per_s": round(nodes * pods * (1 / (REFRESH_AGE + TICK / 2 + JITTER / 2) + 1 / POD_LIFETIME), 2),
            "kube2iam_calls_per_s": round(nodes * distinct_roles / KUBE2IAM_TTL, 2),
            "kiam_calls_per_s": round(KIAM_SERVERS * ROLES / KIAM_TTL, 2),
        },
    }
    out["limiter_holds"] = node_peak_restart <= budget_1s and node_peak_steady <= budget_1s
    progress(f"    {nodes} nodes × {pods} pods: meshiam {out['meshiam_steady']['mean_calls_per_s']}/s "
             f"(peak {out['meshiam_steady']['peak_calls_in_a_second']}), kube2iam "
             f"{out['kube2iam_steady']['mean_calls_per_s']}/s, kiam {out['kiam_steady']['mean_calls_per_s']}/s; "
             f"restart peak {out['meshiam_restart_limited']['peak_calls_in_a_second']} limited vs "
             f"{out['meshiam_restart_unlimited']['peak_calls_in_a_second']} unlimited")
    return out


def run(cfg, progress=print):
    model = {"session_s": SESSION, "refresh_age_s": REFRESH_AGE, "maintenance_tick_s": TICK, "jitter_s": JITTER,
             "sts_rate": STS_RATE, "sts_burst": STS_BURST, "roles": ROLES, "pod_lifetime_s": POD_LIFETIME,
             "kube2iam_ttl_s": KUBE2IAM_TTL, "kiam_ttl_s": KIAM_TTL, "kiam_servers": KIAM_SERVERS,
             "steady_window_s": cfg["steady_s"], "restart_window_s": cfg["restart_s"], "seed": cfg["seed"]}
    return {"model": model,
            "scenarios": [scenario(cfg, n, p, progress) for n in cfg["nodes"] for p in cfg["pods"]]}


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(QUICK if "--quick" in sys.argv else FULL), indent=2))

"""One pod's SDK-like loop for `make soak` (bench/soak.py starts it inside the pod, with the
pod's environment from tests/stack: no AWS credentials or config files, the STS endpoint,
the region).

    soak_client.py --role ROLE --namespace NS --pod NAME [--rate 2]

Each iteration resolves credentials from scratch through botocore's default credential
provider chain (environment, config files, container provider, then IMDS: the token PUT,
the role list and the credential GET, through the pod's sidecar), as a starting process or
a refresh does, and calls STS GetCallerIdentity (moto) with them. The iteration is an error
unless the caller is `assumed-role/ROLE/NS.POD` — this pod's own role and session, never
another pod's or the node's — or if anything fails (botocore's own IMDS timeouts and
retries, 1 s and one attempt, apply).

Prints `READY`, then `TICK {json}` every 5 s and `RESULT {json}` when SIGTERM ends it. Error
texts are kept short and never carry credentials (only the access key's last 4 characters
when a wrong identity is reported).
"""

import argparse
import json
import os
import signal
import sys
import time

import botocore.credentials
import botocore.session

ACCOUNT = "123456789012"
NODE_KEY = "AKIANODEMUSTNOTLEAK0"


def emit(kind, obj=None):
    print(kind if obj is None else f"{kind} {json.dumps(obj, separators=(',', ':'))}", flush=True)


def pct(samples, p):
    if not samples:
        return None
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--pod", required=True)
    ap.add_argument("--rate", type=float, default=2.0, help="iterations per second")
    args = ap.parse_args()
    expected = f"arn:aws:sts::{ACCOUNT}:assumed-role/{args.role}/{args.namespace}.{args.pod}"

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    base = botocore.session.Session()
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    clients = {}
    it = errors = 0
    error_samples = {}
    resolve_ms, sts_ms = [], []
    keys = set()
    t0 = last_tick = time.monotonic()
    emit("READY")

    def error(msg):
        nonlocal errors
        errors += 1
        error_samples[msg] = error_samples.get(msg, 0) + 1

    while not stop:
        started = time.monotonic()
        it += 1
        try:
            # A new chain each time: a fresh IMDS fetch, as a new process or a refresh makes.
            creds = botocore.credentials.create_credential_resolver(base, region_name=region).load_credentials()
            t1 = time.monotonic()
            if creds is None:
                error("no credentials from the provider chain (IMDS through the sidecar)")
            elif creds.method != "iam-role":
                error(f"credentials from {creds.method}, not IMDS")
            else:
                resolve_ms.append((t1 - started) * 1000)
                fz = creds.get_frozen_credentials()
                if fz.access_key == NODE_KEY:
                    error("the node's own credentials reached the pod")
                client = clients.get(fz.access_key)
                if client is None:
                    client = base.create_client("sts", region_name=region, aws_access_key_id=fz.access_key,
                                                aws_secret_access_key=fz.secret_key, aws_session_token=fz.token)
                    clients.clear()  # one live key at a time: old clients are dropped
                    clients[fz.access_key] = client
                    keys.add(fz.access_key[-4:])
                arn = client.get_caller_identity()["Arn"]
                sts_ms.append((time.monotonic() - t1) * 1000)
                if arn != expected:
                    error(f"wrong identity: {arn} (key …{fz.access_key[-4:]})")
        except Exception as e:  # any failure of an iteration is an error, with its kind
            error(f"{type(e).__name__}: {str(e)[:160]}")
        now = time.monotonic()
        if now - last_tick >= 5:
            last_tick = now
            emit("TICK", {"t": round(now - t0, 1), "iterations": it, "errors": errors})
        delay = started + 1.0 / args.rate - time.monotonic()
        if delay > 0 and not stop:
            time.sleep(delay)
    emit("RESULT", {"pod": f"{args.namespace}/{args.pod}", "role": args.role, "iterations": it, "errors": errors,
                    "error_samples": error_samples, "seconds": round(time.monotonic() - t0, 1),
                    "distinct_access_keys": len(keys),
                    "resolve_ms": {"p50": pct(resolve_ms, 50), "p99": pct(resolve_ms, 99), "max": pct(resolve_ms, 100)},
                    "sts_ms": {"p50": pct(sts_ms, 50), "p99": pct(sts_ms, 99)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

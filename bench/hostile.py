"""What a hostile pod does to the broker, and what its neighbour sees (benchmarks 8 and 9).

Run inside a pod's network namespace (`ip netns exec`), or on loopback bound to the pod's
address (`--bind`); bench/stackbench.py starts them:

    hostile.py probe     --broker IP:PORT --bind IP --role ROLE --namespace NS --pod NAME --seconds S --rate N
    hostile.py slowloris --broker IP:PORT --bind IP --connections N --seconds S [--interval 10]
    hostile.py flood     --broker IP:PORT --bind IP --concurrency N --seconds S

`probe` is the victim: the credential call-out a sidecar's filter makes (docs/architecture.md,
"The filter ↔ broker contract"): a broker-session token PUT, then `GET` of the role's
credential path with `:authority` meshiam-broker, `x-meshiam-filter`, the pod's claimed
namespace and name and the broker token, at a fixed rate, each on a new TCP connection (so
it also pays for the broker's accept path under attack). `slowloris` holds N connections
that each send a partial request and then one more header line every ~interval seconds,
never finishing; a connection the broker closes or answers is counted (status, reason) and
opened again at its next tick, as slowloris tools do; a connection open for a second or more
without an answer counts as held. `flood` keeps N requests for the credential path in flight
at once (each answered one followed at once by the next).

Progress goes to stdout as `TICK {json}` lines (once a second) and `READY` once the first
connections were spread over `--ramp-seconds` (the probe: once it has its broker token and
warmed the broker's cache; with `--wait-go` it then starts on a line on stdin); the figures
as one `RESULT {json}` line at the end (SIGTERM ends a run early). Answers are read only for their status line and `x-meshiam-reason`: no
credential is printed.
"""

import argparse
import asyncio
import json
import random
import resource
import signal
import socket
import sys
import time

CREDS_PATH = "/latest/meta-data/iam/security-credentials/"
PERCENTILES = [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]


def emit(kind, obj=None):
    print(kind if obj is None else f"{kind} {json.dumps(obj, separators=(',', ':'))}", flush=True)


def percentiles(samples_us):
    s = sorted(samples_us)
    if not s:
        return {}
    out = {}
    for p in PERCENTILES:
        k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
        out[str(p)] = round(s[k], 1)
    return out


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def split_hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


async def connect(broker, bind, timeout):
    host, port = broker
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(bind, 0) if bind else None), timeout)


async def read_answer(reader, want_body=True):
    """Status, x-meshiam-reason and whether the connection stays open, of one answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0") or 0)
    if n:
        await reader.readexactly(n)  # the body is dropped unread: it may hold credentials
    keep = headers.get("connection", "").lower() != "close"
    return status, headers.get("x-meshiam-reason", ""), keep


def ended(stop, seconds, t0):
    return stop.is_set() or time.monotonic() - t0 >= seconds


def stop_event():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# ------------------------------------------------------------------------------ probe


def request(method, path, headers):
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers] + ["", ""]
    return "\r\n".join(lines).encode()


async def call_once(args, method, path, headers, want_token=False):
    """One call-out on a new connection, with the filter's limits (brokerTimeoutMs for the
    whole exchange, the broker cluster's 0.25 s connect timeout): (status, reason, token or
    None, µs). A call-out that fails counts as the 5xx the sidecar then answers: 503 when
    the broker cannot be reached, 504 when it does not answer in time."""
    t0 = time.perf_counter()
    conn = []

    async def exchange():
        try:
            reader, writer = await connect(args.broker, args.bind, args.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            return 503, f"unreachable: {type(e).__name__}", None
        conn.append(writer)
        writer.write(request(method, path, headers + [("connection", "close")]))
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0") or 0)
        body = await reader.readexactly(n) if n else b""
        token = body.decode() if (want_token and status == 200) else None
        return status, hdrs.get("x-meshiam-reason", ""), token

    try:
        status, reason, token = await asyncio.wait_for(exchange(), args.timeout)
    except asyncio.TimeoutError:
        status, reason, token = 504, "timeout", None
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        status, reason, token = 503, f"no answer: {type(e).__name__}", None
    finally:
        for w in conn:
            w.close()
    return status, reason, token, (time.perf_counter() - t0) * 1e6


async def probe(args):
    base = [("host", "meshiam-broker"), ("x-meshiam-filter", "bench-probe"),
            ("x-meshiam-pod-namespace", args.namespace), ("x-meshiam-pod-name", args.pod)]
    token, deadline = None, time.monotonic() + 15
    while token is None:
        st, reason, token, _ = await call_once(
            args, "PUT", "/latest/api/token", base + [("x-aws-ec2-metadata-token-ttl-seconds", "21600")], True)
        if token is None:
            if time.monotonic() > deadline:
                emit("RESULT", {"error": f"no broker token: {st} {reason}"})
                return 1
            await asyncio.sleep(0.2)
    headers = base + [("x-aws-ec2-metadata-token", token)]
    path = CREDS_PATH + args.role
    # One warming call: the credentials are in the broker's cache before the clock starts.
    await call_once(args, "GET", path, headers)
    emit("READY")
    if args.wait_go:
        # The broker session is set up before the attack starts, as a running sidecar has it.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop = stop_event()
    samples, statuses, tasks = [], {}, set()
    interval = 1.0 / args.rate
    t0 = time.monotonic()

    async def one():
        st, reason, _, us = await call_once(args, "GET", path, headers)
        samples.append(us)
        key = f"{st} {reason}".strip()
        statuses[key] = statuses.get(key, 0) + 1

    n = 0
    while not ended(stop, args.seconds, t0):
        # Open loop at a fixed rate: a slow answer does not delay the next call-out.
        t = asyncio.ensure_future(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n += 1
        delay = t0 + n * interval - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
    if tasks:
        await asyncio.wait(tasks, timeout=args.timeout + 1)
    ok = statuses.get("200", 0)
    fivexx = sum(v for k, v in statuses.items() if k[:1] == "5")
    emit("RESULT", {"requests": len(samples), "ok": ok, "statuses": statuses, "5xx": fivexx,
                    "failed": len(samples) - ok, "seconds": round(time.monotonic() - t0, 2),
                    "rate": args.rate, "latency_us": percentiles(samples)})
    return 0


# ------------------------------------------------------------------------------ slowloris


async def slowloris(args):
    nofile = raise_nofile()
    stop = stop_event()
    t0 = time.monotonic()
    open_since = {}  # slot -> when its connection opened (not yet answered or closed)
    peak_held = peak_open = 0
    opened = 0
    outcomes = {}
    longest = 0.0
    ramp = asyncio.Semaphore(args.ramp)  # connection attempts in progress at once

    def outcome(key):
        outcomes[key] = outcomes.get(key, 0) + 1

    async def slot(i):
        nonlocal peak_open, opened, longest
        rnd = random.Random(i)
        # Spread each slot's ticks over the interval.
        next_tick = t0 + rnd.uniform(0, args.ramp_seconds)
        while not ended(stop, args.seconds, t0):
            await sleep_until(stop, next_tick)
            if ended(stop, args.seconds, t0):
                return
            next_tick += args.interval
            writer = None
            async with ramp:
                try:
                    reader, writer = await connect(args.broker, args.bind, 5)
                except (OSError, asyncio.TimeoutError) as e:
                    outcome(f"connect failed: {type(e).__name__}")
                    continue
            opened += 1
            since = open_since[i] = time.monotonic()
            peak_open = max(peak_open, len(open_since))
            k = 0
            try:
                writer.write(f"GET {CREDS_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: slowloris\r\n".encode())
                while not ended(stop, args.seconds, t0):
                    now = time.monotonic()
                    wait = max(0.0, min(next_tick - now, t0 + args.seconds - now))
                    try:
                        data = await asyncio.wait_for(reader.read(4096), wait)
                    except asyncio.TimeoutError:
                        # Another header line, never the blank one that ends the request.
                        k += 1
                        next_tick += args.interval * rnd.uniform(0.9, 1.1)
                        writer.write(f"X-Slow-{k}: {k}\r\n".encode())
                        await writer.drain()
                        continue
                    if not data:
                        outcome("closed without an answer")
                    else:
                        line = data.split(b"\r\n", 1)[0].decode("latin-1")
                        reason = ""
                        for h in data.split(b"\r\n")[1:]:
                            if h.lower().startswith(b"x-meshiam-reason:"):
                                reason = h.split(b":", 1)[1].strip().decode("latin-1")
                        status = line.split()[1] if len(line.split()) > 1 else "?"
                        outcome(f"answered {status} {reason}".strip())
                    break
            except (OSError, asyncio.IncompleteReadError) as e:
                outcome(f"reset: {type(e).__name__}")
            finally:
                open_since.pop(i, None)
                longest = max(longest, time.monotonic() - since)
                writer.close()

    async def ticker():
        nonlocal peak_held
        ready = False
        while not ended(stop, args.seconds, t0):
            await asyncio.sleep(1)
            now = time.monotonic()
            el = now - t0
            # Held: open for a second or more without an answer (a refusal comes at once).
            held = sum(1 for t in open_since.values() if now - t >= 1)
            peak_held = max(peak_held, held)
            emit("TICK", {"t": round(el, 1), "held": held, "open": len(open_since), "opened": opened})
            if not ready and el >= args.ramp_seconds:
                ready = True
                emit("READY")

    tick = asyncio.ensure_future(ticker())
    await asyncio.gather(*(slot(i) for i in range(args.connections)))
    tick.cancel()
    emit("RESULT", {"connections": args.connections, "interval_s": args.interval, "nofile": nofile,
                    "seconds": round(time.monotonic() - t0, 1), "opened": opened, "peak_held": peak_held, "peak_open": peak_open,
                    "longest_held_s": round(longest, 1), "outcomes": outcomes,
                    "refused": sum(v for k, v in outcomes.items() if not k.startswith("connect failed"))})
    return 0


async def sleep_until(stop, when):
    delay = when - time.monotonic()
    if delay > 0:
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass


# ------------------------------------------------------------------------------ flood


async def flood(args):
    nofile = raise_nofile()
    stop = stop_event()
    t0 = time.monotonic()
    answers, samples = {}, []
    in_flight = 0
    ramp = asyncio.Semaphore(args.ramp)
    req = (f"GET {CREDS_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: flood\r\n\r\n").encode()

    def count(key):
        answers[key] = answers.get(key, 0) + 1

    async def worker(i):
        nonlocal in_flight
        await asyncio.sleep(random.Random(i).uniform(0, args.ramp_seconds))
        reader = writer = None
        while not ended(stop, args.seconds, t0):
            if writer is None:
                try:
                    async with ramp:
                        reader, writer = await connect(args.broker, args.bind, 5)
                except (OSError, asyncio.TimeoutError) as e:
                    count(f"connect failed: {type(e).__name__}")
                    await asyncio.sleep(0.1)
                    continue
            t = time.perf_counter()
            in_flight += 1
            try:
                writer.write(req)
                status, reason, keep = await asyncio.wait_for(read_answer(reader), args.seconds + 5)
                count(f"{status} {reason}".strip())
                samples.append((time.perf_counter() - t) * 1e6)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                count(f"error: {type(e).__name__}")
                keep = False
            finally:
                in_flight -= 1
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def ticker():
        ready = False
        while not ended(stop, args.seconds, t0):
            await asyncio.sleep(1)
            el = time.monotonic() - t0
            emit("TICK", {"t": round(el, 1), "in_flight": in_flight, "answers": sum(answers.values())})
            if not ready and el >= args.ramp_seconds:
                ready = True
                emit("READY")

    tick = asyncio.ensure_future(ticker())
    workers = [asyncio.ensure_future(worker(i)) for i in range(args.concurrency)]
    await stop_or_timeout(stop, args.seconds)
    # Requests still waiting for an answer are abandoned when the attack ends.
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    tick.cancel()
    el = time.monotonic() - t0
    emit("RESULT", {"concurrency": args.concurrency, "nofile": nofile, "seconds": round(el, 1),
                    "answered": len(samples), "answers_per_s": round(len(samples) / el, 1), "answers": answers,
                    "latency_us": percentiles(samples)})
    return 0


async def stop_or_timeout(stop, seconds):
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["probe", "slowloris", "flood"])
    ap.add_argument("--broker", type=split_hostport, required=True, help="the broker, IP:PORT")
    ap.add_argument("--bind", default=None, help="source address (the pod's)")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--timeout", type=float, default=2.5, help="probe: per call-out (the filter's brokerTimeoutMs)")
    ap.add_argument("--connect-timeout", type=float, default=0.25,
                    help="probe: connect (the sidecar's broker cluster connect_timeout)")
    ap.add_argument("--rate", type=float, default=50.0, help="probe: call-outs per second")
    ap.add_argument("--wait-go", action="store_true", help="probe: after READY, start when a line comes on stdin")
    ap.add_argument("--role", default="")
    ap.add_argument("--namespace", default="")
    ap.add_argument("--pod", default="")
    ap.add_argument("--connections", type=int, default=10_000, help="slowloris: connections")
    ap.add_argument("--interval", type=float, default=10.0, help="slowloris: seconds between header lines")
    ap.add_argument("--concurrency", type=int, default=3_000, help="flood: requests in flight")
    ap.add_argument("--ramp", type=int, default=256, help="connection attempts in progress at once")
    ap.add_argument("--ramp-seconds", type=float, default=5.0, help="spread the first connections over this")
    args = ap.parse_args()
    socket.setdefaulttimeout(None)
    return asyncio.run({"probe": probe, "slowloris": slowloris, "flood": flood}[args.mode](args))


if __name__ == "__main__":
    sys.exit(main())

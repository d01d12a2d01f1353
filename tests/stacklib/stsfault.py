"""An HTTP proxy in front of the STS emulator that injects STS faults, request by request.

The stack's own STS proxy (stsproxy.py) delays connections; this one reads each HTTP request
(the broker's AWS SDK keeps its connection alive, so faults must apply per request, not per
connection) and, for the STS action it names (`Action=AssumeRole` in the form body), can

- answer as STS does when it throttles: HTTP 400, `text/xml`, an `ErrorResponse` whose
  `Code` is `Throttling` (what STS sends) or `ThrottlingException` (what other AWS query
  services send) — botocore's _retry.json and aws-sdk-rust both take either at status 400
  as throttling;
- hold the request for a while before passing it on (a slow STS).

Everything else goes to the emulator unchanged. It counts what it saw, per action and per
outcome. Control, on the same port (never forwarded):

    POST /_fault/throttle?code=Throttling     throttle AssumeRole from now on
    POST /_fault/delay?ms=4000                hold each AssumeRole this long
    POST /_fault/clear                        pass everything through again
    GET  /_fault/stats                        {"AssumeRole": {"passed": n, "throttled": n, ...}}

    python -m tests.stacklib.stsfault LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""
import http.client
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.throttle = None  # error code, or None
        self.delay = 0.0
        self.stats = {}

    def count(self, action, outcome):
        with self.lock:
            per = self.stats.setdefault(action, {})
            per[outcome] = per.get(outcome, 0) + 1

    def snapshot(self):
        with self.lock:
            return {"throttle": self.throttle, "delay_ms": int(self.delay * 1000),
                    "stats": json.loads(json.dumps(self.stats))}


def throttling_body(code):
    return (f'<ErrorResponse xmlns="{STS_NS}">\n'
            f"  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n"
            f"    <Message>Rate exceeded</Message>\n  </Error>\n"
            f"  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n").encode()


def make_handler(faults, up_host, up_port):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request, no bodies, no headers
            sys.stdout.write(f"{time.strftime('%H:%M:%S')} {self.command} {self.path} {fmt % args}\n")
            sys.stdout.flush()

        def reply(self, status, body, content_type="application/json", extra=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def control(self):
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            with faults.lock:
                if url.path == "/_fault/throttle":
                    faults.throttle = q.get("code", "Throttling")
                elif url.path == "/_fault/delay":
                    faults.delay = float(q.get("ms", "0")) / 1000.0
                elif url.path == "/_fault/clear":
                    faults.throttle, faults.delay = None, 0.0
                elif url.path != "/_fault/stats":
                    return self.reply(404, b'{"error": "unknown control"}')
            self.reply(200, json.dumps(faults.snapshot()).encode())

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.startswith("/_fault/"):
                return self.control()
            form = parse_qs(body.decode(errors="replace")) if body else {}
            action = (form.get("Action") or parse_qs(urlsplit(self.path).query).get("Action") or ["-"])[-1]
            with faults.lock:
                throttle, delay = faults.throttle, faults.delay
            if action == "AssumeRole" and throttle:
                faults.count(action, "throttled")
                return self.reply(400, throttling_body(throttle), "text/xml",
                                  [("x-amzn-RequestId", str(uuid.uuid4()))])
            if action == "AssumeRole" and delay:
                faults.count(action, "delayed")
                time.sleep(delay)
            faults.count(action, "passed")
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive", "transfer-encoding")}
            try:
                conn = http.client.HTTPConnection(up_host, up_port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, rheaders = resp.status, resp.getheaders()
                conn.close()
            except OSError:
                return self.reply(502, b'{"error": "upstream unreachable"}')
            self.send_response(status)
            for k, v in rheaders:
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

    return Handler


def main(listen_host, listen_port, up_host, up_port):
    faults = Faults()
    server = ThreadingHTTPServer((listen_host, listen_port), make_handler(faults, up_host, up_port))
    server.daemon_threads = True
    print(f"sts fault proxy on {listen_host}:{listen_port} -> {up_host}:{up_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    h, p, uh, up = sys.argv[1:5]
    main(h, int(p), uh, int(up))

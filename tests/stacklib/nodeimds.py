"""A stand-in for the node's own instance metadata service, for the local stack.

It answers like IMDSv2 (token PUT, then GETs with the token) the few paths a node has:
placement (region discovery) and the node role's credentials. The node credentials carry a
marker, NODE-ROLE-MUST-NOT-LEAK, that the tests look for in everything a pod receives: a pod
must never see them.

    python -m tests.stacklib.nodeimds HOST PORT
"""
import http.server
import secrets
import sys
import time

REGION = "us-east-1"
NODE_ROLE = "kube-1-worker"
MARKER = "NODE-ROLE-MUST-NOT-LEAK"
TOKENS = {}


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def documents():
    now = time.time()
    return {
        "/latest/meta-data/placement/region": REGION,
        "/latest/meta-data/placement/availability-zone": REGION + "a",
        "/latest/meta-data/local-ipv4": "198.18.0.1",
        "/latest/meta-data/iam/security-credentials/": NODE_ROLE,
        "/latest/meta-data/iam/security-credentials/" + NODE_ROLE: (
            '{"Code":"Success","LastUpdated":"%s","Type":"AWS-HMAC","AccessKeyId":"ASIA%s",'
            '"SecretAccessKey":"%s","Token":"%s","Expiration":"%s"}'
            % (iso(now), MARKER, MARKER, MARKER, iso(now + 6 * 3600))
        ),
    }


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.reply(403)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self.reply(400)
        token = secrets.token_urlsafe(32)
        TOKENS[token] = time.time() + int(ttl)
        self.reply(200, token.encode(), [("X-aws-ec2-metadata-token-ttl-seconds", ttl)])

    def do_GET(self):
        token = self.headers.get("X-aws-ec2-metadata-token")
        if token is None or TOKENS.get(token, 0) < time.time():
            return self.reply(401)
        doc = documents().get(self.path.split("?")[0])
        if doc is None:
            return self.reply(404, b"Not Found")
        self.reply(200, doc.encode())

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        sys.stderr.write("nodeimds: " + (fmt % args) + "\n")


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    print(f"node IMDS stand-in on {host}:{port}", flush=True)
    server.serve_forever()

"""End-to-end fixtures: the whole system through tests/stack, as a user would run it.

Each stack fixture brings `tests/stack up` (root: network namespaces, Envoy sidecars with
iptables capture; otherwise loopback) and takes it down afterwards. Scenarios that need a
different broker or filter configuration get a stack of their own.
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / "tests/stack")

# What must never reach a pod: the node's own role and the broker's own keys.
NODE_MARKERS = ("NODE-ROLE-MUST-NOT-LEAK", "AKIANODEMUSTNOTLEAK0", "node-secret-must-not-leak")


SECRET_FIELDS = re.compile(r'("(?:SecretAccessKey|Token)"\s*:\s*)"[^"]*"')


class Body(str):
    """An answer body. Compares as the text; shows itself with secrets redacted, so a
    failing assertion never prints a secret key or session token."""

    def redacted(self):
        return SECRET_FIELDS.sub(r'\1"<redacted>"', str.__str__(self))

    def __repr__(self):
        return repr(self.redacted())

    def __str__(self):
        return self.redacted()

    def __format__(self, spec):
        return format(self.redacted(), spec)


def stack(*args, check=True, timeout=180):
    res = subprocess.run([STACK, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"tests/stack {' '.join(map(str, args))} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


class Stack:
    """A running stack and helpers to act inside its pods."""

    def __init__(self, status_text):
        self.status = {}
        self.pods = {}
        for line in status_text.splitlines():
            if line.startswith("POD="):
                fields = dict(part.split("=", 1) for part in line.split())
                self.pods[fields["POD"]] = fields
            elif "=" in line:
                k, v = line.split("=", 1)
                self.status[k] = v
        self.netns = self.status.get("MODE") == "netns"

    def refresh(self):
        self.__init__(stack("status").stdout)

    def exec(self, pod, *argv, timeout=60, env=None):
        cmd = [STACK, "exec", pod, "--"]
        if env:
            cmd += ["env"] + [f"{k}={v}" for k, v in env.items()]
        res = subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=timeout)
        for marker in NODE_MARKERS:
            assert marker not in res.stdout and marker not in res.stderr, \
                f"the node's credentials reached pod {pod}"
        return res

    def curl(self, pod, path, *extra, method="GET", max_time=5):
        """curl inside the pod; returns (status, body, seconds). The seconds are curl's own
        measure of the request (`time_total`), not the wall time of starting a process in
        the pod's namespace, which a loaded machine stretches."""
        url = self.imds(pod) + path
        res = self.exec(pod, "curl", "-s", "-m", str(max_time), "-X", method, "-o", "/dev/stdout",
                        "-w", "\n%{http_code} %{time_total}", *extra, url)
        body, _, tail = res.stdout.rpartition("\n")
        code, _, took = tail.partition(" ")
        return int(code or 0), Body(body), float(took or "inf")

    def imds(self, pod):
        if self.netns:
            return "http://169.254.169.254"
        return self.pods[pod]["IMDS_URL"]

    def token(self, pod, ttl=300):
        code, body, _ = self.curl(pod, "/latest/api/token", "-H", f"X-aws-ec2-metadata-token-ttl-seconds: {ttl}",
                                  method="PUT")
        assert code == 200, (code, body)
        return body

    def python(self, pod, code, timeout=60, env=None):
        res = self.exec(pod, "python", "-c", code, timeout=timeout, env=env)
        return res

    def caller_identity(self, pod, env=None):
        """boto3 with its default configuration: credentials and region from IMDS."""
        res = self.python(pod, "import boto3, json; print(json.dumps(boto3.client('sts').get_caller_identity()))",
                          env=env)
        return res

    def admin(self, path):
        """GET on the broker's admin port, from the node's loopback (the debug endpoints
        answer nowhere else)."""
        port = self.status["BROKER_ADMIN_URL"].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}{path}"
        if self.netns:
            res = subprocess.run(["ip", "netns", "exec", "msh-node", "curl", "-s", "-m", "5", url],
                                 capture_output=True, text=True)
        else:
            res = subprocess.run(["curl", "-s", "-m", "5", url], capture_output=True, text=True)
        return res.stdout


def bring_up(*args):
    stack("down", check=False)
    stack("up", *args, timeout=300)
    return Stack(stack("status").stdout)


@pytest.fixture(scope="module")
def default_stack():
    s = bring_up()
    yield s
    stack("down", "--keep-logs", check=False)


def creds_of(body):
    doc = json.loads(body)
    assert doc["Code"] == "Success"
    return doc


def parse_time(stamp):
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone

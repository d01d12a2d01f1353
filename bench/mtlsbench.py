"""Benchmark 10 (issue 15): what mutual TLS on the call-out costs.

One broker with `--mtls preferred` serves both sides in the same run: a sidecar whose broker
cluster is plain HTTP and one whose cluster presents a workload certificate
(envoy/sidecar.yaml with BROKER_CERT_DIR), both with cacheFreshSeconds 0, so every request
is a call-out answered from the broker's credential cache. Measured side by side in
alternating rounds: the call-out latency (wrk -c1: one connection, the sidecar's broker
connection kept alive, re-established with a resumed session when the broker closes it) and
the throughput through the sidecar (wrk -c16). Certificates: a test CA made here (EC P-256,
as Istio's).
"""

import datetime
import json
import os

import yaml

from benchmarks import CREDS_PATH, METADATA, SIDECAR_POD, imds_get, rounds_of
from harness import log, wrk

SPIFFE = f"spiffe://cluster.local/ns/{SIDECAR_POD['namespace']}/sa/default"
BROKER_ID = "spiffe://cluster.local/ns/meshiam-system/sa/meshiam-broker"


def make_certs(work):
    """Root, the broker's certificate and the sidecar pod's, as the mesh would issue them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    pkey = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # noqa: E731
                                     serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench mesh root")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))

    def leaf(uri):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return pem(cert), pkey(key)

    d = os.path.join(work, "mtls")
    pod_dir = os.path.join(d, "pod")
    os.makedirs(pod_dir, exist_ok=True)
    files = {}
    chain, key = leaf(BROKER_ID)
    for n, data in (("root.pem", pem(ca)), ("broker-cert.pem", chain), ("broker-key.pem", key)):
        files[n] = os.path.join(d, n)
        with open(files[n], "wb") as f:
            f.write(data)
    chain, key = leaf(SPIFFE)
    for n, data in (("cert-chain.pem", chain), ("key.pem", key), ("root-cert.pem", pem(ca))):
        with open(os.path.join(pod_dir, n), "wb") as f:
            f.write(data)
    from render import sds_files  # envoy/render.py
    for n, text in sds_files(pod_dir).items():
        with open(os.path.join(pod_dir, n), "w") as f:
            f.write(text)
    return files, pod_dir


def tls_envoy(stack, name, broker, pod_dir):
    """A sidecar like stack.start_envoy's, its broker cluster over mTLS."""
    path, port, admin, _ordinary = stack.envoy_config(name, broker, plugin={"cacheFreshSeconds": 0})
    with open(path) as f:
        doc = yaml.safe_load(f)
    import render as R  # envoy/render.py
    sock = yaml.safe_load(R.broker_tls(pod_dir, BROKER_ID))["transport_socket"]
    for c in doc["static_resources"]["clusters"]:
        if c["name"] == "meshiam_broker":
            c["transport_socket"] = sock
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    from harness import ENVOY_BIN, SERVER_CPU, http_ok, wait_until
    p = stack.procs.start(name, [ENVOY_BIN, "-c", path, "--disable-hot-restart", "--concurrency", 1, "-l", "warning"],
                          cpu=SERVER_CPU)
    wait_until(f"{name} ready", lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=60,
               procs=stack.procs, name=name)
    return {"name": name, "port": port, "admin": admin, "pid": p.pid}


def _metric_sum(admin, name):
    from harness import http_get
    _, text = http_get(f"http://127.0.0.1:{admin}/metrics")
    if isinstance(text, bytes):
        text = text.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench_mtls(stack, cfg):
    files, pod_dir = make_certs(stack.work)
    broker = stack.start_broker("broker-mtls", [SIDECAR_POD], extra=[
        "--mtls", "preferred", "--mtls-roots", files["root.pem"], "--mtls-cert", files["broker-cert.pem"],
        "--mtls-key", files["broker-key.pem"]])
    plain = stack.start_envoy("envoy-plain", broker, plugin={"cacheFreshSeconds": 0})
    tls = tls_envoy(stack, "envoy-mtls", broker, pod_dir)
    creds = CREDS_PATH + SIDECAR_POD["role"]
    for e in (plain, tls):
        st, body, hdr = imds_get(e["port"], creds)
        if st != 200 or hdr.get("x-meshiam-source") != "broker":
            raise RuntimeError(f"{e['name']}: {st} {hdr} {body[:200]!r}")
    if _metric_sum(broker["admin"], 'meshiam_broker_mtls_checks_total{result="verified"}') < 1:
        raise RuntimeError("the mTLS sidecar's call-out was not verified by the broker")
    envoys = {"plain": plain, "mtls": tls}
    d = cfg["seconds"]
    md = [f"Host: {METADATA}"]
    log(f"10 mTLS call-out: wrk -c1 latency and -c16 throughput, plain vs mTLS, {cfg['rounds']} round(s) × {d}s")
    lat = rounds_of(cfg, list(envoys), lambda v: wrk(f"http://127.0.0.1:{envoys[v]['port']}{creds}", d, 1, md))
    tput = rounds_of(cfg, list(envoys), lambda v: wrk(f"http://127.0.0.1:{envoys[v]['port']}{creds}", d, 16, md))
    handshakes = _metric_sum(broker["admin"], 'meshiam_broker_mtls_connections_total{result="tls"}')
    verified = _metric_sum(broker["admin"], 'meshiam_broker_mtls_checks_total{result="verified"}')
    for n in ("envoy-plain", "envoy-mtls", "broker-mtls"):
        stack.procs.stop(n)
    out = {
        "latency": lat,
        "throughput": tput,
        "p50_ratio": lat["mtls"]["latency_us"]["50"] / lat["plain"]["latency_us"]["50"],
        "p99_ratio": lat["mtls"]["latency_us"]["99"] / lat["plain"]["latency_us"]["99"],
        "throughput_ratio": tput["mtls"]["rps"] / tput["plain"]["rps"],
        "tls_connections": int(handshakes),
        "verified_requests": int(verified),
    }
    log(f"    mTLS / plain: p50 {out['p50_ratio']:.2f}×, p99 {out['p99_ratio']:.2f}×, "
        f"throughput {out['throughput_ratio']:.2f}×; {out['tls_connections']} TLS connections for "
        f"{out['verified_requests']} verified requests")
    return out


if __name__ == "__main__":
    print(json.dumps({"spiffe": SPIFFE}))

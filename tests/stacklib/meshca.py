"""tests/stack's mesh CA (`tests/stack up --mtls MODE`): a small certificate authority that
does what the mesh's does for the call-out over mutual TLS (docs/broker.md, "Mutual TLS").

- Each pod gets a workload certificate with the SPIFFE ID of its service account
  (`spiffe://cluster.local/ns/<namespace>/sa/<serviceAccount>`, the URI SAN Istio puts in),
  a short lifetime (LIFETIME), and the mesh root, in a directory of its own laid out as the
  kubelet lays out a mounted volume: the files are links into `..data`, which is swapped in
  one rename, so Envoy (watching the directory) never reads a half-written pair.
- The broker gets its own certificate (SPIFFE ID of meshiam-system/meshiam-broker) and reads
  the roots from a directory (one file per root), as it would a mounted istio-ca-root-cert.
- The `meshca` component re-issues every pod certificate when a third of its lifetime is
  left, as the mesh does, while the stack runs; `tests/stack mesh rotate [--root]` rotates
  at once (--root: a new root, introduced next to the old one first, then used to issue,
  then the old one removed, as Istio's root rotation goes), and `tests/stack mesh issue`
  gives one pod a chosen identity or a certificate from a CA the broker does not trust.

All keys are EC P-256, the files 0644 (the sidecars run as uid 1337); this is a test CA.
"""
import datetime
import json
import os
import shutil
import sys
import time
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.stacklib.state import ROOT, STATE_DIR, load_state, save_state, say

MESH = STATE_DIR / "mesh"
TRUST_DOMAIN = "cluster.local"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/ns/meshiam-system/sa/meshiam-broker"
LIFETIME = 600  # seconds a workload certificate lasts
# How long a change takes to be seen everywhere: the broker polls its files every second,
# Envoy reacts to the directory at once.
SETTLE = 2.0


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def new_root(name):
    """A root CA named `name`, kept in .stack/mesh/ca/."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshiam test mesh"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(MESH / "ca" / f"{name}.key", _pem_key(key))
    _write(MESH / "ca" / f"{name}.pem", _pem_cert(cert))


def _load_root(name):
    key = serialization.load_pem_private_key((MESH / "ca" / f"{name}.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((MESH / "ca" / f"{name}.pem").read_bytes())
    return key, cert


def issue(spiffe_id, ca, lifetime=LIFETIME):
    """A leaf certificate for `spiffe_id` signed by root `ca`: (chain PEM, key PEM). For
    client and server authentication, as Istio's workload certificates are."""
    ca_key, ca_cert = _load_root(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=1))
            .not_valid_after(_now() + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def publish(directory, files):
    """Writes `files` ({name: bytes}) into `directory` as the kubelet updates a mounted
    volume: a new `..<stamp>` directory, the `..data` link swapped to it in one rename, each
    name a link to `..data/<name>`, the old directory removed."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:8]}"
    stamp.mkdir()
    os.chmod(stamp, 0o755)
    for name, data in files.items():
        (stamp / name).write_bytes(data)
        os.chmod(stamp / name, 0o644)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    tmp = directory / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp.name, tmp)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    if old and old != stamp.name:
        shutil.rmtree(directory / old, ignore_errors=True)


def roots_bundle(state):
    return b"".join((MESH / "ca" / f"{n}.pem").read_bytes() for n in state["mesh"]["roots"])


def write_broker_roots(state):
    """The broker's --mtls-roots directory: one file per trusted root."""
    d = MESH / "roots"
    d.mkdir(parents=True, exist_ok=True)
    want = {f"{n}.pem" for n in state["mesh"]["roots"]}
    for n in state["mesh"]["roots"]:
        _write(d / f"{n}.pem", (MESH / "ca" / f"{n}.pem").read_bytes())
    for f in d.iterdir():
        if not f.name.startswith(".") and f.name not in want:
            f.unlink()


def broker_files():
    return {"roots": MESH / "roots", "cert": MESH / "broker" / "cert-chain.pem", "key": MESH / "broker" / "key.pem"}


def issue_broker(state):
    chain, key = issue(BROKER_ID, state["mesh"]["issuer"])
    # Key first, then the certificate: the broker skips the mismatched pair in between.
    _write(MESH / "broker" / "key.pem", key)
    _write(MESH / "broker" / "cert-chain.pem", chain)


def pod_dir(entry):
    return MESH / "pods" / str(entry["index"])


def pod_spiffe(spec):
    return f"spiffe://{TRUST_DOMAIN}/ns/{spec['namespace']}/sa/{spec.get('serviceAccount') or 'default'}"


def issue_pod(state, entry, spiffe_id=None, ca=None):
    """(Re-)issues a pod's workload certificate: its own identity from the current issuer
    unless told otherwise (tests give pods a wrong identity or a foreign CA)."""
    sys.path.insert(0, str(ROOT / "envoy"))
    from render import sds_files  # envoy/render.py

    d = pod_dir(entry)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    for name, text in sds_files(str(d)).items():
        if not (d / name).exists():
            _write(d / name, text.encode())
    chain, key = issue(spiffe_id or pod_spiffe(entry["spec"]), ca or state["mesh"]["issuer"])
    publish(d, {"cert-chain.pem": chain, "key.pem": key, "root-cert.pem": roots_bundle(state)})
    return d


def init(state):
    """A fresh mesh: one root, the broker's certificate and roots."""
    shutil.rmtree(MESH, ignore_errors=True)
    new_root("root-1")
    state["mesh"] = {"roots": ["root-1"], "issuer": "root-1", "next_root": 2}
    write_broker_roots(state)
    issue_broker(state)


def rotate(state, root=False):
    """Re-issues every certificate. With root=True first a new root, trusted next to the old
    one everywhere, then every certificate issued from it, then the old root dropped."""
    if root:
        name = f"root-{state['mesh']['next_root']}"
        state["mesh"]["next_root"] += 1
        new_root(name)
        old = list(state["mesh"]["roots"])
        state["mesh"]["roots"] = old + [name]
        save_state(state)
        write_broker_roots(state)
        for entry in state["pods"].values():
            republish_roots(state, entry)
        time.sleep(SETTLE)
        state["mesh"]["issuer"] = name
        save_state(state)
    issue_broker(state)
    for entry in state["pods"].values():
        issue_pod(state, entry, spiffe_id=entry.get("spiffe"))
    if root:
        time.sleep(SETTLE)
        state["mesh"]["roots"] = [state["mesh"]["issuer"]]
        save_state(state)
        write_broker_roots(state)
        for entry in state["pods"].values():
            republish_roots(state, entry)
    save_state(state)


def republish_roots(state, entry):
    """The same workload certificate with the current root bundle."""
    d = pod_dir(entry)
    files = {n: (d / n).read_bytes() for n in ("cert-chain.pem", "key.pem")}
    files["root-cert.pem"] = roots_bundle(state)
    publish(d, files)


def due(d):
    """True when the pod's certificate has less than a third of its lifetime left."""
    try:
        cert = x509.load_pem_x509_certificate((d / "cert-chain.pem").read_bytes())
    except (OSError, ValueError):
        return False
    left = (cert.not_valid_after_utc - _now()).total_seconds()
    return left < LIFETIME / 3


def rotate_loop(interval=5.0):
    """The `meshca` component: renews certificates that are due, as the mesh's agent does."""
    say("mesh CA: renewing workload certificates a third of their lifetime before expiry")
    while True:
        time.sleep(interval)
        state = load_state()
        if state is None or "mesh" not in state:
            continue
        for entry in state["pods"].values():
            if due(pod_dir(entry)):
                issue_pod(state, entry, spiffe_id=entry.get("spiffe"))
                print(json.dumps({"renewed": entry["spec"]["name"]}), flush=True)
        if due(MESH / "broker"):
            issue_broker(state)


if __name__ == "__main__":
    if sys.argv[1:] == ["rotate-loop"]:
        rotate_loop()

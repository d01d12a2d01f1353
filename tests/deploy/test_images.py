"""The images build offline with buildah (vfs) and are what they claim: the filter image is
plugin.wasm alone in one layer (the form Istio's WasmPlugin pulls), the broker image the
binary alone, run as UID 65532 through its entrypoint; both carry version and commit labels.
The broker image holds the real static musl binary of the release build (`make build`, which
`make test` runs): the binary in the image's layer is static (no interpreter: it runs on
scratch), its ELF machine matches the image's architecture, and it runs as the image's user.
With both architectures built (`make broker-static`), the arm64 image's binary runs too,
under qemu-user when this machine is not arm64."""

import json
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, needs_root

sys.path.insert(0, str(REPO))
from tests.stacklib.artifacts import BROKER_BIN, RELEASE_TARGET  # noqa: E402
from tests.stacklib.procs import free_port  # noqa: E402

BUILD = REPO / "images" / "build.sh"
WASM = b"\0asm\x01\0\0\0meshiam-test"  # a valid Wasm header, enough for an image test
PREFIX = "localhost/meshiam-test"
STATIC = {"amd64": REPO / "target" / "x86_64-unknown-linux-musl" / "release" / "meshiam-broker",
          "arm64": REPO / "target" / "aarch64-unknown-linux-musl" / "release" / "meshiam-broker"}
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

pytestmark = [
    needs_root,
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed (scripts/setup installs it as root)"),
]


def test_build_script_syntax():
    subprocess.run(["bash", "-n", str(BUILD)], check=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    wasm = tmp / "filter.wasm"
    wasm.write_bytes(WASM)
    assert BROKER_BIN.exists(), f"{BROKER_BIN} missing: build it with `make build`"
    assert HOST_ARCH == "amd64", "build.sh's single-architecture image is amd64"
    print(f"broker image from the release build's static binary {BROKER_BIN} ({RELEASE_TARGET})")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "BUILDAH_ROOT": str(tmp / "root"), "BUILDAH_RUNROOT": str(tmp / "run"),
           "HOME": str(tmp)}
    out = subprocess.run([str(BUILD), "--broker-bin", str(BROKER_BIN), "--wasm", str(wasm),
                          "--tag-prefix", PREFIX], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    ids = dict(line.split() for line in out.stdout.splitlines())
    assert set(ids) == {"meshiam-broker", "meshiam-filter"}
    bh = ["buildah", "--storage-driver", "vfs", "--root", env["BUILDAH_ROOT"],
          "--runroot", env["BUILDAH_RUNROOT"]]
    try:
        yield bh, tmp, ids
    finally:
        subprocess.run(bh + ["rmi", "--all", "--force"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _inspect(bh, ref):
    out = subprocess.run(bh + ["inspect", "--type", "image", ref], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def _layer_members(bh, tmp, ref, name):
    """Push to an OCI layout directory and list each layer's files."""
    dest = tmp / f"oci-{name}"
    subprocess.run(bh + ["push", ref, f"oci:{dest}"], capture_output=True, check=True)
    index = json.loads((dest / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((dest / "blobs" / "sha256" / digest).read_text())
    layers = []
    for layer in manifest["layers"]:
        blob = dest / "blobs" / "sha256" / layer["digest"].split(":")[1]
        with tarfile.open(blob) as tar:
            files = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            contents = {n: tar.extractfile(m).read() for n, m in files.items()}
        layers.append(contents)
    return layers


def _labels(info):
    return info["OCIv1"]["config"].get("Labels") or {}


def _version_and_commit():
    cargo = (REPO / "Cargo.toml").read_text()
    version = cargo.split("[workspace.package]")[1].split('version = "')[1].split('"')[0]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return version, commit


def test_filter_image_is_plugin_wasm_alone(built):
    bh, tmp, ids = built
    version, commit = _version_and_commit()
    ref = f"{PREFIX}/meshiam-filter:{version}"
    info = _inspect(bh, ref)
    assert ids["meshiam-filter"].endswith(info["FromImageID"]), "build.sh printed another ID"
    labels = _labels(info)
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"].startswith(commit or "unknown")
    assert not info["OCIv1"]["config"].get("Entrypoint")
    layers = _layer_members(bh, tmp, ref, "filter")
    assert layers == [{"plugin.wasm": WASM}]


def test_broker_image_runs_the_binary_as_nonroot(built):
    bh, tmp, _ = built
    version, commit = _version_and_commit()
    ref = f"{PREFIX}/meshiam-broker:{version}"
    info = _inspect(bh, ref)
    config = info["OCIv1"]["config"]
    assert config["Entrypoint"] == ["/meshiam-broker"]
    assert config["User"] == "65532:65532"
    labels = _labels(info)
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"].startswith(commit or "unknown")
    layers = _layer_members(bh, tmp, ref, "broker")
    assert len(layers) == 1 and list(layers[0]) == ["meshiam-broker"]
    binary = layers[0]["meshiam-broker"]
    assert binary == BROKER_BIN.read_bytes()
    machine, interp = elf_info(binary)
    assert machine == ELF_MACHINE[info["OCIv1"]["architecture"]] and not interp, "not a static binary"
    run_as_image_user(binary, version)


def run_as_image_user(binary, version, emulator=()):
    """The image's binary, copied out of its layer, runs as the image's user (65532) with an
    empty environment, as on scratch: it prints its version, parses its flags, and serves:
    with an empty pods file, a credentials request from an address that is no pod gets the
    broker's own refusal, `403 unknown-pod`."""
    where = Path(tempfile.mkdtemp(prefix="meshiam-image-"))  # pytest's tmp is 0700 under root's
    try:
        where.chmod(0o755)
        exe = where / "meshiam-broker"
        exe.write_bytes(binary)
        exe.chmod(0o755)
        argv = ["setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups", *emulator, str(exe)]
        out = subprocess.run(argv + ["--version"], capture_output=True, text=True, env={}, timeout=60)
        print(f"{' '.join(argv[6:])} --version: {out.stdout.strip()} {out.stderr.strip()}")
        assert out.returncode == 0 and version in out.stdout, out.stderr
        out = subprocess.run(argv + ["--help"], capture_output=True, text=True, env={}, timeout=60)
        assert out.returncode == 0 and "--listen" in out.stdout, out.stderr
        pods = where / "pods.yaml"
        pods.write_text("pods: []\n")
        pods.chmod(0o644)
        port, admin = free_port(), free_port()
        env = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIAIMAGETEST0000000",
               "AWS_SECRET_ACCESS_KEY": "image-test-not-a-secret", "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:9"}
        proc = subprocess.Popen(argv + ["--pods-file", str(pods), "--listen", f"127.0.0.1:{port}",
                                        "--admin-listen", f"127.0.0.1:{admin}", "--node-name", "image-test"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            url = f"http://127.0.0.1:{port}/latest/meta-data/iam/security-credentials/"
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(url, timeout=15)  # unknown addresses wait --ip-wait
                    raise AssertionError("a request from no pod was answered")
                except urllib.error.HTTPError as e:
                    reason = e.headers.get("x-meshiam-reason")
                    print(f"served: {e.code} {reason}")
                    assert (e.code, reason) == (403, "unknown-pod")
                    break
                except (urllib.error.URLError, OSError):
                    assert proc.poll() is None and time.monotonic() < deadline, "the broker did not serve"
                    time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def elf_info(data):
    """(e_machine, has an interpreter) of a 64-bit little-endian ELF executable."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF"
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return machine, 3 in types  # PT_INTERP


def test_broker_images_hold_static_binaries_per_arch(tmp_path):
    """With both static brokers built, build.sh makes one image per architecture and a
    manifest list: each image's architecture matches its binary's ELF machine, and each
    binary is static (no interpreter: runs on scratch)."""
    missing = [str(p) for p in STATIC.values() if not p.exists()]
    if missing:
        pytest.skip(f"static brokers not built (make broker-static): {missing}")
    wasm = tmp_path / "filter.wasm"
    wasm.write_bytes(WASM)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "BUILDAH_ROOT": str(tmp_path / "root"), "BUILDAH_RUNROOT": str(tmp_path / "run"),
           "HOME": str(tmp_path)}
    bh = ["buildah", "--storage-driver", "vfs", "--root", env["BUILDAH_ROOT"], "--runroot", env["BUILDAH_RUNROOT"]]
    try:
        out = subprocess.run([str(BUILD), "--only", "broker", "--broker-bin", str(STATIC["amd64"]),
                              "--broker-bin-arm64", str(STATIC["arm64"]), "--tag-prefix", PREFIX],
                             capture_output=True, text=True, env=env, timeout=300)
        print(out.stdout)
        assert out.returncode == 0, out.stderr
        names = dict(line.split() for line in out.stdout.splitlines())
        assert set(names) == {"meshiam-broker-amd64", "meshiam-broker-arm64", "meshiam-broker"}
        version, _ = _version_and_commit()
        listed = json.loads(subprocess.run(bh + ["manifest", "inspect", f"{PREFIX}/meshiam-broker:{version}"],
                                           capture_output=True, text=True, check=True).stdout)
        assert sorted(m["platform"]["architecture"] for m in listed["manifests"]) == ["amd64", "arm64"]
        for arch in ("amd64", "arm64"):
            ref = f"{PREFIX}/meshiam-broker:{version}-{arch}"
            info = _inspect(bh, ref)
            assert info["OCIv1"]["architecture"] == arch and info["OCIv1"]["os"] == "linux"
            (layer,) = _layer_members(bh, tmp_path, ref, f"broker-{arch}")
            binary = layer["meshiam-broker"]
            assert binary == STATIC[arch].read_bytes()
            machine, interp = elf_info(binary)
            print(f"{arch}: ELF machine {machine:#x}, interpreter: {interp}, {len(binary)} bytes")
            assert machine == ELF_MACHINE[arch] and not interp
            if arch == HOST_ARCH:
                run_as_image_user(binary, version)
            elif arch == "arm64" and shutil.which("qemu-aarch64"):
                run_as_image_user(binary, version, emulator=[shutil.which("qemu-aarch64")])
            else:
                print(f"{arch}: not run (no qemu-user for it here: apt-get install qemu-user)")
    finally:
        subprocess.run(bh + ["rmi", "--all", "--force"], capture_output=True)

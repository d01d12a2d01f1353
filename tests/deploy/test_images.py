"""The images build offline with buildah (vfs) from stand-in artefacts, and are what they
claim: the filter image is plugin.wasm alone in one layer (the form Istio's WasmPlugin
pulls), the broker image the binary alone, run as UID 65532 through its entrypoint; both
carry version and commit labels. Real artefacts are not needed: the point is the image
shape, so this runs without a Rust build."""

import json
import shutil
import subprocess
import tarfile

import pytest

from conftest import REPO, needs_root

BUILD = REPO / "images" / "build.sh"
WASM = b"\0asm\x01\0\0\0meshiam-test"  # a valid Wasm header, enough for an image test
PREFIX = "localhost/meshiam-test"

pytestmark = [
    needs_root,
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed (scripts/setup installs it as root)"),
]


def test_build_script_syntax():
    subprocess.run(["bash", "-n", str(BUILD)], check=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    wasm, broker = tmp / "filter.wasm", tmp / "broker"
    wasm.write_bytes(WASM)
    broker.write_bytes(b"\x7fELF stand-in for the static broker")
    broker.chmod(0o755)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "BUILDAH_ROOT": str(tmp / "root"), "BUILDAH_RUNROOT": str(tmp / "run"),
           "HOME": str(tmp)}
    out = subprocess.run([str(BUILD), "--broker-bin", str(broker), "--wasm", str(wasm),
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

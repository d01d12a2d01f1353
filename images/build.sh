#!/usr/bin/env bash
# Builds meshiam's images with buildah, offline: broker and filter are FROM scratch and
# only COPY an artefact, so no registry is contacted.
#
#   images/build.sh [--broker-bin PATH] [--broker-bin-arm64 PATH] [--wasm PATH]
#                   [--tag-prefix PREFIX] [--only broker|filter] [--with-netinit]
#
# Defaults: the release artefacts under target/, tags ghcr.io/meshiam/meshiam-{broker,filter}
# :VERSION (VERSION from the workspace Cargo.toml). The broker binaries are the static musl
# builds: x86_64 from `make build`, aarch64 (--broker-bin-arm64) from `make broker-static`. With an arm64
# binary the broker is built once per architecture (meshiam-broker:VERSION-amd64, -arm64) and
# meshiam-broker:VERSION is a manifest list of both. Each image is labelled with the version
# and the git commit (org.opencontainers.image.{version,revision}). Prints one line per
# image: "<name> <image id>" (and "meshiam-broker-<arch> <id>" per architecture).
# Storage: buildah's defaults with --storage-driver vfs; set BUILDAH_ROOT and
# BUILDAH_RUNROOT to keep images elsewhere (the tests do, in a temporary directory).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

broker_bin=$repo/target/x86_64-unknown-linux-musl/release/meshiam-broker
broker_bin_arm64=""
wasm=$repo/target/wasm32-wasip1/release/meshiam_filter.wasm
prefix=ghcr.io/meshiam
only=""
with_netinit=0
while [ $# -gt 0 ]; do
  case "$1" in
    --broker-bin) broker_bin=$2; shift 2 ;;
    --broker-bin-arm64) broker_bin_arm64=$2; shift 2 ;;
    --wasm) wasm=$2; shift 2 ;;
    --tag-prefix) prefix=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --with-netinit) with_netinit=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v buildah >/dev/null 2>&1 || {
  echo "build.sh: buildah not found (apt-get install buildah)" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain 2>/dev/null)" ]; then commit="$commit-dirty"; fi

bh=(buildah --storage-driver vfs)
[ -n "${BUILDAH_ROOT:-}" ] && bh+=(--root "$BUILDAH_ROOT")
[ -n "${BUILDAH_RUNROOT:-}" ] && bh+=(--runroot "$BUILDAH_RUNROOT")

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# stage SRC DEST: copy an artefact into the build context at the path the Containerfile
# names, so the context holds nothing else (never the whole of target/).
stage() {
  [ -f "$1" ] || { echo "build.sh: missing $1 (build it first)" >&2; exit 1; }
  mkdir -p "$ctx/$(dirname "$2")"
  cp "$1" "$ctx/$2"
}

build() { # NAME CONTAINERFILE [TAG-SUFFIX ARCH]
  local name=$1 file=$2 suffix=${3:-} arch=${4:-amd64} id
  "${bh[@]}" bud --quiet --pull=never --layers=false --os linux --arch "$arch" \
    --build-arg "VERSION=$version" --build-arg "GIT_COMMIT=$commit" \
    -f "$file" -t "$prefix/meshiam-$name:$version$suffix" "$ctx" >/dev/null
  id=$("${bh[@]}" images --quiet --no-trunc "$prefix/meshiam-$name:$version$suffix" | head -n1)
  echo "meshiam-$name${suffix:+-$arch} $id"
}

if [ -z "$only" ] || [ "$only" = broker ]; then
  if [ -z "$broker_bin_arm64" ]; then
    stage "$broker_bin" broker/meshiam-broker
    build broker "$repo/images/broker.Containerfile"
  else
    # One image per architecture, and a manifest list under the plain tag.
    list="$prefix/meshiam-broker:$version"
    "${bh[@]}" manifest rm "$list" >/dev/null 2>&1 || true
    "${bh[@]}" manifest create "$list" >/dev/null
    for pair in "amd64:$broker_bin" "arm64:$broker_bin_arm64"; do
      arch=${pair%%:*}
      stage "${pair#*:}" broker/meshiam-broker
      build broker "$repo/images/broker.Containerfile" "-$arch" "$arch"
      "${bh[@]}" manifest add --arch "$arch" --os linux "$list" "containers-storage:$list-$arch" >/dev/null
    done
    "${bh[@]}" manifest inspect "$list" >/dev/null
    echo "meshiam-broker $list"
  fi
fi
if [ -z "$only" ] || [ "$only" = filter ]; then
  stage "$wasm" target/wasm32-wasip1/release/meshiam_filter.wasm
  build filter "$repo/images/filter.Containerfile"
fi
if [ "$with_netinit" = 1 ]; then
  stage "$wasm" target/wasm32-wasip1/release/meshiam_filter.wasm
  stage "$repo/deploy/init/meshiam-link.sh" deploy/init/meshiam-link.sh
  stage "$repo/deploy/init/meshiam-iptables.sh" deploy/init/meshiam-iptables.sh
  "${bh[@]}" bud --quiet --layers=false \
    --build-arg "VERSION=$version" --build-arg "GIT_COMMIT=$commit" \
    -f "$repo/images/netinit.Containerfile" -t "$prefix/meshiam-netinit:$version" "$ctx" >/dev/null
  echo "meshiam-netinit $("${bh[@]}" images --quiet --no-trunc "$prefix/meshiam-netinit:$version" | head -n1)"
fi

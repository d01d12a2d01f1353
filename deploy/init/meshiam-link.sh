#!/usr/bin/env bash
# meshiam-link: the broker's node-local address, a link-local IP on a dummy interface
# (as node-local DNS and the EKS Pod Identity Agent do), so every pod of a node reaches its
# node's broker at the same address on every node.
#
#   meshiam-link up      create the interface and address (idempotent), exit
#   meshiam-link down    delete the interface (idempotent), exit
#   meshiam-link check   exit 0 when the interface is up with the address
#   meshiam-link hold    up, then wait; on SIGTERM/SIGINT: down. The DaemonSet runs this as
#                        a native sidecar, so the address lives exactly as long as the
#                        broker pod and nothing is left behind on uninstall.
#
# Environment: MESHIAM_LINK_NAME (default meshiam0), MESHIAM_LINK_ADDRESS (default
# 169.254.170.52/32; IPv6-only clusters: an IPv6 /128 of a prefix routed nowhere, e.g.
# fd6d:7368::52/128, see docs/install.md), MESHIAM_LINK_TYPE (default dummy; any link type that holds an
# address without traffic, e.g. bridge on kernels built without the dummy driver).
# Needs CAP_NET_ADMIN in the node's network namespace, nothing else.
set -euo pipefail

name=${MESHIAM_LINK_NAME:-meshiam0}
address=${MESHIAM_LINK_ADDRESS:-169.254.170.52/32}
link_type=${MESHIAM_LINK_TYPE:-dummy}

log() { printf 'meshiam-link: %s\n' "$*" >&2; }

# Read ip's output whole before matching: with pipefail, `ip | grep -q` fails whenever grep
# exits early and ip dies of SIGPIPE.
has_address() {
  local out
  out=$(ip -o addr show dev "$name" 2>/dev/null) || return 1
  [[ $out == *" ${address%/*}/"* ]]
}

up() {
  if ! ip link show dev "$name" >/dev/null 2>&1; then
    ip link add "$name" type "$link_type"
    log "created $name ($link_type)"
  fi
  if ! has_address; then
    # noprefixroute: the /32 needs no route beyond the local one the kernel adds. An IPv6
    # address (IPv6-only clusters) without duplicate address detection, so the broker can
    # bind it at once rather than fail on a "tentative" address.
    local extra=()
    [[ $address == *:* ]] && extra=(nodad)
    ip addr add "$address" dev "$name" noprefixroute "${extra[@]}"
    log "added $address to $name"
  fi
  ip link set dev "$name" up
}

down() {
  if ip link show dev "$name" >/dev/null 2>&1; then
    ip link del dev "$name"
    log "deleted $name"
  fi
}

check() {
  local out
  has_address || return 1
  out=$(ip -o link show dev "$name" 2>/dev/null) || return 1
  [[ $out == *"<"*UP*">"* ]]
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  check) check ;;
  hold)
    # The trap first: a SIGTERM that arrives while the link is being set up must still
    # remove it.
    trap 'down; exit 0' TERM INT
    up
    # sleep in the background and wait, so the trap runs as soon as the signal arrives.
    while :; do sleep 3600 & wait $! || true; done
    ;;
  *) echo "usage: $0 up|down|check|hold" >&2; exit 2 ;;
esac

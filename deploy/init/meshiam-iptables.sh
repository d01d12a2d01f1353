#!/usr/bin/env bash
# meshiam-iptables: the pod-side capture for meshes that are not Istio (plain Envoy).
# Run by an init container in the pod's network namespace (CAP_NET_ADMIN, CAP_NET_RAW).
#
#   meshiam-iptables.sh            apply the rules (idempotent: re-running leaves one copy)
#   meshiam-iptables.sh --clean    remove every rule and chain this script adds
#   meshiam-iptables.sh --print    show what is installed (iptables-save of our chains)
#
# Rules, IPv4 (and IPv6 with ip6tables, for IMDS's fd00:ec2::254, when the kernel has it),
# for the IMDS address and the container-credentials address (EKS Pod Identity's
# 169.254.170.23 / fd00:ec2::23, which SDKs call when AWS_CONTAINER_CREDENTIALS_FULL_URI is set):
#   nat    OUTPUT -> MESHIAM_OUTPUT: TCP to IMDS:80 from any UID but Envoy's is REDIRECTed
#          to Envoy's capture port (an IPv6 REDIRECT lands on [::1], where the sidecar
#          listens too). Envoy's own connections are never recaptured.
#   filter OUTPUT -> MESHIAM_GUARD: anything else to the IMDS address is refused, whoever
#          sends it (other ports, UDP, and Envoy itself). Redirected traffic does not
#          match: nat OUTPUT has already rewritten its destination to the loopback.
#          This is the fail-closed guard: if the capture is missing or bypassed, a pod gets
#          "connection refused", never the node's credentials. Envoy needs no route to the
#          real IMDS: the meshiam filter answers every request itself or from the broker.
#
# Environment (defaults as Istio's): MESHIAM_PROXY_UID=1337, MESHIAM_PROXY_PORT=15001,
# MESHIAM_IMDS_V4=169.254.169.254, MESHIAM_IMDS_V6=fd00:ec2::254, MESHIAM_IMDS_PORT=80,
# MESHIAM_CONTAINER_V4=169.254.170.23, MESHIAM_CONTAINER_V6=fd00:ec2::23 (empty: not captured),
# MESHIAM_IPV6=auto|on|off (auto: only if ip6tables can use the nat table).
set -euo pipefail

proxy_uid=${MESHIAM_PROXY_UID:-1337}
proxy_port=${MESHIAM_PROXY_PORT:-15001}
imds_v4=${MESHIAM_IMDS_V4:-169.254.169.254}
imds_v6=${MESHIAM_IMDS_V6:-fd00:ec2::254}
imds_port=${MESHIAM_IMDS_PORT:-80}
container_v4=${MESHIAM_CONTAINER_V4-169.254.170.23}
container_v6=${MESHIAM_CONTAINER_V6-fd00:ec2::23}
ipv6=${MESHIAM_IPV6:-auto}

NAT_CHAIN=MESHIAM_OUTPUT
GUARD_CHAIN=MESHIAM_GUARD

log() { printf 'meshiam-iptables: %s\n' "$*" >&2; }

# ensure_chain TOOL TABLE CHAIN: create CHAIN if missing, then empty it.
ensure_chain() {
  "$1" -w -t "$2" -N "$3" 2>/dev/null || true
  "$1" -w -t "$2" -F "$3"
}

# ensure_jump TOOL TABLE CHAIN: exactly one jump from OUTPUT to CHAIN, first in OUTPUT.
ensure_jump() {
  if ! "$1" -w -t "$2" -C OUTPUT -j "$3" 2>/dev/null; then
    "$1" -w -t "$2" -I OUTPUT 1 -j "$3"
  fi
}

apply_family() { # TOOL REJECT_OTHER ADDRESS... (empty addresses are skipped)
  local t=$1 reject_other=$2 addr
  shift 2
  ensure_chain "$t" nat "$NAT_CHAIN"
  ensure_chain "$t" filter "$GUARD_CHAIN"
  for addr in "$@"; do
    case "$addr" in /*) continue ;; esac
    "$t" -w -t nat -A "$NAT_CHAIN" -d "$addr" -p tcp --dport "$imds_port" \
      -m owner --uid-owner "$proxy_uid" -j RETURN
    "$t" -w -t nat -A "$NAT_CHAIN" -d "$addr" -p tcp --dport "$imds_port" \
      -j REDIRECT --to-ports "$proxy_port"
    "$t" -w -t filter -A "$GUARD_CHAIN" -d "$addr" -p tcp -j REJECT --reject-with tcp-reset
    "$t" -w -t filter -A "$GUARD_CHAIN" -d "$addr" -j REJECT --reject-with "$reject_other"
  done
  ensure_jump "$t" nat "$NAT_CHAIN"
  ensure_jump "$t" filter "$GUARD_CHAIN"
}

clean_family() { # TOOL
  local t=$1 table chain
  for pair in nat:$NAT_CHAIN filter:$GUARD_CHAIN; do
    table=${pair%%:*}; chain=${pair#*:}
    while "$t" -w -t "$table" -D OUTPUT -j "$chain" 2>/dev/null; do :; done
    "$t" -w -t "$table" -F "$chain" 2>/dev/null || true
    "$t" -w -t "$table" -X "$chain" 2>/dev/null || true
  done
}

ipv6_usable() {
  case "$ipv6" in
    on) return 0 ;;
    off) return 1 ;;
  esac
  command -v ip6tables >/dev/null 2>&1 && ip6tables -w -t nat -S OUTPUT >/dev/null 2>&1
}

print_rules() {
  iptables-save | grep -E "MESHIAM_|^\*|^COMMIT" || true
  if ipv6_usable; then ip6tables-save | grep -E "MESHIAM_|^\*|^COMMIT" || true; fi
}

case "${1:-}" in
  "")
    apply_family iptables icmp-port-unreachable "$imds_v4/32" "$container_v4/32"
    log "IPv4: $imds_v4:$imds_port ${container_v4:+and $container_v4:$imds_port }-> :$proxy_port (except uid $proxy_uid), rest to them refused"
    if ipv6_usable; then
      apply_family ip6tables icmp6-port-unreachable "$imds_v6/128" "$container_v6/128"
      log "IPv6: [$imds_v6]:$imds_port ${container_v6:+and [$container_v6]:$imds_port }-> :$proxy_port (except uid $proxy_uid), rest refused"
    else
      log "IPv6: ip6tables nat unavailable, skipped"
    fi
    ;;
  --clean)
    clean_family iptables
    if ipv6_usable; then clean_family ip6tables; fi
    log "removed"
    ;;
  --print) print_rules ;;
  -h|--help) sed -n '2,24p' "$0" ;;
  *) echo "usage: $0 [--clean|--print|--help]" >&2; exit 2 ;;
esac

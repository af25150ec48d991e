#!/usr/bin/env bash
# TUN_IMPL_CMD plugin for ../shared/bench/tunnel/anchors.sh: N appliance links between the
# harness's two namespaces, NS_A as gateway gw1 (site side) and NS_B as node c1 (cloud side).
# Contract (anchors.sh header): `up N` prints "<ifA> <ifB>" per link, logs on stderr, adds no
# inner addresses or routes of its own beyond what appliance itself owns (its routes use metric
# 20 and are shadowed by the harness's metric-0 routes over the same devices).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${APPLIANCE_BIN:-$HERE/../../target/x86_64-unknown-linux-gnu/release/appliance}
cmd=${1:?up|down} n=${2:?N}
case $cmd in
  up)
    "$BIN" genkey > "$WORK/ap-gw.key"; "$BIN" genkey > "$WORK/ap-c1.key"; chmod 600 "$WORK"/ap-*.key
    cat > "$WORK/ap-site.kdl" <<KDL
site "bench" {
    asn 65010
    cloud-block "198.19.0.2/31"
    site-prefix "198.19.0.0/31"
    links $n
    base-port $PORT_BASE
    mtu 1420
    keepalive-ms 300
    dead-after 10
}
gateway "gw1" {
    endpoint "$UNDER_A"
    site-address "198.19.0.1"
    public-key "$("$BIN" pubkey < "$WORK/ap-gw.key")"
}
node "c1" {
    address "198.19.0.2"
    public-key "$("$BIN" pubkey < "$WORK/ap-c1.key")"
}
KDL
    # WORKERS_A / WORKERS_B: `--workers` for each end (default: the cores, as in production).
    ip netns exec "$NS_A" "$BIN" run -c "$WORK/ap-site.kdl" --node gw1 -k "$WORK/ap-gw.key" \
      ${WORKERS_A:+--workers "$WORKERS_A"} > "$WORK/ap-a.log" 2>&1 &
    ip netns exec "$NS_B" "$BIN" run -c "$WORK/ap-site.kdl" --node c1 -k "$WORK/ap-c1.key" \
      ${WORKERS_B:+--workers "$WORKERS_B"} > "$WORK/ap-b.log" 2>&1 &
    for ns in "$NS_A" "$NS_B"; do
      for _ in $(seq 200); do
        live=$(ip netns exec "$ns" "$BIN" status -o json 2>/dev/null | grep -c '"alive": true' || true)
        [ "$live" = "$n" ] && break; sleep 0.1
      done
      [ "$live" = "$n" ] || { echo "appliance links not live in $ns ($live of $n)" >&2; cat "$WORK"/ap-*.log >&2; exit 1; }
    done
    for i in $(seq 0 $((n - 1))); do echo "ap-l$i ap-gw1-$i"; done
    ;;
  down) : ;;  # the harness ends every process in its namespaces and deletes them
  *) echo "usage: $0 up|down N" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Tunnel throughput at a WAN round trip: appliance (1 and 4 links) against wireguard-go (1 and
# 4 tunnels + ECMP), the underlay carried through a delay forwarder (examples/udp-delay.rs;
# the kernel here has no netem). Run as root after
#   cargo build --release --bin appliance --example udp-delay
#
#   dl-a [lo 198.19.0.1] -- veth 192.0.2.1/24 -- dl-d (udp-delay) -- 192.0.3.2/24 veth -- dl-b [lo 198.19.0.2]
#
# dl-d does not route: the only way between A and B is the forwarder, which listens on
# 192.0.3.254:PORT+i and sends to 192.0.2.1:PORT+i, holding each datagram RTT/2 each way. B
# (the cloud node) dials A (the gateway) at the forwarder's address; A learns B where the
# forwarder sends from. iperf3 runs A -> B, -P PARALLEL, for DUR seconds after OMIT.
# Knobs: RTT_MS 20, PARALLEL 8, DUR 15, OMIT 3, REPS 2, CONFIGS "wggo:1 wggo:4 ap:1 ap:4",
# OUT (default /tmp/tunnel-delay/<time>), APPLIANCE_BIN, DELAY_BIN.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=$HERE/../../target/x86_64-unknown-linux-gnu/release
BIN=${APPLIANCE_BIN:-$TARGET/appliance}
DELAY_BIN=${DELAY_BIN:-$TARGET/examples/udp-delay}
RTT_MS=${RTT_MS:-20} PARALLEL=${PARALLEL:-8} DUR=${DUR:-15} OMIT=${OMIT:-3} REPS=${REPS:-2}
CONFIGS=${CONFIGS:-"wggo:1 wggo:4 ap:1 ap:4"}
OUT=${OUT:-/tmp/tunnel-delay/$(date +%Y%m%d-%H%M%S)}
PORT=53820
for p in iperf3 wireguard-go wg jq ip; do
  command -v "$p" >/dev/null || { echo "needs $p (apt-get install iperf3 wireguard-go wireguard-tools jq iproute2)" >&2; exit 1; }
done
for b in "$BIN" "$DELAY_BIN"; do [ -x "$b" ] || { echo "build first: $b is missing" >&2; exit 1; }; done
mkdir -p "$OUT"
A=dl-a-$$ B=dl-b-$$ D=dl-d-$$
PIDS=()
down() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  for ns in $A $B $D; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap down EXIT INT TERM

up_lab() {
  for ns in $A $B $D; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
  ip -n "$A" link add va type veth peer name da netns "$D"
  ip -n "$B" link add vb type veth peer name db netns "$D"
  ip -n "$A" addr add 192.0.2.1/24 dev va; ip -n "$A" link set va up
  ip -n "$D" addr add 192.0.2.254/24 dev da; ip -n "$D" link set da up
  ip -n "$B" addr add 192.0.3.2/24 dev vb; ip -n "$B" link set vb up
  ip -n "$D" addr add 192.0.3.254/24 dev db; ip -n "$D" link set db up
  ip -n "$A" route add 192.0.3.0/24 via 192.0.2.254
  ip -n "$B" route add 192.0.2.0/24 via 192.0.3.254
  ip -n "$A" addr add 198.19.0.1/32 dev lo
  ip -n "$B" addr add 198.19.0.2/32 dev lo
  for ns in $A $B; do ip netns exec "$ns" sysctl -qw net.ipv4.fib_multipath_hash_policy=1; done
}

forwarder() {  # $1 tunnels
  local maps=() i
  for i in $(seq 0 $(($1 - 1))); do maps+=("192.0.3.254:$((PORT + i))=192.0.2.1:$((PORT + i))"); done
  ip netns exec "$D" "$DELAY_BIN" $((RTT_MS / 2)) "${maps[@]}" 2> "$W/delay.log" &
  PIDS+=($!)
}

up_ap() {  # $1 links
  local n=$1
  "$BIN" genkey > "$W/a.key"; "$BIN" genkey > "$W/b.key"; chmod 600 "$W"/*.key
  cat > "$W/site.kdl" <<KDL
site "delay" {
    asn 65010
    cloud-block "198.19.0.2/31"
    site-prefix "198.19.0.0/31"
    links $n
    base-port $PORT
    mtu 1420
    keepalive-ms 300
    dead-after 10
}
gateway "gw1" {
    endpoint "192.0.3.254"
    site-address "198.19.0.1"
    public-key "$("$BIN" pubkey < "$W/a.key")"
}
node "c1" {
    address "198.19.0.2"
    public-key "$("$BIN" pubkey < "$W/b.key")"
}
KDL
  ip netns exec "$A" "$BIN" run -c "$W/site.kdl" --node gw1 -k "$W/a.key" > "$W/a.log" 2>&1 &
  PIDS+=($!)
  ip netns exec "$B" "$BIN" run -c "$W/site.kdl" --node c1 -k "$W/b.key" > "$W/b.log" 2>&1 &
  PIDS+=($!)
  local ns live
  for ns in $A $B; do
    for _ in $(seq 300); do
      live=$(ip netns exec "$ns" "$BIN" status -o json 2>/dev/null | jq '[.links[] | select(.alive)] | length' || echo 0)
      [ "$live" = "$n" ] && break; sleep 0.1
    done
    [ "$live" = "$n" ] || { echo "appliance: $live of $n links live in $ns" >&2; cat "$W"/[ab].log >&2; exit 1; }
  done
}

up_wggo() {  # $1 tunnels
  local n=$1 i s ns
  local nh_a=() nh_b=()
  for i in $(seq 0 $((n - 1))); do
    for s in a b; do wg genkey > "$W/$s$i.key"; wg pubkey < "$W/$s$i.key" > "$W/$s$i.pub"; done
    ip netns exec "$A" wireguard-go -f "wa$i" > "$W/wa$i.log" 2>&1 &
    PIDS+=($!)
    ip netns exec "$B" wireguard-go -f "wb$i" > "$W/wb$i.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
      [ -S "/var/run/wireguard/wa$i.sock" ] && [ -S "/var/run/wireguard/wb$i.sock" ] && break; sleep 0.05
    done
    ip netns exec "$A" wg set "wa$i" listen-port $((PORT + i)) private-key "$W/a$i.key" \
      peer "$(cat "$W/b$i.pub")" allowed-ips 198.18.0.0/15,198.19.0.2/32
    ip netns exec "$B" wg set "wb$i" private-key "$W/b$i.key" \
      peer "$(cat "$W/a$i.pub")" allowed-ips 198.18.0.0/15,198.19.0.1/32 endpoint "192.0.3.254:$((PORT + i))" \
      persistent-keepalive 1
    for ns in $A $B; do
      local dev; [ "$ns" = "$A" ] && dev=wa$i || dev=wb$i
      ip -n "$ns" link set "$dev" mtu 1420 up
    done
    nh_a+=(nexthop dev "wa$i") nh_b+=(nexthop dev "wb$i")
  done
  if [ "$n" -eq 1 ]; then
    ip -n "$A" route add 198.19.0.2/32 dev wa0 src 198.19.0.1
    ip -n "$B" route add 198.19.0.1/32 dev wb0 src 198.19.0.2
  else
    ip -n "$A" route add 198.19.0.2/32 src 198.19.0.1 "${nh_a[@]}"
    ip -n "$B" route add 198.19.0.1/32 src 198.19.0.2 "${nh_b[@]}"
  fi
  for _ in $(seq 100); do ip netns exec "$A" ping -c1 -W1 -I 198.19.0.1 198.19.0.2 >/dev/null 2>&1 && return; done
  echo "wireguard-go: 198.19.0.2 not reachable" >&2; exit 1
}

cpu_of() {  # CPU seconds (user+sys) used so far by every process in namespace $1
  local t=0 p
  for p in $(ip netns pids "$1"); do
    v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || continue  # it may have ended
    [ -n "$v" ] && t=$((t + v))
  done
  echo "$t"
}

snap() {  # every kernel counter of namespace $1 that says a packet was lost or reordered
  ip netns exec "$1" nstat -asz 2>/dev/null | awk 'NF >= 2 && $1 !~ /^#/ {print $1, $2}'
  ip -n "$1" -s -j link show | jq -r '.[] | "ifdrop_\(.ifname) \(.stats64.rx.dropped + .stats64.tx.dropped)"'
}

delta() {  # $1 $2 snapshots: the counters that grew, "name delta" per line
  awk 'NR == FNR {a[$1] = $2; next} ($2 - a[$1]) > 0 {print $1, $2 - a[$1]}' "$1" "$2"
}

ap_lost() {  # the appliance's own drop counters in namespace $1, summed over its devices
  ip netns exec "$1" "$BIN" status -o json 2>/dev/null |
    jq '[.devices[] | .replayed + .send_dropped + .tun_write_errors + .invalid] | add // 0' || echo 0
}

fwd_lost() {  # trains dropped + datagrams unsent by the forwarder so far (its last report)
  awk '/udp-delay:/ {t = $2 + $7} END {print t + 0}' "$W/delay.log"
}

echo "rtt_ms config rep gbit_s retransmits processes_cpu_s forwarder_cpu_s measured_rtt_ms udp_buffer_drops if_drops forwarder_lost appliance_dropped dsacks_at_sender ofo_at_receiver" > "$OUT/raw.tsv"
for rep in $(seq 1 "$REPS"); do
  for cfg in $CONFIGS; do
    impl=${cfg%%:*} n=${cfg#*:}
    W=$OUT/work/r$rep-${impl}_$n; mkdir -p "$W"
    up_lab
    forwarder "$n"
    case $impl in
      ap) up_ap "$n" ;;
      wggo) up_wggo "$n" ;;
      *) echo "unknown config $cfg" >&2; exit 2 ;;
    esac
    rtt=$(ip netns exec "$A" ping -c 5 -i 0.2 -I 198.19.0.1 198.19.0.2 | awk -F/ '/^rtt/ {print $5}')
    ip netns exec "$B" iperf3 -s -1 -B 198.19.0.2 > "$W/iperf-s.log" 2>&1 &
    PIDS+=($!)
    sleep 0.5
    hz=$(getconf CLK_TCK)
    ca=$(cpu_of "$A"); cb=$(cpu_of "$B"); cd=$(cpu_of "$D")
    for ns in $A $B $D; do snap "$ns" > "$W/before.$ns"; done
    apl=0; [ "$impl" = ap ] && apl=$(( $(ap_lost "$A") + $(ap_lost "$B") ))
    fwl=$(fwd_lost)
    ip netns exec "$A" iperf3 -c 198.19.0.2 -B 198.19.0.1 -P "$PARALLEL" -t "$DUR" -O "$OMIT" -J > "$W/iperf.json"
    ca2=$(cpu_of "$A"); cb2=$(cpu_of "$B"); cd2=$(cpu_of "$D")
    sleep 1.2  # the forwarder reports once a second
    : > "$W/counters.txt"
    for role in a b d; do  # the gateway end (iperf3 client), the node end, the forwarder
      ns=$A; [ $role = b ] && ns=$B; [ $role = d ] && ns=$D
      snap "$ns" > "$W/after.$ns"
      delta "$W/before.$ns" "$W/after.$ns" | sed "s/^/$role /" >> "$W/counters.txt"
    done
    [ "$impl" = ap ] && apl=$(( $(ap_lost "$A") + $(ap_lost "$B") - apl ))
    fwl=$(( $(fwd_lost) - fwl ))
    # Where the retransmitted segments were lost (or not lost: a DSACK says a retransmit was
    # spurious, an out-of-order arrival at the receiver is reordering on the way).
    udpd=$(awk '$2 ~ /^Udp(Rcvbuf|Sndbuf)Errors$/ {t += $3} END {print t + 0}' "$W/counters.txt")
    ifd=$(awk '$2 ~ /^ifdrop_/ {t += $3} END {print t + 0}' "$W/counters.txt")
    dsack=$(awk '$1 == "a" && $2 == "TcpExtTCPDSACKRecv" {t += $3} END {print t + 0}' "$W/counters.txt")
    ofo=$(awk '$1 == "b" && $2 == "TcpExtTCPOFOQueue" {t += $3} END {print t + 0}' "$W/counters.txt")
    gbit=$(jq '.end.sum_received.bits_per_second / 1e9' "$W/iperf.json")
    retr=$(jq '.end.sum_sent.retransmits' "$W/iperf.json")
    # Every process in A and B: the tunnel daemons and iperf3 (softirq work is not in it).
    tun=$(jq -n "(($ca2 - $ca) + ($cb2 - $cb)) / $hz" )
    fwd=$(jq -n "($cd2 - $cd) / $hz")
    line="$RTT_MS $cfg $rep $(printf %.3f "$gbit") $retr $(printf %.1f "$tun") $(printf %.1f "$fwd") $rtt $udpd $ifd $fwl $apl $dsack $ofo"
    echo "$line" | tee -a "$OUT/raw.tsv"
    down
  done
done
echo
echo "median over $REPS rounds, RTT ${RTT_MS} ms added, iperf3 -P $PARALLEL, ${DUR} s (first ${OMIT} s omitted):"
echo "(mean per round: retransmits; datagrams lost at UDP socket buffers, interfaces, the forwarder, the appliance; DSACKs at the sender; out-of-order arrivals at the receiver)"
echo "| configuration | Gbit/s | TCP retransmits | UDP buffer drops | interface drops | forwarder lost | appliance dropped | DSACKs | out of order | measured RTT ms |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for cfg in $CONFIGS; do
  med=$(awk -v c="$cfg" '$2 == c {print $4}' "$OUT/raw.tsv" | sort -n |
    awk '{g[NR] = $1} END {print (NR % 2) ? g[(NR + 1) / 2] : (g[NR / 2] + g[NR / 2 + 1]) / 2}')
  awk -v c="$cfg" -v m="$med" '$2 == c {r += $5; t = $8; for (i = 9; i <= 14; i++) l[i] += $i; n++} END {
    printf "| %s | %.2f | %d | %d | %d | %d | %d | %d | %d | %s |\n", c, m, r / n,
      l[9] / n, l[10] / n, l[11] / n, l[12] / n, l[13] / n, l[14] / n, t }' "$OUT/raw.tsv"
done | tee "$OUT/summary.md"

#!/usr/bin/env bash
# Plan and apply N node routes (default 10,000) on a gateway with 4 links, in a private network
# namespace, against `ip -batch` doing the same work in another namespace in the same run.
#
#   sudo bench/reconcile/routes.sh [N] [ROUNDS]
#
# Measures, per round (interleaved, so machine noise hits both sides alike):
#   appliance apply   : `appliance reconcile` on an empty namespace (observe, plan, apply 4 tun
#                       devices + N multipath routes + sysctls, re-observe and verify)
#   appliance noop    : the same reconcile again (observe + plan, nothing to do)
#   appliance dry-run : plan only, empty namespace
#   ip -batch         : create the 4 tun devices and add the same N multipath routes
# and prints medians and the ratio appliance/ip-batch. Needs root, iproute2, python3.
set -euo pipefail
N=${1:-10000}
ROUNDS=${2:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${APPLIANCE_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/release/appliance}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK=$(mktemp -d)
NS_A=ap-bench-a-$$; NS_B=ap-bench-b-$$
cleanup() { ip netns del "$NS_A" 2>/dev/null || true; ip netns del "$NS_B" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

python3 - "$N" > "$WORK/site.kdl" <<'PY'
import base64, hashlib, sys
n = int(sys.argv[1])
key = lambda i: base64.b64encode(hashlib.sha256(b"bench%d" % i).digest()).decode()
print('site "bench" {\n asn 65010\n cloud-block "10.200.0.0/15"\n site-prefix "10.10.0.0/16"\n links 4\n}')
print(f'gateway "gw1" {{\n endpoint "192.0.2.1"\n site-address "10.10.0.2"\n public-key "{key(-1)}"\n}}')
print(f'pool "p" {{\n prefix "10.200.0.0/15"\n count {n}')
for i in range(n):
    print(f' key {i} "{key(i)}"')
print('}')
PY
python3 - "$N" > "$WORK/batch" <<'PY'
import ipaddress, sys
n = int(sys.argv[1])
base = int(ipaddress.IPv4Address("10.200.0.0"))
for i in range(4):
    print(f"tuntap add dev ap-l{i} mode tun multi_queue")
    print(f"link set ap-l{i} mtu 1420 up")
hops = " ".join(f"nexthop dev ap-l{i}" for i in range(4))
for i in range(n):
    print(f"route add {ipaddress.IPv4Address(base + i)}/32 proto 173 metric 20 {hops}")
print("route add blackhole 10.200.0.0/15 proto 173 metric 4000")
PY

now() { date +%s.%N; }
fresh() { ip netns del "$1" 2>/dev/null || true; ip netns add "$1"; ip -n "$1" link set lo up; }
declare -a T_APPLY T_NOOP T_DRY T_BATCH
for r in $(seq 1 "$ROUNDS"); do
  fresh "$NS_A"; fresh "$NS_B"
  t0=$(now); ip netns exec "$NS_A" "$BIN" reconcile -c "$WORK/site.kdl" --node gw1 --dry-run >/dev/null || [ $? -eq 2 ]; t1=$(now)
  T_DRY+=("$(echo "$t1 - $t0" | bc)")
  t0=$(now); ip netns exec "$NS_A" "$BIN" reconcile -c "$WORK/site.kdl" --node gw1 >/dev/null; t1=$(now)
  T_APPLY+=("$(echo "$t1 - $t0" | bc)")
  t0=$(now); ip netns exec "$NS_A" "$BIN" reconcile -c "$WORK/site.kdl" --node gw1 >/dev/null; t1=$(now)
  T_NOOP+=("$(echo "$t1 - $t0" | bc)")
  t0=$(now); ip -n "$NS_B" -batch "$WORK/batch"; t1=$(now)
  T_BATCH+=("$(echo "$t1 - $t0" | bc)")
  a=$(ip -n "$NS_A" route show proto 173 | grep -c '^[0-9b]'); b=$(ip -n "$NS_B" route show proto 173 | grep -c '^[0-9b]')
  [ "$a" = "$b" ] || { echo "route counts differ: appliance $a, ip -batch $b" >&2; exit 1; }
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
A=$(median "${T_APPLY[@]}"); O=$(median "${T_NOOP[@]}"); D=$(median "${T_DRY[@]}"); B=$(median "${T_BATCH[@]}")
echo "routes: $N (+1 blackhole), links: 4, rounds: $ROUNDS, kernel $(uname -r), $(ip -V)"
printf '%-40s %8.3f s  ratio %5.2f\n' "ip -batch (anchor)" "$B" 1
printf '%-40s %8.3f s  ratio %5.2f\n' "appliance reconcile (plan+apply+verify)" "$A" "$(echo "$A / $B" | bc -l)"
printf '%-40s %8.3f s  ratio %5.2f\n' "appliance reconcile, nothing to do" "$O" "$(echo "$O / $B" | bc -l)"
printf '%-40s %8.3f s  ratio %5.2f\n' "appliance reconcile --dry-run (empty)" "$D" "$(echo "$D / $B" | bc -l)"

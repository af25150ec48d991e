#!/bin/bash
set -u
NS=ap-cap-4; D=/tmp/bgpcap/$NS; mkdir -p $D
GPID=""
cleanup() {
  if [ -n "$GPID" ] && kill -0 $GPID 2>/dev/null; then kill $GPID; sleep 1; kill -0 $GPID 2>/dev/null && kill -9 $GPID; fi
  ip netns del $NS 2>/dev/null; echo "cleanup done ($NS)"
}
trap cleanup EXIT
ip netns add $NS || exit 1
ip -n $NS link set lo up
ip -n $NS addr add 2001:db8::1/128 dev lo
ip netns exec $NS gobgpd -f /work/main/tests/bgp/golden/gobgp/gobgpd.toml -t toml > $D/gobgpd.log 2>&1 &
GPID=$!
echo "gobgpd pid $GPID"
sleep 3
ip netns exec $NS timeout 120 python3 /tmp/bgpcap/scen_gobgp.py $D
echo "scenario rc=$?"

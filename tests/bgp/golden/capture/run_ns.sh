#!/bin/bash
# usage: run_ns.sh NSNAME CONF SCENARIO.py
set -u
NS=$1; CONF=$2; SCEN=$3
D=/tmp/bgpcap/$NS
mkdir -p $D
BIRD_PID=""
cleanup() {
  if [ -n "$BIRD_PID" ] && kill -0 $BIRD_PID 2>/dev/null; then
    kill $BIRD_PID; sleep 1; kill -0 $BIRD_PID 2>/dev/null && kill -9 $BIRD_PID
  fi
  ip netns del $NS 2>/dev/null
  echo "cleanup done ($NS)"
}
trap cleanup EXIT
ip netns add $NS || exit 1
ip -n $NS link set lo up
ip -n $NS addr add 2001:db8::1/128 dev lo
cp "$CONF" $D/bird.conf
cd $D
ip netns exec $NS bird -f -c $D/bird.conf -s $D/bird.ctl -P $D/bird.pid 2> $D/bird.log &
BIRD_PID=$!
echo "bird pid $BIRD_PID"
sleep 2
ip netns exec $NS timeout 300 python3 $SCEN $D
echo "scenario rc=$?"

#!/usr/bin/env bash
# What one link flip costs, and what an idle daemon costs, for two appliance binaries in the
# same run (the "before" binary is the anchor):
#
#   sudo bench/failover/run.sh BEFORE_BIN AFTER_BIN      # FLIPS=5 COST_FLIPS=3 IDLE_S=60
#
# Lab per binary, rebuilt from scratch (fresh namespaces, fresh keys):
#   gw ns: 192.0.2.1 (veth), 10.10.0.2 on lo ── veth ── 192.0.2.7 node ns
#   site: 4 links, keepalive 200 ms, dead after 3; gateway gw1, node c1 10.200.0.11, plus a
#   pool of POOL (default 200) enrolled nodes that never connect (their peers exist on every
#   link; a real gateway carries them).
# Measures, binaries interleaved per round:
#   idle CPU   : utime+stime of each daemon over IDLE_S seconds with 4 live links, as ms/min
#   flip time  : from an nft rule dropping the node's packets on link 2 (at the gateway) to the
#                kernel route change on each side (`ip -ts monitor route`); FLIPS rounds
#   flip cost  : netlink syscalls of each daemon from the drop to its route change + 300 ms
#                (strace -yy of the daemon's main thread, which runs the netlink connection;
#                netlink sockets only): requests sent, messages received;
#                COST_FLIPS rounds, medians (a drift check falling into a window shows as max)
# Needs root, iproute2, nftables, strace, python3. Traffic stays inside the two namespaces.
set -euo pipefail
BEFORE=${1:?usage: run.sh BEFORE_BIN AFTER_BIN}
AFTER=${2:?usage: run.sh BEFORE_BIN AFTER_BIN}
FLIPS=${FLIPS:-5}
COST_FLIPS=${COST_FLIPS:-3}
IDLE_S=${IDLE_S:-60}
POOL=${POOL:-200}
for b in "$BEFORE" "$AFTER"; do [ -x "$b" ] || { echo "not executable: $b" >&2; exit 1; }; done
WORK=$(mktemp -d)
GW=ap-bf-gw-$$; NODE=ap-bf-node-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$GW" 2>/dev/null || true; ip netns del "$NODE" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
now() { date +%s.%N; }

lab_up() { # BIN LABEL
  local bin=$1 d=$WORK/$2
  mkdir -p "$d"
  ip netns del "$GW" 2>/dev/null || true; ip netns del "$NODE" 2>/dev/null || true
  ip netns add "$GW"; ip netns add "$NODE"
  ip -n "$GW" link set lo up; ip -n "$NODE" link set lo up
  ip -n "$GW" link add u0 type veth peer name u1 netns "$NODE"
  ip -n "$GW" addr add 192.0.2.1/24 dev u0; ip -n "$GW" link set u0 up
  ip -n "$GW" addr add 10.10.0.2/32 dev lo
  ip -n "$NODE" addr add 192.0.2.7/24 dev u1; ip -n "$NODE" link set u1 up
  for h in gw1 c1; do
    "$bin" genkey > "$d/$h.key"; chmod 600 "$d/$h.key"
    "$bin" pubkey < "$d/$h.key" > "$d/$h.pub"
  done
  python3 - "$POOL" "$(cat "$d/gw1.pub")" "$(cat "$d/c1.pub")" > "$d/site.kdl" <<'PY'
import base64, hashlib, sys
pool, gw, c1 = int(sys.argv[1]), sys.argv[2], sys.argv[3]
key = lambda i: base64.b64encode(hashlib.sha256(b"pool%d" % i).digest()).decode()
print('site "bench" {\n asn 65010\n cloud-block "10.200.0.0/16"\n site-prefix "10.10.0.0/16"\n'
      ' links 4\n keepalive-ms 200\n dead-after 3\n}')
print(f'gateway "gw1" {{\n endpoint "192.0.2.1"\n site-address "10.10.0.2"\n public-key "{gw}"\n}}')
print(f'node "c1" {{\n address "10.200.0.11"\n public-key "{c1}"\n}}')
if pool:
    print(f'pool "p" {{\n prefix "10.200.4.0/22"\n count {pool}')
    for i in range(pool):
        print(f' key {i} "{key(i)}"')
    print('}')
PY
  ip netns exec "$GW" "$bin" run -c "$d/site.kdl" --node gw1 -k "$d/gw1.key" > "$d/gw1.log" 2>&1 &
  GW_PID=$!; PIDS+=("$GW_PID")
  ip netns exec "$NODE" "$bin" run -c "$d/site.kdl" --node c1 -k "$d/c1.key" > "$d/c1.log" 2>&1 &
  NODE_PID=$!; PIDS+=("$NODE_PID")
  wait_live 4 || { echo "links did not come up ($2):" >&2; tail -5 "$d"/*.log >&2; exit 1; }
}

live() { # NS -> number of live links
  ip netns exec "$1" "$BIN" status --output json 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin)["links"] if l["alive"]))' 2>/dev/null || echo 0
}
wait_live() { # N
  for _ in $(seq 1 200); do
    [ "$(live "$GW")" -ge "$1" ] && [ "$(live "$NODE")" -ge "$1" ] && return 0
    sleep 0.1
  done
  return 1
}
hops() { # NS DST -> nexthops of our metric-20 route
  ip -n "$1" route show "$2" proto 173 metric 20 2>/dev/null | grep -c nexthop || true
}
wait_hops() { # N (both sides)
  for _ in $(seq 1 500); do
    [ "$(hops "$GW" 10.200.0.11)" -eq "$1" ] && [ "$(hops "$NODE" 10.10.0.0/16)" -eq "$1" ] && return 0
    sleep 0.01
  done
  return 1
}
lab_down() {
  kill "$GW_PID" "$NODE_PID" 2>/dev/null || true
  wait "$GW_PID" "$NODE_PID" 2>/dev/null || true
}
drop_link2() {
  ip netns exec "$GW" nft add table inet bench
  ip netns exec "$GW" nft add chain inet bench in '{ type filter hook input priority 0; }'
  ip netns exec "$GW" nft add rule inet bench in udp dport 51822 drop
}
undrop() { ip netns exec "$GW" nft delete table inet bench; }

cpu_ms() { # PID -> utime+stime in ms
  python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); t=os.sysconf("SC_CLK_TCK"); print((int(f[11])+int(f[12]))*1000//t)' "$1"
}

# A flip's timing: drop, wait for the change on both sides, undrop, wait for recovery.
flip_time() { # LABEL -> appends "gw_ms node_ms" to WORK/LABEL.times
  local d=$WORK/$1
  ip -n "$GW" -ts monitor route > "$d/mon-gw" 2>/dev/null & local m1=$!
  ip -n "$NODE" -ts monitor route > "$d/mon-node" 2>/dev/null & local m2=$!
  sleep 0.3
  local t0; t0=$(now)
  drop_link2
  wait_hops 3 || { echo "link 2 did not leave the routes" >&2; exit 1; }
  sleep 0.2
  kill "$m1" "$m2"; wait "$m1" "$m2" 2>/dev/null || true
  undrop; wait_hops 4 || { echo "link 2 did not come back" >&2; exit 1; }
  python3 - "$t0" "$d/mon-gw" "$d/mon-node" >> "$d.times" <<'PY'
import datetime, re, sys
t0 = float(sys.argv[1])
def first(path, dst):
    for line in open(path):
        m = re.match(r"\[([0-9T:.\-]+)\] (.*)", line)
        if m and dst in m.group(2):
            t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
            if t >= t0:
                return (t - t0) * 1000
    return float("nan")
print(f"{first(sys.argv[2], '10.200.0.11'):.0f} {first(sys.argv[3], '10.10.0.0/16'):.0f}")
PY
  sleep 1
}

# A flip's netlink cost, from strace of both daemons.
flip_cost() { # LABEL -> appends "gw_req gw_msgs node_req node_msgs gw_span_ms node_span_ms" to WORK/LABEL.cost
  local d=$WORK/$1
  strace -ttt -yy -v -s 65536 -e trace=sendto,sendmsg,recvfrom,recvmsg -p "$GW_PID" -o "$d/st-gw" 2>/dev/null & local s1=$!
  strace -ttt -yy -v -s 65536 -e trace=sendto,sendmsg,recvfrom,recvmsg -p "$NODE_PID" -o "$d/st-node" 2>/dev/null & local s2=$!
  sleep 1
  drop_link2
  wait_hops 3 || { echo "link 2 did not leave the routes" >&2; exit 1; }
  sleep 0.3
  kill -INT "$s1" "$s2"; wait "$s1" "$s2" 2>/dev/null || true
  undrop; wait_hops 4 || { echo "link 2 did not come back" >&2; exit 1; }
  python3 - "$d/st-gw" "$d/st-node" >> "$d.cost" <<'PY'
import re, sys
out, spans = [], []
for path in sys.argv[1:]:
    req = msgs = 0
    times = []
    for line in open(path):
        if "<NETLINK:" not in line:
            continue
        times.append(float(line.split()[0]))
        if re.search(r"\b(sendto|sendmsg)\(", line):
            req += 1
        elif re.search(r"\b(recvfrom|recvmsg)\(", line) and "EAGAIN" not in line:
            msgs += line.count("nlmsg_type=")
    out += [req, msgs]
    spans.append((times[-1] - times[0]) * 1000 if times else 0.0)
print(*out, *(f"{x:.3f}" for x in spans))
PY
  sleep 1
}

declare -A IDLE
for round in 1 2; do
  for label in before after; do
    if [ $label = before ]; then BIN=$BEFORE; else BIN=$AFTER; fi
    lab_up "$BIN" "$label"
    if [ "$round" = 1 ]; then
      sleep 2
      g0=$(cpu_ms "$GW_PID"); n0=$(cpu_ms "$NODE_PID")
      sleep "$IDLE_S"
      g1=$(cpu_ms "$GW_PID"); n1=$(cpu_ms "$NODE_PID")
      IDLE[$label]="$(( (g1 - g0) * 60 / IDLE_S )) $(( (n1 - n0) * 60 / IDLE_S ))"
      for _ in $(seq 1 "$COST_FLIPS"); do flip_cost "$label"; done
    else
      for _ in $(seq 1 "$FLIPS"); do flip_time "$label"; done
    fi
    lab_down
  done
done

python3 - "$WORK" "${IDLE[before]}" "${IDLE[after]}" <<'PY'
import statistics, sys
work = sys.argv[1]
idle = {"before": list(map(int, sys.argv[2].split())), "after": list(map(int, sys.argv[3].split()))}
def rows(path):
    return [list(map(float, l.split())) for l in open(path) if l.strip()]
def med(v):
    return statistics.median(v)
t = {k: rows(f"{work}/{k}.times") for k in ("before", "after")}
c = {k: rows(f"{work}/{k}.cost") for k in ("before", "after")}
def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"
print("| what | before | after | after ÷ before |")
print("|---|---|---|---|")
for i, side in enumerate(("gateway", "node")):
    b, a = med([r[i] for r in t["before"]]), med([r[i] for r in t["after"]])
    rng = lambda k: f"[{min(r[i] for r in t[k]):.0f}–{max(r[i] for r in t[k]):.0f}]"
    print(f"| link death → kernel route change, {side} (ms, median {rng('before')} / {rng('after')}) | {b:.0f} | {a:.0f} | {ratio(a, b)} |")
for i, side in enumerate(("gateway", "node")):
    b, a = idle["before"][i], idle["after"][i]
    print(f"| idle CPU, {side}, 4 live links (ms per minute) | {b} | {a} | {ratio(a, b)} |")
for i, side in ((4, "gateway"), (5, "node")):
    b, a = med([r[i] for r in c["before"]]), med([r[i] for r in c["after"]])
    print(f"| reaction's kernel work per flip, {side}: first to last netlink syscall (ms under strace, median) | {b:.2f} | {a:.2f} | {ratio(a, b)} |")
for i, (side, what) in enumerate((("gateway", "requests"), ("gateway", "messages received"), ("node", "requests"), ("node", "messages received"))):
    b, a = med([r[i] for r in c["before"]]), med([r[i] for r in c["after"]])
    mx = lambda k: f"{max(r[i] for r in c[k]):.0f}"
    print(f"| netlink per link flip, {side}: {what} (median; max {mx('before')} / {mx('after')}) | {b:.0f} | {a:.0f} | {ratio(a, b)} |")
PY

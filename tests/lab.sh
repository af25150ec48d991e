#!/usr/bin/env bash
# The whole site in network namespaces, with the real binary in every role:
#
#   sudo tests/lab.sh up [DIR]     # build it, start everything, print what came up
#   sudo tests/lab.sh status [DIR] # print it again
#   sudo tests/lab.sh down [DIR]   # stop every process it started (by PID), delete everything
#   sudo tests/lab.sh run HOST [DIR]  # start HOST's daemon again (after you killed it, say)
#   LAB_RTT_MS=20 sudo tests/lab.sh up   # with 20 ms of WAN round trip (tests/udp-delay.py)
#   LAB_ROUTER=frr sudo tests/lab.sh up  # FRR (zebra, bfdd, bgpd) as the site router, not bird
#   LAB_SIM=247 sudo tests/lab.sh up     # and 247 simulated nodes (+ "big"): 250 nodes in all
#
#  site  10.10.0.1/24: bird2 or FRR (site router, ECMP from both gateways, BFD), NFS server
#        (nfs-ganesha, export DIR/nfs-export), iperf3 target
#  gw1 10.10.0.2 / 192.0.2.1, gw2 10.10.0.3 / 192.0.2.3: appliance gateways (route reflectors)
#  inet  the internet: a bridge joining the gateways' and the relays' public legs
#  relay1 192.0.2.2 / 172.31.0.1, relay2 192.0.2.4 / 172.31.0.2: appliance relays (their NAT)
#  c1..c3 172.31.0.11-13, cloud addresses 10.200.0.11-13: appliance nodes, private network
#        only (no default route), links spread over both relays
#  sim   with LAB_SIM=N: N pool slots sim-1..sim-N (10.200.4.i) and node "big" (10.200.5.0/28,
#        which announces two /29s: one more than its assignment allows) as iBGP clients of both
#        gateways, each played by a bird of its own. They reach the
#        gateways over a veth each (198.18.1.0/30, 198.18.2.0/30) instead of tunnels: the
#        gateways' BGP policy, their session with each other and with the site router are real.
#
# One site file (DIR/site.kdl) for every host. Namespaces are named $LAB_PREFIX-<role>
# (default ap-lab-<role>); everything else lives in DIR (default /tmp/ap-lab). Traffic stays inside the lab's namespaces.
set -euo pipefail
CMD=${1:-}
if [ "$CMD" = run ]; then HOST=${2:-}; shift; fi
DIR=${2:-/tmp/ap-lab}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${APPLIANCE_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/debug/appliance}
PREFIX=${LAB_PREFIX:-ap-lab}
ROUTER=${LAB_ROUTER:-bird}
SIM=${LAB_SIM:-0}
[[ "$SIM" =~ ^[0-9]+$ ]] && [ "$SIM" -le 250 ] || { echo "LAB_SIM: 0..=250 simulated nodes" >&2; exit 2; }
NS=(site gw1 gw2 inet relay1 relay2 private c1 c2 c3)
[ "$SIM" -eq 0 ] || NS+=(sim)
ns() { echo "$PREFIX-$1"; }
x() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
say() { printf '%s\n' "$*"; }

start() { # NAME LOG CMD... : run in namespace NAME, remember its PID
  local n=$1 log=$2; shift 2
  ip netns exec "$(ns "$n")" "$@" > "$DIR/$log" 2>&1 &
  echo "$! $n $*" >> "$DIR/pids"
}

down() {
  if [ -f "$DIR/pids" ]; then
    while read -r pid _; do kill "$pid" 2>/dev/null || true; done < "$DIR/pids"
    sleep 0.5
    while read -r pid _; do kill -9 "$pid" 2>/dev/null || true; done < "$DIR/pids"
    rm -f "$DIR/pids"
  fi
  for n in "${NS[@]}" sim; do ip netns del "$(ns "$n")" 2>/dev/null || true; done
}

veth() { # NS1 DEV1 NS2 DEV2
  ip -n "$(ns "$1")" link add "$2" type veth peer name "$4" netns "$(ns "$3")"
  ip -n "$(ns "$1")" link set "$2" up
  ip -n "$(ns "$3")" link set "$4" up
}

member() { # HUB NS DEV ADDR : a veth from NS (named DEV, addressed ADDR) into HUB's bridge
  local port="p-$2"
  veth "$1" "$port" "$2" "$3"
  ip -n "$(ns "$1")" link set "$port" master br0
  ip -n "$(ns "$2")" addr add "$4" dev "$3"
}

site_file() {
  local k
  {
    printf 'site "lab" {\n asn 65010\n cloud-block "10.200.0.0/16"\n site-prefix "10.10.0.0/16"\n links 4\n keepalive-ms 100\n dead-after 3\n}\n'
    for g in "gw1 192.0.2.1 10.10.0.2" "gw2 192.0.2.3 10.10.0.3"; do
      set -- $g; k=$("$BIN" pubkey < "$DIR/$1.key")
      printf 'gateway "%s" {\n endpoint "%s"\n site-address "%s"\n public-key "%s"\n}\n' "$1" "$2" "$3" "$k"
    done
    printf 'relay "relay1" {\n public-address "192.0.2.2"\n private-address "172.31.0.1"\n}\n'
    printf 'relay "relay2" {\n public-address "192.0.2.4"\n private-address "172.31.0.2"\n}\n'
    for i in 1 2 3; do
      k=$("$BIN" pubkey < "$DIR/c$i.key")
      printf 'node "c%s" {\n address "10.200.0.1%s"\n public-key "%s"\n}\n' "$i" "$i" "$k"
    done
    if [ "$SIM" -gt 0 ]; then
      printf 'pool "sim" {\n prefix "10.200.4.0/24"\n count %s\n' $((SIM + 1))
      for i in $(seq 1 "$SIM"); do printf ' key %s "%s"\n' "$i" "$("$BIN" genkey | "$BIN" pubkey)"; done
      printf '}\nnode "big" {\n address "10.200.5.1"\n prefix "10.200.5.0/28"\n public-key "%s"\n}\n' "$("$BIN" genkey | "$BIN" pubkey)"
    fi
    printf 'bgp {\n hold-time 30\n neighbor "site-router" {\n  address "10.10.0.1"\n  bfd #true\n }\n}\n'
  } > "$DIR/site.kdl"
}

readme_block() { # REGEX: the first ``` block after the README line matching it (the snippets
  # the README gives site engineers are the lab's own configuration, so they are tested)
  local b
  b=$(awk -v h="$1" 'f==0 && $0 ~ h {f=1; next} f==1 && /^```/ {f=2; next} f==2 && /^```/ {exit} f==2 {print}' "$ROOT/README.md")
  [ -n "$b" ] || { say "README.md has no snippet after /$1/" >&2; exit 1; }
  printf '%s\n' "$b"
}

bird_conf() { # bird2 as the site router: the README's snippet
  { printf 'router id 10.10.0.1;\nprotocol device {}\n'; readme_block '^A site router in bird2'; } > "$DIR/bird.conf"
}

sim_up() { # the simulated nodes: addresses, veths to both gateways, a bird each
  local g i
  for g in 1 2; do
    veth sim "s$g" "gw$g" sim
    ip -n "$(ns sim)" addr add "198.18.$g.2/30" dev "s$g"
    ip -n "$(ns "gw$g")" addr add "198.18.$g.1/30" dev sim
    ip -n "$(ns sim)" route add "10.10.0.$((g + 1))/32" via "198.18.$g.1"
    # Not the gateway's own routing (it owns protocol 173 only): its replies to the simulated
    # nodes take the veth, by a rule ahead of its tunnel routes and blackholes.
    ip -n "$(ns "gw$g")" route add 10.200.4.0/23 via "198.18.$g.2" table 100
    ip -n "$(ns "gw$g")" rule add to 10.200.4.0/23 lookup 100 pref 100
  done
  { for i in $(seq 1 "$SIM"); do echo "addr add 10.200.4.$i/32 dev lo"; done
    echo "addr add 10.200.5.1/32 dev lo"; } | ip -n "$(ns sim)" -batch -
  # One bird per simulated node: bird locks a neighbour address to one session per instance.
  mkdir -p "$DIR/sim"
  sim_bird() { # NAME ADDRESS ERROR-WAIT STATIC-ROUTES... (announced to both gateways)
    local name=$1 addr=$2 wait=$3 r g; shift 3
    {
      printf 'router id %s;\nprotocol device {}\nprotocol static {\n ipv4;\n' "$addr"
      for r in "$@"; do printf ' route %s unreachable;\n' "$r"; done
      printf '}\n'
      for g in 2 3; do
        printf 'protocol bgp g%s { local %s as 65010; neighbor 10.10.0.%s as 65010; hold time 30;\n' "$g" "$addr" "$g"
        printf '  strict bind on; connect delay time 1; connect retry time 2; error wait time %s;\n' "$wait"
        printf '  ipv4 { import none; export all; }; }\n'
      done
    } > "$DIR/sim/$name.conf"
    start sim "sim/$name.log" bird -f -c "$DIR/sim/$name.conf" -s "$DIR/sim/$name.ctl" -P "$DIR/sim/$name.pid"
  }
  for i in $(seq 1 "$SIM"); do  sim_bird "s$i" "10.200.4.$i" "1, 10" "10.200.4.$i/32"; done
  sim_bird big 10.200.5.1 "5, 10" 10.200.5.0/29 10.200.5.8/29
}

frr_conf() { # FRR as the site router: the README's snippet (its bfd block for bfdd, the rest
  # for bgpd), with zebra beside them
  local snippet
  snippet=$(readme_block 'The same in FRR')
  mkdir -p "$DIR/frr"
  echo "hostname site" > "$DIR/frr/zebra.conf"
  printf '%s\n' "$snippet" | awk '{print} /^!$/ {exit}' > "$DIR/frr/bfdd.conf"
  { printf 'frr defaults traditional\nhostname site\n'; printf '%s\n' "$snippet" | awk 'f {print} /^!$/ {f=1}'; } > "$DIR/frr/bgpd.conf"
  chown -R frr:frr "$DIR/frr" # zebra and bfdd drop to FRR's user
}

frr() { # DAEMON ARGS...: start one FRR daemon in the site namespace
  local d=$1; shift
  start site "frr-$d.log" "/usr/lib/frr/$d" -f "$DIR/frr/$d.conf" --vty_socket "$DIR/frr" \
    -i "$DIR/frr/$d.pid" -z "$DIR/frr/zserv.api" -P 0 "$@"
}

router() { # start the site router
  if [ "$ROUTER" = frr ]; then
    frr_conf
    frr zebra
    for _ in $(seq 1 50); do [ -S "$DIR/frr/zserv.api" ] && break; sleep 0.1; done
    frr bfdd --bfdctl "$DIR/frr/bfdd.sock"
    frr bgpd -S
  else
    bird_conf
    start site bird.log bird -f -c "$DIR/bird.conf" -s "$DIR/bird.ctl" -P "$DIR/bird.pid"
  fi
}

nfs_conf() {
  mkdir -p "$DIR/nfs-export" "$DIR/ganesha"
  cat > "$DIR/ganesha.conf" <<EOF
NFS_CORE_PARAM { Protocols = 3, 4; Bind_addr = 10.10.0.1; }
NFSV4 { Graceless = true; }
EXPORT {
  Export_Id = 1; Path = $DIR/nfs-export; Pseudo = /export;
  Access_Type = RW; Squash = No_Root_Squash; Protocols = 3, 4; SecType = sys;
  FSAL { Name = VFS; }
}
LOG { Default_Log_Level = WARN; }
EOF
}

need() {
  local missing=() p
  for p in iproute2 nftables python3 bird2 frr iperf3 nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || { say "missing packages: ${missing[*]} (run as root to install them)"; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
}

up() {
  [ "$(id -u)" -eq 0 ] || { say "run as root (namespaces): sudo $0 up"; exit 1; }
  [ -x "$BIN" ] || { say "build first: cargo build (or set APPLIANCE_BIN)"; exit 1; }
  need
  down
  mkdir -p "$DIR"
  for n in "${NS[@]}"; do ip netns add "$(ns "$n")"; ip -n "$(ns "$n")" link set lo up; done
  for hub in site inet private; do
    ip -n "$(ns "$hub")" link add br0 type bridge; ip -n "$(ns "$hub")" link set br0 up
  done
  ip -n "$(ns site)" addr add 10.10.0.1/24 dev br0
  member site gw1 lan 10.10.0.2/24
  member site gw2 lan 10.10.0.3/24
  member inet gw1 pub 192.0.2.1/24
  member inet gw2 pub 192.0.2.3/24
  member inet relay1 pub 192.0.2.2/24
  member inet relay2 pub 192.0.2.4/24
  member private relay1 priv 172.31.0.1/24
  member private relay2 priv 172.31.0.2/24
  for i in 1 2 3; do member private "c$i" eth0 "172.31.0.1$i/24"; done
  for h in gw1 gw2 c1 c2 c3; do
    [ -f "$DIR/$h.key" ] || { "$BIN" genkey > "$DIR/$h.key"; chmod 600 "$DIR/$h.key"; }
  done
  site_file
  router
  if command -v ganesha.nfsd > /dev/null; then
    nfs_conf
    start site rpcbind.log rpcbind -f -w
    sleep 0.5
    start site ganesha.log ganesha.nfsd -F -f "$DIR/ganesha.conf" -L "$DIR/ganesha.out" -p "$DIR/ganesha.pid"
  fi
  for r in relay1 relay2; do x "$r" "$BIN" reconcile -c "$DIR/site.kdl" --node "$r" > "$DIR/$r.reconcile.log"; done
  if [ "${LAB_RTT_MS:-0}" -gt 0 ]; then
    # WAN delay: the relays reach the gateways through a UDP forwarder in the internet
    # namespace that holds every datagram LAB_RTT_MS/2 each way (no netem in this kernel).
    ip -n "$(ns inet)" addr add 192.0.2.254/24 dev br0
    local maps=() k=0 g i
    x inet nft add table ip delay
    x inet nft add chain ip delay pre '{ type nat hook prerouting priority -100; }'
    for g in 192.0.2.1 192.0.2.3; do
      for i in 0 1 2 3; do
        x inet nft add rule ip delay pre ip daddr "$g" udp dport $((51820 + i)) dnat to "192.0.2.254:$((40000 + k))"
        maps+=("$((40000 + k))=$g:$((51820 + i))")
        k=$((k + 1))
      done
    done
    start inet delay.log python3 "$ROOT/tests/udp-delay.py" $((LAB_RTT_MS / 2)) 192.0.2.254 "${maps[@]}"
    for r in relay1 relay2; do
      for g in 192.0.2.1 192.0.2.3; do x "$r" ip route add "$g/32" via 192.0.2.254; done
    done
  fi
  [ "$SIM" -eq 0 ] || sim_up
  for h in gw1 gw2 c1 c2 c3; do daemon "$h"; done
  # Wait for every node's 8 links (2 gateways x 4), bird's paths and every BGP session (but
  # big's, which its max-prefix ends).
  for _ in $(seq 1 600); do
    local ok=1
    for i in 1 2 3; do [ "$(live "c$i")" = 8 ] || ok=0; done
    for g in gw1 gw2; do [ "$(sessions_up $g)" = $((5 + SIM)) ] || ok=0; done
    [ "$(x site ip route show 10.200.0.13 2>/dev/null | grep -c nexthop)" = 2 ] || ok=0
    [ "$(x site ip route show root 10.200.4.0/24 2>/dev/null | grep -c nexthop)" = $((2 * SIM)) ] || ok=0
    [ $ok = 1 ] && break
    sleep 0.1
  done
  status
}

daemon() { # HOST: start its appliance daemon (log appended to DIR/HOST.log)
  ip netns exec "$(ns "$1")" "$BIN" run -c "$DIR/site.kdl" --node "$1" -k "$DIR/$1.key" >> "$DIR/$1.log" 2>&1 &
  echo "$! $1 $BIN run" >> "$DIR/pids"
}

sessions_up() { # NS -> its daemon's established BGP sessions
  x "$1" "$BIN" status --output json 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(1 for s in json.load(sys.stdin)["bgp"]["sessions"] if s["state"] == "Established"))' 2>/dev/null || echo 0
}

live() { # NS -> live links of its daemon
  x "$1" "$BIN" status --output json 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin)["links"] if l["alive"]))' 2>/dev/null || echo 0
}

status() {
  say "== BGP sessions (gw1)"
  if [ "$SIM" -gt 0 ]; then
    x gw1 "$BIN" status | sed -n '/BGP PEER/,/refused/p' | grep -v '^sim-' || true
    say "and $SIM simulated nodes, $(x gw1 "$BIN" status | grep '^sim-' | grep -c Established) of them Established"
  else
    x gw1 "$BIN" status | sed -n '/BGP PEER/,/refused/p'
  fi
  say "== live links"
  for h in gw1 gw2 c1 c2 c3; do say "$h: $(live "$h")"; done
  say "== the site router's ($ROUTER) routes to the cloud (one nexthop per gateway)"
  if [ "$SIM" -gt 0 ]; then
    x site ip route show root 10.200.0.0/24
    say "and $(x site ip -o route show root 10.200.4.0/24 | grep -c 'nexthop via 10.10.0.2.*nexthop via 10.10.0.3') simulated nodes' /32s over both gateways"
  else
    x site ip route show root 10.200.0.0/16
  fi
  say "== c1's route to the site"
  x c1 ip route show 10.10.0.0/16 proto 173
  say "== iperf3 c1 -> site, 2 s"
  start site iperf3.log iperf3 -s -1 -B 10.10.0.1
  sleep 0.3
  x c1 iperf3 -c 10.10.0.1 -B 10.200.0.11 -t 2 | tail -3 | head -1
  if command -v nfs-cp > /dev/null && [ -f "$DIR/ganesha.pid" ]; then
    say "== NFS: 64 MiB from c1 to the site and back"
    head -c $((64 << 20)) /dev/urandom > "$DIR/nfs-src"
    x c1 nfs-cp "$DIR/nfs-src" "nfs://10.10.0.1$DIR/nfs-export/from-c1?version=3" > /dev/null
    x c1 nfs-cp "nfs://10.10.0.1$DIR/nfs-export/from-c1?version=3" "$DIR/nfs-back" > /dev/null
    sha256sum "$DIR/nfs-src" "$DIR/nfs-export/from-c1" "$DIR/nfs-back" | awk '{print $1, $2}'
  fi
}

case "$CMD" in
  up) trap 'rc=$?; [ $rc -eq 0 ] || { say "lab failed (exit $rc); tearing down"; down; }' EXIT; up ;;
  status) status ;;
  down) down; say "lab down" ;;
  run)
    case "$HOST" in gw1|gw2|c1|c2|c3) ;; *) say "usage: $0 run gw1|gw2|c1|c2|c3 [DIR]"; exit 2 ;; esac
    [ -f "$DIR/pids" ] || { say "no lab in $DIR: $0 up first"; exit 1; }
    daemon "$HOST"; say "started $HOST's daemon" ;;
  *) say "usage: $0 up|status|down|run HOST [DIR]"; exit 2 ;;
esac

#!/usr/bin/env bash
# Tunnel throughput: appliance (1 and 4 links) against bare veth, OpenVPN (1 tunnel),
# wireguard-go (1 and 4 tunnels) in the same run, with the shared anchors harness
# (../shared/bench/tunnel/anchors.sh; README and RESULTS.md beside it), and boringtun-cli 4
# tunnels when it is installed (`cargo install boringtun-cli`). Run as root after
# `cargo build --release`. Knobs pass through: REPS, DUR, PARALLEL, CONFIGS, OUT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ANCHORS=${ANCHORS:-$HERE/../../../shared/bench/tunnel/anchors.sh}
[ -x "$ANCHORS" ] || { echo "anchors harness not found at $ANCHORS (set ANCHORS=)" >&2; exit 1; }
for p in iperf3 openvpn wireguard-go wg jq openssl; do
  command -v "$p" >/dev/null || { echo "needs $p (apt-get install iperf3 openvpn wireguard-go wireguard-tools jq openssl)" >&2; exit 1; }
done
export TUN_IMPL_CMD=$HERE/appliance-plugin.sh TUN_IMPL_NAME=appliance
# w1:N / w2:N: appliance with the site end on 1 or 2 workers, the cloud end on 1.
export TUN_IMPL_FILE=$HERE/appliance-impls.sh
BT_CFG=; command -v boringtun-cli >/dev/null && BT_CFG=bt:4
export CONFIGS=${CONFIGS:-"bare ovpn-aes:1 wggo:1 wggo:4 $BT_CFG ext:1 ext:4 w1:1 w2:1"}
export PARALLEL=${PARALLEL:-"1 8"} REPS=${REPS:-3} CRYPTO=${CRYPTO:-0} PROFILE=${PROFILE:-}
exec "$ANCHORS"

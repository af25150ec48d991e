#!/usr/bin/env bash
# Route-reflector scale: appliance's reflector against bird2 and gobgpd in the same run, with
# the shared harness (../shared/bench/bgp/rr-bench.sh: one namespace, N simulated iBGP clients
# on loopback addresses, each announcing K prefixes inside its own /28, a non-client listener
# that must receive them all; per-client import filters; no client-to-client reflection).
#   sudo bench/bgp/run.sh ["1000 1" "200 5" ...]     # after cargo build --release
# Prints one summary line per run; raw JSON under $OUT (default /tmp/appliance-rr-bench).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RR=${RR_BENCH:-$HERE/../../../shared/bench/bgp/rr-bench.sh}
BIN=${APPLIANCE_BIN:-$HERE/../../target/x86_64-unknown-linux-gnu/release/appliance}
OUT=${OUT:-/tmp/appliance-rr-bench}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for p in bird gobgpd python3; do command -v "$p" >/dev/null || { echo "needs $p (apt-get install bird2 gobgpd)" >&2; exit 1; }; done
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=("1000 1" "200 5")
mkdir -p "$OUT"
for size in "${SIZES[@]}"; do
  read -r n k <<<"$size"
  for impl in custom gobgp bird; do
    run=$OUT/run-$impl-$n-$k; rm -rf "$run"; mkdir -p "$run"
    env OUTDIR="$OUT" RUN_DIR="$run" \
      RR_CMD="exec $BIN bgp-reflector" RR_COUNT_CMD="cat $run/rr.count" \
      "$RR" "$impl" "$n" "$k" > "$run/stdout.txt" 2>&1 || { echo "$impl $n x $k failed:"; tail -5 "$run/stdout.txt"; continue; }
    python3 - "$run/result.json" "$impl" "$n" "$k" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = [k for k in r if any(s in k for s in ("conv", "cpu", "rss", "t_", "withdraw"))]
print(sys.argv[2], sys.argv[3], "x", sys.argv[4], {k: r[k] for k in sorted(keys)})
PY
  done
done

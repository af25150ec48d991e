#!/usr/bin/env bash
# Build the Debian package: target/debian/appliance_VERSION_amd64.deb (or --out DIR).
#
#   packaging/build-deb.sh                  # cargo build --release, then cargo deb
#   packaging/build-deb.sh --bin PATH       # package an already built static binary
#
# Installs cargo-deb (crates.io) when it is missing. The man pages and completions are
# generated from the binary's own command line (`appliance man`, `appliance completions`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="" out="$here/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
done
cd "$here"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin="$here/target/x86_64-unknown-linux-gnu/release/appliance"
fi
file "$bin" | grep -q static || { echo "build-deb.sh: $bin is not a static binary" >&2; exit 1; }
assets="$here/target/assets"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
install -m 0755 "$bin" "$assets/appliance"
strip "$assets/appliance" 2>/dev/null || true
"$bin" man --dir "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" completions bash > "$assets/completions/appliance"
"$bin" completions zsh > "$assets/completions/_appliance"
"$bin" completions fish > "$assets/completions/appliance.fish"
mkdir -p "$out"
cargo deb --no-build --no-strip --target x86_64-unknown-linux-gnu --output "$out" --quiet
ls "$out"/appliance_*.deb

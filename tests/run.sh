#!/usr/bin/env bash
# The project's test command (README "Run the tests"): installs what the tests need, then runs
# formatting, lints, the static-binary check and every test. Run as root: the namespace tests
# create their own network namespaces (never touching the root namespace) and fail, not skip,
# when CI=true and they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

need=(iproute2 iputils-ping ethtool util-linux file bc nftables python3 wireguard-go wireguard-tools iperf3 bird2 gobgpd frr
      linux-image-amd64 erofs-utils cryptsetup-bin syslinux syslinux-common systemd-boot-efi mtools dosfstools
      e2fsprogs fdisk zstd cpio kmod qemu-utils qemu-system-x86 ovmf xorriso binutils gzip nix-bin
      nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind curl man-db dpkg systemd
      docker-registry skopeo umoci busybox-static)
# Without its recommends (node exporter, smartmontools): the tests start their own Prometheus.
lean=(prometheus)
missing=()
for p in "${need[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
missing_lean=()
for p in "${lean[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing_lean+=("$p"); done
if [ ${#missing_lean[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "missing packages: ${missing_lean[*]} (run as root to install them)" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_lean[@]}" >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "missing packages: ${missing[*]} (run as root to install them)" >&2; exit 1; fi
  apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    # A qemu-utils newer than Debian's qemu-system-x86 (a backport) blocks it: take the matching one.
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${missing[@]}" "qemu-utils=$v" >/dev/null
  fi
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== nix/ (parse every file; evaluate the NixOS module against a stub lib)"
for f in nix/*.nix; do nix-instantiate --parse "$f" >/dev/null; done
nix-instantiate --eval --strict nix/check.nix | grep -q "bin/appliance run -c"
echo "== static binary"
cargo build --quiet
bin=target/x86_64-unknown-linux-gnu/debug/appliance
file "$bin"
file "$bin" | grep -q "static" || { echo "error: $bin is not statically linked" >&2; exit 1; }
echo "== release build (the images the boot tests build, and the workload image's tools)"
cargo build --release --quiet
cargo build --release --quiet --example control-raw
echo "== cargo test"
cargo test --no-fail-fast 2>&1 | tee /tmp/appliance-test.log
left=$(ip netns list | awk '{print $1}' | grep '^ap-t-' || true)
[ -z "$left" ] || { echo "error: tests left namespaces behind: $left" >&2; exit 1; }

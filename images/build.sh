#!/usr/bin/env bash
# Build the appliance disk image, offline, from Debian packages and our static binary.
#
#   images/build.sh [--bin PATH] [--out DIR] [--version V] [--cmdline-extra "ARGS"]
#
# --bin: the static appliance binary (default: `cargo build --release`). --cmdline-extra: more
# kernel parameters (e.g. "appliance.wait=10"); they become part of the image (and its hash).
#
# Output (DIR, default build/image): appliance.raw (the disk, sized to its partitions),
# appliance.raw.gz (the update artifact for `appliance image install http://…`),
# appliance.qcow2 (the same disk, 10 GiB virtual size, compressed, preallocation off: what
# Exoscale registers as a template), appliance-A.efi / vmlinuz / initrd (the slot-A boot files,
# also used by `appliance image install`), root-A.erofs + verity-A.img with root-hash-A,
# SHA256SUMS and MD5SUMS.
#
# Layout (GPT): 1 esp (vfat, systemd-boot + UKIs for UEFI, syslinux for BIOS via gptmbr.bin and
# the LegacyBIOSBootable attribute), 2 rootA (erofs), 3 verityA, 4 rootB, 5 verityB,
# 6 state (ext4; grown to the disk at first boot). The root hash sits on the kernel command
# line inside the unified kernel image (and in syslinux.cfg for BIOS).
#
# Inputs come from Debian packages (installed with apt-get when missing). Other builders (the Nix
# derivation in nix/) set APPLIANCE_NO_APT=1 and point at their own files with KERNEL,
# MODULES_ROOT (the directory holding lib/modules/KVER), KVER, SDBOOT_DIR and SYSLINUX_MBR.
#
# Reproducible: every timestamp is SOURCE_DATE_EPOCH (default: the last commit's time), and
# every UUID, salt and volume id is derived from the binary's hash and the version, so the
# same inputs give the same bytes.
set -euo pipefail
umask 022
export LC_ALL=C TZ=UTC

here=$(cd "$(dirname "$0")/.." && pwd)
bin=""
out="$here/build/image"
version=""
extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --cmdline-extra) extra=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

need=(linux-image-amd64 erofs-utils cryptsetup-bin syslinux syslinux-common systemd-boot-efi
      mtools dosfstools e2fsprogs fdisk zstd cpio kmod qemu-utils binutils)
missing=()
[ -n "${APPLIANCE_NO_APT:-}" ] && need=()
for p in "${need[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "build.sh: missing packages: ${missing[*]} (run as root to install them)" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "$bin" ]; then
  (cd "$here" && cargo build --release --quiet)
  bin="$here/target/x86_64-unknown-linux-gnu/release/appliance"
fi
[ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
file -L "$bin" | grep -q "static" || { echo "build.sh: $bin is not statically linked" >&2; exit 1; }
[ -n "$version" ] || version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$here" log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
export SOURCE_DATE_EPOCH
modroot=${MODULES_ROOT:-/}
kver=${KVER:-$(ls "$modroot/lib/modules" | sort -V | tail -1)}
vmlinuz=${KERNEL:-/boot/vmlinuz-$kver}
sdboot=${SDBOOT_DIR:-/usr/lib/systemd/boot/efi}
gptmbr=${SYSLINUX_MBR:-/usr/lib/syslinux/mbr/gptmbr.bin}
[ -r "$vmlinuz" ] || { echo "build.sh: no kernel $vmlinuz" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/appliance-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# Everything random is derived from the inputs: sha256("$seed:$name").
stripped=$work/appliance
objcopy --strip-debug "$bin" "$stripped"
seed=$(cat "$stripped" <(printf '%s' "$version $kver") | sha256sum | cut -c1-64)
derive() { printf '%s' "$seed:$1" | sha256sum | cut -c1-64; }
uuid() { local h; h=$(derive "$1"); echo "${h:0:8}-${h:8:4}-4${h:13:3}-a${h:17:3}-${h:20:12}"; }
touch_all() { find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; }

# ---- root filesystem (erofs) + dm-verity
root=$work/root
mkdir -p "$root"/{usr/bin,etc,dev,proc,sys,run,tmp,state}
install -m 0755 "$stripped" "$root/usr/bin/appliance"
cat > "$root/etc/os-release" <<EOF
NAME="appliance"
ID=appliance
VERSION_ID=$version
PRETTY_NAME="appliance $version (kernel $kver)"
EOF
# ---- initramfs: the same binary as /init, and the modules in dependency order
initrd=$work/initrd
mkdir -p "$initrd/lib/modules"
install -m 0755 "$stripped" "$initrd/init"
modules=(virtio_pci virtio_blk virtio_net virtio_scsi ata_piix ahci sd_mod sr_mod isofs vfat nls_ascii
         nls_cp437 nls_utf8 erofs dm_verity ext4 tun e1000 efivarfs button evdev loop
         nf_tables nft_chain_nat nft_masq nfs nfsv3 nfsv4 overlay)
: > "$initrd/lib/modules/load.list"
for m in "${modules[@]}"; do
  modprobe -d "$modroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  # Stored uncompressed: finit_module gets plain ELF on every kernel.
  rel=${ko#"${modroot%/}"}
  plain=${rel%.xz}; plain=${plain%.zst}
  mkdir -p "$initrd$(dirname "$plain")"
  case "$ko" in
    *.xz) xz -dc "$ko" > "$initrd$plain" ;;
    *.zst) zstd -qdc "$ko" > "$initrd$plain" ;;
    *) cp "$ko" "$initrd$plain" ;;
  esac
  echo "$plain" >> "$initrd/lib/modules/load.list"
done
touch_all "$initrd"
(cd "$initrd" && find . -print0 | sort -z | cpio --quiet --null --reproducible -o -H newc -R 0:0) \
  | zstd -q -T1 -12 > "$work/initrd.img"

cmdline_for() { echo "console=ttyS0,115200 appliance.slot=$1 appliance.verity=$2 panic=10${extra:+ $extra}"; }

# ---- unified kernel image (systemd-boot Type #2 entry), PE timestamp and checksum pinned
stub=$sdboot/linuxx64.efi.stub
make_uki() { # slot roothash output
  cmdline_for "$1" "$2" > "$work/cmdline-$1"
  sed "s/^PRETTY_NAME=.*/PRETTY_NAME=\"appliance $version slot $1\"/" "$root/etc/os-release" > "$work/osrel-$1"
  objcopy \
    --add-section .osrel="$work/osrel-$1" --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$work/cmdline-$1" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$vmlinuz" --change-section-vma .linux=0x2000000 \
    --add-section .initrd="$work/initrd.img" --change-section-vma .initrd=0x3000000 \
    "$stub" "$3"
  python3 - "$3" "$SOURCE_DATE_EPOCH" <<'EOF'
import struct, sys
path, epoch = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    b = bytearray(f.read())
    pe = struct.unpack_from("<I", b, 0x3c)[0]
    assert b[pe:pe + 4] == b"PE\0\0", "not a PE file"
    struct.pack_into("<I", b, pe + 8, epoch)        # COFF TimeDateStamp
    struct.pack_into("<I", b, pe + 24 + 64, 0)      # optional header CheckSum
    f.seek(0); f.write(b)
EOF
}
# The root vouches for the boot files (boot/manifest, read by `appliance image install`): their
# sha256, each UKI's with a placeholder for the root hash its command line names (the root hash
# is known only once the root is made), and the command lines the stanzas are built from.
placeholder=0000000000000000000000000000000000000000000000000000000000000000
make_uki A "$placeholder" "$work/uki-A.in"
make_uki B "$placeholder" "$work/uki-B.in"
mkdir -p "$root/boot"
{
  echo "vmlinuz $(sha256sum < "$vmlinuz" | cut -c1-64)"
  echo "initrd $(sha256sum < "$work/initrd.img" | cut -c1-64)"
  for s in A B; do echo "uki-$s $(sha256sum < "$work/uki-$s.in" | cut -c1-64)"; done
  for s in A B; do echo "cmdline-$s $(cmdline_for "$s" "$placeholder")"; done
} > "$root/boot/manifest"

touch_all "$root"
mkfs.erofs --quiet -zlz4hc -T "$SOURCE_DATE_EPOCH" -U "$(uuid erofs)" --all-root "$work/root.erofs" "$root"
veritysetup format "$work/root.erofs" "$work/verity.img" \
  --salt="$(derive verity-salt)" --uuid="$(uuid verity)" --root-hash-file="$work/roothash" >/dev/null
roothash=$(cat "$work/roothash")

# The UKIs that boot: the placeheld ones with the root hash put in (same length, same layout).
for s in A B; do
  python3 - "$work/uki-$s.in" "$work/appliance-$s.efi" "$placeholder" "$roothash" <<'EOF'
import sys
src, dst, ph, h = sys.argv[1:]
b = open(src, "rb").read()
old, new = ("appliance.verity=" + ph).encode(), ("appliance.verity=" + h).encode()
assert len(old) == len(new) and b.count(old) == 1, "one placeholder in the UKI"
open(dst, "wb").write(b.replace(old, new))
EOF
done

# ---- ESP: systemd-boot (UEFI) and syslinux (BIOS)
mib=$((1024 * 1024))
esp_mib=128; root_mib=64; verity_mib=8; state_mib=64
esp_start=2048  # sectors
esp_img=$work/esp.img
truncate -s $((esp_mib * mib)) "$esp_img"
mkfs.vfat -F 32 -n ESP -i "$(derive esp-volid | cut -c1-8)" --invariant -h "$esp_start" "$esp_img" >/dev/null
esp=$work/esp
mkdir -p "$esp/EFI/BOOT" "$esp/EFI/systemd" "$esp/EFI/Linux" "$esp/loader" "$esp/syslinux" "$esp/A" "$esp/slots"
cp "$sdboot/systemd-bootx64.efi" "$esp/EFI/BOOT/BOOTX64.EFI"
cp "$sdboot/systemd-bootx64.efi" "$esp/EFI/systemd/systemd-bootx64.efi"
cp "$work/appliance-A.efi" "$esp/EFI/Linux/appliance-A.efi"
printf 'timeout 0\ndefault appliance-A.efi\nconsole-mode keep\n' > "$esp/loader/loader.conf"
cp "$vmlinuz" "$esp/A/vmlinuz"
cp "$work/initrd.img" "$esp/A/initrd"
# slots/: what `appliance image install` takes from this image for either slot of a running
# machine (this image's root is always in its slot A; the entries differ in the slot they name).
# Slot A's UKI is the one in EFI/Linux; slot B's waits in slots/.
cp "$work/appliance-B.efi" "$esp/slots/appliance-B.efi"
for s in A B; do
  printf 'LABEL %s\n  LINUX /%s/vmlinuz\n  INITRD /%s/initrd\n  APPEND %s\n' \
    "$s" "$s" "$s" "$(cmdline_for "$s" "$roothash")" > "$esp/slots/syslinux-$s.cfg"
done
{ printf 'SERIAL 0 115200\nPROMPT 0\nTIMEOUT 1\nDEFAULT A\n'; cat "$esp/slots/syslinux-A.cfg"; } > "$esp/syslinux/syslinux.cfg"
touch_all "$esp"
# mtools stamps new directories with the current time unless SOURCE_DATE_EPOCH says otherwise.
export MTOOLS_SKIP_CHECK=1
(cd "$esp" && find . -mindepth 1 -type d | sort | while read -r d; do mmd -i "$esp_img" "::${d#./}"; done)
(cd "$esp" && find . -type f | sort | while read -r f; do mcopy -m -i "$esp_img" "$f" "::${f#./}"; done)
syslinux --install --directory /syslinux "$esp_img"

# ---- state (ext4), empty: init creates what it needs
state_img=$work/state.img
truncate -s $((state_mib * mib)) "$state_img"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -L state -U "$(uuid state-fs)" \
  -E "root_owner=0:0,hash_seed=$(uuid state-hash)" -T default "$state_img"

# ---- the disk
sectors() { echo $(($1 * mib / 512)); }
p1=$esp_start;                      s1=$(sectors $esp_mib)
p2=$((p1 + s1));                    s2=$(sectors $root_mib)
p3=$((p2 + s2));                    s3=$(sectors $verity_mib)
p4=$((p3 + s3));                    s4=$s2
p5=$((p4 + s4));                    s5=$s3
p6=$((p5 + s5));                    s6=$(sectors $state_mib)
total=$(( (p6 + s6 + 2048) * 512 ))
raw=$work/appliance.raw
truncate -s "$total" "$raw"
esp_type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
root_type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709     # root, x86-64 (discoverable partitions)
verity_type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5   # root verity, x86-64
linux_type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
sfdisk --quiet --no-reread --no-tell-kernel "$raw" <<EOF
label: gpt
label-id: $(uuid disk)
first-lba: 2048
start=$p1, size=$s1, type=$esp_type, uuid=$(uuid part-esp), name="esp", attrs="LegacyBIOSBootable"
start=$p2, size=$s2, type=$root_type, uuid=$(uuid part-rootA), name="rootA"
start=$p3, size=$s3, type=$verity_type, uuid=$(uuid part-verityA), name="verityA"
start=$p4, size=$s4, type=$root_type, uuid=$(uuid part-rootB), name="rootB"
start=$p5, size=$s5, type=$verity_type, uuid=$(uuid part-verityB), name="verityB"
start=$p6, size=$s6, type=$linux_type, uuid=$(uuid part-state), name="state"
EOF
[ "$(stat -c %s "$work/root.erofs")" -le $((s2 * 512)) ] || { echo "build.sh: root filesystem does not fit its ${root_mib} MiB slot" >&2; exit 1; }
put() { dd if="$1" of="$raw" bs=512 seek="$2" conv=notrunc,sparse status=none; }
put "$esp_img" $p1
put "$work/root.erofs" $p2
put "$work/verity.img" $p3
put "$state_img" $p6
dd if="$gptmbr" of="$raw" bs=440 count=1 conv=notrunc status=none

# ---- outputs
cp --sparse=always "$raw" "$out/appliance.raw"
rm -f "$out/appliance.qcow2"
qemu-img convert -q -c -m 1 -f raw -O qcow2 -o preallocation=off "$raw" "$out/appliance.qcow2"
qemu-img resize -q "$out/appliance.qcow2" 10G
# The update artifact: what `appliance image install http://…/appliance.raw.gz` fetches.
gzip -n -c "$raw" > "$out/appliance.raw.gz"
cp "$work/appliance-A.efi" "$out/appliance-A.efi"
cp "$vmlinuz" "$out/vmlinuz"
cp "$work/initrd.img" "$out/initrd"
cp "$work/root.erofs" "$out/root-A.erofs"
cp "$work/verity.img" "$out/verity-A.img"
echo "$roothash" > "$out/root-hash-A"
(cd "$out" && sha256sum appliance.raw appliance.raw.gz appliance.qcow2 appliance-A.efi root-A.erofs verity-A.img > SHA256SUMS \
  && md5sum appliance.qcow2 > MD5SUMS)
echo "built $out/appliance.raw ($((total / mib)) MiB) and appliance.qcow2 ($(($(stat -c %s "$out/appliance.qcow2") / 1024)) KiB, 10 GiB virtual)"
echo "root hash (slot A): $roothash"
echo "kernel $kver, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"

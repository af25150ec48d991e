# The bootable image from nixpkgs: the same images/build.sh, fed Nix store paths instead of
# Debian packages (APPLIANCE_NO_APT=1 and the KERNEL / MODULES_ROOT / SDBOOT_DIR /
# SYSLINUX_MBR overrides). Output: appliance.raw, appliance.qcow2 (10 GiB virtual), the slot-A
# boot files, SHA256SUMS and MD5SUMS.
{ lib, stdenvNoCC, appliance, src, linuxPackages, systemd, syslinux, erofs-utils, cryptsetup
, mtools, dosfstools, e2fsprogs, util-linux, zstd, xz, cpio, kmod, qemu-utils, binutils
, python3, file, coreutils, findutils, gawk, gnused, gnugrep }:

let
  kernel = linuxPackages.kernel;
  kver = kernel.modDirVersion;
in
stdenvNoCC.mkDerivation {
  pname = "appliance-image";
  inherit (appliance) version;
  inherit src;

  nativeBuildInputs = [
    erofs-utils cryptsetup mtools dosfstools e2fsprogs util-linux zstd xz cpio kmod
    qemu-utils binutils python3 file coreutils findutils gawk gnused gnugrep syslinux
  ];

  dontConfigure = true;
  buildPhase = ''
    runHook preBuild
    export APPLIANCE_NO_APT=1
    export KVER=${kver}
    export KERNEL=${kernel}/bzImage
    export MODULES_ROOT=${kernel.modules or kernel}
    export SDBOOT_DIR=${systemd}/lib/systemd/boot/efi
    export SYSLINUX_MBR=${syslinux}/share/syslinux/gptmbr.bin
    export SOURCE_DATE_EPOCH=''${SOURCE_DATE_EPOCH:-1}
    bash images/build.sh --bin ${appliance}/bin/appliance --out "$out" --version ${appliance.version}
    runHook postBuild
  '';
  dontInstall = true;
  dontFixup = true;

  meta = {
    description = "Bootable immutable appliance image (BIOS and UEFI, erofs + dm-verity, A/B slots)";
    platforms = [ "x86_64-linux" ];
  };
}

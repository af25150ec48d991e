# The appliance binary, statically linked like the Debian build: glibc with crt-static, the
# target pinned by the repository's .cargo/config.toml.
{ lib, rustPlatform, glibc, file, src }:

rustPlatform.buildRustPackage {
  pname = "appliance";
  version = (lib.importTOML (src + "/Cargo.toml")).package.version;
  inherit src;
  cargoLock.lockFile = src + "/Cargo.lock";

  buildInputs = [ glibc.static ];
  nativeBuildInputs = [ file ];

  # The test suite needs root, network namespaces and qemu: it runs in the project's CI.
  doCheck = false;

  postInstall = ''
    file "$out/bin/appliance" | grep -q static || { echo "appliance is not statically linked" >&2; exit 1; }
  '';

  meta = {
    description = "Extends a research site's network into a public cloud: userspace WireGuard over N links, kernel ECMP, embedded iBGP";
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
    mainProgram = "appliance";
  };
}

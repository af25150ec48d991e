{
  description = "appliance: extend a research site's network into a public cloud (static binary, bootable image, NixOS module)";

  # The flake lives in nix/ and builds the repository around it:
  #   nix build 'git+file:..?dir=nix#appliance'     (or: cd nix && nix build .#appliance)
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      appliance = pkgs.callPackage ./package.nix { src = ../.; };
    in
    {
      packages.${system} = {
        inherit appliance;
        default = appliance;
        # The same disk image images/build.sh makes on Debian, from nixpkgs inputs.
        image = pkgs.callPackage ./image.nix { inherit appliance; src = ../.; };
      };

      # For sites that run NixOS hosts instead of the image: `appliance run` as a service.
      nixosModules.default = import ./module.nix;
      nixosModules.appliance = import ./module.nix;

      overlays.default = final: prev: {
        appliance = final.callPackage ./package.nix { src = ../.; };
      };

      checks.${system}.module = (nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          self.nixosModules.default
          {
            boot.isContainer = true;
            system.stateVersion = "25.05";
            services.appliance = {
              enable = true;
              package = appliance;
              configFile = ../config.kdl.example;
              node = "gw1";
            };
          }
        ];
      }).config.system.build.toplevel;
    };
}

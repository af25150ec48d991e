# A CI check that needs no nixpkgs (it cannot be fetched on the build machines): evaluate the
# NixOS module against a small stub of nixpkgs' lib and return the service's command line.
#   nix-instantiate --eval --strict nix/check.nix
let
  lib = {
    mkEnableOption = description: { _type = "option"; inherit description; };
    mkOption = o: o // { _type = "option"; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    escapeShellArg = s: "'" + s + "'";
    types = { package = "package"; path = "path"; str = "str"; };
  };
  pkgs = {
    coreutils = "/nix/store/coreutils";
    runCommand = name: attrs: script: { inherit name script; };
  };
  settings = {
    enable = true;
    package = "/nix/store/appliance";
    configFile = "/etc/appliance/site.kdl";
    node = "gw1";
    keyFile = "/var/lib/appliance/private.key";
    logLevel = "info";
  };
  module = import ./module.nix { config.services.appliance = settings; inherit lib pkgs; };
  options = module.options.services.appliance;
  service = module.config.content.systemd.services.appliance;
in
assert builtins.all (o: options ? ${o}) [ "enable" "package" "configFile" "node" "keyFile" "logLevel" ];
assert module.config.condition;
assert service.serviceConfig.Restart == "always";
service.serviceConfig.ExecStart

# NixOS module: run `appliance run` as a service on a NixOS host (the equivalent of the image's
# supervised daemon), with the site file, this host's name and its private key file.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.appliance;
in
{
  options.services.appliance = {
    enable = lib.mkEnableOption "the appliance daemon (WireGuard links, ECMP routes, iBGP)";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The appliance package (the flake's packages.x86_64-linux.appliance).";
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      description = "The site file (KDL) every host of the site reads.";
    };

    node = lib.mkOption {
      type = lib.types.str;
      description = "Which gateway, node or relay of the site file this host is.";
    };

    keyFile = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/appliance/private.key";
      description = "This host's WireGuard private key (mode 0600); created at first start when missing.";
    };

    logLevel = lib.mkOption {
      type = lib.types.str;
      default = "info";
      description = "APPLIANCE_LOG filter (tracing-subscriber syntax).";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];

    # The config is checked when the system is built, with the same parser the daemon uses.
    system.checks = [
      (pkgs.runCommand "appliance-config-check" { } ''
        ${cfg.package}/bin/appliance check -c ${cfg.configFile} && touch $out
      '')
    ];

    boot.kernelModules = [ "tun" ];

    systemd.services.appliance = {
      description = "appliance: site network extension (WireGuard links, ECMP, iBGP)";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      environment.APPLIANCE_LOG = cfg.logLevel;
      preStart = ''
        if [ ! -e ${lib.escapeShellArg cfg.keyFile} ]; then
          install -d -m 0700 "$(dirname ${lib.escapeShellArg cfg.keyFile})"
          (umask 077; ${cfg.package}/bin/appliance genkey > ${lib.escapeShellArg cfg.keyFile})
          echo "generated a private key; public key: $(${cfg.package}/bin/appliance pubkey < ${lib.escapeShellArg cfg.keyFile})"
        fi
      '';
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/appliance run -c ${cfg.configFile} --node ${lib.escapeShellArg cfg.node} --key-file ${lib.escapeShellArg cfg.keyFile}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "always";
        RestartSec = 1;
        StateDirectory = "appliance";
        RuntimeDirectory = "appliance";
        AmbientCapabilities = [ "CAP_NET_ADMIN" "CAP_NET_BIND_SERVICE" "CAP_NET_RAW" ];
      };
    };
  };
}

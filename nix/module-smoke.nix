# Smoke evaluation of nixos-module/default.nix for the CI checks, where nixpkgs is not available:
# the module function is called with small stand-ins for nixpkgs' `lib`, `pkgs` and `utils`
# (only the functions the module calls, with the same meaning) and with option values built
# like the module system would build them (typed defaults < module definitions < the
# configuration). This executes the module's own expressions (names, arities, the unit and
# assertions it computes) but not nixpkgs' module system or option types: those are covered by
# the VM test on a machine with nixpkgs. Output (JSON) is read by tests/nix_module.rs.
let
  s = import ../nixos-module/settings.nix;
  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";

  hasPrefix = prefix: str: builtins.substring 0 (builtins.stringLength prefix) str == prefix;
  splitString = sep: str: builtins.filter builtins.isString (builtins.split (escapeRegex sep) str);
  escapeRegex = str: builtins.replaceStrings [ "." "[" "]" "(" ")" "*" "+" "?" "^" "$" "|" "{" "}" "\\" ] [ "\\." "\\[" "\\]" "\\(" "\\)" "\\*" "\\+" "\\?" "\\^" "\\$" "\\|" "\\{" "\\}" "\\\\" ] str;
  escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  foldl' = builtins.foldl';
  recursiveUpdate = left: right:
    left // builtins.mapAttrs
      (key: value:
        if builtins.isAttrs value && builtins.hasAttr key left && builtins.isAttrs left.${key}
        && !(value ? _type) && !(left.${key} ? _type)
        then recursiveUpdate left.${key} value
        else value)
      right;

  lib = {
    inherit hasPrefix splitString escapeShellArg foldl' recursiveUpdate;
    setAttrByPath = s.setPath;
    concatStringsSep = builtins.concatStringsSep;
    concatMap = builtins.concatMap;
    length = builtins.length;
    attrNames = builtins.attrNames;
    attrValues = builtins.attrValues;
    mapAttrs = builtins.mapAttrs;
    toInt = str: builtins.fromJSON str;
    last = list: builtins.elemAt list (builtins.length list - 1);
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: attrs: builtins.listToAttrs (map (n: f n attrs.${n}) (builtins.attrNames attrs));
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: { _type = "option"; default = false; description = "Whether to enable ${name}."; };
    mkPackageOption = _pkgs: name: _extra: { _type = "option"; defaultText = "pkgs.${name}"; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
    mkForce = content: { _type = "override"; priority = 50; inherit content; };
    types = {
      str = "str";
      bool = "bool";
      listOf = t: { listOf = t; };
      nonEmptyListOf = t: { nonEmptyListOf = t; };
      nullOr = t: { nullOr = t; };
      attrsOf = t: { attrsOf = t; };
      submodule = m: { submodule = m; };
      enum = values: { enum = values; };
      strMatching = regex: { strMatching = regex; };
      ints = {
        between = lo: hi: { between = [ lo hi ]; };
        positive = "positiveInt";
      };
    };
  };

  package = { outPath = storePath "libvirt-volume-provisioner"; meta.mainProgram = "libvirt-volume-provisioner"; };
  pkgs = {
    formats.toml = _: {
      type = "toml value";
      generate = name: _value: storePath name;
    };
    coreutils = storePath "coreutils";
    util-linux = storePath "util-linux";
  };
  # Only "/" → "-" (systemd's \x2d escaping of "-" and other characters is not reproduced).
  utils.escapeSystemdPath = path:
    builtins.replaceStrings [ "/" ] [ "-" ] (builtins.substring 1 (builtins.stringLength path - 1) path);

  # Option values as the module system would produce them from `configuration`.
  optionValues = configuration: {
    enable = false;
    inherit package;
    openFirewall = false;
    environmentFile = null;
  } // builtins.removeAttrs configuration [ "lvm" "libvirt" "tls" "s3" "auth" "otlp" "settings" ] // {
    lvm = { volumeGroups = { }; extraDeviceAllow = [ ]; } // (configuration.lvm or { });
    libvirt = { definePool = false; } // (configuration.libvirt or { });
    tls = { certFile = null; keyFile = null; clientCaFile = null; } // (configuration.tls or { });
    s3 = { secretKeyFile = null; caFile = null; } // (configuration.s3 or { });
    auth = { tokensFile = null; } // (configuration.auth or { });
    otlp = { caFile = null; endpoint = null; serviceName = null; } // (configuration.otlp or { });
    settings = s.render configuration;
  };

  # `host`: whether the rest of the host's configuration enables libvirtd.
  evaluateOn = host: configuration:
    let
      cfg = optionValues configuration;
      module = import ../nixos-module/default.nix {
        inherit lib pkgs utils;
        config = {
          services.libvirt-volume-provisioner = cfg;
          services.lvm = { enable = true; package = storePath "lvm2"; };
          virtualisation.libvirtd = { enable = host.libvirtd; package = storePath "libvirt"; };
        };
      };
      body = module.config.content;
      services = body.systemd.services;
      unit = services.libvirt-volume-provisioner;
      # Unwraps mkDefault/mkIf values of serviceConfig the way the module system would.
      plain = v:
        if builtins.isAttrs v && v ? _type && v._type == "override" then plain v.content
        else if builtins.isAttrs v && v ? _type && v._type == "if" then (if v.condition then plain v.content else null)
        else v;
    in
    {
      optionNames = builtins.attrNames module.options.services.libvirt-volume-provisioner;
      enabledGuard = module.config._type;
      assertions = body.assertions;
      warnings = body.warnings;
      etc = builtins.attrNames body.environment.etc;
      firewallPorts = plain body.networking.firewall.allowedTCPPorts;
      kernelModules = plain body.boot.kernelModules;
      tmpfiles = body.systemd.tmpfiles.settings."10-libvirt-volume-provisioner";
      units = builtins.attrNames services;
      daemon = {
        inherit (unit) wantedBy wants requires after reloadTriggers path;
        serviceConfig = builtins.mapAttrs (_: plain) unit.serviceConfig;
      };
      volumeGroupUnits = builtins.mapAttrs
        (_: u: {
          inherit (u) requires after before script;
          serviceConfig = builtins.mapAttrs (_: plain) u.serviceConfig;
        })
        (builtins.removeAttrs services [ "libvirt-volume-provisioner" "libvirt-volume-provisioner-pool" ]);
      poolUnit =
        if services ? libvirt-volume-provisioner-pool then
          let u = services.libvirt-volume-provisioner-pool;
          in { inherit (u) requires after before path script; serviceConfig = builtins.mapAttrs (_: plain) u.serviceConfig; }
        else null;
    };
  evaluate = evaluateOn { libvirtd = false; };
in
{
  example = evaluate (import ../nixos-module/example.nix);
  # Secret options pointing into the Nix store, and a secret in settings: assertions must fail.
  storeSecrets = evaluate {
    enable = true;
    tls.keyFile = storePath "server.key";
    settings.s3.secret_key = "in-the-store";
    settings.tls.cert_file = storePath "server.crt";
  };
  # Directory backend, no volume groups: no capability, no device.
  directory = evaluate {
    enable = true;
    settings = {
      server.listen = "127.0.0.1:8080";
      volumes.backend = "directory";
      volumes.directory.path = "/srv/volumes";
    };
  };
  # The libvirt pool declared by the module, over the first of two volume groups.
  definePool = evaluateOn { libvirtd = true; } {
    enable = true;
    libvirt.definePool = true;
    lvm.volumeGroups = {
      vg_b.devices = [ "/dev/vdc" ];
      vg_a.devices = [ "/dev/vdb" ];
    };
    settings.libvirt.pool = "vms pool";
  };
  # The pool unit whose script the libvirt VM test runs against a real libvirtd
  # (tests/libvirt_vm.rs, through scripts/vm-test.sh): pool and volume group `vmlv`.
  vmTestPool = evaluateOn { libvirtd = true; } {
    enable = true;
    libvirt.definePool = true;
    lvm.volumeGroups.vmlv.devices = [ "/dev/vda" ];
    settings.libvirt.pool = "vmlv";
  };
  # definePool without a pool name, on a host without libvirtd: refused.
  definePoolWithoutPool = evaluate {
    enable = true;
    libvirt.definePool = true;
    lvm.volumeGroups.vg_a.devices = [ "/dev/vdb" ];
  };
  # LVM on a privileged port with the firewall opened, two volume groups.
  privilegedPort = evaluate {
    enable = true;
    openFirewall = true;
    lvm.volumeGroups = {
      vg_fast.devices = [ "/dev/disk/by-id/nvme-a" "/dev/disk/by-id/nvme-b" ];
      vg_slow.devices = [ "/dev/sdb" ];
    };
    settings.server.listen = "[::]:443";
  };
}

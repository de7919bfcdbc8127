# The NixOS module evaluated without nixpkgs, shared by nix/module-smoke.nix and
# nix/vg-script.nix: nixos-module/default.nix is called with small stand-ins for nixpkgs' `lib`,
# `pkgs` and `utils` (only the functions the module calls, with the same meaning) and with option
# values built like the module system would build them (typed defaults < module definitions <
# the configuration). This executes the module's own expressions (names, arities, the units and
# assertions it computes); two pieces of nixpkgs' semantics are reproduced because tests depend
# on them: the string checks of typed settings (`typeErrors`) and how systemd unit options merge
# definitions of different priorities (`mergeUnitOption`, as in nixpkgs'
# nixos/lib/systemd-unit-options.nix). The rest of the module system is covered by the VM test
# on a machine with nixpkgs.
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

  # Priority of a definition (lib.mkOverride; mkDefault is 1000, a plain definition 100) and its
  # value with mkIf/mkOverride unwrapped; null for a mkIf whose condition is false.
  priorityOf = v: if builtins.isAttrs v && v ? _type && v._type == "override" then v.priority else 100;
  plain = v:
    if builtins.isAttrs v && v ? _type && v._type == "override" then plain v.content
    else if builtins.isAttrs v && v ? _type && v._type == "if" then (if v.condition then plain v.content else null)
    else v;

  # nixpkgs' unitOption merge: only the definitions of the highest priority (lowest number)
  # count; if any of them is a list, they are concatenated, otherwise they must be equal. null
  # when nothing is defined.
  mergeUnitOption = definitions:
    let
      defined = builtins.filter (d: plain d != null) definitions;
      top = builtins.foldl' (p: d: if priorityOf d < p then priorityOf d else p) 10000 defined;
      values = map plain (builtins.filter (d: priorityOf d == top) defined);
      toList = v: if builtins.isList v then v else [ v ];
    in
    if values == [ ] then null
    else if builtins.any builtins.isList values then builtins.concatMap toList values
    else if builtins.all (v: v == builtins.head values) values then builtins.head values
    else throw "conflicting definitions: ${builtins.toJSON values}";

  # serviceConfig as systemd gets it from the module's definitions and `extra` (a host's own
  # serviceConfig definitions).
  mergeServiceConfig = module: extra:
    builtins.mapAttrs
      (key: _: mergeUnitOption ((if module ? ${key} then [ module.${key} ] else [ ]) ++ (if extra ? ${key} then [ extra.${key} ] else [ ])))
      (module // extra);

  # The module's own definitions of `settings` (mkMerge/mkIf/mkDefault unwrapped and merged).
  definedSettings = v:
    if builtins.isAttrs v && v ? _type && v._type == "merge" then builtins.foldl' s.deepMerge { } (map definedSettings v.contents)
    else if builtins.isAttrs v && v ? _type then (let p = plain v; in if p == null then { } else definedSettings p)
    else if builtins.isAttrs v then builtins.mapAttrs (_: definedSettings) v
    else v;

  # Whether `value` passes the stand-in type `type` (the checks of nixpkgs' types of that name:
  # strMatching is builtins.match on the whole string).
  typeOk = type: value:
    if type == "str" then builtins.isString value
    else if type == "bool" then builtins.isBool value
    else if type == "positiveInt" then builtins.isInt value && value > 0
    else if type ? strMatching then builtins.isString value && builtins.match type.strMatching value != null
    else if type ? enum then builtins.elem value type.enum
    else if type ? between then builtins.isInt value && value >= builtins.head type.between && value <= builtins.elemAt type.between 1
    else if type ? listOf then builtins.isList value && builtins.all (typeOk type.listOf) value
    else if type ? nullOr then value == null || typeOk type.nullOr value
    else throw "module-eval: no check for the stand-in type ${builtins.toJSON type}";

  evaluate = configuration: evaluateWith configuration { };

  # `extraServiceConfig`: the host's own serviceConfig definitions for the daemon's unit.
  evaluateWith = evaluateOn { libvirtd = false; };

  # The module on a host that enables libvirtd.
  evaluateOnLibvirtHost = configuration: evaluateOn { libvirtd = true; } configuration { };

  # `host.libvirtd`: whether the rest of the host's configuration enables libvirtd.
  evaluateOn = host: configuration: extraServiceConfig:
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
      settingsOptions = module.options.services.libvirt-volume-provisioner.settings.type.submodule.options;
    in
    {
      optionNames = builtins.attrNames module.options.services.libvirt-volume-provisioner;
      # meta.doc would put docs/nixos.md into the NixOS manual build (see the module).
      hasMetaDoc = module ? meta && module.meta ? doc;
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
        serviceConfig = mergeServiceConfig unit.serviceConfig extraServiceConfig;
      };
      # The module's own definitions of settings keys (the default volume group and its devices,
      # credential names, mapped options), and the rendered settings' values that fail the type
      # of their typed option (as the module system would refuse them).
      settings = cfg.settings;
      moduleSettings = definedSettings body.services.libvirt-volume-provisioner.settings;
      typeErrors = map (o: o.path) (builtins.filter
        (o: !(typeOk (s.getPath o.path settingsOptions).type (s.getPath o.path cfg.settings)))
        s.typedSettings);
      volumeGroupUnits = builtins.mapAttrs
        (_: u: {
          inherit (u) requires after before script;
          serviceConfig = builtins.mapAttrs (_: plain) u.serviceConfig;
        })
        (builtins.removeAttrs services [ "libvirt-volume-provisioner" poolUnitName ]);
      # The libvirt pool unit (libvirt.definePool), null without it.
      poolUnit =
        if services ? ${poolUnitName} then
          let u = services.${poolUnitName};
          in {
            inherit (u) requires after before path script;
            serviceConfig = builtins.mapAttrs (_: plain) u.serviceConfig;
          }
        else null;
    };
  poolUnitName = "libvirt-volume-provisioner-pool";
in
{
  inherit evaluate evaluateWith evaluateOnLibvirtHost storePath;
}

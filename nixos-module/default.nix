# NixOS module `services.libvirt-volume-provisioner`: renders the daemon's TOML settings to
# /etc/libvirt-volume-provisioner/config.toml, hands secret files to the unit with LoadCredential
# (never through the Nix store), creates the declared LVM volume groups without ever destroying
# data, optionally defines the libvirt storage pool over the daemon's volume group, and runs the
# daemon in a hardened unit that reloads (SIGHUP) instead of restarting when only the
# configuration changes. Option tables shared with CI live in ./settings.nix.
{ config, lib, pkgs, utils, ... }:

let
  cfg = config.services.libvirt-volume-provisioner;
  data = import ./settings.nix;

  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "libvirt-volume-provisioner.toml" cfg.settings;
  # A stable path: the unit never names the store file, so a settings change alters only the
  # reload trigger below and the daemon is reloaded, not restarted.
  configPath = "/etc/libvirt-volume-provisioner/config.toml";

  inherit (lib) mkOption types;

  settingTypes = {
    str = types.str;
    strList = types.listOf types.str;
    address = types.strMatching ".+:[0-9]+";
    absolutePath = types.strMatching "/.*";
    jobSlots = types.ints.between 1 64;
    queueCapacity = types.ints.between 0 100000;
    positiveInt = types.ints.positive;
    duration = types.strMatching "[0-9]+ ?[a-zA-Z]+( ?[0-9]+ ?[a-zA-Z]+)*";
    backend = types.enum [ "lvm" "directory" ];
    bool = types.bool;
    percent = types.ints.between 1 100;
    lvmName = types.strMatching "[A-Za-z0-9_+.][A-Za-z0-9_+.-]*";
    clientAuth = types.enum [ "required" "optional" ];
    logFormat = types.enum [ "json" "text" ];
  };

  mergeOptions = lib.foldl' lib.recursiveUpdate { };

  typedSettingsOptions = mergeOptions (map
    (o: lib.setAttrByPath o.path (mkOption {
      type = settingTypes.${o.type};
      inherit (o) default description;
    }))
    data.typedSettings);

  credentialOptions = mergeOptions (map
    (c: lib.setAttrByPath c.option (mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/libvirt-volume-provisioner/${c.name}";
      description = ''
        ${c.description}
        An absolute path string outside the Nix store; the unit receives the file with
        `LoadCredential=${c.name}:<path>` and the daemon reads `$CREDENTIALS_DIRECTORY/${c.name}`
        (`settings.${lib.concatStringsSep "." c.setting} = "${c.name}"`). Read once at service
        start: a rotated file needs `systemctl restart`.
      '';
    }))
    data.credentials);

  mappedOptions = mergeOptions (map
    (m: lib.setAttrByPath m.option (mkOption {
      type = types.nullOr types.str;
      default = null;
      inherit (m) description;
    }))
    data.mapped);

  isStorePath = p: lib.hasPrefix "${builtins.storeDir}/" p;
  optionName = path: "services.libvirt-volume-provisioner.${lib.concatStringsSep "." path}";

  volumeGroups = cfg.lvm.volumeGroups;
  vgUnitName = name: "libvirt-volume-provisioner-vg-${name}";
  vgUnits = map (name: "${vgUnitName name}.service") (lib.attrNames volumeGroups);
  vgDevices = lib.concatMap (vg: vg.devices) (lib.attrValues volumeGroups);
  thinPoolsOf = vg: vg.thinPools or { };
  usesThinPools = lib.any (vg: thinPoolsOf vg != { }) (lib.attrValues volumeGroups);
  # The volume-group script's `thin_pools` entries: name|size|chunk size (empty: LVM's default).
  thinPoolSpecs = vg: lib.mapAttrsToList
    (pool: t: "${pool}|${t.size}|${if (t.chunkSize or null) == null then "" else t.chunkSize}")
    (thinPoolsOf vg);
  defaultVolumeGroup = data.defaultVolumeGroup cfg;

  usesLvm = cfg.settings.volumes.backend == "lvm";
  # The directory backend's "volume is open" check reads /proc/<pid>/fd of every process (QEMU
  # runs as another user): listing another user's fd directory needs CAP_DAC_READ_SEARCH, reading
  # its links CAP_SYS_PTRACE (the ptrace access check; ptrace(2) itself stays blocked by the system
  # call filter). Measured on Linux 6.18 (tests/nix_module.rs): with both, the check sees the
  # holder under hidepid=invisible too; with either one alone, or none, it does not.
  directoryCapabilities = [ "CAP_DAC_READ_SEARCH" "CAP_SYS_PTRACE" ];
  usesLibvirtPool = cfg.settings.libvirt.pool != "";
  definesPool = cfg.libvirt.definePool;
  poolUnitName = "libvirt-volume-provisioner-pool";
  poolUnits = lib.optional definesPool "${poolUnitName}.service";
  listenPort = lib.toInt (lib.last (lib.splitString ":" cfg.settings.server.listen));

  # LVM's own writable paths ("-": no error when one does not exist yet).
  lvmWritablePaths = [ "-/etc/lvm" "-/run/lvm" "-/run/lock/lvm" ];
  lvmCapabilities = [ "CAP_SYS_ADMIN" "CAP_IPC_LOCK" "CAP_SYS_NICE" ];
  lvmDeviceAllow = devices: extraAllow:
    [ "/dev/mapper/control rw" "block-device-mapper rw" ] ++ map (dev: "${dev} rw") devices ++ extraAllow;
  # The volume-group units may also read every block device (device groups in /proc/devices,
  # matched as a glob): their check for an existing group of the same name must see all disks.
  allBlockDevicesReadOnly = "block-* r";

  # The daemon's hardening: the LVM sandbox, adapted to the backend in use.
  daemonSandbox = lvmSandbox vgDevices cfg.lvm.extraDeviceAllow // {
    # The LVM privileges only for the lvm backend, what the "volume is open" check needs for the
    # directory backend; a port below 1024 needs CAP_NET_BIND_SERVICE.
    CapabilityBoundingSet = (if usesLvm then lvmCapabilities else directoryCapabilities)
      ++ lib.optional (listenPort < 1024) "CAP_NET_BIND_SERVICE";
    # The directory backend opens no device: only the standard pseudo devices remain.
    DeviceAllow = lib.optionals usesLvm (lvmDeviceAllow vgDevices cfg.lvm.extraDeviceAllow);
    # The job store, the image cache, directory-backend volumes, and LVM's paths.
    ReadWritePaths = lib.optionals usesLvm lvmWritablePaths ++ writableDirs;
    # AF_INET/AF_INET6 for the API, S3 and OTLP; AF_UNIX for virsh (libvirtd's socket) and
    # the journal. No netlink: nothing here configures or monitors the network or udev.
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
  };

  # Directories the daemon writes besides LVM's: the job store, the image cache and, for the
  # directory backend, the volumes.
  writableDirs = lib.unique ([ cfg.settings.storage.data_dir cfg.settings.cache.dir ]
    ++ lib.optional (!usesLvm) cfg.settings.volumes.directory.path
    ++ lib.optional (cfg.settings.volumes.encryption.key_dir != "") cfg.settings.volumes.encryption.key_dir);

  # The sandbox LVM needs, shared by the daemon and the volume-group units. `devices` are the
  # physical volumes the unit may open read-write, `extraAllow` further DeviceAllow= entries.
  lvmSandbox = devices: extraAllow: {
    # LVM refuses to run unprivileged (the Go service's unit failed exactly there), so these units
    # run as root; the capability bounding set is what keeps root small:
    # - CAP_SYS_ADMIN: device-mapper ioctls on /dev/mapper/control (creating, loading, removing
    #   LVs) and the block-device ioctls LVM and qemu-img issue (BLKFLSBUF, BLKRASET, ...);
    # - CAP_IPC_LOCK: LVM mlock()s its memory while devices are suspended (lib/mm/memlock.c),
    #   beyond what RLIMIT_MEMLOCK allows;
    # - CAP_SYS_NICE: LVM raises its priority (setpriority -18) in that same critical section.
    # Not granted: CAP_DAC_OVERRIDE (every file and device involved is owned by root),
    # CAP_MKNOD (udev creates the /dev/mapper nodes), CAP_SYS_MODULE (dm-mod is loaded at boot),
    # CAP_SYS_RAWIO, CAP_SETUID/SETGID, CAP_CHOWN (nothing changes owners).
    CapabilityBoundingSet = lvmCapabilities;
    # No setuid helpers are needed, and no child may gain privileges.
    NoNewPrivileges = true;
    RestrictSUIDSGID = true;
    # The whole file system is read-only for the unit, except what is listed as writable.
    ProtectSystem = "strict";
    # LVM writes metadata backups and archives (/etc/lvm/backup, /etc/lvm/archive) and, when the
    # host uses one, the devices file (/etc/lvm/devices); hints in /run/lvm and its locks in
    # /run/lock/lvm (both created by the lvm2 package's tmpfiles rules; "-": no error if absent).
    ReadWritePaths = lvmWritablePaths;
    # Home directories are none of its business.
    ProtectHome = true;
    # A private /tmp and /var/tmp (qemu-img and LVM need no shared temporary files).
    PrivateTmp = true;
    # PrivateDevices must stay off: the unit needs the real block devices and
    # /dev/mapper/control. Instead the device cgroup allows exactly: the standard pseudo devices
    # (DevicePolicy=closed), /dev/mapper/control, every device-mapper device (the LVs), and the
    # physical volumes of the declared volume groups (plus lvm.extraDeviceAllow). The daemon's
    # LVM commands are narrowed to its group's devices (settings.volumes.lvm.devices), so LVM does
    # not try to open other disks; the volume-group units may read them all (see
    # allBlockDevicesReadOnly).
    DevicePolicy = "closed";
    DeviceAllow = lvmDeviceAllow devices extraAllow;
    # /proc/sys and /sys stay read-only: LVM and libdevmapper only read sysfs (for LVM's default
    # read-ahead "auto", libdevmapper sets nothing).
    ProtectKernelTunables = true;
    # dm-mod is loaded at boot (boot.kernelModules), so no module loading is needed.
    ProtectKernelModules = true;
    # The kernel log, the cgroup tree, the clock and the hostname are never touched.
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    # /proc with hidepid=invisible: other users' processes are hidden from what may not
    # ptrace-read them (the kernel exempts the group 0, so root still lists their ids; their fd
    # directories need CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE, which only the directory backend
    # gets). /proc itself must stay complete (no ProcSubset=pid): LVM reads /proc/devices,
    # /proc/partitions and /proc/self/mountinfo.
    ProtectProc = "invisible";
    # No namespaces, realtime scheduling, personality changes or writable+executable memory are
    # used by the daemon, qemu-img, LVM or virsh.
    RestrictNamespaces = true;
    RestrictRealtime = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    # Only native system calls, limited to what a system service uses; denied calls fail with
    # EPERM instead of killing the process, so a tool can report the error.
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    SystemCallErrorNumber = "EPERM";
    # PrivateIPC stays off on purpose: LVM waits for udev through SysV semaphores that udev's
    # `dmsetup udevcomplete` releases from the host's IPC namespace.
    # Files the unit creates are private to root.
    UMask = "0077";
  };
in
{
  # No meta.doc: the NixOS manual renders every meta.doc file with nixos-render-docs, which
  # refuses docs/nixos.md (headings without ids), and that breaks `nixos-rebuild switch` on any
  # host that builds the manual (the default). docs/nixos.md stays repository documentation; the
  # flake check `nixos-manual` builds the manual of a system with this module.
  options.services.libvirt-volume-provisioner = lib.recursiveUpdate (lib.recursiveUpdate credentialOptions mappedOptions) {
    enable = lib.mkEnableOption "libvirt-volume-provisioner, which provisions libvirt volumes (LVM or directory) from qcow2/raw images over an HTTPS API";

    package = lib.mkPackageOption pkgs "libvirt-volume-provisioner" { };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP port of `settings.server.listen` in the firewall.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/libvirt-volume-provisioner/env";
      description = ''
        An `EnvironmentFile=` for the unit (read by systemd, outside the Nix store), for settings
        given as environment variables, e.g. `LVP_S3__ACCESS_KEY=...` or the Go service's
        `MINIO_ACCESS_KEY_ID=...`. Any key can be set as `LVP_<SECTION>__<KEY>`.
      '';
    };

    lvm.volumeGroups = mkOption {
      type = types.attrsOf (types.submodule {
        options.thinPools = mkOption {
          type = types.attrsOf (types.submodule {
            options.size = mkOption {
              type = types.strMatching "[0-9]+(\\.[0-9]+)?[bBsSkKmMgGtTpPeE]?";
              example = "500G";
              description = "Size of the pool's data (`lvcreate --size` syntax, e.g. `500G`).";
            };
            options.chunkSize = mkOption {
              type = types.nullOr (types.strMatching "[0-9]+[kKmMgG]?");
              default = null;
              example = "128K";
              description = "Chunk size of the pool (`lvcreate --chunksize`); null: LVM's default.";
            };
          });
          default = { };
          example = lib.literalExpression ''{ pool.size = "500G"; }'';
          description = ''
            Thin pools in the group, created by the group's unit when no LV of that name exists
            (never converted, resized or re-chunked; an LV of that name that is not a thin pool,
            or too little free space, fails the unit and the daemon does not start). The first in
            attribute-name order of the group in use is the default for
            `settings.volumes.lvm.thin_pool`: new volumes are then thin LVs, and with
            `settings.volumes.lvm.golden_images` thin snapshots of golden images.
          '';
        };
        options.devices = mkOption {
          type = types.nonEmptyListOf (types.strMatching "/dev/.+");
          example = [ "/dev/disk/by-id/nvme-SAMSUNG_MZQL23T8HCLS-00A07_S64HNE0T512345" ];
          description = ''
            Block devices of the volume group. A oneshot unit ordered before the daemon creates
            the group from them when no group of that name exists on any disk, and only if each
            is readable and carries no signature (file system, partition table, RAID, LVM label
            other than an unused physical volume) and no holder; when the group exists, all of
            its physical volumes must be declared here. Otherwise it fails loudly and the daemon
            does not start. It never wipes anything. The devices are also the physical volumes
            the daemon's unit may open (DeviceAllow) and, for the group in use, the devices its
            LVM commands are narrowed to (`settings.volumes.lvm.devices`).
          '';
        };
      });
      default = { };
      example = lib.literalExpression ''{ vg_vms.devices = [ "/dev/disk/by-id/nvme-..." ]; }'';
      description = ''
        Volume groups the service manages. The first one in attribute-name order is the default
        for `settings.volumes.lvm.volume_group`.
      '';
    };

    images = mkOption {
      type = types.attrsOf (types.submodule {
        options.url = mkOption {
          type = types.str;
          example = "s3://vm-images/ubuntu-24.04.qcow2";
          description = "Where the image comes from, as a request's `image_url` (the same `settings.sources` and `settings.s3` rules).";
        };
        options.checksum = mkOption {
          type = types.str;
          default = "";
          description = "`sha256:<hex>` or `sha512:<hex>` every version must match; empty: none.";
        };
        options.checksumUrl = mkOption {
          type = types.str;
          default = "";
          description = "A checksum manifest listing the image (not with `checksum`); empty: none.";
        };
        options.imageType = mkOption {
          type = types.enum [ "qcow2" "raw" "vmdk" "vhdx" "vpc" "vdi" "auto" ];
          default = "qcow2";
          description = "The format every version must have.";
        };
        options.golden = mkOption {
          type = types.bool;
          default = false;
          description = "Build the golden copy (thin LV, reflinked file) of each version before the name points at it.";
        };
        options.refresh = mkOption {
          type = settingTypes.duration;
          default = "6h";
          description = "How often the source is asked whether the image changed (one conditional request); `0s`: never.";
        };
      });
      default = { };
      example = lib.literalExpression ''{ "ubuntu-24.04" = { url = "s3://vm-images/ubuntu-24.04.qcow2"; golden = true; }; }'';
      description = ''
        Declared images, rendered into the daemon's `[[images]]`: the daemon keeps each one
        cached (pinned, never evicted while declared) and fresh (a new version is fetched,
        verified and, with `golden`, built into its golden copy before the name points at it),
        and requests may name it as `"image": "<name>"`. A change reloads the daemon; a name
        dropped here is unpinned, not deleted from the cache.
      '';
    };

    lvm.extraDeviceAllow = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/dev/md0 rw" "block-blkext rw" ];
      description = ''
        Further `DeviceAllow=` entries for the daemon, e.g. the physical volumes of a volume group
        that is managed outside this module.
      '';
    };

    libvirt.definePool = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Define the libvirt storage pool `settings.libvirt.pool` when libvirt does not have it: a
        oneshot unit ordered after libvirtd (and the volume groups) runs
        `virsh pool-define-as <pool> logical --source-name <vg> --target /dev/<vg>` over the
        daemon's volume group (`settings.volumes.lvm.volume_group`, by default the first of
        `lvm.volumeGroups`), then marks it autostart and starts it. A pool of that name that
        exists is never redefined or changed (the unit only warns when it is not a logical pool
        or not active). Needs the lvm backend and `virtualisation.libvirtd.enable`.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = typedSettingsOptions;
      };
      default = { };
      example = lib.literalExpression ''
        {
          server.listen = "0.0.0.0:8443";
          s3 = { endpoint = "https://minio.example.com:9000"; access_key = "provisioner"; };
          auth.allowed_clients = [ "scheduler.example.com" ];
        }
      '';
      description = ''
        The daemon's settings, rendered to ${configPath} (TOML; section and key names as in
        the daemon's configuration reference). Keys without a typed option here are passed
        through as written; unknown keys make the daemon refuse to start. Secret values do not
        belong here (the Nix store is world-readable): use the `*File` options or
        `environmentFile`.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      (map
        (c:
          let value = data.getPath c.option cfg;
          in {
            assertion = value == null || (lib.hasPrefix "/" value && !isStorePath value);
            message = "${optionName c.option} must be an absolute path outside the Nix store (the store is world-readable), got: ${toString value}";
          })
        data.credentials)
      ++ (map
        (c:
          let value = data.getPath c.setting cfg.settings;
          in {
            assertion = value == null || !isStorePath value;
            message = "${optionName ([ "settings" ] ++ c.setting)} names a file in the Nix store, which is world-readable; use ${optionName c.option} with a path outside the store.";
          })
        data.credentials)
      ++ [
        {
          assertion = (cfg.settings.s3.secret_key or "") == "";
          message = "services.libvirt-volume-provisioner.settings.s3.secret_key would put the secret into the world-readable Nix store; use s3.secretKeyFile or environmentFile.";
        }
        {
          assertion = cfg.environmentFile == null || (lib.hasPrefix "/" cfg.environmentFile && !isStorePath cfg.environmentFile);
          message = "services.libvirt-volume-provisioner.environmentFile must be an absolute path outside the Nix store.";
        }
        {
          assertion = !usesLvm || config.services.lvm.enable;
          message = "services.libvirt-volume-provisioner with settings.volumes.backend = \"lvm\" needs services.lvm.enable.";
        }
        {
          assertion = !definesPool || (usesLibvirtPool && usesLvm && config.virtualisation.libvirtd.enable);
          message = "services.libvirt-volume-provisioner.libvirt.definePool defines a logical pool over the daemon's volume group: it needs settings.libvirt.pool set, settings.volumes.backend = \"lvm\" and virtualisation.libvirtd.enable.";
        }
        {
          assertion = lib.length vgDevices == lib.length (lib.unique vgDevices);
          message = "services.libvirt-volume-provisioner.lvm.volumeGroups: a device is listed in more than one volume group.";
        }
      ]
      ++ lib.mapAttrsToList
        (name: _: {
          assertion = data.validVolumeGroupName name;
          message = "services.libvirt-volume-provisioner.lvm.volumeGroups.${name}: a volume group name here is letters, digits, '_', '.', '-' and does not start with '-' or '.'.";
        })
        volumeGroups;

    warnings =
      lib.optional (usesLvm && volumeGroups != { } && !(volumeGroups ? ${cfg.settings.volumes.lvm.volume_group}))
        "services.libvirt-volume-provisioner: settings.volumes.lvm.volume_group = \"${cfg.settings.volumes.lvm.volume_group}\" is not one of lvm.volumeGroups; its physical volumes must be added to lvm.extraDeviceAllow."
      ++ lib.optional (usesLvm && vgDevices == [ ] && cfg.lvm.extraDeviceAllow == [ ])
        "services.libvirt-volume-provisioner: the lvm backend is selected but no physical volume is allowed to the unit; declare lvm.volumeGroups.<name>.devices or set lvm.extraDeviceAllow."
      ++ lib.optional (usesLibvirtPool && !config.virtualisation.libvirtd.enable)
        "services.libvirt-volume-provisioner: settings.libvirt.pool is set but virtualisation.libvirtd is not enabled on this host.";

    services.libvirt-volume-provisioner.settings = lib.mkMerge [
      (data.credentialSettings cfg)
      (data.mappedSettings cfg)
      (data.imagesSettings cfg)
      (lib.mkIf (defaultVolumeGroup != null) {
        volumes.lvm.volume_group = lib.mkDefault defaultVolumeGroup;
      })
      {
        volumes.lvm.devices = lib.mkDefault (data.volumeGroupDevices cfg cfg.settings.volumes.lvm.volume_group);
        volumes.lvm.thin_pool = lib.mkDefault (data.defaultThinPool cfg cfg.settings.volumes.lvm.volume_group);
      }
    ];

    # LVM's thin pool support (thin_check and friends in lvm.conf, and at boot).
    services.lvm.boot.thin.enable = lib.mkIf usesThinPools (lib.mkDefault true);

    environment.etc."libvirt-volume-provisioner/config.toml".source = configFile;
    # For `libvirt-volume-provisioner --config ... check-config` by operators.
    environment.systemPackages = [ cfg.package ];

    boot.kernelModules = lib.mkIf usesLvm [ "dm_mod" ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ listenPort ];

    systemd.tmpfiles.settings."10-libvirt-volume-provisioner" = lib.genAttrs writableDirs (_: {
      d = { mode = "0700"; user = "root"; group = "root"; };
    });

    systemd.services = lib.mapAttrs'
      (name: vg: lib.nameValuePair (vgUnitName name) {
        description = "Create LVM volume group ${name} for libvirt-volume-provisioner";
        requires = map (dev: "${utils.escapeSystemdPath dev}.device") vg.devices;
        after = map (dev: "${utils.escapeSystemdPath dev}.device") vg.devices;
        before = [ "libvirt-volume-provisioner.service" ];
        # thin-provisioning-tools: LVM runs thin_check when it activates a thin pool.
        path = [ config.services.lvm.package pkgs.util-linux pkgs.coreutils pkgs.thin-provisioning-tools ];
        serviceConfig = {
          # Runs once per boot and stays active, so the daemon's Requires= on it holds.
          Type = "oneshot";
          RemainAfterExit = true;
        } // lvmSandbox vg.devices [ allBlockDevicesReadOnly ] // {
          # Creating a volume group needs no network at all; AF_UNIX is for the journal.
          PrivateNetwork = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
        };
        # The rules (never destroy data, refuse loudly) are in ./volume-group.sh.
        script = ''
          set -euo pipefail
          vg=${lib.escapeShellArg name}
          devices=(${lib.escapeShellArgs vg.devices})
          thin_pools=(${lib.escapeShellArgs (thinPoolSpecs vg)})
        '' + builtins.readFile ./volume-group.sh;
      })
      volumeGroups // lib.optionalAttrs definesPool {
      ${poolUnitName} = {
        description = "Define the libvirt storage pool ${cfg.settings.libvirt.pool} for libvirt-volume-provisioner";
        requires = [ "libvirtd.service" ];
        after = [ "libvirtd.service" ] ++ vgUnits;
        before = [ "libvirt-volume-provisioner.service" ];
        # virsh; grep is on every unit's default PATH.
        path = [ config.virtualisation.libvirtd.package ];
        serviceConfig = {
          # Once per boot; stays active so that the daemon's Wants= on it holds.
          Type = "oneshot";
          RemainAfterExit = true;
          # virsh only talks to libvirtd's socket: no capability, no network (a socket file
          # works across network namespaces), read-only file system.
          CapabilityBoundingSet = "";
          NoNewPrivileges = true;
          PrivateNetwork = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          UMask = "0077";
        };
        # The rules (define only what is missing, never change an existing pool) are in
        # ./libvirt-pool.sh.
        script = ''
          set -euo pipefail
          pool=${lib.escapeShellArg cfg.settings.libvirt.pool}
          vg=${lib.escapeShellArg cfg.settings.volumes.lvm.volume_group}
          virsh=(virsh -c ${lib.escapeShellArg cfg.settings.libvirt.uri})
        '' + builtins.readFile ./libvirt-pool.sh;
      };
    } // {
      libvirt-volume-provisioner = {
        description = "libvirt-volume-provisioner: provisions libvirt volumes from qcow2/raw images";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ lib.optional usesLibvirtPool "libvirtd.service" ++ poolUnits;
        requires = vgUnits;
        after = [ "network-online.target" ] ++ vgUnits ++ lib.optional usesLibvirtPool "libvirtd.service" ++ poolUnits;
        # A settings change rewrites only /etc: switch-to-configuration reloads the unit
        # (ExecReload, SIGHUP) instead of restarting it, so running jobs go on.
        reloadTriggers = [ configFile ];
        # The host's LVM tools (matching its udev rules and lvm.conf) and libvirt client come
        # first; the package's wrapper appends its own qemu-img, LVM and virsh as a fallback.
        path = lib.optional config.services.lvm.enable config.services.lvm.package
          ++ lib.optional config.virtualisation.libvirtd.enable config.virtualisation.libvirtd.package
          # LVM runs thin_check when it activates a thin pool (e.g. a golden image's origin).
          ++ lib.optional usesLvm pkgs.thin-provisioning-tools;
        serviceConfig = {
          Type = "exec";
          ExecStart = "${lib.getExe cfg.package} --config ${configPath} serve";
          # nixos-rebuild repoints /etc/static without an inotify event in
          # /etc/libvirt-volume-provisioner, so the daemon is told explicitly.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = "5s";
          # SIGTERM goes to the daemon only: it cancels its qemu-img children itself, gives running
          # jobs settings.jobs.shutdown_grace (default 30s) and rolls back what they created; what
          # is left after TimeoutStopSec is killed.
          KillMode = "mixed";
          TimeoutStopSec = "2min";
          LoadCredential = data.loadCredentials cfg;
          EnvironmentFile = lib.mkIf (cfg.environmentFile != null) cfg.environmentFile;
          # /var/lib/libvirt-volume-provisioner and /var/cache/libvirt-volume-provisioner, root only.
          StateDirectory = "libvirt-volume-provisioner";
          StateDirectoryMode = "0700";
          CacheDirectory = "libvirt-volume-provisioner";
          CacheDirectoryMode = "0700";
        } // lib.mapAttrs (_: lib.mkDefault) (removeAttrs daemonSandbox [ "DeviceAllow" "ReadWritePaths" ]) // {
          # Not mkDefault: these lists are merged with a host's own entries (systemd options
          # concatenate definitions of equal priority), instead of being replaced by them.
          inherit (daemonSandbox) DeviceAllow ReadWritePaths;
        };
      };
    };
  };
}

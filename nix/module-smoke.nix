# Smoke evaluation of nixos-module/default.nix for the CI checks, where nixpkgs is not available:
# the module evaluated with the stand-ins of nix/module-eval.nix for a few configurations. Output
# (JSON) is read by tests/nix_module.rs.
let
  inherit (import ./module-eval.nix) evaluate evaluateWith evaluateOnLibvirtHost storePath;
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
  definePool = evaluateOnLibvirtHost {
    enable = true;
    libvirt.definePool = true;
    lvm.volumeGroups = {
      vg_b.devices = [ "/dev/vdc" ];
      vg_a.devices = [ "/dev/vdb" ];
    };
    settings.libvirt.pool = "vms pool";
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
  # An invalid volume group name that sorts before a valid one: the assertion must name it, and it
  # must not become the default volume group (whose type would then reject it first).
  invalidFirst = evaluate {
    enable = true;
    lvm.volumeGroups = {
      "-bad".devices = [ "/dev/vdc" ];
      good.devices = [ "/dev/vdb" ];
    };
  };
  # A host adding its own entries to the daemon's unit: the lists are merged with the module's,
  # a scalar replaces the module's mkDefault.
  hostAdditions = evaluateWith (import ../nixos-module/example.nix) {
    DeviceAllow = [ "/dev/md0 rw" ];
    ReadWritePaths = [ "/srv/extra" ];
    ProtectProc = "default";
  };
}

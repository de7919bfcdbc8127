# The example configuration of `services.libvirt-volume-provisioner`, in one place: docs/nixos.md
# shows it, the NixOS VM test (tests/nixos/provisioner.nix) deploys it on its hypervisor node, and
# tests/fixtures/nixos-example.toml is what the module renders from it (checked by
# tests/nix_module.rs through nixos-module/settings.nix). Pure data: no nixpkgs needed.
{
  enable = true;
  openFirewall = true;

  # Secrets are path strings outside the Nix store (here: files a secret manager or, in the VM
  # test, an activation script puts under /run/keys); the unit passes them with LoadCredential.
  tls = {
    certFile = "/run/keys/libvirt-volume-provisioner/server.crt";
    keyFile = "/run/keys/libvirt-volume-provisioner/server.key";
    clientCaFile = "/run/keys/libvirt-volume-provisioner/client-ca.crt";
  };
  s3 = {
    secretKeyFile = "/run/keys/libvirt-volume-provisioner/s3-secret-key";
    caFile = "/run/keys/libvirt-volume-provisioner/s3-ca.crt";
  };

  # An empty disk becomes the volume group `vg_vms` (created only if the disk carries no
  # signature); being the only declared group, it is the one the daemon uses.
  lvm.volumeGroups.vg_vms.devices = [ "/dev/vdb" ];

  settings = {
    server.listen = "0.0.0.0:8443";
    jobs = {
      max_concurrent = 2;
      timeout = "2h";
    };
    cache.max_size_bytes = 4294967296;
    s3 = {
      endpoint = "https://s3:9000";
      access_key = "provisioner";
      bucket = "images";
    };
    auth.allowed_clients = [ "client" ];
    log.level = "info";
  };
}

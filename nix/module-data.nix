# Pure expression for the CI checks (`nix-instantiate --eval --strict --json nix/module-data.nix`,
# no nixpkgs needed): what the NixOS module renders for its example configuration and for a
# configuration that sets every file and mapped option, plus the module's option tables.
# tests/nix_module.rs compares `example` with tests/fixtures/nixos-example.toml, runs the daemon's
# `check-config` on both renderings, and checks the tables against the daemon and docs/nixos.md.
let
  s = import ../nixos-module/settings.nix;
  example = import ../nixos-module/example.nix;

  # Every credential option set to a file named after its credential, every mapped option set,
  # and two volume groups (the first in attribute-name order must become the default).
  everything = builtins.foldl' s.deepMerge { } (
    map (c: s.setPath c.option "/run/keys/libvirt-volume-provisioner/${c.name}") s.credentials
    ++ [
      (s.setPath [ "otlp" "endpoint" ] "https://otel-collector:4317")
      (s.setPath [ "otlp" "serviceName" ] "provisioner-everything")
      { lvm.volumeGroups = { vg_b.devices = [ "/dev/vdc" ]; vg_a.devices = [ "/dev/vdb" ]; }; }
      {
        settings.sources.allowed_hosts = [ "images.example.com" ];
        images = {
          "ubuntu-24.04" = { url = "https://images.example.com/ubuntu-24.04.qcow2"; golden = true; refresh = "6h"; };
          debian-12 = {
            url = "https://images.example.com/debian-12.raw";
            checksumUrl = "https://images.example.com/SHA256SUMS";
            imageType = "raw";
          };
        };
      }
    ]
  );
in
{
  example = s.render example;
  everything = s.render everything;
  exampleLoadCredentials = s.loadCredentials example;
  inherit (s) typedSettings credentials mapped;
}

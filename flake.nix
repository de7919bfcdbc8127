# Flake of libvirt-volume-provisioner: the package, an overlay, the NixOS module, the checks
# (package build with unit tests, NixOS VM test, Nix formatting and dead code), a development
# shell and the formatter, for x86_64-linux and aarch64-linux. One input: nixpkgs (flake.lock).
{
  description = "Provisions libvirt/KVM volumes (LVM or directory) from qcow2/raw images in S3/MinIO over an HTTPS API";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        libvirt-volume-provisioner = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        libvirt-volume-provisioner = pkgs.callPackage ./nix/package.nix { };
        default = libvirt-volume-provisioner;
      });

      # The module, with the package of this flake as the default `package` (the module alone,
      # ./nixos-module, expects pkgs.libvirt-volume-provisioner, e.g. from overlays.default).
      nixosModules.default = { pkgs, ... }: {
        imports = [ ./nixos-module ];
        services.libvirt-volume-provisioner.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;

        nixos-vm = pkgs.testers.runNixOSTest (import ./tests/nixos/provisioner.nix { inherit self pkgs; });

        # The same checks as scripts/check-nix.sh, with the nixpkgs builds of the tools.
        nix-files = pkgs.runCommand "libvirt-volume-provisioner-nix-files"
          {
            nativeBuildInputs = [ pkgs.nixpkgs-fmt pkgs.deadnix ];
            src = lib.fileset.toSource {
              root = ./.;
              fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ./.;
            };
          }
          ''
            cd "$src"
            nixpkgs-fmt --check .
            deadnix --fail -L .
            touch "$out"
          '';
      });

      # The integration tests' S3 server, s3s-fs, was not found in nixpkgs: `cargo install --locked
      # s3s-fs@0.14.1 --features binary` (as .ci/run does).
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.qemu-utils
            pkgs.lvm2
            pkgs.libvirt
            pkgs.curl
            pkgs.openssl
            pkgs.nixpkgs-fmt
            pkgs.deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}

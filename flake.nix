# Flake of libvirt-volume-provisioner: the package, an overlay, the NixOS module, the checks
# (package build with unit tests, NixOS VM test, the NixOS manual of a host with the module, Nix
# formatting and dead code), a development shell and the formatter, for x86_64-linux and
# aarch64-linux. One input: nixpkgs (flake.lock).
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

        # The NixOS manual of a host running the example configuration with the documentation on
        # (the default on a real host; VM test nodes turn the manual off, so nixos-vm cannot see
        # this). The manual renders every module's meta.doc and options with nixos-render-docs: what
        # it refuses fails here instead of in `nixos-rebuild switch`. The host's toplevel .drv is
        # instantiated as well (the whole system evaluates, assertions included), not built.
        nixos-manual =
          let
            host = lib.nixosSystem {
              modules = [
                self.nixosModules.default
                {
                  nixpkgs.hostPlatform = pkgs.stdenv.hostPlatform.system;
                  system.stateVersion = "25.11";
                  boot.loader.grub.enable = false;
                  fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; };
                  documentation.enable = true;
                  documentation.doc.enable = true;
                  documentation.nixos.enable = true;
                  services.libvirt-volume-provisioner = import ./nixos-module/example.nix;
                }
              ];
            };
          in
          pkgs.runCommand "libvirt-volume-provisioner-nixos-manual"
            {
              manual = host.config.system.build.manual.manualHTML;
              toplevel = builtins.unsafeDiscardOutputDependency host.config.system.build.toplevel.drvPath;
            }
            ''
              test -e "$manual/share/doc/nixos/index.html"
              echo "$toplevel" > "$out"
            '';

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

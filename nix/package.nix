# The libvirt-volume-provisioner package: built from Cargo.lock (no vendor hash), unit tests run
# in the build, and the binary wrapped so that qemu-img, the LVM tools and virsh are found.
{ lib
, rustPlatform
, makeWrapper
, qemu-utils
, lvm2
, libvirt
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  # Only what cargo needs: a change to docs, Nix files or CI scripts does not rebuild the package.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      (lib.fileset.difference ../tests ../tests/nixos)
      (lib.fileset.maybeMissing ../benches)
      (lib.fileset.maybeMissing ../examples)
      (lib.fileset.maybeMissing ../build.rs)
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ makeWrapper ];

  # Unit tests only (`--lib --bins`): they need qemu-img and nothing else (no network, no root).
  # The integration tests in tests/ start the daemon against an S3 server (s3s-fs), Prometheus,
  # curl and a QEMU VM with LVM, none of which exist in the build sandbox; they run in CI
  # (.ci/run) and, for the NixOS deployment, in the VM test (tests/nixos/provisioner.nix).
  cargoTestFlags = [ "--lib" "--bins" ];
  nativeCheckInputs = [ qemu-utils ];

  # Appended to PATH, so the host's own tools (the unit's `path`, e.g. the system's LVM matching
  # its udev rules) take precedence and these are the fallback.
  postInstall = ''
    wrapProgram $out/bin/libvirt-volume-provisioner \
      --suffix PATH : ${lib.makeBinPath [ qemu-utils lvm2 libvirt ]}
  '';

  meta = {
    description = cargoToml.package.description;
    license = lib.licenses.asl20;
    mainProgram = "libvirt-volume-provisioner";
    platforms = [ "x86_64-linux" "aarch64-linux" ];
  };
}

# Pure expression for the CI checks: the Python test script of tests/nixos/provisioner.nix with
# its store paths replaced by placeholders, so scripts/check-nix.sh can compile it with python3
# where nixpkgs is not available. The stand-ins below mimic only what the file calls at the top
# level; the nodes' configurations are not evaluated here.
let
  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";
  pkgs = {
    runCommand = name: _attrs: _script: storePath name;
    writeText = name: _text: storePath name;
    openssl = storePath "openssl";
    qemu-utils = storePath "qemu-utils";
    minio-client = storePath "minio-client";
    curl = storePath "curl";
  };
  test = import ../tests/nixos/provisioner.nix {
    inherit pkgs;
    self.nixosModules.default = { };
  };
in
test.testScript {
  nodes.hypervisor.system.build.toplevel = storePath "nixos-system-hypervisor";
}

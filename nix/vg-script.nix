# The script of the volume-group unit, exactly as the NixOS module renders it, for a volume group
# `name` on `devices` with `thinPools` (nix-instantiate --eval --argstr name vg --arg devices
# '[ "/dev/loop0" ]' [--arg thinPools '{ pool = { size = "1G"; chunkSize = "128K"; }; }']).
# tests/nix_module.rs runs it for real against loop devices, tests/thin_vm.rs inside the test VM.
{ name, devices, thinPools ? { } }:
let
  inherit (import ./module-eval.nix) evaluate;
  evaluated = evaluate {
    enable = true;
    lvm.volumeGroups.${name} = { inherit devices thinPools; };
  };
in
evaluated.volumeGroupUnits."libvirt-volume-provisioner-vg-${name}".script

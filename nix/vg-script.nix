# The script of the volume-group unit, exactly as the NixOS module renders it, for a volume group
# `name` on `devices` (nix-instantiate --eval --argstr name vg --arg devices '[ "/dev/loop0" ]').
# tests/nix_module.rs runs it for real against loop devices.
{ name, devices }:
let
  inherit (import ./module-eval.nix) evaluate;
  evaluated = evaluate {
    enable = true;
    lvm.volumeGroups.${name}.devices = devices;
  };
in
evaluated.volumeGroupUnits."libvirt-volume-provisioner-vg-${name}".script

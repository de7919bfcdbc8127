# The script of the libvirt pool unit (libvirt.definePool), exactly as the NixOS module renders
# it, for pool `pool` over volume group `vg` (nix-instantiate --eval --argstr pool vmlv --argstr vg
# vmlv). The libvirt VM test runs it against a real libvirtd (scripts/vm-test.sh extracts it).
{ pool, vg }:
let
  inherit (import ./module-eval.nix) evaluateOnLibvirtHost;
  evaluated = evaluateOnLibvirtHost {
    enable = true;
    libvirt.definePool = true;
    lvm.volumeGroups.${vg}.devices = [ "/dev/vda" ];
    settings.libvirt.pool = pool;
  };
in
evaluated.poolUnit.script

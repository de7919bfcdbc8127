# Body of libvirt-volume-provisioner-pool.service (nixos-module/default.nix puts `set -euo
# pipefail`, `pool=<settings.libvirt.pool>`, `vg=<settings.volumes.lvm.volume_group>` and
# `virsh=(virsh -c <settings.libvirt.uri>)` in front of it). It defines, autostarts and starts
# the logical pool "$pool" over the volume group "$vg" when libvirt has no pool of that name, and
# never changes a pool that exists (it only warns about one that is not logical or not running).
# Run against a real libvirtd by the libvirt VM test (tests/libvirt_vm.rs).
# Commands: virsh (the unit's `path`), bash builtins, grep.

if info=$("${virsh[@]}" pool-info "$pool" 2>/dev/null); then
  echo "libvirt pool $pool exists; it is not redefined"
  # Output is captured before grep reads it: grep -q on a pipe fails under pipefail when grep
  # exits at the first match and the writer gets SIGPIPE.
  xml=$("${virsh[@]}" pool-dumpxml "$pool")
  if ! grep -q "<pool type='logical'" <<<"$xml"; then
    echo "warning: libvirt pool $pool is not a logical pool (the daemon writes LVs of volume group $vg)" >&2
  fi
  if ! grep -Eq '^State: +running' <<<"$info"; then
    echo "warning: libvirt pool $pool is not active: the daemon's pool refreshes fail until it is started (virsh pool-start $pool)" >&2
  fi
  exit 0
fi
"${virsh[@]}" pool-define-as "$pool" logical --source-name "$vg" --target "/dev/$vg"
"${virsh[@]}" pool-autostart "$pool"
"${virsh[@]}" pool-start "$pool"
echo "defined, autostarted and started libvirt pool $pool over volume group $vg"

# Body of libvirt-volume-provisioner-vg-<name>.service (nixos-module/default.nix puts `set -euo
# pipefail`, `vg=<name>` and `devices=(<declared devices>)` in front of it). It creates the volume
# group "$vg" from the declared devices when no group of that name exists, and never destroys
# data: it wipes nothing, forces nothing, and refuses loudly (non-zero exit, the daemon does not
# start) whenever it cannot be sure. Tested for real on loop devices by tests/nix_module.rs.
#
# The unit may read every block device and write only the declared ones (DeviceAllow), so the
# survey below sees groups on any disk, while creation is narrowed to the declared devices.
# Commands: bash builtins, coreutils, util-linux and LVM only (the unit's `path`).

# LVM's devices file, if the host uses one (LVM_SYSTEM_DIR as LVM itself reads it).
devicesfile=${LVM_SYSTEM_DIR:-/etc/lvm}/devices/system.devices
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
  printf '%s\n' "$*" >&2
  exit 1
}

# refuse DEVICE-MESSAGE: one reason not to create the group (all are collected, then it fails).
refuse() {
  printf 'refusing to create %s: %s\n' "$vg" "$*" >&2
}

# Device number (major:minor) of a block device, through symlinks such as /dev/disk/by-id/*.
devnum() {
  stat -L -c '%t:%T' -- "$1"
}

trim() {
  local s=$1
  s=${s#"${s%%[![:space:]]*}"}
  printf '%s' "${s%"${s##*[![:space:]]}"}"
}

# --- Survey: every physical volume on the machine, not narrowed to the declared devices and not
# limited by a devices file, so that a group of this name on any other disk is seen.
survey=$(pvs --devicesfile "" --noheadings --separator '|' -o pv_name,vg_name,vg_uuid,pv_in_use) ||
  fail "volume group $vg: cannot list the physical volumes (pvs failed, see above); nothing was written"

declare -A declared=() # device number -> declared path
for dev in "${devices[@]}"; do
  if [ -b "$dev" ]; then
    declared[$(devnum "$dev")]=$dev
  fi
done

members=()             # physical volumes of groups named $vg
declare -A uuids=()    # their group UUIDs
declare -A unused=()   # device number -> 1: a physical volume in no group, not marked in use
while IFS='|' read -r pv owner uuid inuse; do
  pv=$(trim "$pv")
  owner=$(trim "$owner")
  uuid=$(trim "$uuid")
  inuse=$(trim "$inuse")
  [ -n "$pv" ] || continue
  if [ "$owner" = "$vg" ]; then
    members+=("$pv")
    uuids[$uuid]=1
  elif [ -z "$owner" ] && [ -z "$inuse" ] && [ -b "$pv" ]; then
    unused[$(devnum "$pv")]=1
  fi
done <<<"$survey"

# --- The group exists: its physical volumes must all be declared (the daemon's LVM commands see
# only the declared devices), and it must be the only group of that name.
group_exists() {
  if [ "${#uuids[@]}" -gt 1 ]; then
    fail "volume group $vg: ${#uuids[@]} volume groups have this name (UUIDs ${!uuids[*]}; physical volumes ${members[*]}). Refusing to guess which one is meant: rename all but one (vgrename <UUID> <new name>). Nothing was written."
  fi
  local pv stray=() dev
  declare -A member_nums=()
  for pv in "${members[@]}"; do
    if [ -b "$pv" ] && [ -n "${declared[$(devnum "$pv")]:-}" ]; then
      member_nums[$(devnum "$pv")]=1
    else
      stray+=("$pv")
    fi
  done
  if [ "${#stray[@]}" -gt 0 ]; then
    fail "volume group $vg exists, but its physical volumes ${stray[*]} are not among the declared devices (${devices[*]}). Refusing to guess which disks are meant: declare exactly the group's physical volumes in lvm.volumeGroups.$vg.devices, or rename the other group. Nothing was written."
  fi
  for dev in "${devices[@]}"; do
    if [ ! -b "$dev" ] || [ -z "${member_nums[$(devnum "$dev")]:-}" ]; then
      echo "warning: $dev is declared for $vg but is not one of its physical volumes; this unit does not extend groups (vgextend it yourself, or remove it from the declaration)" >&2
    fi
  done
  echo "volume group $vg exists on ${members[*]}; nothing to create"
}

# readable DEVICE OFFSET: reads 1 MiB at OFFSET, so that a device that cannot be read never passes
# as blank.
readable() {
  local n
  n=$(dd if="$1" bs=65536 count=16 skip="$2" iflag=skip_bytes,fullblock status=none | wc -c) &&
    [ "$n" -eq 1048576 ]
}

# blank DEVICE: whether the device holds nothing at all, or only an unused physical volume (left
# by an interrupted creation). Prints each reason to refuse.
blank() {
  local dev=$1 size sigs rc=0 found err line types=() pttype="" children
  if [ ! -b "$dev" ]; then
    refuse "$dev is not a block device"
    return 1
  fi
  if ! size=$(blockdev --getsize64 "$dev"); then
    refuse "cannot open $dev (blockdev failed, see above)"
    return 1
  fi
  if [ "$size" -lt $((4 << 20)) ]; then
    refuse "$dev has $size bytes, too small for a physical volume"
    return 1
  fi
  if ! readable "$dev" 0 || ! readable "$dev" $((size - (1 << 20))); then
    refuse "cannot read the first and last MiB of $dev (see above)"
    return 1
  fi
  # Every signature libblkid knows (file systems, partition tables, RAID, LVM), with offsets.
  # Listing only: --no-act, and neither --all nor --offset.
  if ! sigs=$(wipefs --no-act --noheadings --output TYPE,OFFSET "$dev"); then
    refuse "cannot probe $dev for signatures (wipefs failed, see above)"
    return 1
  fi
  # A second, independent probe. Exit status 2 means "nothing found" only when blkid printed
  # nothing: it is also its status for a device it could not open or read.
  found=$(blkid -p -o export "$dev" 2>"$work/blkid.err") || rc=$?
  err=$(cat "$work/blkid.err")
  case $rc in
    0) ;;
    2)
      if [ -n "$err" ] || [ -n "$found" ]; then
        refuse "blkid could not probe $dev: $err"
        return 1
      fi
      ;;
    8)
      refuse "$dev carries more than one signature (blkid: ambivalent result):"$'\n'"$sigs"
      return 1
      ;;
    *)
      refuse "blkid could not probe $dev (exit $rc): $err"
      return 1
      ;;
  esac
  while IFS= read -r line; do
    [ -n "$line" ] && types+=("${line%% *}")
  done <<<"$sigs"
  while IFS= read -r line; do
    case $line in
      TYPE=*) types+=("${line#TYPE=}") ;;
      PTTYPE=*) pttype=${line#PTTYPE=} ;;
    esac
  done <<<"$found"
  if [ -n "$pttype" ]; then
    refuse "$dev carries a partition table ($pttype):"$'\n'"$sigs"
    return 1
  fi
  if [ "${#types[@]}" -gt 0 ]; then
    local t
    for t in "${types[@]}"; do
      if [ "$t" != LVM2_member ]; then
        refuse "$dev carries data:"$'\n'"$sigs"$'\n'"$found"
        return 1
      fi
    done
    if [ -z "${unused[$(devnum "$dev")]:-}" ]; then
      refuse "$dev is an LVM physical volume of another group, or marked in use:"$'\n'"$found"
      return 1
    fi
    echo "$dev is an unused LVM physical volume (no group, not in use; e.g. left by an interrupted creation): it is used as it is"
  fi
  # Partitions, or device-mapper/RAID devices stacked on it.
  if ! children=$(lsblk --noheadings --output NAME "$dev"); then
    refuse "cannot list the partitions and holders of $dev (lsblk failed, see above)"
    return 1
  fi
  if [ "$(printf '%s\n' "$children" | wc -l)" -gt 1 ]; then
    refuse "$dev has partitions or holders:"$'\n'"$children"
    return 1
  fi
}

# --- The group does not exist: create it with one vgcreate, only if every device is blank.
create_group() {
  local dev refused=0 narrow=()
  for dev in "${devices[@]}"; do
    blank "$dev" || refused=1
  done
  if [ "$refused" -ne 0 ]; then
    fail "volume group $vg was not created and nothing was written. This unit never wipes a device: clear it yourself (wipefs) if it really holds nothing of value."
  fi
  # The host's LVM devices-file policy is kept: when it uses a devices file, vgcreate adds the new
  # physical volumes to it. Otherwise LVM is narrowed to the declared devices (which also keeps it
  # from creating a devices file: that would hide every other volume group from LVM).
  if [ ! -e "$devicesfile" ]; then
    for dev in "${devices[@]}"; do
      narrow+=(--devices "$dev")
    done
  fi
  # One command: blank devices become physical volumes and the group in one go, so an interruption
  # leaves at most unused physical volumes, which the next run accepts.
  vgcreate "${narrow[@]}" "$vg" "${devices[@]}"
  echo "created volume group $vg on ${devices[*]}"
}

if [ "${#members[@]}" -gt 0 ]; then
  group_exists
else
  create_group
fi
# From here on the group exists and consists of declared devices only. Whatever is created in it
# later (thin pools) follows the same rules: never destroy data, refuse loudly when unsure.

#!/bin/bash
# vm-run.sh [-s SHARE_DIR] [-d DISK_SIZE] [-e VAR]... -- CMD [ARGS...]
# Runs CMD (a host path: test binary, script, daemon) inside a throwaway QEMU/TCG VM whose kernel
# HAS device-mapper (the LVM tests need it; the host kernel may not have it).
# The VM sees the host's whole root file system read-only over 9p (so every host binary and
# library works unchanged), SHARE_DIR read-write at the same path, a blank sparse virtio disk as
# /dev/vda, tmpfs on /tmp and /run, and loopback networking only. LVM inside is udev-free through
# LVM_SYSTEM_DIR=/run/lvm-vm; IN_TEST_VM=1 is exported. Returns CMD's exit status (255 when the
# VM died or timed out before CMD finished).
# -e VAR passes the host's VAR into the VM (repeatable).
# Environment: WORK (kernel/initrd cache and disk images, default /tmp/vmrun), VM_MEM (MiB,
# default 2048), VM_CPUS (default 1), VM_TIMEOUT (seconds, default 600), RUST_LOG (passed in).
# Origin: ../shared/tools/vm-run.sh; owned here since (per-run disk, locked cache preparation).
set -euo pipefail
SHARE=$PWD; DISK=2G; PASS_ENV="RUST_LOG RUST_BACKTRACE"
while [ $# -gt 0 ]; do case $1 in -s) SHARE=$(realpath "$2"); shift 2;; -d) DISK=$2; shift 2;; -e) PASS_ENV="$PASS_ENV $2"; shift 2;; --) shift; break;; *) break;; esac; done
[ $# -gt 0 ] || { echo "usage: $0 [-s SHARE_DIR] [-d DISK_SIZE] [-e VAR]... -- CMD [ARGS...]" >&2; exit 2; }
for tool in qemu-system-x86_64 busybox apt-cache apt-get dpkg-deb xz gzip flock; do
  command -v "$tool" >/dev/null || { echo "vm-run.sh: $tool is not installed" >&2; exit 3; }
done
WORK=${WORK:-/tmp/vmrun}; mkdir -p "$WORK"
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); KVER=${KPKG#linux-image-}
[ -n "$KVER" ] || { echo "vm-run.sh: cannot find the kernel package behind linux-image-amd64 (apt-get update?)" >&2; exit 3; }
K=$WORK/k-$KVER
MODULES="virtio_pci virtio-rng virtio_blk virtio_net 9pnet_virtio 9p crc32c_generic dm-mod dm-thin-pool dm-snapshot loop xfs"
# The initramfs name carries the module list, so a changed list never reuses an old image.
INITRD=$WORK/initrd-9p-$KVER-$(echo "$MODULES ctl-from-cmdline" | md5sum | cut -c1-8).gz

# Kernel and initramfs are prepared once per kernel version, under a lock (parallel runs share
# the cache) and published by rename.
exec 9>"$WORK/.prepare.lock"; flock 9
if [ ! -e "$K/vmlinux" ]; then     # kernel: download, unpack, depmod, and decompress bzImage -> ELF (PVH boot skips a slow XZ unpack under TCG)
  T=$(mktemp -d "$WORK/k.XXXXXX")
  (cd "$T" && apt-get download "$KPKG" >/dev/null) || { echo "vm-run.sh: apt-get download $KPKG failed" >&2; rm -rf "$T"; exit 3; }
  dpkg-deb -x "$T"/${KPKG}_*.deb "$T/root"; rm -f "$T"/${KPKG}_*.deb
  busybox depmod -b "$T/root" "$KVER"
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$T/root/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1)
  tail -c +$((off+1)) "$T/root/boot/vmlinuz-$KVER" | xz -dc > "$T/root/vmlinux" 2>/dev/null || true
  [ -s "$T/root/vmlinux" ] || { echo "vm-run.sh: cannot unpack the kernel image" >&2; rm -rf "$T"; exit 3; }
  rm -rf "$K"; mv "$T/root" "$K"; rm -rf "$T"
fi
if [ ! -e "$INITRD" ]; then       # initramfs: static busybox + modules only; everything else comes from the host root
  R=$(mktemp -d); mkdir -p $R/{bin,dev,proc,sys,mnt,hostroot}
  cp "$(command -v busybox)" $R/bin/busybox; for a in $(busybox --list); do [ -e $R/bin/$a ] || ln -s busybox $R/bin/$a; done
  KM=$K/lib/modules/$KVER
  for m in $MODULES; do
    line=$(grep -E "(^|/)$m\.ko(\.xz)?:" $KM/modules.dep)
    for f in ${line%%:*} ${line#*:}; do mkdir -p $R/lib/modules/$KVER/$(dirname $f); cp $KM/$f $R/lib/modules/$KVER/$f; done
  done
  busybox depmod -b $R $KVER
  cat > $R/init <<INIT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODULES; do modprobe \$m; done
INIT
  cat >> $R/init <<'INIT'
O=trans=virtio,version=9p2000.L,msize=512000
# This run's control directory in the share (runs in parallel share one checkout).
V=$(sed -n 's/.*vmrun=\([^ ]*\).*/\1/p' /proc/cmdline)
mount -t 9p -o $O,ro hostroot /hostroot; mount -t 9p -o $O share /mnt
H=/hostroot; for d in proc sys dev; do mount --bind /$d $H/$d; done
mount -t tmpfs -o size=70% tmpfs $H/tmp; mount -t tmpfs tmpfs $H/run
S=$(cat /mnt/$V/sharepath); mkdir -p $H$S; mount --bind /mnt $H$S
mkdir -p $H/run/lvm-vm; cp /mnt/$V/lvm.conf $H/run/lvm-vm/lvm.conf
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
chroot $H /bin/sh -c ". $S/$V/env; cd \"\$VMRUN_CWD\"; \"$S/$V/cmd\"; echo \$? > $S/$V/rc"
sync; poweroff -f
INIT
  chmod +x $R/init; (cd $R && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$INITRD.tmp"; rm -rf $R
  mv "$INITRD.tmp" "$INITRD"
fi
flock -u 9

# per-run control files in the share (named on the kernel command line), and a per-run disk
mkdir -p "$SHARE/.vmrun"; C=$(mktemp -d "$SHARE/.vmrun/run.XXXXXX"); echo "$SHARE" > "$C/sharepath"
DISKIMG=$(mktemp "$WORK/disk.XXXXXX")
trap 'rm -rf "$C" "$DISKIMG"' EXIT
cat > "$C/lvm.conf" <<'CONF'
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 }
backup { backup_dir = "/run/lvm-vm/backup" archive_dir = "/run/lvm-vm/archive" }
CONF
{ printf 'export PATH=%q HOME=%q LVM_SYSTEM_DIR=/run/lvm-vm VMRUN_CWD=%q IN_TEST_VM=1\n' "$PATH" "$HOME" "$PWD"
  for v in $PASS_ENV; do [ -n "${!v:-}" ] && printf 'export %s=%q\n' "$v" "${!v}"; done; true; } > "$C/env"
{ echo '#!/bin/sh'; printf 'exec'; printf ' %q' "$@"; echo; } > "$C/cmd"; chmod +x "$C/cmd"
truncate -s "$DISK" "$DISKIMG"
set +e
timeout ${VM_TIMEOUT:-600} qemu-system-x86_64 -accel tcg -m ${VM_MEM:-2048} -smp ${VM_CPUS:-1} -nographic -no-reboot \
  -kernel "$K/vmlinux" -initrd "$INITRD" -append "console=ttyS0 panic=-1 quiet vmrun=.vmrun/${C##*/}" \
  -device virtio-rng-pci -drive file="$DISKIMG",if=virtio,format=raw,cache=unsafe \
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,romfile= \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$SHARE",mount_tag=share,security_model=none \
  | grep --line-buffered -a -v -E 'SeaBIOS|iPXE|Press Ctrl|Booting from|^\s*$|reboot: Power down'
qemu_rc=${PIPESTATUS[0]}
set -e
if [ "$qemu_rc" = 124 ]; then echo "vm-run.sh: VM timed out after ${VM_TIMEOUT:-600} s" >&2; fi
if [ -e "$C/rc" ]; then exit "$(cat "$C/rc")"; fi
echo "vm-run.sh: the command did not finish inside the VM (qemu exit status $qemu_rc)" >&2
exit 255

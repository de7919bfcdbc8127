#!/bin/bash
# Records real `virsh` output inside the test VM, for the parsing unit tests in
# src/volume/libvirt/: the disks of running domains as `virsh domstats --block --backing
# --list-active` lists them (an LV, a file, a qcow2 overlay on a backing file, an empty CD-ROM, a
# paused and a running domain), and what virsh prints when libvirtd is not running. Run from the
# repository root:
#   tests/vm/vm-run.sh -s "$PWD" -- tests/vm/capture-libvirt-fixtures.sh
# Writes tests/fixtures/libvirt/*. Needs IN_TEST_VM=1 (it formats /dev/vda and starts libvirtd);
# sets libvirt up the way tests/libvirt_vm.rs does.
set -euo pipefail
[ "${IN_TEST_VM:-}" = 1 ] || { echo "run me inside the VM (tests/vm/vm-run.sh)" >&2; exit 2; }
OUT=$PWD/tests/fixtures/libvirt; mkdir -p "$OUT"
export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1
for d in /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
  mkdir -p /run/libvirt-vm$d; cp -a $d/. /run/libvirt-vm$d/; mount --bind /run/libvirt-vm$d $d
done
mount --bind /run/lvm-vm/lvm.conf /etc/lvm/lvm.conf
echo 'namespaces = []' >> /etc/libvirt/qemu.conf
virtlogd -d; libvirtd -d
for i in $(seq 480); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.25; done
V="virsh -c qemu:///system"
pvcreate -q /dev/vda; vgcreate -q -s 8m vgfix /dev/vda
lvcreate -q -y -L 64m -n disk1 vgfix
W=/tmp/fix; mkdir -p $W; chmod 755 $W
truncate -s 64M $W/file1
qemu-img create -q -f raw $W/base.raw 64M
qemu-img create -q -f qcow2 -b $W/base.raw -F raw $W/overlay.qcow2
chmod 644 $W/*
domain() { # name disk-xml
  cat > "$W/$1.xml" <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    $2
    <memballoon model='none'/>
  </devices>
</domain>
XML
  $V define "$W/$1.xml" >/dev/null
}
domain lvdom "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vgfix/disk1'/><target dev='vda' bus='virtio'/></disk>"
domain 'file dom' "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$W/file1'/><target dev='vda' bus='virtio'/></disk><disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"
domain overlaydom "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$W/overlay.qcow2'/><target dev='vda' bus='virtio'/></disk>"
domain stopped "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$W/base.raw'/><target dev='vda' bus='virtio'/><readonly/></disk>"
$V start --paused lvdom >/dev/null
$V start --paused 'file dom' >/dev/null
$V start overlaydom >/dev/null
$V domstats --block --backing --list-active > $OUT/domstats.txt
$V list --all > $OUT/list.txt
$V vol-list --pool default > /dev/null 2>&1 || true
kill "$(cat /run/libvirtd.pid)"; while kill -0 "$(cat /run/libvirtd.pid 2>/dev/null)" 2>/dev/null; do sleep 0.2; done
$V domstats --block --backing --list-active > /dev/null 2> $OUT/domstats-down.stderr && echo "unexpected success" >&2 || echo "virsh domstats without libvirtd: exit $?" > $OUT/domstats-down.status
virsh --version > $OUT/libvirt-version.txt; qemu-system-x86_64 --version | head -1 >> $OUT/libvirt-version.txt
echo captured

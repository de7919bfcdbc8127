#!/usr/bin/env bash
# Makes the fuzz seeds of the format inspectors from real qemu-img output: each image is
# encoded as fuzz_targets/sparse.rs reads it (size, then its non-zero 512-byte runs as
# patches). Run from anywhere; writes fuzz/seeds/*.sparse.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c 300000 /dev/urandom > "$work/data"
qemu-img convert -q -f raw -O raw "$work/data" "$work/base.raw"
truncate -s 2M "$work/base.raw"
mk() { qemu-img convert -q -f raw -O "$@"; }
mk vmdk -o subformat=monolithicSparse "$work/base.raw" "$work/m.vmdk"
mk vmdk -o subformat=streamOptimized "$work/base.raw" "$work/s.vmdk"
mk vhdx "$work/base.raw" "$work/x.vhdx"
mk vpc "$work/base.raw" "$work/d.vhd"
mk vpc -o subformat=fixed "$work/base.raw" "$work/f.vhd"
mk vdi "$work/base.raw" "$work/i.vdi"
qemu-img create -q -f vdi "$work/e.vdi" 1M
printf '<Envelope xmlns:ovf="x"><References><File ovf:id="f1" ovf:href="s.vmdk"/></References><DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1"/></DiskSection></Envelope>' > "$work/vm.ovf"
tar -C "$work" --format=ustar -cf "$work/vm.ova" vm.ovf s.vmdk
for f in m.vmdk s.vmdk x.vhdx d.vhd f.vhd i.vdi e.vdi vm.ova; do
  python3 - "$work/$f" "seeds/$f.sparse" <<'PY'
import struct, sys
data = open(sys.argv[1], 'rb').read()
out = [struct.pack('<Q', len(data))]
i = 0
while i < len(data):
    if data[i:i + 512].strip(b'\0'):
        j = i
        while j < len(data) and j - i < 65024 and data[j:j + 512].strip(b'\0'):
            j += 512
        # Only headers and metadata: at most 4 KiB of each run.
        chunk = data[i:min(j, i + 4096)]
        out.append(struct.pack('<IH', i, len(chunk)) + chunk)
        i = j
    else:
        i += 512
open(sys.argv[2], 'wb').write(b''.join(out))
PY
done
ls -l seeds

#!/bin/sh
# Records real LVM JSON reports (vgs/lvs, the exact options the lvm backend uses) inside the test
# VM, for the parsing unit tests in src/volume/lvm.rs. Run from the repository root:
#   tests/vm/vm-run.sh -s "$PWD" -- tests/vm/capture-lvm-fixtures.sh
# Writes tests/fixtures/lvm/*.json. Needs IN_TEST_VM=1 (it formats /dev/vda).
set -eu
[ "${IN_TEST_VM:-}" = 1 ] || { echo "run me inside the VM (tests/vm/vm-run.sh)" >&2; exit 2; }
OUT=tests/fixtures/lvm; mkdir -p "$OUT"
export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1
NOTHIN='global { thin_check_executable = "" thin_repair_executable = "" }'
VG_OPTS="--reportformat json --units b --nosuffix -o vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_free,vg_size,vg_attr"
LV_OPTS="--reportformat json --units b --nosuffix -a -o lv_name,vg_name,lv_size,lv_attr,lv_tags,origin,pool_lv,segtype"
pvcreate -q /dev/vda
vgcreate -q -s 8m vgfix /dev/vda
lvcreate -q -y --wipesignatures y -l 13 -n plain --addtag lvp_job_00000000-0000-0000-0000-000000000001 vgfix
lvcreate -q -y -L 64m -n busy vgfix
lvcreate -q -y -L 64m -n inactive vgfix; lvchange -q -an vgfix/inactive
lvcreate -q -y -L 64m -n origin vgfix
lvcreate -q -y -s -L 32m -n snap1 vgfix/origin
lvcreate -q -y --config "$NOTHIN" --type thin-pool -L 128m -n pool vgfix
lvcreate -q -y --config "$NOTHIN" -V 256m --thinpool pool -n thinvol vgfix
lvcreate -q -y --config "$NOTHIN" -s -n thinsnap vgfix/thinvol
sleep 300 < /dev/vgfix/busy & HOLDER=$!
vgs $VG_OPTS vgfix > $OUT/vgs.json
lvs $LV_OPTS vgfix > $OUT/lvs.json
lvs $LV_OPTS vgfix/plain > $OUT/lvs-one.json
vgs $VG_OPTS novg > $OUT/vgs-missing.json 2> $OUT/vgs-missing.stderr && echo "unexpected success" >&2 || echo "vgs novg: exit $?" > $OUT/vgs-missing.status
lvs $LV_OPTS vgfix/nolv > $OUT/lvs-missing.json 2> $OUT/lvs-missing.stderr && echo "unexpected success" >&2 || echo "lvs vgfix/nolv: exit $?" > $OUT/lvs-missing.status
kill $HOLDER
ls -l /dev/vgfix/ /dev/mapper/ > $OUT/devnodes.txt
lvcreate -q -y -L 100g -n toolarge vgfix 2> $OUT/lvcreate-nospace.stderr || echo "lvcreate 100g: exit $?" > $OUT/lvcreate-nospace.status
lvcreate -q -y -L 64m -n plain vgfix 2> $OUT/lvcreate-exists.stderr || echo "lvcreate existing: exit $?" > $OUT/lvcreate-exists.status
lvm version > $OUT/lvm-version.txt
uname -r >> $OUT/lvm-version.txt
echo captured

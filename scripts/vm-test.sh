#!/usr/bin/env bash
# The LVM tests in a VM with device-mapper: builds the test binaries on the host, makes the test
# images and their reference conversions on the host with qemu-img (and renders the NixOS
# module's volume-group scripts with nix-instantiate), then runs the ignored `lvm_vm` test and
# the ignored `thin_vm` test (golden images on a dm-thin pool), each inside its own QEMU/TCG VM
# (tests/vm/vm-run.sh) against the real daemon binary with the lvm backend. Prints one
# PASS/FAIL line per case; exits non-zero on any FAIL, a missing case, or a VM time-out.
# Exit status 77 (and a loud message) only when QEMU or busybox is not installed.
# Environment: VM_TIMEOUT (seconds, default 900), WORK (VM cache, default /tmp/vmrun).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

skip() {
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! SKIPPED: the LVM VM tests cannot run: %s\n' "$1" >&2
  printf '!!! Install QEMU from bookworm-backports (see .ci/run) to run them.\n' >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
  exit 77
}
for tool in qemu-system-x86_64 busybox; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done
qemu-system-x86_64 --version >/dev/null 2>&1 || skip "qemu-system-x86_64 does not run"

started=$(date +%s)
echo "== building the test binaries (host) =="
json=$(cargo test --locked --test lvm_vm --test thin_vm --no-run --message-format=json 2>/dev/null)
BIN=$(sed -n 's/.*"executable":"\([^"]*\/lvm_vm-[^"]*\)".*/\1/p' <<<"$json" | tail -1)
THIN_BIN=$(sed -n 's/.*"executable":"\([^"]*\/thin_vm-[^"]*\)".*/\1/p' <<<"$json" | tail -1)
[ -x "$BIN" ] || { echo "cannot find the lvm_vm test binary" >&2; exit 1; }
[ -x "$THIN_BIN" ] || { echo "cannot find the thin_vm test binary" >&2; exit 1; }
# The VM mounts a tmpfs over /tmp, then the shared checkout at its own path: binaries under
# /tmp are visible only when they are inside the checkout (target/ inside it).
for b in "$BIN" "$THIN_BIN"; do
  case "$b" in "$ROOT"/*) ;; /tmp/*) echo "the test binary is under /tmp outside the checkout, which the VM hides: $b" >&2; exit 1;; esac
done

# Test images and the raw bytes qemu-img makes of them on the host (the VM test compares LV
# contents with these hashes). Regenerated when this script's recipe version changes.
DATA=$ROOT/target/vm-test
RECIPE=4
if [ "$(cat "$DATA/recipe" 2>/dev/null)" != "$RECIPE" ]; then
  echo "== making test images (host) =="
  rm -rf "$DATA"; mkdir -p "$DATA"
  # A sparse raw with random data at a few offsets (and zeros between them).
  scatter() { # file size_mib
    truncate -s "$2M" "$1"
    for off in 0 3 17 $(($2 / 2)) $(($2 - 1)); do
      head -c 1M /dev/urandom | dd of="$1" bs=1M seek="$off" conv=notrunc status=none
    done
  }
  scatter "$DATA/disk.src" 64
  qemu-img convert -q -f raw -O qcow2 "$DATA/disk.src" "$DATA/disk.qcow2"; rm "$DATA/disk.src"
  scatter "$DATA/disk.raw" 24
  # Fits a 1 GiB request but not an LV of 1008 MiB; and one larger than any request of 1 GiB.
  qemu-img create -q -f qcow2 "$DATA/tight.qcow2" 1020M
  qemu-img create -q -f qcow2 "$DATA/toolarge.qcow2" 2G
  # 1 GiB of compressible non-zero data, compressed: a small download whose conversion takes
  # long enough under emulation to be cancelled midway.
  { yes "libvirt-volume-provisioner cancel test pattern" || true; } | head -c 1G > "$DATA/cancel.src"
  qemu-img convert -q -c -f raw -O qcow2 "$DATA/cancel.src" "$DATA/cancel.qcow2"; rm "$DATA/cancel.src"
  # 256 MiB of non-zero data, compressed: a golden build slow enough under emulation to be
  # interrupted (thin_vm's kill case).
  { yes "libvirt-volume-provisioner golden build pattern" || true; } | head -c 256M > "$DATA/slow.src"
  qemu-img convert -q -c -f raw -O qcow2 "$DATA/slow.src" "$DATA/slow.qcow2"; rm "$DATA/slow.src"
  for img in disk.qcow2:qcow2 disk.raw:raw slow.qcow2:qcow2; do
    name=${img%%:*}; fmt=${img#*:}
    qemu-img convert -q -f "$fmt" -O raw "$DATA/$name" "$DATA/$name.ref"
    printf '%s %s %s\n' "$name" "$(stat -c %s "$DATA/$name.ref")" \
      "$(sha256sum "$DATA/$name.ref" | cut -d' ' -f1)" >> "$DATA/refs.txt"
    rm "$DATA/$name.ref"
  done
  echo "$RECIPE" > "$DATA/recipe"
fi
cat "$DATA/refs.txt"

# The NixOS module's volume-group script with thin pools, as the module renders it, for
# thin_vm's case on a loop device (named /dev/lvp-nixthin/disk inside the VM).
render_vg_script() { # file thinPools-expression
  NIX_CONFIG="build-users-group =" nix-instantiate --eval --strict --json nix/vg-script.nix \
    --argstr name nixthin --arg devices '[ "/dev/lvp-nixthin/disk" ]' --arg thinPools "$2" 2>/dev/null \
    | python3 -c 'import json, sys; sys.stdout.write(json.load(sys.stdin))' > "$DATA/vg-scripts/$1"
}
rm -rf "$DATA/vg-scripts"; mkdir -p "$DATA/vg-scripts"
if command -v nix-instantiate >/dev/null; then
  render_vg_script create.sh '{ pool = { size = "256M"; chunkSize = "128K"; }; }'
  render_vg_script too-big.sh '{ big = { size = "10G"; }; }'
  render_vg_script not-a-pool.sh '{ plain = { size = "8M"; }; }'
else
  echo "nix-instantiate is not installed: thin_vm's NixOS case will fail (install nix-bin, see .ci/run)" >&2
fi

export VMTEST_DATA=$DATA
failed=0
# run_suite NAME BINARY: one VM per suite, a PASS/FAIL count and its wall time.
run_suite() {
  local name=$1 bin=$2 log=$ROOT/target/vm-test-$1.log suite_started rc pass fail want
  echo "== running the $name tests in a VM =="
  suite_started=$(date +%s)
  set +e
  VM_TIMEOUT=${VM_TIMEOUT:-900} VM_MEM=${VM_MEM:-2048} tests/vm/vm-run.sh -s "$ROOT" -d 8G -e VMTEST_DATA -- \
    "$bin" --ignored --test-threads=1 --nocapture 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  pass=$(grep -c '^VM-CASE PASS' "$log" || true)
  fail=$(grep -c '^VM-CASE FAIL' "$log" || true)
  want=$(grep -o 'VM-CASES [0-9]*' "$log" | head -1 | cut -d' ' -f2 || true)
  echo "== $name VM test: $pass passed, $fail failed of ${want:-?} cases, exit status $rc, $(( $(date +%s) - suite_started )) s wall time =="
  if [ "$rc" != 0 ] || [ "$fail" != 0 ] || [ -z "$want" ] || [ "$pass" != "$want" ]; then
    echo "$name VM test FAILED (log: $log)" >&2
    failed=1
  fi
}
for suite in ${VM_SUITES:-lvm thin}; do
  case $suite in
    lvm) run_suite lvm "$BIN" ;;
    thin) run_suite thin "$THIN_BIN" ;;
    *) echo "unknown VM suite $suite" >&2; exit 2 ;;
  esac
done
echo "== VM tests: $(( $(date +%s) - started )) s wall time in all =="
[ "$failed" = 0 ] || exit 1

#!/usr/bin/env bash
# The tests that need a VM: builds the test binaries on the host, makes the test images and their
# reference conversions on the host with qemu-img, then runs each suite's ignored test inside its
# own QEMU/TCG VM (tests/vm/vm-run.sh) against the real daemon binary:
# - lvm (tests/lvm_vm.rs): the lvm backend on device-mapper;
# - thin (tests/thin_vm.rs): golden images on a dm-thin pool, and the NixOS module's volume-group
#   scripts with thin pools (rendered here with nix-instantiate);
# - libvirt (tests/libvirt_vm.rs): a real libvirtd (the host's Debian packages) with a logical
#   and a dir pool, and paused domains holding provisioned volumes open.
# Prints one PASS/FAIL line per case and each suite's wall time; exits non-zero on any FAIL, a
# missing case, or a VM time-out.
# Exit status 77 (and a loud message) when QEMU or busybox is not installed (nothing runs), or
# when libvirt is not (the lvm suite runs, the libvirt suite is skipped).
# - reflink (tests/reflink_vm.rs): the directory backend's reflink clones on an XFS file system
#   with reflink=1 made on the VM's disk.
# - lifecycle (tests/lifecycle_vm.rs): growing thick and thin LVs (one under a paused domain), cloning (thin
#   snapshot, copy, an in-use source refused then allowed, clone times of 1 GiB), the write cap on a wipe,
#   wiping on delete (markers, kill -9 mid-wipe), the wipe's throughput beside blkdiscard -z.
# Environment: VM_SUITES (default "lvm thin libvirt reflink lifecycle"), VM_TIMEOUT (seconds per suite, default 2100),
# WORK (VM cache, default /tmp/vmrun), LIFECYCLE_CLONE_MIB (data in the lifecycle clone-time case, default 256),
# VM_DISK (each VM's disk, default 8G; the clone-time case at 4096 MiB needs about 16G).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

skip() {
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! SKIPPED: %s\n' "$1" >&2
  printf '!!! Install what .ci/run installs (QEMU from bookworm-backports, libvirt) to run them.\n' >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
}
for tool in qemu-system-x86_64 busybox; do
  command -v "$tool" >/dev/null || { skip "the VM tests cannot run: $tool is not installed"; exit 77; }
done
qemu-system-x86_64 --version >/dev/null 2>&1 || { skip "the VM tests cannot run: qemu-system-x86_64 does not run"; exit 77; }
SUITES=${VM_SUITES:-lvm thin libvirt reflink lifecycle}
skipped=0
case " $SUITES " in *" libvirt "*|*" lifecycle "*)
  for tool in virsh libvirtd virtlogd nix-instantiate; do
    if ! command -v "$tool" >/dev/null; then
      skip "the libvirt and lifecycle VM tests cannot run: $tool is not installed (apt-get install libvirt-daemon-system libvirt-clients nix-bin)"
      SUITES=${SUITES//libvirt/}; SUITES=${SUITES//lifecycle/}; skipped=1; break
    fi
  done;;
esac

started=$(date +%s)
echo "== building the release daemon and the test binaries (host) =="
# The suites start the release build (what ships; TEST_DAEMON_BIN, tests/common): it is also
# several times faster than the debug build under the VM's CPU emulation.
cargo build --locked --release
export TEST_DAEMON_BIN=$ROOT/target/release/libvirt-volume-provisioner
declare -A BINS
json=$(cargo test --locked --test lvm_vm --test thin_vm --test libvirt_vm --test reflink_vm --test lifecycle_vm --no-run --message-format=json 2>/dev/null)
for suite in lvm thin libvirt reflink lifecycle; do
  BINS[$suite]=$(sed -n 's/.*"executable":"\([^"]*\/'$suite'_vm-[^"]*\)".*/\1/p' <<<"$json" | tail -1)
  [ -x "${BINS[$suite]}" ] || { echo "cannot find the ${suite}_vm test binary" >&2; exit 1; }
done
# The VM mounts a tmpfs over /tmp, then the shared checkout at its own path: binaries under
# /tmp are visible only when they are inside the checkout (target/ inside it).
for BIN in "${BINS[@]}"; do
  case "$BIN" in "$ROOT"/*) ;; /tmp/*) echo "the test binary is under /tmp outside the checkout, which the VM hides: $BIN" >&2; exit 1;; esac
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

# The NixOS module's pool unit script (libvirt.definePool), as the module renders it: the libvirt
# suite runs it against the real libvirtd.
case " $SUITES " in *" libvirt "*)
  NIX_CONFIG="build-users-group =" nix-instantiate --eval --strict --json \
    --argstr pool vmlv --argstr vg vmlv nix/pool-script.nix > "$DATA/define-pool.json";;
esac

# The NixOS module's volume-group script with thin pools, as the module renders it, for
# thin_vm's case on a loop device (named /dev/lvp-nixthin/disk inside the VM).
render_vg_script() { # file thinPools-expression
  NIX_CONFIG="build-users-group =" nix-instantiate --eval --strict --json nix/vg-script.nix \
    --argstr name nixthin --arg devices '[ "/dev/lvp-nixthin/disk" ]' --arg thinPools "$2" 2>/dev/null \
    | python3 -c 'import json, sys; sys.stdout.write(json.load(sys.stdin))' > "$DATA/vg-scripts/$1"
}
case " $SUITES " in *" thin "*)
  rm -rf "$DATA/vg-scripts"; mkdir -p "$DATA/vg-scripts"
  if command -v nix-instantiate >/dev/null; then
    render_vg_script create.sh '{ pool = { size = "256M"; chunkSize = "128K"; }; }'
    render_vg_script too-big.sh '{ big = { size = "10G"; }; }'
    render_vg_script not-a-pool.sh '{ plain = { size = "8M"; }; }'
  else
    echo "nix-instantiate is not installed: thin_vm's NixOS case will fail (install nix-bin, see .ci/run)" >&2
  fi;;
esac

export VMTEST_DATA=$DATA
# One suite in its VM: its log in target/vm-test-<suite>.log, a summary line, and status 1 when
# a case failed, one is missing, or the VM died.
run_suite() { # suite
  local suite=$1 LOG=$ROOT/target/vm-test-$1.log suite_started rc pass fail want
  suite_started=$(date +%s)
  set +e
  # The emulator's CPU time is what the suite costs on an idle machine (one vCPU); the wall time
  # grows with whatever else runs on the host.
  TIMEFORMAT="$suite VM: %0R s wall time, %0U s user + %0S s system CPU"
  time {
    VM_TIMEOUT=${VM_TIMEOUT:-2100} VM_MEM=${VM_MEM:-2048} tests/vm/vm-run.sh -s "$ROOT" -d "${VM_DISK:-8G}" -e VMTEST_DATA -e TEST_DAEMON_BIN -e LIFECYCLE_CLONE_MIB -- \
      "${BINS[$suite]}" --ignored --test-threads=1 --nocapture > "$LOG" 2>&1
    rc=$?
  }
  set -e
  pass=$(grep -c '^VM-CASE PASS' "$LOG" || true)
  fail=$(grep -c '^VM-CASE FAIL' "$LOG" || true)
  want=$(grep -o 'VM-CASES [0-9]*' "$LOG" | head -1 | cut -d' ' -f2 || true)
  echo "== $suite VM test: $pass passed, $fail failed of ${want:-?} cases, exit status $rc, $(( $(date +%s) - suite_started )) s wall time =="
  if [ "$rc" != 0 ] || [ "$fail" != 0 ] || [ -z "$want" ] || [ "$pass" != "$want" ]; then
    echo "$suite VM test FAILED (log: $LOG)" >&2
    return 1
  fi
}
# Each VM has one vCPU: the thin suite (the longest), then reflink, run beside the others, which
# run one after the other; on 2 cores that halves the wall time. Each log is printed whole when
# its suite ends (interleaved consoles would be unreadable).
failed=0
run_and_print() { # suite
  local rc=0
  run_suite "$1" > "$ROOT/target/vm-test-$1.summary" 2>&1 || rc=1
  echo "== the $1 tests in a VM =="
  cat "$ROOT/target/vm-test-$1.log" "$ROOT/target/vm-test-$1.summary"
  return $rc
}
# The second lane: thin, then reflink (the shortest), beside the others one after the other.
parallel=
case " $SUITES " in *" thin "*)
  if [ "$(nproc)" -ge 2 ]; then
    parallel=thin; SUITES=${SUITES//thin/}
    case " $SUITES " in *" reflink "*) parallel="thin reflink"; SUITES=${SUITES//reflink/};; esac
  fi;;
esac
run_lane() { local rc=0 suite; for suite in "$@"; do run_and_print "$suite" || rc=1; done; return $rc; }
if [ -n "$parallel" ]; then run_lane $parallel & bg=$!; fi
for suite in $SUITES; do
  run_and_print "$suite" || failed=1
done
if [ -n "$parallel" ]; then wait "$bg" || failed=1; fi
echo "== VM tests: $(( $(date +%s) - started )) s wall time in all =="
[ "$failed" = 0 ] || exit 1
[ "$skipped" = 0 ] || exit 77

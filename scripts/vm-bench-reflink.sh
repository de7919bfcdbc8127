#!/usr/bin/env bash
# Reflink clones on XFS against cp --reflink=always, inside the test VM (QEMU/TCG): the directory
# backend on an XFS file system made with reflink=1 on the VM's disk; an image with 1 GiB of
# data (4 GiB virtual), prefetched; then VOLUMES (10) volumes of it, the first of which builds the
# golden file. Per volume: the job's own started_at..finished_at and the file system space it
# took (df before/after); beside them, in the same run, `cp --reflink=always` of the golden file
# VOLUMES times (time and space per copy). Not part of the tests. Under emulation everything is
# slow: compare the clone with cp, and the clones with each other, not with real hardware.
# On the host: makes the image in target/vm-bench-reflink, builds the daemon (release) and runs
# this script again inside the VM (tests/vm/vm-run.sh), which prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$ROOT/target/vm-bench-reflink
VOLUMES=${VOLUMES:-10}

if [ "${IN_TEST_VM:-}" != 1 ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  # BENCH_NO_BUILD=1: use the release binary already in target/release.
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --locked --quiet --release
  mkdir -p "$DATA"
  img=$DATA/data1024.qcow2
  if [ ! -e "$img" ]; then
    # Random (incompressible) data over the first 4 GiB in 4 MiB runs, holes between.
    truncate -s 4G "$DATA/src.raw"
    for i in $(seq 0 255); do
      head -c 4M /dev/urandom | dd of="$DATA/src.raw" bs=1M seek=$((i * 16)) conv=notrunc status=none
    done
    qemu-img convert -q -f raw -O qcow2 "$DATA/src.raw" "$img.tmp" && mv "$img.tmp" "$img"
    rm -f "$DATA/src.raw"
  fi
  echo "host: $(nproc) CPUs, $(qemu-system-x86_64 --version | head -1)"
  exec env VM_MEM=${VM_MEM:-4096} VM_TIMEOUT=${VM_TIMEOUT:-3000} tests/vm/vm-run.sh -s "$ROOT" -d 64G -e VOLUMES -- "$0"
fi

# --- inside the VM ---
echo "guest: $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB, kernel $(uname -r)"
mkfs.xfs -q -f -m reflink=1 /dev/vda
mkdir -p /tmp/xfs && mount -t xfs /dev/vda /tmp/xfs
W=/tmp/xfs/bench; mkdir -p "$W"
BIN=$ROOT/target/release/libvirt-volume-provisioner
PORT=18080
cat > "$W/config.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"
[storage]
data_dir = "$W/state"
[jobs]
max_concurrent = 1
[volumes]
backend = "directory"
[volumes.directory]
path = "/tmp/xfs/volumes"
[cache]
dir = "$W/cache"
max_size_bytes = 21474836480
[sources]
file_roots = ["$DATA"]
CONF
"$BIN" --config "$W/config.toml" serve 2> "$W/log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 200); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.5; done

api() { curl -sf -H 'content-type: application/json' "$@"; }
wait_job() {
  local out
  while :; do
    out=$(api "http://127.0.0.1:$PORT/api/v1/jobs/$1")
    case $(python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' <<<"$out") in
      completed) echo "$out"; return;;
      failed|cancelled) echo "job $1: $out" >&2; exit 1;;
    esac
    sleep 1
  done
}
used() { df -B1 --output=used /tmp/xfs | tail -1; }
img=data1024.qcow2
id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/cache/fetch" -d '{"image_url":"file://'"$DATA/$img"'"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
wait_job "$id" >/dev/null
echo "| volume | job seconds | method | space taken |"
echo "|---|---|---|---|"
for n in $(seq 1 "$VOLUMES"); do
  before=$(used)
  id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/jobs" \
    -d '{"image_url":"file://'"$DATA/$img"'","volume_name":"v'"$n"'","volume_size_gb":8}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  out=$(wait_job "$id" | python3 -c '
import json, sys
from datetime import datetime
j = json.load(sys.stdin)
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
print("%.2f %s" % ((t(j["finished_at"]) - t(j["started_at"])).total_seconds(), j.get("method", "-")))')
  read -r secs method <<<"$out"
  echo "| v$n | $secs | $method | $(( ($(used) - before) / 1048576 )) MiB |"
done
golden=$(ls /tmp/xfs/volumes/.lvp-golden/*.img)
echo
echo "| cp --reflink=always of the golden file | seconds | space taken |"
echo "|---|---|---|"
for n in $(seq 1 "$VOLUMES"); do
  before=$(used)
  start=$(date +%s.%N)
  cp --reflink=always "$golden" "/tmp/xfs/cp-$n"
  end=$(date +%s.%N)
  echo "| cp-$n | $(python3 -c "print(f'{$end-$start:.2f}')") | $(( ($(used) - before) / 1048576 )) MiB |"
done

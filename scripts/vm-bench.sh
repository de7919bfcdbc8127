#!/usr/bin/env bash
# Throughput of writing a 1 GiB image into an LV inside the test VM (QEMU/TCG, device-mapper),
# next to `dd` of the same bytes there: dd with O_DIRECT; qemu-img convert with the daemon's
# exact arguments (raw and qcow2 sources, -m 8 and -m 16); and the daemon itself through its
# API (its convert stage, from its own stage_duration_seconds metric). Not part of the tests.
# On the host: makes the images in target/vm-bench, builds the daemon and runs this script
# again inside the VM (tests/vm/vm-run.sh), which prints the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$ROOT/target/vm-bench
MIB=$((1 << 20))

if [ "${IN_TEST_VM:-}" != 1 ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --locked --quiet
  mkdir -p "$DATA"
  if [ ! -e "$DATA/img.raw" ]; then
    head -c 1G /dev/urandom > "$DATA/img.raw.tmp" && mv "$DATA/img.raw.tmp" "$DATA/img.raw"
    qemu-img convert -q -f raw -O qcow2 "$DATA/img.raw" "$DATA/img.qcow2"
  fi
  echo "host: $(nproc) CPUs, $(qemu-system-x86_64 --version | head -1)"
  exec env VM_MEM=${VM_MEM:-3072} VM_TIMEOUT=${VM_TIMEOUT:-1200} tests/vm/vm-run.sh -s "$ROOT" -d 4G -- "$0"
fi

# --- inside the VM ---
export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1
echo "guest: $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB, kernel $(uname -r)"
pvcreate -q /dev/vda >/dev/null
vgcreate -q vgbench /dev/vda >/dev/null
lvcreate -q -y -L 1g -n bench vgbench >/dev/null
LV=/dev/vgbench/bench
cp "$DATA/img.raw" /tmp/img.raw
cp "$DATA/img.qcow2" /tmp/img.qcow2
SIZE=$(stat -c %s /tmp/img.raw)

now() { date +%s.%N; }
report() { # label seconds
  awk -v l="$1" -v s="$2" -v b="$SIZE" 'BEGIN { printf "BENCH %-52s %7.2f s %8.1f MiB/s\n", l, s, b / 1048576 / s }'
}
timed() { # label command...
  local label=$1; shift
  local t0 t1; t0=$(now); "$@"; t1=$(now)
  report "$label" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
}

for round in 1 2; do
  timed "dd bs=4M oflag=direct (round $round)" dd if=/tmp/img.raw of=$LV bs=4M oflag=direct status=none
  timed "qemu-img convert -f raw -m 8 -t none (round $round)" \
    qemu-img convert -f raw -O raw -n -W -m 8 -t none /tmp/img.raw $LV
  timed "qemu-img convert -f raw -m 16 -t none (round $round)" \
    qemu-img convert -f raw -O raw -n -W -m 16 -t none /tmp/img.raw $LV
  timed "qemu-img convert -f qcow2 -m 8 -t none (round $round)" \
    qemu-img convert -f qcow2 -O raw -n -W -m 8 -t none /tmp/img.qcow2 $LV
done
lvremove -q -y $LV >/dev/null
rm -f /tmp/img.raw /tmp/img.qcow2   # room in the tmpfs for the daemon's cache copy

# The daemon: a new LV, the raw image through file:// (copied and hashed into its cache on the
# tmpfs), its own convert-stage duration.
W=/tmp/daemon; mkdir -p $W
cat > $W/config.toml <<EOF
[server]
listen = "127.0.0.1:18080"
[storage]
data_dir = "$W/state"
[volumes]
backend = "lvm"
[volumes.lvm]
volume_group = "vgbench"
[cache]
dir = "$W/cache"
[sources]
file_roots = ["$DATA"]
[log]
format = "json"
level = "info"
EOF
"$ROOT/target/debug/libvirt-volume-provisioner" --config $W/config.toml serve 2> $W/log &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.5; done
t0=$(now)
id=$(curl -sf -X POST -H 'content-type: application/json' http://127.0.0.1:18080/api/v1/jobs \
  -d '{"image_url":"file://'"$DATA"'/img.raw","volume_name":"bench-daemon","volume_size_gb":1,"image_type":"raw"}' \
  | sed 's/.*"job_id":"\([^"]*\)".*/\1/')
status=
while :; do
  status=$(curl -sf http://127.0.0.1:18080/api/v1/jobs/$id | sed 's/.*"status":"\([a-z]*\)".*/\1/')
  case $status in completed|failed|cancelled) break;; esac
  sleep 1
done
t1=$(now)
[ "$status" = completed ] || { echo "daemon job $status:"; curl -s http://127.0.0.1:18080/api/v1/jobs/$id; tail -5 $W/log; exit 1; }
convert=$(curl -sf http://127.0.0.1:18080/metrics | grep 'stage_duration_seconds_sum' | grep 'stage="convert"' | awk '{print $2}')
report "daemon job: convert stage (qemu-img as run by it)" "$convert"
report "daemon job: whole job (fetch+hash, create, write)" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
grep -o '"message":"target does not support O_DIRECT[^"]*"' $W/log || echo "daemon used O_DIRECT (-t none)"

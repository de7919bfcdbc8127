#!/usr/bin/env bash
# Encrypted volumes against plain ones, inside the test VM (QEMU/TCG), the lvm backend on a
# volume group over the VM's disk, libvirt off (keys in files): an image with DATA_MIB (1024)
# MiB of incompressible data, prefetched; then, in the same run, the provision job of a plain
# volume and of an encrypted one (each 2 x the data, thick LVs), and their DELETE with
# `volumes.wipe_on_delete = "zero"`: the plain LV is zeroed (a `wipe` job), the encrypted one
# crypto-erased (header and key slots only). Times are the jobs' own started_at..finished_at
# and the DELETE's wall time. Not part of the tests. Under emulation AES and zeroing are slow:
# read the figures beside each other, not against real hardware.
# On the host: makes the image in target/vm-bench-encryption, builds the daemon (release;
# BENCH_NO_BUILD=1 uses target/release as it is) and runs this script again inside the VM.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$ROOT/target/vm-bench-encryption
DATA_MIB=${DATA_MIB:-1024}

if [ "${IN_TEST_VM:-}" != 1 ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --locked --quiet --release
  mkdir -p "$DATA"
  img=$DATA/data$DATA_MIB.qcow2
  if [ ! -e "$img" ]; then
    head -c "${DATA_MIB}M" /dev/urandom > "$DATA/src.raw"
    qemu-img convert -q -f raw -O qcow2 "$DATA/src.raw" "$img.tmp" && mv "$img.tmp" "$img"
    rm -f "$DATA/src.raw"
  fi
  echo "host: $(nproc) CPUs, $(qemu-system-x86_64 --version | head -1)"
  exec env VM_MEM=${VM_MEM:-2048} VM_TIMEOUT=${VM_TIMEOUT:-3000} tests/vm/vm-run.sh -s "$ROOT" -d 12G -e DATA_MIB -- "$0"
fi

# --- inside the VM ---
echo "guest: $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB, kernel $(uname -r)"
pvcreate -q -y -ff /dev/vda && vgcreate -q -s 8m bench /dev/vda
# The VM's /tmp is a small tmpfs: the daemon's state and cache go on an LV of their own.
W=/tmp/bench; mkdir -p "$W"
lvcreate -q -y -L 4G -n scratch bench && mkfs.xfs -q /dev/bench/scratch && mount /dev/bench/scratch "$W"
BIN=$ROOT/target/release/libvirt-volume-provisioner
PORT=18080
SIZE_GB=$(( (2 * DATA_MIB + 1023) / 1024 ))
cat > "$W/config.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"
[storage]
data_dir = "$W/state"
[jobs]
max_concurrent = 1
[volumes]
backend = "lvm"
wipe_on_delete = "zero"
[volumes.lvm]
volume_group = "bench"
[cache]
dir = "$W/cache"
[sources]
file_roots = ["$DATA"]
CONF
"$BIN" --config "$W/config.toml" serve 2> "$W/log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true; sleep 1; umount "$W" 2>/dev/null || true' EXIT
for _ in $(seq 200); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.5; done

api() { curl -sf -H 'content-type: application/json' "$@"; }
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)'"$1"')'; }
wait_job() {
  local out
  while :; do
    out=$(api "http://127.0.0.1:$PORT/api/v1/jobs/$1")
    case $(field '["status"]' <<<"$out") in
      completed) echo "$out"; return;;
      failed|cancelled) echo "job $1: $out" >&2; tail -20 "$W/log" >&2; exit 1;;
    esac
    sleep 1
  done
}
# Seconds between a job's started_at and finished_at.
job_seconds() {
  python3 -c 'import json,sys,datetime as d
j=json.load(sys.stdin); p=lambda s: d.datetime.fromisoformat(s.replace("Z","+00:00"))
print("%.2f" % (p(j["finished_at"])-p(j["started_at"])).total_seconds())'
}
img=data$DATA_MIB.qcow2
id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/cache/fetch" -d '{"image_url":"file://'"$DATA/$img"'"}' | field '["job_id"]')
wait_job "$id" >/dev/null
echo "image: $img ($DATA_MIB MiB of data), volumes of $SIZE_GB GiB (thick LVs)"

provision() { # name extra-json
  local id
  id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/jobs" \
    -d '{"image_url":"file://'"$DATA/$img"'","volume_name":"'"$1"'","volume_size_gb":'"$SIZE_GB$2"'}' | field '["job_id"]')
  wait_job "$id" | job_seconds
}
plain=$(provision plain "")
encrypted=$(provision enc ',"encryption":{"format":"luks"}')
echo "FIGURE provision of $DATA_MIB MiB of data: plain ${plain} s, encrypted (LUKS) ${encrypted} s"

delete() { # name: prints the wall seconds of the DELETE (and of its wipe job, if any)
  local start out id
  start=$(date +%s.%N)
  out=$(curl -s -X DELETE "http://127.0.0.1:$PORT/api/v1/volumes/$1")
  id=$(field '.get("job_id","")' <<<"$out")
  [ -z "$id" ] || wait_job "$id" >/dev/null
  python3 -c "print('%.2f' % ($(date +%s.%N) - $start))"
}
zeroed=$(delete plain)
erased=$(delete enc)
echo "FIGURE delete of a $SIZE_GB GiB LV with wipe_on_delete=zero: plain (zeroed) ${zeroed} s, encrypted (crypto-erase) ${erased} s"
left=$(lvs --noheadings -o lv_name bench | grep -vw scratch || true)
[ -z "$left" ] || { echo "LVs left behind: $left" >&2; exit 1; }

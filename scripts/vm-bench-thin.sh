#!/usr/bin/env bash
# Golden images on a thin pool against thick copies, inside the test VM (QEMU/TCG, dm-thin):
# for an image with 256 MiB and one with 1 GiB of data (4 GiB virtual each), the time to a
# finished 8 GiB volume by (a) thick copy (no thin pool: the baseline, qemu-img over the whole
# virtual size), (b) the first thin volume (golden build + snapshot) and (c) the later thin
# volumes (snapshots only), and the pool data after 10 volumes. Times are the jobs' own
# started_at..finished_at; every image is prefetched into the cache first, so no job downloads.
# Not part of the tests. Under emulation every LVM command costs about a second of CPU: judge (c)
# by how it scales (the same for both images), not by its absolute value.
# On the host: makes the images in target/vm-bench-thin, builds the daemon and runs this script
# again inside the VM (tests/vm/vm-run.sh), which prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$ROOT/target/vm-bench-thin
VOLUMES=${VOLUMES:-10}

if [ "${IN_TEST_VM:-}" != 1 ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --locked --quiet
  mkdir -p "$DATA"
  for mib in 256 1024; do
    img=$DATA/data$mib.qcow2
    [ -e "$img" ] && continue
    # Random (incompressible) data spread over the first 4 GiB in 4 MiB runs, holes between.
    truncate -s 4G "$DATA/src.raw"
    step=$((4096 / (mib / 4)))
    for i in $(seq 0 $((mib / 4 - 1))); do
      head -c 4M /dev/urandom | dd of="$DATA/src.raw" bs=1M seek=$((i * step)) conv=notrunc status=none
    done
    qemu-img convert -q -f raw -O qcow2 "$DATA/src.raw" "$img.tmp" && mv "$img.tmp" "$img"
    rm -f "$DATA/src.raw"
  done
  echo "host: $(nproc) CPUs, $(qemu-system-x86_64 --version | head -1)"
  exec env VM_MEM=${VM_MEM:-4096} VM_TIMEOUT=${VM_TIMEOUT:-3000} tests/vm/vm-run.sh -s "$ROOT" -d 48G -e VOLUMES -- "$0"
fi

# --- inside the VM ---
export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1
echo "guest: $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB, kernel $(uname -r)"
pvcreate -q /dev/vda >/dev/null
vgcreate -q vgbench /dev/vda >/dev/null
lvcreate -q -y --type thin-pool -L 24g -n pool vgbench >/dev/null
BIN=$ROOT/target/debug/libvirt-volume-provisioner
PORT=18080

start_daemon() { # name thin_pool
  local w=/tmp/$1
  mkdir -p "$w"
  cat > "$w/config.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
[storage]
data_dir = "$w/state"
[jobs]
max_concurrent = 1
[volumes]
backend = "lvm"
[volumes.lvm]
volume_group = "vgbench"
devices = ["/dev/vda"]
thin_pool = "$2"
[cache]
dir = "/tmp/cache-$1"
max_size_bytes = 21474836480
[sources]
file_roots = ["$DATA"]
[log]
format = "json"
level = "info"
EOF
  "$BIN" --config "$w/config.toml" serve 2> "$w/log" &
  DAEMON=$!
  for _ in $(seq 200); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && return; sleep 0.5; done
  echo "daemon $1 did not start:"; tail -20 "$w/log"; exit 1
}
# stop_daemon NAME: stops it and drops its cache (the cache lives on the VM's tmpfs).
stop_daemon() { kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true; rm -rf "/tmp/cache-$1"; }
trap 'kill $DAEMON 2>/dev/null || true' EXIT

api() { curl -sf -H 'content-type: application/json' "$@"; }
# wait_job ID: prints the finished job's JSON once it is terminal.
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
prefetch() { # image
  local id
  id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/cache/fetch" -d '{"image_url":"file://'"$DATA/$1"'"}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  wait_job "$id" >/dev/null
}
# provision IMAGE VOLUME: prints "seconds method" of the job (its own started_at..finished_at).
provision() {
  local id
  id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/jobs" \
    -d '{"image_url":"file://'"$DATA/$1"'","volume_name":"'"$2"'","volume_size_gb":8}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  wait_job "$id" | python3 -c '
import json, sys
from datetime import datetime
j = json.load(sys.stdin)
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
print("%.1f %s" % ((t(j["finished_at"]) - t(j["started_at"])).total_seconds(), j.get("method", "-")))'
}
pool_data() { # bytes of data in the pool
  lvs --noheadings --units b --nosuffix -o data_percent,lv_size vgbench/pool \
    | awk '{ printf "%d", $1 / 100 * $2 }'
}
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }

declare -A thick first later_min later_max later_med pool image_data
for mib_data in 256 1024; do
  img=data$mib_data.qcow2
  image_data[$mib_data]=$(qemu-img map -f qcow2 --output=json "$DATA/$img" \
    | python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')

  start_daemon thick-$mib_data ""
  prefetch "$img"
  # No process substitution: the VM has no /dev/fd.
  out=$(provision "$img" thick-$mib_data)
  read -r secs method <<<"$out"
  thick[$mib_data]=$secs
  echo "BENCH $img (a) thick copy: $secs s ($method)"
  stop_daemon thick-$mib_data
  lvremove -q -y vgbench/thick-$mib_data >/dev/null

  before=$(pool_data)
  start_daemon thin-$mib_data pool
  prefetch "$img"
  out=$(provision "$img" thin-$mib_data-1)
  read -r secs method <<<"$out"
  first[$mib_data]=$secs
  echo "BENCH $img (b) first thin volume: $secs s ($method)"
  times=()
  for n in $(seq 2 "$VOLUMES"); do
    out=$(provision "$img" thin-$mib_data-$n)
    read -r secs method <<<"$out"
    echo "BENCH $img (c) thin volume $n: $secs s ($method)"
    times+=("$secs")
  done
  sorted=$(printf '%s\n' "${times[@]}" | sort -n)
  later_min[$mib_data]=$(head -1 <<<"$sorted")
  later_max[$mib_data]=$(tail -1 <<<"$sorted")
  later_med[$mib_data]=$(awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }' <<<"$sorted")
  pool[$mib_data]=$(( $(pool_data) - before ))
  stop_daemon thin-$mib_data
  for n in $(seq 1 "$VOLUMES"); do lvremove -q -y vgbench/thin-$mib_data-$n >/dev/null; done
  lvremove -q -y $(lvs --noheadings -o lv_full_name -S 'lv_tags=lvp_golden' vgbench) >/dev/null
done

echo
echo "| image (4 GiB virtual) | (a) thick copy | (b) first thin volume | (c) later thin volumes: median (min-max) | pool data after $VOLUMES volumes / image data |"
echo "|---|---|---|---|---|"
for mib_data in 256 1024; do
  printf '| %s MiB data | %s s | %s s | %s s (%s-%s) | %s MiB / %s MiB = %s |\n' "$mib_data" \
    "${thick[$mib_data]}" "${first[$mib_data]}" "${later_med[$mib_data]}" "${later_min[$mib_data]}" \
    "${later_max[$mib_data]}" "$(mib "${pool[$mib_data]}")" "$(mib "${image_data[$mib_data]}")" \
    "$(awk -v p="${pool[$mib_data]}" -v d="${image_data[$mib_data]}" 'BEGIN { printf "%.2fx", p / d }')"
done

#!/usr/bin/env bash
# Encrypted volumes on the host (directory backend on this machine's disk, release build, keys
# in files): an image with DATA_MIB (1024) MiB of incompressible data, prefetched; the provision
# job of a plain volume and of an encrypted one (2 x the data each), beside bare qemu-img doing
# the same (convert into a raw file; create -f luks + convert through the luks driver); then
# their DELETE with `volumes.wipe_on_delete = "zero"`: the plain file is zeroed (a `wipe` job),
# the encrypted one crypto-erased. Job times are the jobs' own started_at..finished_at, DELETE
# times the request's wall time (with its wipe job). The LVM side is
# scripts/vm-bench-encryption.sh (inside the VM).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA_MIB=${1:-${DATA_MIB:-1024}}
export PATH="$HOME/.cargo/bin:$PATH"
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --locked --quiet --release
BIN=$ROOT/target/release/libvirt-volume-provisioner
DATA=$ROOT/target/bench-encryption
mkdir -p "$DATA"
img=$DATA/data$DATA_MIB.qcow2
if [ ! -e "$img" ]; then
  head -c "${DATA_MIB}M" /dev/urandom > "$DATA/src.raw"
  qemu-img convert -q -f raw -O qcow2 "$DATA/src.raw" "$img.tmp" && mv "$img.tmp" "$img"
  rm -f "$DATA/src.raw"
fi
W=$(mktemp -d "$ROOT/target/bench-encryption/run.XXXXXX")
PORT=$((20000 + RANDOM % 20000))
SIZE_GB=$(( (2 * DATA_MIB + 1023) / 1024 ))
cat > "$W/config.toml" <<CONF
[server]
listen = "127.0.0.1:$PORT"
[storage]
data_dir = "$W/state"
[jobs]
max_concurrent = 1
[volumes]
backend = "directory"
wipe_on_delete = "zero"
[volumes.directory]
path = "$W/volumes"
golden_images = false
[cache]
dir = "$W/cache"
[sources]
file_roots = ["$DATA"]
CONF
"$BIN" --config "$W/config.toml" serve 2> "$W/log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true; wait $DAEMON 2>/dev/null || true; rm -rf "$W"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done

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
    sleep 0.2
  done
}
job_seconds() {
  python3 -c 'import json,sys,datetime as d
j=json.load(sys.stdin); p=lambda s: d.datetime.fromisoformat(s.replace("Z","+00:00"))
print("%.2f" % (p(j["finished_at"])-p(j["started_at"])).total_seconds())'
}
now() { date +%s.%N; }
since() { python3 -c "print('%.2f' % ($(now) - $1))"; }

id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/cache/fetch" -d '{"image_url":"file://'"$img"'"}' | field '["job_id"]')
wait_job "$id" >/dev/null
echo "image: $(basename "$img") ($DATA_MIB MiB of data); volumes of $SIZE_GB GiB; $(nproc) CPUs"

provision() { # name extra-json
  local id
  id=$(api -X POST "http://127.0.0.1:$PORT/api/v1/jobs" \
    -d '{"image_url":"file://'"$img"'","volume_name":"'"$1"'","volume_size_gb":'"$SIZE_GB$2"'}' | field '["job_id"]')
  wait_job "$id" | job_seconds
}
plain=$(provision plain "")
encrypted=$(provision enc ',"encryption":{"format":"luks"}')

# Baselines: bare qemu-img, same image, same disk.
t=$(now)
truncate -s "${SIZE_GB}G" "$W/bare.raw"
qemu-img convert -q -f qcow2 -O raw -n -t none "$img" "$W/bare.raw"
sync -f "$W/bare.raw"
bare=$(since "$t")
printf 'benchmark-passphrase-0123456789' > "$W/pass"
t=$(now)
qemu-img create -q -f luks --object "secret,id=k,file=$W/pass" -o key-secret=k "$W/bare.luks" "${SIZE_GB}G"
qemu-img convert -q -f qcow2 -n -t none --object "secret,id=k,file=$W/pass" "$img" \
  --target-image-opts "driver=luks,key-secret=k,file.filename=$W/bare.luks"
sync -f "$W/bare.luks"
bare_luks=$(since "$t")
rm -f "$W/bare.raw" "$W/bare.luks"
echo "FIGURE provision of $DATA_MIB MiB of data: plain ${plain} s (bare qemu-img convert ${bare} s); encrypted ${encrypted} s (bare qemu-img create -f luks + convert ${bare_luks} s)"

delete() { # name: wall seconds of the DELETE and of its wipe job, if any
  local t out id
  t=$(now)
  out=$(curl -s -X DELETE "http://127.0.0.1:$PORT/api/v1/volumes/$1")
  id=$(field '.get("job_id","")' <<<"$out")
  [ -z "$id" ] || wait_job "$id" >/dev/null
  since "$t"
}
zeroed=$(delete plain)
erased=$(delete enc)
echo "FIGURE delete of a $SIZE_GB GiB volume with wipe_on_delete=zero: plain (zeroed) ${zeroed} s, encrypted (crypto-erase) ${erased} s"

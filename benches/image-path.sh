#!/usr/bin/env bash
# Benchmark of the image path, printed beside its baselines:
#  1. download throughput from a local S3 server (s3s-fs) into the cache (a prefetch job),
#     next to curl fetching the same object with SigV4 to /dev/null;
#  2. a cache-hit provision (job submitted -> completed) next to a bare
#     `qemu-img convert` of the same cached image into a file of the same size.
# Usage: benches/image-path.sh [SIZE_MIB]   (default 1024; needs s3s-fs, qemu-img, curl)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
cargo build --release --quiet --locked
BIN=$PWD/target/release/libvirt-volume-provisioner
W=$(mktemp -d /var/tmp/lvp-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
AK=bench-access SK=bench-secret-0123456789
S3PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
APIPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$W/s3/bench" "$W/images"

echo "== making a qcow2 with $SIZE_MIB MiB of incompressible data"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$W/data.raw"
qemu-img convert -q -f raw -O qcow2 "$W/data.raw" "$W/s3/bench/image.qcow2"
rm "$W/data.raw"
OBJ_BYTES=$(stat -c %s "$W/s3/bench/image.qcow2")

s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key $AK --secret-key $SK "$W/s3" >/dev/null 2>&1 &
cat > "$W/config.toml" <<TOML
[server]
listen = "127.0.0.1:$APIPORT"
[storage]
data_dir = "$W/state"
[volumes]
backend = "directory"
[volumes.directory]
path = "$W/volumes"
[cache]
dir = "$W/cache"
max_size_bytes = 107374182400
[s3]
endpoint = "http://127.0.0.1:$S3PORT"
allow_http = true
access_key = "$AK"
secret_key = "$SK"
[log]
level = "warn"
TOML
"$BIN" --config "$W/config.toml" serve 2>"$W/daemon.log" &
B=http://127.0.0.1:$APIPORT
for _ in $(seq 100); do curl -fs "$B/health" >/dev/null 2>&1 && break; sleep 0.1; done
URL="http://127.0.0.1:$S3PORT/bench/image.qcow2"

wait_job() {
  while :; do
    S=$(curl -fs "$B/api/v1/jobs/$1")
    case "$S" in *'"status":"completed"'*) return 0;; *'"status":"failed"'*|*'"status":"cancelled"'*) echo "$S" >&2; return 1;; esac
    sleep 0.05
  done
}
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/($3-$2)/1e6:8.1f} MB/s  ({$3-$2:.2f} s)')"; }

echo "== 1. download from s3s-fs ($OBJ_BYTES bytes)"
# Warm the page cache for the object so both readers see the same server side.
cat "$W/s3/bench/image.qcow2" >/dev/null
s3curl() { curl -fs --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"; }
T0=$(now)
s3curl -o /dev/null "$URL"
T1=$(now)
echo "   curl GET (baseline, to /dev/null):    $(rate "$OBJ_BYTES" "$T0" "$T1")"
# The daemon also asks for the object's metadata (HEAD) and its .sha256 before the GET;
# s3s-fs computes the ETag (MD5 of the whole object) on every HEAD, MinIO stores it.
T0=$(now)
s3curl -I -o /dev/null "$URL"
s3curl -o /dev/null "$URL.sha256" || true
s3curl -o /dev/null "$URL"
T1=$(now)
echo "   curl HEAD + .sha256 + GET (same requests as the daemon): $(rate "$OBJ_BYTES" "$T0" "$T1")"
T0=$(now); s3curl -I -o /dev/null "$URL"; T1=$(now)
python3 -c "print(f'   of which HEAD alone:                  {$T1-$T0:.2f} s')"
T0=$(now)
s3curl -I -o /dev/null "$URL"
s3curl -o /dev/null "$URL.sha256" || true
s3curl -o "$W/curl-copy" "$URL"
sync -f "$W/curl-copy"
T1=$(now)
rm -f "$W/curl-copy"
echo "   curl HEAD + .sha256 + GET to a file + sync:               $(rate "$OBJ_BYTES" "$T0" "$T1")"
T0=$(now)
JOB=$(curl -fs -X POST "$B/api/v1/cache/fetch" -H 'content-type: application/json' -d "{\"image_url\":\"$URL\"}" | sed -E 's/.*"job_id":"([^"]+)".*/\1/')
wait_job "$JOB"
T1=$(now)
echo "   daemon prefetch (hash+fsync+inspect): $(rate "$OBJ_BYTES" "$T0" "$T1")"

echo "== 2. cache-hit provision vs bare qemu-img convert (virtual size $SIZE_MIB MiB)"
CACHED=$(ls "$W"/cache/*.img)
truncate -s $(( (SIZE_MIB + 1023) / 1024 ))G "$W/bare.raw"
T0=$(now)
qemu-img convert -f qcow2 -O raw -n -W -m 8 -t none "$CACHED" "$W/bare.raw" 2>/dev/null || qemu-img convert -f qcow2 -O raw -n -W -m 8 "$CACHED" "$W/bare.raw"
sync -f "$W/bare.raw"
T1=$(now)
python3 -c "print(f'   bare qemu-img convert + sync:          {$T1-$T0:.2f} s')"
T0=$(now)
JOB=$(curl -fs -X POST "$B/api/v1/jobs" -H 'content-type: application/json' -d "{\"image_url\":\"$URL\",\"volume_name\":\"bench\",\"volume_size_gb\":$(( (SIZE_MIB + 1023) / 1024 ))}" | sed -E 's/.*"job_id":"([^"]+)".*/\1/')
wait_job "$JOB"
T1=$(now)
HIT=$(curl -fs "$B/api/v1/jobs/$JOB" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cache_hit"])')
python3 -c "print(f'   cache-hit provision (API to done):     {$T1-$T0:.2f} s  (cache_hit={\"$HIT\"})')"

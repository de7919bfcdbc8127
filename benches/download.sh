#!/usr/bin/env bash
# Benchmark of the download path, every row beside its baselines measured in the same run
# (issue 12): the same qcow2 (SIZE_MIB of incompressible data, VIRT_GIB virtual) from
#   - a local nginx without a limit,
#   - the same nginx with `limit_rate 40m` per connection,
#   - s3s-fs (SigV4; the object PUT so that s3s-fs stores its ETag),
# fetched by one curl stream, by `aria2c -x 8 -s 8`, by the daemon (prefetch job, submit to
# completed), then a provision on a cold cache (download + convert), a provision from the
# cache, and bare `qemu-img convert` of the cached file (the daemon's flags). Release build.
# Also the SHA-256 speed of the sha2 crate beside `openssl speed sha256`.
# Usage: benches/download.sh [SIZE_MIB] [VIRT_GIB]   (default 1200 4; needs nginx, aria2c,
# s3s-fs, qemu-img, curl, python3; about 2.5 x SIZE_MIB of free disk in /var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1200}
VIRT_GIB=${2:-4}
cargo build --release --quiet --locked
BIN=$PWD/target/release/libvirt-volume-provisioner
W=$(mktemp -d /var/tmp/lvp-dl-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
AK=bench-access SK=bench-secret-0123456789
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "== SHA-256: sha2 crate vs openssl"
cargo bench --quiet --locked --bench sha256 2>/dev/null | grep 'MB/s'
openssl speed -bytes 16384 -seconds 3 sha256 2>/dev/null | awk '/^sha256/ {printf "openssl speed sha256 (16 KiB blocks): %.0f MB/s\n", $2*1.024/1000}'
echo "sha256sum (coreutils):" "$(python3 - "$W" <<'PY'
import os, subprocess, sys, time
p = os.path.join(sys.argv[1], "hash.bin")
with open(p, "wb") as f:
    f.write(os.urandom(1 << 29))
t = time.time(); subprocess.run(["sha256sum", p], check=True, capture_output=True); d = time.time() - t
print(f"{(1 << 29) / d / 1e6:.0f} MB/s"); os.remove(p)
PY
)"

echo "== making a qcow2 with $SIZE_MIB MiB of incompressible data in $VIRT_GIB GiB"
mkdir -p "$W/www" "$W/s3/bench" "$W/out"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$W/data.raw"
truncate -s "${VIRT_GIB}G" "$W/data.raw"
qemu-img convert -q -f raw -O qcow2 "$W/data.raw" "$W/www/image.qcow2"
rm "$W/data.raw"
OBJ=$(stat -c %s "$W/www/image.qcow2")
sha256sum "$W/www/image.qcow2" | cut -d' ' -f1 > "$W/www/image.qcow2.sha256"

NPORT=$(port); NPORT_CAP=$(port); S3PORT=$(port)
mkdir -p "$W/nginx/tmp"
cat > "$W/nginx/nginx.conf" <<CONF
daemon off; master_process on; worker_processes 2; user root;
pid $W/nginx/nginx.pid; error_log $W/nginx/error.log warn;
events { worker_connections 256; }
http {
  access_log off; sendfile on; default_type application/octet-stream;
  client_body_temp_path $W/nginx/tmp/b; proxy_temp_path $W/nginx/tmp/p;
  fastcgi_temp_path $W/nginx/tmp/f; uwsgi_temp_path $W/nginx/tmp/u; scgi_temp_path $W/nginx/tmp/s;
  server { listen 127.0.0.1:$NPORT; root $W/www; }
  server { listen 127.0.0.1:$NPORT_CAP; root $W/www; limit_rate 40m; }
}
CONF
"$NGINX" -c "$W/nginx/nginx.conf" -p "$W/nginx" &
s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key $AK --secret-key $SK "$W/s3" >/dev/null 2>&1 &
sleep 1
s3curl() { curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"; }
s3curl -T "$W/www/image.qcow2" "http://127.0.0.1:$S3PORT/bench/image.qcow2" >/dev/null
s3curl -T "$W/www/image.qcow2.sha256" "http://127.0.0.1:$S3PORT/bench/image.qcow2.sha256" >/dev/null
cat "$W/www/image.qcow2" >/dev/null   # page cache warm for every reader alike

# Starts a daemon with a fresh state and cache; prints its base URL.
DAEMON_PID=
start_daemon() {
  local d="$W/daemon" api; api=$(port)
  rm -rf "$d"; mkdir -p "$d"
  cat > "$d/config.toml" <<TOML
[server]
listen = "127.0.0.1:$api"
[storage]
data_dir = "$d/state"
[volumes]
backend = "directory"
[volumes.directory]
path = "$d/volumes"
[cache]
dir = "$d/cache"
max_size_bytes = 107374182400
min_free_bytes = 0
[sources]
allowed_hosts = ["127.0.0.1:$NPORT", "127.0.0.1:$NPORT_CAP"]
[s3]
endpoint = "http://127.0.0.1:$S3PORT"
allow_http = true
access_key = "$AK"
secret_key = "$SK"
[log]
level = "warn"
TOML
  "$BIN" --config "$d/config.toml" serve 2>"$d/daemon.log" &
  DAEMON_PID=$!
  B=http://127.0.0.1:$api
  for _ in $(seq 100); do curl -fs "$B/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "daemon did not start" >&2; cat "$d/daemon.log" >&2; exit 1
}
stop_daemon() { kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; rm -rf "$W/daemon"; }
api() { curl -fsS -H 'content-type: application/json' "$@"; }
wait_job() {
  while :; do
    S=$(curl -fs "$B/api/v1/jobs/$1")
    case "$S" in *'"status":"completed"'*) return 0;; *'"status":"failed"'*|*'"status":"cancelled"'*) echo "$S" >&2; return 1;; esac
    sleep 0.02
  done
}
job_id() { sed -E 's/.*"job_id":"([^"]+)".*/\1/'; }
timed_job() {  # path body -> seconds
  local t0 t1 id
  t0=$(now); id=$(api -X POST "$B$1" -d "$2" | job_id); wait_job "$id"; t1=$(now)
  secs "$t0" "$t1"
}

ROWS=()
row() { ROWS+=("$(printf '| %-22s | %-34s | %9s s | %9s MB/s |' "$1" "$2" "$3" "$(python3 -c "print(f'{$OBJ/$3/1e6:.0f}')")")"); echo "   $2: $3 s"; }

bench_source() {  # name url curl-args...
  local name=$1 url=$2; shift 2
  echo "== $name"
  local t0 t1
  t0=$(now); curl -fsS "$@" -o "$W/out/curl" "$url"; sync -f "$W/out/curl"; t1=$(now)
  CURL_T=$(secs "$t0" "$t1"); rm -f "$W/out/curl"; row "$name" "curl, one stream (to a file, synced)" "$CURL_T"
  if [ "$name" != "s3s-fs" ]; then
    t0=$(now); aria2c -q -x 8 -s 8 --allow-overwrite=true --file-allocation=falloc -d "$W/out" -o aria "$url"; sync -f "$W/out/aria"; t1=$(now)
    ARIA_T=$(secs "$t0" "$t1"); rm -f "$W/out/aria"; row "$name" "aria2c -x 8 -s 8 (synced)" "$ARIA_T"
  fi
  start_daemon
  DL_T=$(timed_job /api/v1/cache/fetch "{\"image_url\":\"$url\"}"); row "$name" "daemon: prefetch job" "$DL_T"
  stop_daemon; start_daemon
  MISS_T=$(timed_job /api/v1/jobs "{\"image_url\":\"$url\",\"volume_name\":\"miss\",\"volume_size_gb\":$VIRT_GIB}")
  row "$name" "daemon: provision, cache miss" "$MISS_T"
  HIT_T=$(timed_job /api/v1/jobs "{\"image_url\":\"$url\",\"volume_name\":\"hit\",\"volume_size_gb\":$VIRT_GIB}")
  row "$name" "daemon: provision, cache hit" "$HIT_T"
  local cached; cached=$(ls "$W"/daemon/cache/*.img)
  truncate -s "${VIRT_GIB}G" "$W/out/bare.raw"
  t0=$(now)
  qemu-img convert -f qcow2 -O raw -n -W -m 8 -t none "$cached" "$W/out/bare.raw" 2>/dev/null \
    || qemu-img convert -f qcow2 -O raw -n -W -m 8 -t writeback "$cached" "$W/out/bare.raw"
  sync -f "$W/out/bare.raw"; t1=$(now)
  CONV_T=$(secs "$t0" "$t1"); rm -f "$W/out/bare.raw"; row "$name" "bare qemu-img convert + sync" "$CONV_T"
  stop_daemon
  python3 - "$name" "$CURL_T" "${ARIA_T:-0}" "$DL_T" "$MISS_T" "$HIT_T" "$CONV_T" <<'PY' >> "$W/targets"
import sys
name, curl, aria, dl, miss, hit, conv = sys.argv[1], *map(float, sys.argv[2:])
out = []
if name == "nginx, limit_rate 40m":
    out.append(f"| {name} | daemon >= 0.9x aria2c throughput | {aria/dl:.2f}x | {'met' if aria/dl >= 0.9 else 'MISSED'} |")
if name == "nginx, no limit":
    out.append(f"| {name} | download <= 1.1x curl's time | {dl/curl:.2f}x | {'met' if dl/curl <= 1.1 else 'MISSED'} |")
    out.append(f"| {name} | cache miss total <= 1.4x max(curl, convert) | {miss/max(curl, conv):.2f}x | {'met' if miss/max(curl, conv) <= 1.4 else 'MISSED'} |")
if name == "s3s-fs":
    out.append(f"| {name} | cache hit <= 1.1x bare convert | {hit/conv:.2f}x | {'met' if hit/conv <= 1.1 else 'MISSED'} |")
    out.append(f"| {name} | cache miss total <= 1.4x max(curl, convert) | {miss/max(curl, conv):.2f}x | {'met' if miss/max(curl, conv) <= 1.4 else 'MISSED'} |")
print("\n".join(out))
PY
  unset ARIA_T
}

: > "$W/targets"
bench_source "nginx, no limit" "http://127.0.0.1:$NPORT/image.qcow2"
bench_source "nginx, limit_rate 40m" "http://127.0.0.1:$NPORT_CAP/image.qcow2"
bench_source "s3s-fs" "http://127.0.0.1:$S3PORT/bench/image.qcow2" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD'

echo
echo "Object: $OBJ bytes ($SIZE_MIB MiB of data, $VIRT_GIB GiB virtual); release build; MB/s = object bytes / time"
echo "| source | what | time | throughput |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| source | target | measured | |"
echo "|---|---|---|---|"
cat "$W/targets"

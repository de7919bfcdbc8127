#!/usr/bin/env bash
# Benchmark of compressed sources (issue 24), every figure beside its baseline from the same
# run: a qcow2 holding IMG_MIB MiB of real-world data (the start of a tar of /usr: binaries,
# libraries, text; default 1024) wrapped by gzip, xz (-T0, so in blocks), bzip2 and zstd, then
#   - per wrapper: the daemon's prefetch job from a local nginx (download, SHA-256, unwrap,
#     write, sync, inspect) beside the reference tool on the same file (`gzip -dc` or
#     `pigz -dc`, `xz -dc -T0`, `bzip2 -dc`, `zstd -dc`, into a file, synced); MB/s are of
#     the decompressed image;
#   - a provision of the .qcow2.xz (cache miss: download, unwrap, convert into a directory
#     volume) beside `curl | xz -dc -T0 > f && qemu-img convert`;
#   - the uncompressed qcow2: the daemon's prefetch beside `aria2c -x 8 -s 8`, best of RUNS,
#     and the daemon's RSS after the downloads.
# Release build. Usage: benches/decompress.sh [IMG_MIB] [RUNS]  (default 1024 3; needs nginx,
# aria2c, curl, qemu-img, gzip, xz, bzip2, zstd, python3; about 6 x IMG_MIB free in /var/tmp).
# FAST=1 compresses with xz -1 and bzip2 -1 instead of -6 and -9 (making the files is the slow
# part on a loaded host; the decoders' speed changes little).
set -euo pipefail
cd "$(dirname "$0")/.."
IMG_MIB=${1:-1024}
RUNS=${2:-3}
# DAEMON_BIN: a daemon binary built already (skips the release build).
BIN=${DAEMON_BIN:-$PWD/target/release/libvirt-volume-provisioner}
[ -n "${DAEMON_BIN:-}" ] || cargo build --release --quiet --locked
W=$(mktemp -d /var/tmp/lvp-dec-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
mbs() { python3 -c "print(f'{$1/$2/1e6:.0f}')"; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
GZ=gzip; command -v pigz >/dev/null && GZ=pigz

echo "== making a qcow2 of $IMG_MIB MiB of real-world data, and its wrappers"
mkdir -p "$W/www" "$W/out"
tar cf - --ignore-failed-read /usr 2>/dev/null | head -c $((IMG_MIB << 20)) > "$W/data.raw" || true
qemu-img convert -q -f raw -O qcow2 "$W/data.raw" "$W/www/image.qcow2"
rm "$W/data.raw"
IMG=$(stat -c %s "$W/www/image.qcow2")
gzip -c -6 "$W/www/image.qcow2" > "$W/www/image.qcow2.gz"
XZL=-6; BZL=-9; [ -n "${FAST:-}" ] && { XZL=-1; BZL=-1; }
xz -c $XZL -T0 "$W/www/image.qcow2" > "$W/www/image.qcow2.xz"
bzip2 -c $BZL "$W/www/image.qcow2" > "$W/www/image.qcow2.bz2"
zstd -q -c -3 -T0 "$W/www/image.qcow2" > "$W/www/image.qcow2.zst"
ls -l "$W/www"

NPORT=$(port)
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
}
CONF
"$NGINX" -c "$W/nginx/nginx.conf" -p "$W/nginx" &
sleep 1
cat "$W"/www/* >/dev/null   # page cache warm for every reader alike
URL=http://127.0.0.1:$NPORT

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
allowed_hosts = ["127.0.0.1:$NPORT"]
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
wait_job() {
  while :; do
    S=$(curl -fs "$B/api/v1/jobs/$1")
    case "$S" in *'"status":"completed"'*) return 0;; *'"status":"failed"'*|*'"status":"cancelled"'*) echo "$S" >&2; return 1;; esac
    sleep 0.02
  done
}
timed_job() {  # path body -> seconds
  local t0 t1 id
  t0=$(now)
  id=$(curl -fsS -H 'content-type: application/json' -X POST "$B$1" -d "$2" | sed -E 's/.*"job_id":"([^"]+)".*/\1/')
  wait_job "$id" || exit 1; t1=$(now)
  secs "$t0" "$t1"
}
reference() {  # command... -> seconds, output into $W/out/ref, synced
  local t0 t1; t0=$(now); "$@" > "$W/out/ref"; sync -f "$W/out/ref"; t1=$(now)
  rm -f "$W/out/ref"; secs "$t0" "$t1"
}

ROWS=()
for w in "gz:$GZ -dc" "xz:xz -dc -T0" "bz2:bzip2 -dc" "zst:zstd -dc -q"; do
  ext=${w%%:*}; tool=${w#*:}
  echo "== .$ext"
  # shellcheck disable=SC2086
  REF_T=$(reference $tool "$W/www/image.qcow2.$ext")
  start_daemon
  DL_T=$(timed_job /api/v1/cache/fetch "{\"image_url\":\"$URL/image.qcow2.$ext\"}")
  stop_daemon
  ROWS+=("$(printf '| .%-4s | %-16s | %7s s | %6s MB/s | %7s s | %6s MB/s | %5.2fx |' "$ext" "$tool" "$REF_T" "$(mbs "$IMG" "$REF_T")" "$DL_T" "$(mbs "$IMG" "$DL_T")" "$(python3 -c "print($DL_T/$REF_T)")")")
  echo "   $tool: $REF_T s, daemon prefetch: $DL_T s"
done

echo "== provision of the .qcow2.xz vs curl | xz -dc -T0 > f && qemu-img convert"
VIRT=$(qemu-img info --output=json "$W/www/image.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
GIB=$(( (VIRT + (1 << 30) - 1) >> 30 ))
t0=$(now)
curl -fsS "$URL/image.qcow2.xz" | xz -dc -T0 > "$W/out/f.qcow2"
truncate -s "${GIB}G" "$W/out/vol.raw"
qemu-img convert -q -f qcow2 -O raw -n -W -m 8 -t none "$W/out/f.qcow2" "$W/out/vol.raw" 2>/dev/null \
  || qemu-img convert -q -f qcow2 -O raw -n -W -m 8 -t writeback "$W/out/f.qcow2" "$W/out/vol.raw"
sync -f "$W/out/vol.raw"; t1=$(now)
PIPE_T=$(secs "$t0" "$t1"); rm -f "$W/out/f.qcow2" "$W/out/vol.raw"
start_daemon
PROV_T=$(timed_job /api/v1/jobs "{\"image_url\":\"$URL/image.qcow2.xz\",\"volume_name\":\"v\",\"volume_size_gb\":$GIB}")
stop_daemon
echo "   pipeline: $PIPE_T s, daemon: $PROV_T s"

echo "== uncompressed qcow2: aria2c -x 8 -s 8 vs the daemon's prefetch, best of $RUNS"
BEST_A=999999; BEST_D=999999
for _ in $(seq "$RUNS"); do
  t0=$(now); aria2c -q -x 8 -s 8 --allow-overwrite=true --file-allocation=falloc -d "$W/out" -o aria "$URL/image.qcow2"; sync -f "$W/out/aria"; t1=$(now)
  A=$(secs "$t0" "$t1"); rm -f "$W/out/aria"
  start_daemon
  D=$(timed_job /api/v1/cache/fetch "{\"image_url\":\"$URL/image.qcow2\"}")
  RSS=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$DAEMON_PID/status")
  stop_daemon
  echo "   aria2c $A s, daemon $D s (daemon RSS after: $RSS MiB)"
  BEST_A=$(python3 -c "print(min($BEST_A, $A))"); BEST_D=$(python3 -c "print(min($BEST_D, $D))")
done

echo
echo "Image: $IMG bytes (qcow2 of $IMG_MIB MiB of /usr); xz $XZL, bzip2 $BZL, gzip -6, zstd -3; $(nproc) cores, shared; release build"
echo "| wrapper | reference | ref time | ref rate | daemon prefetch | daemon rate | daemon/ref |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "| provision of image.qcow2.xz | time |"
echo "|---|---|"
echo "| curl \| xz -dc -T0 > f && qemu-img convert | $PIPE_T s |"
echo "| daemon provision job (cache miss) | $PROV_T s ($(python3 -c "print(f'{$PROV_T/$PIPE_T:.2f}')")x) |"
echo
echo "| uncompressed, best of $RUNS | time | |"
echo "|---|---|---|"
echo "| aria2c -x 8 -s 8 (synced) | $BEST_A s | |"
echo "| daemon prefetch | $BEST_D s | $(python3 -c "print(f'{$BEST_D/$BEST_A:.2f}')")x aria2c's time |"

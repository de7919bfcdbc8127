#!/usr/bin/env bash
# Load benchmark of the API over mutual TLS (release build), printed beside a baseline measured
# in the same run:
#  1. GET /api/v1/jobs/{id} at 1000 req/s for 60 s while 2 real jobs run (downloads from a local
#     S3 server, s3s-fs, through a throttled TCP proxy, so they run during the whole test):
#     p50/p99/max latency, errors, the daemon's RSS before/during/after. Baseline: GET /health
#     at the same rate, same connections (TLS and HTTP only: no auth, no store read).
#  2. POST /api/v1/jobs at 200 req/s for 30 s against a full queue (every answer must be 429).
# Certificates are made here with openssl (v3 extensions, as in docs/security.md).
# Usage: benches/api-load.sh [GET_SECONDS] [POST_SECONDS]   (defaults 60 and 30)
# Needs: oha >= 1.16 (cargo install --locked oha), openssl, s3s-fs, python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
GET_SECONDS=${1:-60}
POST_SECONDS=${2:-30}
GET_RATE=1000
POST_RATE=200
CONNECTIONS=50
IMAGE_MIB=256
THROTTLE_BYTES_PER_SEC=$((1 << 20))
command -v oha >/dev/null || { echo "oha not found: cargo install --locked oha" >&2; exit 1; }
cargo build --release --quiet --locked
BIN=$PWD/target/release/libvirt-volume-provisioner
W=$(mktemp -d /var/tmp/lvp-load.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3PORT=$(free_port) PROXYPORT=$(free_port) APIPORT=$(free_port)
AK=load-access SK=load-secret-0123456789

echo "== certificates (openssl, v3 extensions)"
P=$W/pki
mkdir -p "$P"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=Load CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$P/ca.key" -out "$P/ca.crt" 2>/dev/null
issue() { # name usage san
  printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = %s\nsubjectAltName = %s\n' "$2" "$3" > "$P/$1.ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$P/$1.key" -out "$P/$1.csr" 2>/dev/null
  openssl x509 -req -in "$P/$1.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$P/$1.ext" -out "$P/$1.crt" 2>/dev/null
}
issue server serverAuth "DNS:localhost, IP:127.0.0.1"
issue bench clientAuth "DNS:bench"
openssl verify -CAfile "$P/ca.crt" "$P/server.crt" "$P/bench.crt" >/dev/null

echo "== two images of $IMAGE_MIB MiB behind s3s-fs, served at $((THROTTLE_BYTES_PER_SEC >> 10)) KiB/s per connection"
mkdir -p "$W/s3/load"
for i in 1 2; do head -c $((IMAGE_MIB << 20)) /dev/urandom > "$W/s3/load/image-$i.raw"; done
s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key $AK --secret-key $SK "$W/s3" >/dev/null 2>&1 &
# A TCP proxy that passes requests through and sends responses at a fixed rate per connection.
python3 - "$PROXYPORT" "$S3PORT" "$THROTTLE_BYTES_PER_SEC" <<'PY' &
import asyncio, sys, time
listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def pipe(reader, writer, limit):
    chunk = max(1024, limit // 20) if limit else 65536
    try:
        while data := await reader.read(chunk):
            started = time.monotonic()
            writer.write(data)
            await writer.drain()
            if limit:
                await asyncio.sleep(max(0.0, len(data) / limit - (time.monotonic() - started)))
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
async def handle(client_r, client_w):
    server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(client_r, server_w, 0), pipe(server_r, client_w, rate))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY

cat > "$W/config.toml" <<TOML
[server]
listen = "127.0.0.1:$APIPORT"
[storage]
data_dir = "$W/state"
[jobs]
max_concurrent = 2
queue_capacity = 4
[volumes]
backend = "directory"
[volumes.directory]
path = "$W/volumes"
[cache]
dir = "$W/cache"
[s3]
endpoint = "http://127.0.0.1:$PROXYPORT"
allow_http = true
access_key = "$AK"
secret_key = "$SK"
[tls]
cert_file = "$P/server.crt"
key_file = "$P/server.key"
client_ca_file = "$P/ca.crt"
client_auth = "required"
[auth]
allowed_clients = ["bench"]
[log]
level = "info"
TOML
"$BIN" --config "$W/config.toml" serve 2>"$W/daemon.log" &
DAEMON=$!
B=https://127.0.0.1:$APIPORT
TLS=(--cacert "$P/ca.crt" --cert "$P/bench.crt" --key "$P/bench.key")
for _ in $(seq 100); do curl -fs "${TLS[@]}" "$B/health" >/dev/null 2>&1 && break; sleep 0.1; done
api() { curl -fsS "${TLS[@]}" -H 'content-type: application/json' "$@"; }
job_id() { sed -E 's/.*"job_id":"([^"]+)".*/\1/'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
submit() { # volume image
  api -X POST "$B/api/v1/jobs" \
    -d "{\"image_url\":\"s3://load/image-$2.raw\",\"volume_name\":\"$1\",\"volume_size_gb\":1,\"image_type\":\"raw\"}" | job_id
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$DAEMON/status"; }
sample_rss() { # file: the daemon's RSS every 0.5 s until killed
  while :; do rss_kib >> "$1"; sleep 0.5; done
}
# oha --output-format json -> "p50 p99 max errors non_expected_status total rps"
summarize() { # file expected_status
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s, pct = r["summary"], r["latencyPercentiles"]
codes = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
# Requests still in flight when -z ends are counted as "aborted due to deadline": not errors.
errors = sum(v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k)
other = sum(v for k, v in codes.items() if k != int(sys.argv[2]))
ms = lambda x: f"{x * 1000:8.2f}"
print(f"{ms(pct['p50'])} {ms(pct['p99'])} {ms(s['slowest'])} {errors:7d} {other:7d} {sum(codes.values()):8d} {s['requestsPerSec']:8.1f}")
PY
}
load() { # out seconds rate method url [oha args...]
  local out=$1 seconds=$2 rate=$3 method=$4 url=$5; shift 5
  oha --no-tui --output-format json -z "${seconds}s" -q "$rate" -c "$CONNECTIONS" \
    --latency-correction -m "$method" "${TLS[@]}" "$@" "$url" > "$out"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== 2 provision jobs (throttled S3 downloads)"
JOB1=$(submit load-1 1)
JOB2=$(submit load-2 2)
sleep 3
for j in $JOB1 $JOB2; do
  [ "$(api "$B/api/v1/jobs/$j" | field '["status"]')" = running ] || { echo "job $j is not running" >&2; exit 1; }
done

echo "== baseline: GET /health at $GET_RATE req/s for $GET_SECONDS s ($CONNECTIONS connections)"
load "$W/health.json" "$GET_SECONDS" "$GET_RATE" GET "$B/health"
sleep 2
RSS_BEFORE=$(rss_kib)
echo "== GET /api/v1/jobs/{id} at $GET_RATE req/s for $GET_SECONDS s while 2 jobs run"
sample_rss "$W/rss-during" & SAMPLER=$!
load "$W/get.json" "$GET_SECONDS" "$GET_RATE" GET "$B/api/v1/jobs/$JOB1"
kill $SAMPLER; wait $SAMPLER 2>/dev/null || true
RUNNING_AFTER_GET=$(for j in $JOB1 $JOB2; do api "$B/api/v1/jobs/$j" | field '["status"]'; done | grep -c running || true)
PERCENT=$(api "$B/api/v1/jobs/$JOB1" | field '["progress"]["percent"]')

echo "== POST /api/v1/jobs at $POST_RATE req/s for $POST_SECONDS s against a full queue"
for i in 1 2 3 4; do submit "queued-$i" 1 >/dev/null; done
sample_rss "$W/rss-post" & SAMPLER=$!
load "$W/post.json" "$POST_SECONDS" "$POST_RATE" POST "$B/api/v1/jobs" -T application/json \
  -d '{"image_url":"s3://load/image-1.raw","volume_name":"overflow","volume_size_gb":1,"image_type":"raw"}'
kill $SAMPLER; wait $SAMPLER 2>/dev/null || true
sleep 5
RSS_AFTER=$(rss_kib)
RUNNING_AT_END=$(for j in $JOB1 $JOB2; do api "$B/api/v1/jobs/$j" | field '["status"]'; done | grep -c running || true)
LOG_LINES=$(wc -l < "$W/daemon.log")

echo
echo "| run | p50 ms | p99 ms | max ms | errors | other status | requests | req/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
row() { read -r p50 p99 max err other total rps; echo "| $1 | $p50 | $p99 | $max | $err | $other | $total | $rps |"; }
summarize "$W/health.json" 200 | row "baseline GET /health, $GET_RATE/s"
summarize "$W/get.json" 200 | row "GET /api/v1/jobs/{id}, $GET_RATE/s, 2 jobs running"
summarize "$W/post.json" 429 | row "POST /api/v1/jobs, $POST_RATE/s, queue full (expect 429)"
for f in health get post; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])).get('errorDistribution',{}); d and print(sys.argv[2]+':', d)" "$W/$f.json" "$f errors"
done
echo
max_of() { sort -n "$1" | tail -1; }
echo "| daemon RSS | KiB |"
echo "|---|---:|"
echo "| before the GET run | $RSS_BEFORE |"
echo "| during the GET run (max) | $(max_of "$W/rss-during") |"
echo "| during the POST run (max) | $(max_of "$W/rss-post") |"
echo "| 5 s after the POST run | $RSS_AFTER |"
echo
echo "jobs running after the GET run: $RUNNING_AFTER_GET of 2 (job 1 at $PERCENT %); at the end: $RUNNING_AT_END of 2"
echo "daemon log: $LOG_LINES lines (level info) for all runs"
echo "machine load average (1/5/15 min): $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end ($(nproc) cores)"

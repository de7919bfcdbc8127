#!/usr/bin/env bash
# Demo on the embedded default (directory volumes, state under ./var, no root, no external
# service): builds the daemon, makes a small qcow2 with qemu-img, starts the daemon, provisions
# a volume with the daemon's own CLI (`provision --wait` follows the job to completion and
# fails unless it completed), checks the volume's bytes against qemu-img's own conversion, and
# stops the daemon (it must exit 0 on SIGTERM).
# Environment: PORT (8080), PROFILE (debug or release: which build to run; scripts/release-check.sh
# uses release), DEMO_VAR (the state directory, default ./var, as the embedded default uses).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
BASE="http://127.0.0.1:$PORT"
PROFILE=${PROFILE:-debug}
VAR=${DEMO_VAR:-var}
BIN=target/$PROFILE/libvirt-volume-provisioner

echo "== building ($PROFILE)"
if [ "$PROFILE" = release ]; then cargo build --quiet --locked --release; else cargo build --quiet --locked; fi
mkdir -p "$VAR/images"
IMG=$VAR/images/demo.qcow2
if [ ! -e "$IMG" ]; then
  echo "== making $IMG (1 GiB virtual, 64 MiB of data)"
  qemu-img create -q -f qcow2 "$IMG" 1G
  qemu-io -f qcow2 -c 'write -P 0x5a 0 32M' -c 'write -P 0xa5 512M 32M' "$IMG" >/dev/null
fi

echo "== starting $BIN on $BASE (log: $VAR/demo.log)"
# The embedded default keeps its state under ./var; DEMO_VAR moves it with the settings below.
LVP_SERVER__LISTEN="127.0.0.1:$PORT" LVP_STORAGE__DATA_DIR="$VAR/state" \
  LVP_VOLUMES__DIRECTORY__PATH="$VAR/volumes" LVP_CACHE__DIR="$VAR/cache" \
  LVP_SOURCES__FILE_ROOTS="[\"$PWD/$VAR/images\"]" \
  LOG_FORMAT=text "$BIN" --embedded serve > "$VAR/demo.log" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true; wait $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "$BASE/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "$BASE/health"; echo

VOLUME="demo-$(date +%s)"
echo "== $BIN provision --wait (volume $VOLUME, 2 GiB; the CLI follows the job's progress stream)"
"$BIN" --server "$BASE" provision --image-url "file://$PWD/$IMG" --volume "$VOLUME" --size-gb 2 \
  --correlation-id demo --wait
"$BIN" --server "$BASE" job list --limit 3

echo "== checking the volume against qemu-img convert"
qemu-img convert -q -f qcow2 -O raw "$IMG" "$VAR/demo-reference.raw"
if cmp -s -n "$(stat -c %s "$VAR/demo-reference.raw")" "$VAR/demo-reference.raw" "$VAR/volumes/$VOLUME"; then
  echo "OK: $VAR/volumes/$VOLUME holds the image's bytes"
else
  echo "MISMATCH"; exit 1
fi
rm -f "$VAR/demo-reference.raw"

echo "== stopping the daemon (SIGTERM)"
kill -TERM "$DAEMON"
rc=0; wait "$DAEMON" || rc=$?
trap - EXIT
[ "$rc" = 0 ] || { echo "the daemon exited with status $rc on SIGTERM (log: $VAR/demo.log)"; exit 1; }
echo "OK: stopped cleanly"

#!/usr/bin/env bash
# Demo on the embedded default (directory volumes, state under ./var, no root, no external
# service): builds the daemon, makes a small qcow2 with qemu-img, starts the daemon, provisions
# a volume with the daemon's own CLI (`provision --wait` follows the job to completion and
# fails unless it completed), checks the volume's bytes against qemu-img's own conversion, and
# stops the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
BASE="http://127.0.0.1:$PORT"
BIN=target/debug/libvirt-volume-provisioner

echo "== building"
cargo build --quiet --locked
mkdir -p var/images
IMG=var/images/demo.qcow2
if [ ! -e "$IMG" ]; then
  echo "== making $IMG (1 GiB virtual, 64 MiB of data)"
  qemu-img create -q -f qcow2 "$IMG" 1G
  qemu-io -f qcow2 -c 'write -P 0x5a 0 32M' -c 'write -P 0xa5 512M 32M' "$IMG" >/dev/null
fi

echo "== starting the daemon on $BASE (log: var/demo.log)"
LVP_SERVER__LISTEN="127.0.0.1:$PORT" LOG_FORMAT=text "$BIN" --embedded serve > var/demo.log 2>&1 &
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
qemu-img convert -q -f qcow2 -O raw "$IMG" var/demo-reference.raw
if cmp -s -n "$(stat -c %s var/demo-reference.raw)" var/demo-reference.raw "var/volumes/$VOLUME"; then
  echo "OK: var/volumes/$VOLUME holds the image's bytes"
else
  echo "MISMATCH"; exit 1
fi
rm -f var/demo-reference.raw

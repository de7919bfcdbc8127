#!/usr/bin/env bash
# The API contract, machine-checked: Schemathesis (property-based tests generated from the
# daemon's own OpenAPI document) against the debug daemon on the embedded default, in a
# temporary directory, with an API token (auth.tokens_file) so that every protected operation
# is also tried without and with a wrong credential, and a small qcow2 served through file://
# under sources.file_roots (also declared as the image `small`) so that jobs can complete. Every check, stateful links, a fixed seed
# and bounded examples; any failure fails the script.
# Environment: BIN (the daemon, default target/debug/...), SCHEMATHESIS (the command),
# MAX_EXAMPLES (per operation, default 80), SEED (default 20261101), KEEP=1 keeps the temp dir,
# ST_ARGS (more options for `schemathesis run`, e.g. `--include-path ...` while debugging).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/debug/libvirt-volume-provisioner}
SCHEMATHESIS=${SCHEMATHESIS:-schemathesis}
MAX_EXAMPLES=${MAX_EXAMPLES:-80}
SEED=${SEED:-20261101}

[ -x "$BIN" ] || { echo "no daemon at $BIN: run cargo build (or cargo test) first" >&2; exit 1; }
command -v "$SCHEMATHESIS" >/dev/null || { echo "schemathesis is not installed (.ci/run installs it)" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img is needed" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lvp-api-contract.XXXXXX")
DAEMON=
cleanup() {
  if [ -n "$DAEMON" ]; then kill -TERM "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

mkdir -p "$WORK/var/images"
qemu-img create -q -f qcow2 "$WORK/var/images/small.qcow2" 1M
IMAGE_URL="file://$WORK/var/images/small.qcow2"
(cd "$WORK/var/images" && sha256sum small.qcow2 > SHA256SUMS)
CHECKSUM_URL="file://$WORK/var/images/SHA256SUMS"
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'schemathesis:%s\n' "$TOKEN" > "$WORK/tokens"
chmod 600 "$WORK/tokens"
# The embedded default, run inside the temp dir (its state lives under ./var there), with an
# API token and uploads allowed into any volume name; nothing is read from /etc.
cat > "$WORK/config.toml" <<EOF
[server]
listen = "127.0.0.1:0"
[auth]
tokens_file = "$WORK/tokens"
[sources]
file_roots = ["$WORK/var/images"]
[volumes]
upload_name_pattern = "*"
upload_max_bytes = 1048576
[log]
format = "text"
[cache]
declared_fetch_window = "0s"
[[images]]
name = "small"
url = "$IMAGE_URL"
refresh = "1h"
EOF
: > "$WORK/daemon.log"
(cd "$WORK" && exec "$BIN" --embedded --config "$WORK/config.toml" serve) >> "$WORK/daemon.log" 2>&1 &
DAEMON=$!
# The daemon picks a free port and logs it.
ADDRESS=
for _ in $(seq 300); do
  ADDRESS=$(sed -n 's/.*listening (plain HTTP) (address=\([0-9.:]*\).*/\1/p' "$WORK/daemon.log" | head -n 1 || true)
  [ -n "$ADDRESS" ] && break
  kill -0 "$DAEMON" 2>/dev/null || break
  sleep 0.1
done
BASE="http://$ADDRESS"
[ -n "$ADDRESS" ] && curl -fsS "$BASE/health" >/dev/null || { echo "the daemon did not start:"; cat "$WORK/daemon.log"; exit 1; }
echo "daemon $BIN on $BASE (state in $WORK)"

export LVP_CONTRACT_IMAGE_URL=$IMAGE_URL
export LVP_CONTRACT_CHECKSUM_URL=$CHECKSUM_URL
export SCHEMATHESIS_HOOKS=api_contract_hooks
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
set +e
(
  cd "$WORK"
  "$SCHEMATHESIS" --config-file "$ROOT/scripts/api-contract.toml" run "$BASE/api/v1/openapi.json" \
    --header "Authorization: Bearer $TOKEN" \
    --checks all \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --generation-database none \
    --workers 1 \
    --generation-with-security-parameters false \
    --request-timeout 20 \
    --no-color \
    ${ST_ARGS:-}
)
rc=$?
set -e
echo "schemathesis: exit $rc after $(( $(date +%s) - started ))s"
# What the daemon answered, per route and status (its own requests_total counter).
echo "--- answers by route and status (requests_total)"
curl -fsS "$BASE/metrics" | python3 -c '
import re, sys
rows = []
for line in sys.stdin:
    m = re.match(r"\w*requests_total\{(.*)\} (\d+)", line)
    if m:
        labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(1)))
        rows.append((labels.get("endpoint", ""), labels.get("method", ""), labels.get("status", ""), int(m.group(2))))
for endpoint, method, status, n in sorted(rows):
    print(f"  {method:7} {endpoint:34} {status}  {n}")
' || true
if [ "$rc" != 0 ]; then
  echo "--- daemon log (last 40 lines)"; tail -n 40 "$WORK/daemon.log"
fi
exit "$rc"

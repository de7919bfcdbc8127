#!/usr/bin/env bash
# Long crash soak: the crash test (tests/crash.rs) with many rounds of (submit 3 jobs, wait a
# random 0-2 s, SIGKILL, restart), then its invariants. Prints the test's summary line.
#   scripts/crash-soak.sh [ROUNDS (default 100)] [SEED (default 20261201)]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}"
seed="${2:-20261201}"
CRASH_ROUNDS="$rounds" CRASH_SEED="$seed" \
  cargo test --quiet --test crash -- --nocapture 2>&1 | tee /tmp/crash-soak.log | grep -E "crash summary|panicked|test result"

#!/usr/bin/env bash
# What ships, checked as the package builds it: the dependencies fetched from Cargo.lock alone,
# then the release build (the profile the flake's package uses: thin LTO) offline and frozen, as
# `rustPlatform.buildRustPackage` with `cargoLock.lockFile` does; the package's check phase
# (`cargo test --release --lib --bins`); and a smoke run of the release binary (scripts/demo.sh
# with PROFILE=release: start it on the embedded default, provision one small qcow2 through the
# CLI with --wait, compare the bytes, stop it and check that it exits cleanly).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fetch --locked"
cargo fetch --locked
echo "== cargo build --release --frozen --offline"
cargo build --release --frozen --offline
echo "== cargo test --release --frozen --offline --lib --bins (the package's check phase)"
cargo test --release --frozen --offline --lib --bins
echo "== smoke run of the release binary"
PROFILE=release PORT=${PORT:-18080} DEMO_VAR=var/release-smoke ./scripts/demo.sh

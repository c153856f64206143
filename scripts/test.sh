#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and end-to-end tests
# (real KVM guests, a real Linux kernel). Needs root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests boot target/release/remora-guest.
cargo build --release --workspace --quiet
cargo nextest run --release --workspace --no-fail-fast --failure-output final

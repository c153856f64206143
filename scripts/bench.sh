#!/usr/bin/env bash
# Runs a benchmark: scripts/bench.sh boot
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
case "${1:-}" in
    boot|snapshot|net) cargo build --release --quiet && cargo bench --quiet --bench "$1" ;;
    *) echo "usage: scripts/bench.sh boot|snapshot|net" >&2; exit 2 ;;
esac

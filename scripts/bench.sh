#!/usr/bin/env bash
# Runs a benchmark: scripts/bench.sh boot
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
case "${1:-}" in
    boot|snapshot|net) cargo build --release --quiet && cargo bench --quiet --bench "$1" ;;
    relay)
        # The plot needs matplotlib: Debian's, for Debian's python3 (a
        # python3 earlier in PATH, e.g. pyenv's, may lack it). Installed
        # before the ~10 minute run.
        matplotlib_python
        cargo build --release --quiet
        cargo bench --quiet --bench relay
        "$py" scripts/plot_relay.py target/bench/relay.json target/bench/relay.png
        ;;
    replication)
        # Protected vs unprotected vs QEMU, ~10 minutes; the plot needs
        # matplotlib (as for relay), installed before the run.
        matplotlib_python
        cargo build --release --workspace --quiet
        cargo bench --quiet --bench replication
        "$py" scripts/plot_replication.py target/bench/replication.json target/bench/replication.png
        ;;
    http)
        # nginx + wrk through the relay in every mode (~5 minutes):
        # target/bench/http.{txt,json}, copied to docs/bench/http.txt.
        cargo build --release --quiet
        cargo bench --quiet --bench http
        mkdir -p docs/bench
        cp "${CARGO_TARGET_DIR:-target}/bench/http.txt" docs/bench/http.txt
        ;;
    scale)
        # 1..5000 flows through the speculative relay (~1 minute):
        # target/bench/scale.{txt,json}, copied to docs/bench/scale.txt.
        cargo build --release --quiet
        cargo bench --quiet --bench scale
        mkdir -p docs/bench
        cp "${CARGO_TARGET_DIR:-target}/bench/scale.txt" docs/bench/scale.txt
        ;;
    faults)
        # The fault campaign of tests/faults.rs with N trials (default 30):
        # a table per fault kind (trials, survived, violations, failover
        # time, outcomes), target/bench/faults.json, docs/bench/faults.txt.
        # REMORA_FAULT_SEED / REMORA_FAULT_KINDS pass through.
        trials="${2:-30}"
        cargo build --release --workspace --quiet
        rc=0
        REMORA_FAULT_TRIALS="$trials" cargo test --release --quiet --test faults -- --nocapture fault_campaign || rc=$?
        mkdir -p docs/bench
        cp "${CARGO_TARGET_DIR:-target}/bench/faults.txt" docs/bench/faults.txt
        cat docs/bench/faults.txt
        exit "$rc"
        ;;
    *) echo "usage: scripts/bench.sh boot|snapshot|net|relay|replication|http|scale|faults [N]" >&2; exit 2 ;;
esac

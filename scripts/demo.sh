#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs the
# demo: the test guest boots on 2 vCPUs, prints what it sees, powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
echo "remora: building (release)" >&2
cargo build --release --quiet
echo "remora: booting the test guest with 2 vCPUs" >&2
exec target/release/remora run --kernel target/release/remora-guest \
    --cmdline "workload=info" --vcpus 2 --mem 256

#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs the
# failover demo (examples/failover_demo.rs): a protected test guest on a
# primary host streams 512 MiB over TCP to a client, the primary's remora is
# killed with SIGKILL partway, and the backup host resumes the guest and
# its connection. Prints the client's throughput per 100 ms across the
# failover, the failover time, whether the stream arrived byte-exact
# (SHA-256), and plots target/demo/failover.png. Everything runs in network
# namespaces that the demo removes on exit, also on failure or Ctrl-C.
# Arguments go to the demo (scripts/demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
# The plot needs matplotlib.
matplotlib_python
echo "remora: building (release; a few minutes the first time)" >&2
cargo build --release --quiet --workspace
echo "remora: running the failover demo" >&2
demo="${CARGO_TARGET_DIR:-target}/demo"
rm -f "$demo/failover.png"
status=0
cargo run --release --quiet --example failover_demo -- "$@" || status=$?
if [ -f "$demo/failover.json" ]; then
    if ! "$py" scripts/plot_demo.py "$demo/failover.json" "$demo/failover.png"; then
        [ "$status" -ne 0 ] || status=1
    fi
fi
exit "$status"

#!/usr/bin/env bash
# Coverage-guided fuzzing of the speculative TCP engine for a bounded time:
#   scripts/fuzz.sh [SECONDS]   (default 300)
# Runs the cargo-fuzz target crates/speculate/fuzz (engine_ops: the
# structured operation decoder of crates/speculate/tests/fuzzops) with the
# nightly toolchain, debug assertions and overflow checks, seeded with the
# saved regression inputs. Installs cargo-fuzz from crates.io if missing.
# Extra arguments after SECONDS go to libFuzzer (e.g. -jobs=2 -workers=2).
# A crash is saved under crates/speculate/fuzz/artifacts/engine_ops/: replay
# it with FUZZ_OPS_REPLAY=<file> cargo test -p remora-speculate --release
# --test fuzz_ops replay -- --nocapture, fix it, and copy it into
# crates/speculate/tests/fuzz_regressions/ as a regression test.
set -euo pipefail
cd "$(dirname "$0")/../crates/speculate"
secs="${1:-300}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
corpus=fuzz/corpus/engine_ops
mkdir -p "$corpus"
cp -n tests/fuzz_regressions/*.bin "$corpus"/ 2>/dev/null || true
echo "fuzz.sh: cargo +nightly fuzz run engine_ops for ${secs}s (corpus $(ls "$corpus" | wc -l) inputs) $*"
status=0
cargo +nightly fuzz run --debug-assertions engine_ops "$corpus" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 "$@" || status=$?
if [ "$status" -eq 0 ]; then
    echo "fuzz.sh: no crash in ${secs}s (corpus now $(ls "$corpus" | wc -l) inputs)"
else
    echo "fuzz.sh: FAILED (status $status); crash inputs:" >&2
    ls -1 fuzz/artifacts/engine_ops/ >&2 || true
fi
exit "$status"

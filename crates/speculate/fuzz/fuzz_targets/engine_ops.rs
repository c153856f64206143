//! Coverage-guided fuzzing of the engine with the structured operation
//! decoder of `tests/fuzzops` (shared with the stable seeded test).
//! `cargo +nightly fuzz run engine_ops` from `crates/speculate`, or
//! `scripts/fuzz.sh`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzops/mod.rs"]
mod fuzzops;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = fuzzops::run(data) {
        panic!("invariant violated: {e}");
    }
});

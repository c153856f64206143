//! The structured fuzz harness (`tests/fuzzops`) on the stable toolchain:
//! a seeded run over many pseudo-random inputs (the same decoder the
//! cargo-fuzz target `fuzz/engine_ops` drives), plus the inputs the fuzzer
//! found, kept as regression tests.

mod fuzzops;

use std::time::Instant;

/// xorshift64*: deterministic inputs, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, v: &mut [u8]) {
        for b in v {
            *b = self.next() as u8;
        }
    }
}

/// One operation record: `op` for flow `flow`, random parameters.
fn record(rng: &mut Rng, op: u8, flow: u8) -> Vec<u8> {
    let mut r = vec![0u8; fuzzops::RECORD_LEN];
    rng.fill(&mut r);
    r[0] = op;
    r[1] = flow;
    r
}

/// An input biased toward reaching deep states: mostly consistent
/// configurations, handshakes completed early, then a weighted mix of
/// operations concentrated on few flows.
fn input(rng: &mut Rng) -> Vec<u8> {
    let mut v = vec![0u8; fuzzops::CONFIG_LEN];
    rng.fill(&mut v);
    let nflows = 1 + rng.below(3) as u8;
    if rng.below(4) != 0 {
        for f in 0..nflows {
            if rng.below(3) == 0 {
                // Passive open: peer SYN, guest SYN-ACK, commit, peer ACK.
                for op in [6, 7, 21, 8] {
                    v.extend(record(rng, op, f));
                }
            } else {
                // Active open: guest SYN, commit, SYN-ACK, third ACK, commit.
                for op in [0, 21, 2, 4, 21] {
                    v.extend(record(rng, op, f));
                }
            }
        }
    }
    // Weighted: data and ACKs most, epochs and time often, the rest rarely.
    const OPS: &[u8] = &[
        9, 9, 10, 11, 12, 13, 14, 15, 15, 16, 17, 18, 21, 21, 22, 20, 23, 24, 25, 26, 27, 4, 5, 29, 19, 28, 30, 31, 0,
        2, 6, 7, 8,
    ];
    let n = rng.below(400);
    for _ in 0..n {
        let op = OPS[rng.below(OPS.len() as u64) as usize];
        let flow = rng.below(u64::from(nflows)) as u8;
        v.extend(record(rng, op, flow));
    }
    v
}

#[test]
fn seeded_structured_fuzz() {
    let n: usize = std::env::var("FUZZ_OPS_INPUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let seed = std::env::var("FUZZ_OPS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_cafe_d00d_u64);
    let mut rng = Rng(seed.max(1));
    let t0 = Instant::now();
    let (mut refused, mut ops, mut failovers) = (0, 0, 0);
    let mut total = remora_speculate::Stats::default();
    for k in 0..n {
        let data = input(&mut rng);
        let r = fuzzops::run_harness(&data);
        if let Ok(h) = &r {
            let Some(h) = h else {
                refused += 1;
                continue;
            };
            ops += h.ops;
            failovers += h.failovers;
            let s = h.engine.stats();
            total.segments_sent += s.segments_sent;
            total.spec_acks += s.spec_acks;
            total.retransmits += s.retransmits;
            total.fast_recoveries += s.fast_recoveries;
            total.tail_probes += s.tail_probes;
            total.timeouts += s.timeouts;
            total.zero_window_probes += s.zero_window_probes;
            total.aborted_flows += s.aborted_flows;
            total.window_updates += s.window_updates;
        }
        if let Err(e) = r {
            let dir = std::env::temp_dir().join("remora-fuzz-ops");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("input-{k}.bin"));
            let _ = std::fs::write(&path, &data);
            panic!(
                "input {k} ({} bytes, saved to {}) failed: {e}",
                data.len(),
                path.display()
            );
        }
    }
    eprintln!(
        "{n} inputs ({refused} configs refused, {ops} ops, {failovers} failovers) in {:?}; engine totals: {total:?}",
        t0.elapsed()
    );
    // The inputs reach deep states (not just handshakes and garbage).
    assert!(
        total.fast_recoveries > 0 && total.tail_probes > 0 && total.timeouts > 0,
        "{total:?}"
    );
    assert!(failovers > 0 && total.window_updates > 0, "{total:?}");
}

/// Replays one input file with a trace of every operation:
/// `FUZZ_OPS_REPLAY=path cargo test -p remora-speculate --release --test fuzz_ops replay -- --nocapture`.
#[test]
fn replay() {
    let Ok(path) = std::env::var("FUZZ_OPS_REPLAY") else {
        return;
    };
    let data = std::fs::read(&path).expect("input file");
    fuzzops::TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = fuzzops::run(&data) {
        panic!("{path}: {e}");
    }
}

/// Inputs the fuzzers found (`tests/fuzz_regressions/*.bin`, named after
/// what they broke), replayed on every run.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz_regressions") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "bin") {
            let data = std::fs::read(&path).expect("input");
            if let Err(e) = fuzzops::run(&data) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

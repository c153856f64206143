//! Rough single-core throughput of the engine (run with
//! `cargo test -p remora-speculate --release --test perf -- --ignored --nocapture`).

use std::time::{Duration, Instant};

use remora_speculate::wire::{self, flags, Build, Net, Parsed};
use remora_speculate::{Config, Engine, Mode, Side};

#[allow(clippy::too_many_arguments)]
fn frame(src: Net, from_guest: bool, seq: u32, ack: u32, fl: u8, win: u16, ts: (u32, u32), payload: &[u8]) -> Vec<u8> {
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let (sp, dp) = if from_guest { (40000, 80) } else { (80, 40000) };
    Build {
        eth_src: if from_guest { a } else { b },
        eth_dst: if from_guest { b } else { a },
        net: src,
        ip_id: 0,
        src_port: sp,
        dst_port: dp,
        seq,
        ack,
        flags: fl,
        window: win,
        mss: (fl & flags::SYN != 0).then_some(1460),
        wscale: (fl & flags::SYN != 0).then_some(7),
        sack_permitted: fl & flags::SYN != 0,
        timestamps: Some(ts),
        sack: &[],
    }
    .to_frame(payload, &[])
}

fn run(mode: Mode, total: usize) -> (Duration, u64) {
    let g = Net::V4 {
        src: [10, 0, 0, 1],
        dst: [10, 0, 0, 2],
        tos: 0,
        ttl: 64,
        df: true,
    };
    let p = g.reversed();
    let mut e = Engine::new(Config {
        mode,
        per_flow_budget: 8 << 20,
        // As the relay and the VMM run it: the TAP completes checksums.
        offload_checksums: true,
        ..Config::default()
    })
    .expect("valid config");
    let t = |ms: u64| Duration::from_millis(ms);
    let (gisn, pisn) = (1000u32, 5000u32);
    e.handle_inner(t(0), &frame(g, true, gisn, 0, flags::SYN, 65535, (1, 0), &[]));
    let id = e.seal_epoch(t(0));
    e.commit_epoch(t(0), id);
    e.handle_outer(
        t(0),
        &frame(p, false, pisn, gisn + 1, flags::SYN | flags::ACK, 65535, (1, 1), &[]),
    );
    e.handle_inner(t(0), &frame(g, true, gisn + 1, pisn + 1, flags::ACK, 1000, (1, 1), &[]));
    while e.poll_transmit().is_some() {}
    let payload = vec![0x5au8; 1448];
    let mut seq = gisn + 1;
    let mut sent = 0usize;
    let mut peer_acked = gisn + 1;
    let mut outer_bytes = 0u64;
    let mut now_ms = 1u64;
    let mut pending_acks = 0u32;
    let mut highest = gisn + 1;
    let start = Instant::now();
    let mut n = 0u64;
    while sent < total {
        let f = frame(g, true, seq, pisn + 1, flags::ACK, 1000, (now_ms as u32, 1), &payload);
        e.handle_inner(t(now_ms), &f);
        seq = seq.wrapping_add(1448);
        sent += 1448;
        n += 1;
        if n.is_multiple_of(256) {
            now_ms += 1;
            let id = e.seal_epoch(t(now_ms));
            e.commit_epoch(t(now_ms), id);
        }
        while let Some(tx) = e.poll_transmit() {
            if tx.to == Side::Outer {
                outer_bytes += tx.frame.len() as u64;
                if let Parsed::Tcp(s) = wire::parse(&tx.frame) {
                    let end = s.seq.wrapping_add(s.payload.len() as u32);
                    if (end.wrapping_sub(highest) as i32) > 0 {
                        highest = end;
                    }
                    pending_acks += 1;
                }
            }
            // As a driver does once the frame is written.
            e.recycle(tx.frame);
        }
        // The peer acknowledges every second segment.
        if highest.wrapping_sub(peer_acked) >= 2 * 1448 || (pending_acks > 0 && n.is_multiple_of(256)) {
            pending_acks = 0;
            peer_acked = highest;
            e.handle_outer(
                t(now_ms),
                &frame(
                    p,
                    false,
                    pisn + 1,
                    peer_acked,
                    flags::ACK,
                    65535,
                    (now_ms as u32, now_ms as u32),
                    &[],
                ),
            );
            while let Some(tx) = e.poll_transmit() {
                if tx.to == Side::Outer {
                    outer_bytes += tx.frame.len() as u64;
                    if let Parsed::Tcp(s) = wire::parse(&tx.frame) {
                        let end = s.seq.wrapping_add(s.payload.len() as u32);
                        if (end.wrapping_sub(highest) as i32) > 0 {
                            highest = end;
                        }
                    }
                }
                e.recycle(tx.frame);
            }
        }
        let _ = e.poll_timeout();
    }
    (start.elapsed(), outer_bytes)
}

#[test]
#[ignore]
fn throughput() {
    // REMORA_PERF_MIB (1024) and REMORA_PERF_MODES=speculative narrow it
    // (e.g. for a run under callgrind).
    let mib: usize = std::env::var("REMORA_PERF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let only = std::env::var("REMORA_PERF_MODES").unwrap_or_default().to_lowercase();
    for mode in [Mode::Direct, Mode::Buffered, Mode::Speculative] {
        if !only.is_empty() && !only.contains(&format!("{mode:?}").to_lowercase()) {
            continue;
        }
        let total = mib << 20;
        let (d, out) = run(mode, total);
        let gbps = total as f64 * 8.0 / d.as_secs_f64() / 1e9;
        eprintln!("{mode:?}: {total} guest bytes in {d:?} = {gbps:.2} Gbit/s (outer bytes {out}), includes building the input frames");
    }
}

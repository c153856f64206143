//! Timer upkeep at scale and the idle timeout of established flows.

use std::time::Duration;

use remora_speculate::wire::{flags, Build, Net};
use remora_speculate::{Config, Engine, EpochId, Mode};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GISN: u32 = 1000;
const PISN: u32 = 7000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn gnet(i: u32) -> Net {
    Net::V4 {
        src: [10, 1, (i >> 8) as u8, i as u8],
        dst: [192, 0, 2, 9],
        tos: 0,
        ttl: 64,
        df: true,
    }
}

fn frame(i: u32, from_guest: bool, seq: u32, ack: u32, fl: u8, payload: &[u8]) -> Vec<u8> {
    let syn = fl & flags::SYN != 0;
    Build {
        eth_src: if from_guest { GUEST_MAC } else { PEER_MAC },
        eth_dst: if from_guest { PEER_MAC } else { GUEST_MAC },
        net: if from_guest { gnet(i) } else { gnet(i).reversed() },
        ip_id: 0,
        src_port: if from_guest { 40000 } else { 443 },
        dst_port: if from_guest { 443 } else { 40000 },
        seq,
        ack,
        flags: fl,
        window: 8192,
        mss: syn.then_some(1460),
        wscale: None,
        sack_permitted: false,
        timestamps: None,
        sack: &[],
    }
    .to_frame(payload, &[])
}

fn commit(e: &mut Engine, now: Duration) -> EpochId {
    let id = e.seal_epoch(now);
    e.commit_epoch(now, id);
    while e.poll_transmit().is_some() {}
    id
}

/// `n` flows opened by the guest at `now` (all speculated).
fn open_flows(e: &mut Engine, n: u32, now: Duration) {
    for i in 0..n {
        e.handle_inner(now, &frame(i, true, GISN, 0, flags::SYN, &[]));
    }
    commit(e, now);
    for i in 0..n {
        e.handle_outer(now, &frame(i, false, PISN, GISN + 1, flags::SYN | flags::ACK, &[]));
        e.handle_inner(now, &frame(i, true, GISN + 1, PISN + 1, flags::ACK, &[]));
    }
    commit(e, now);
    assert_eq!(e.stats().speculative_flows, n as usize);
}

fn config() -> Config {
    Config {
        mode: Mode::Speculative,
        per_flow_budget: 1 << 20,
        global_cap: 1 << 30,
        ..Config::default()
    }
}

/// 10k idle flows: the timer work of a busy flow's packets and of
/// `poll_timeout`/`handle_timeout` does not grow with them (a scan would
/// cost 10k deadline evaluations per call); when the idle timeout comes,
/// the work is proportional to the flows that expire, their reservations
/// are back in the pool and they leave the table, while the busy flow
/// stays.
#[test]
fn ten_thousand_idle_flows_cost_no_scan_and_time_out() {
    const N: u32 = 10_000;
    let cfg = config();
    let idle = cfg.idle_timeout;
    let mut e = Engine::new(cfg).expect("valid config");
    open_flows(&mut e, N, ms(1));
    let per_flow = e.stats().bytes_reserved / u64::from(N);
    assert!(per_flow >= 8192, "each flow reserved the window it offered: {per_flow}");
    assert_eq!(e.poll_timeout(), Some(ms(1) + idle), "the idle deadlines only");

    // Flow 0 is busy for 100 s: data, commit, the peer's ACK, timers.
    let w0 = e.timer_work();
    let mut seq = GISN + 1;
    let mut now = ms(1);
    const ROUNDS: u64 = 1000;
    for k in 0..ROUNDS {
        now = ms(1 + 100 * (k + 1));
        e.handle_inner(now, &frame(0, true, seq, PISN + 1, flags::ACK, &[7; 1000]));
        seq += 1000;
        commit(&mut e, now);
        e.handle_outer(now + ms(5), &frame(0, false, PISN + 1, seq, flags::ACK, &[]));
        let next = e.poll_timeout().expect("idle deadlines");
        assert!(next > now, "{next:?}");
        e.handle_timeout(now + ms(5));
    }
    let work = e.timer_work() - w0;
    eprintln!("timer work for {ROUNDS} busy rounds with {N} flows: {work}");
    assert!(
        work < ROUNDS * 20,
        "timer work {work} for {ROUNDS} rounds with {N} flows (a scan: {})",
        ROUNDS * u64::from(N)
    );
    assert_eq!(e.stats().flows, N as usize);
    assert_eq!(e.poll_timeout(), Some(ms(1) + idle), "the idle flows' deadline");

    // The idle flows time out; the busy one does not.
    let w0 = e.timer_work();
    let t = ms(1) + idle;
    e.handle_timeout(t);
    let work = e.timer_work() - w0;
    eprintln!("timer work to expire {N} idle flows: {work}");
    assert!(
        work <= 3 * u64::from(N),
        "work {work} to expire {N} flows is O(expired)"
    );
    let st = e.stats();
    assert_eq!(st.flows, 1, "idle flows forgotten: {st:?}");
    assert_eq!(st.speculative_flows, 1);
    assert_eq!(
        e.speculative_flows()[0].guest_ip,
        remora_speculate::wire::IpAddr::V4([10, 1, 0, 0])
    );
    assert!(
        st.bytes_reserved <= per_flow + 100_000,
        "the idle flows' reservations are back in the pool: {st:?}"
    );
    assert_eq!(
        e.poll_timeout(),
        Some(now + ms(5) + idle),
        "the busy flow's idle deadline"
    );
    e.check_invariants().expect("consistent");
    // Later frames of a forgotten flow pass as for an unknown flow.
    e.handle_outer(t + ms(1), &frame(5, false, PISN + 1, GISN + 1, flags::ACK, &[1; 10]));
    let out: Vec<_> = std::iter::from_fn(|| e.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].frame,
        frame(5, false, PISN + 1, GISN + 1, flags::ACK, &[1; 10]),
        "unchanged"
    );
    // The busy flow, idle from now on, goes in its turn.
    e.handle_timeout(now + ms(5) + idle);
    assert_eq!(e.stats().flows, 0);
    assert_eq!(e.stats().bytes_reserved, 0);
    assert_eq!(e.poll_timeout(), None);
}

/// An idle flow that still holds bytes (the peer went silent: only the
/// retransmission timer runs) gives its reservation back but is kept; once
/// the peer acknowledges everything and it goes idle again, it is
/// forgotten. With the idle timeout disabled nothing of this happens.
#[test]
fn idle_flow_holding_bytes_releases_its_reservation_and_is_kept() {
    for enabled in [true, false] {
        let cfg = Config {
            idle_timeout: if enabled {
                Duration::from_secs(300)
            } else {
                Duration::ZERO
            },
            max_retries: 100,
            ..config()
        };
        let mut e = Engine::new(cfg).expect("valid config");
        open_flows(&mut e, 1, ms(1));
        e.handle_inner(ms(10), &frame(0, true, GISN + 1, PISN + 1, flags::ACK, &[3; 5000]));
        commit(&mut e, ms(10));
        assert_eq!(e.bytes_held(), 5000);
        assert!(e.stats().bytes_reserved >= 5000);
        // Nothing from the peer: retransmission timeouts only.
        let mut now = ms(10);
        while now < Duration::from_secs(301) {
            now = e.poll_timeout().expect("a timer");
            e.handle_timeout(now);
            while e.poll_transmit().is_some() {}
            e.check_invariants().expect("consistent");
        }
        let st = e.stats();
        assert_eq!(st.flows, 1, "a flow holding bytes is kept");
        assert_eq!(st.bytes_held, 5000);
        if enabled {
            assert_eq!(st.bytes_reserved, 0, "its reservation went back: {st:?}");
        } else {
            assert!(st.bytes_reserved >= 5000, "{st:?}");
        }
        // The peer comes back and acknowledges everything.
        e.handle_outer(now, &frame(0, false, PISN + 1, GISN + 5001, flags::ACK, &[]));
        assert_eq!(e.bytes_held(), 0);
        e.handle_timeout(now + Duration::from_secs(300));
        assert_eq!(e.stats().flows, usize::from(!enabled), "forgotten once idle and empty");
    }
}

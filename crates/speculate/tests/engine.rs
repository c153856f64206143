//! Unit-level tests of the engine with hand-made frames.

mod common;

use std::time::Duration;

use common::{v4, v6, GUEST_MAC, PEER_MAC};
use proptest::prelude::*;
use remora_speculate::wire::{self, flags, Build, Net, Parsed, Segment};
use remora_speculate::{Checksum, Config, Engine, EpochId, Mode, Side, Stats, Transmit};

const GISN: u32 = 0xffff_f000; // wraps during the tests
const PISN: u32 = 0x1000_0000;
const GPORT: u16 = 40000;
const PPORT: u16 = 443;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The default idle timeout: the only deadline of an established flow
/// with nothing in flight.
const IDLE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
struct Ep {
    v6: bool,
}

impl Ep {
    fn gnet(&self) -> Net {
        if self.v6 {
            v6(1, 2)
        } else {
            v4([10, 0, 0, 1], [192, 0, 2, 9])
        }
    }
    fn pnet(&self) -> Net {
        self.gnet().reversed()
    }

    #[allow(clippy::too_many_arguments)]
    fn guest(
        &self,
        seq: u32,
        ack: u32,
        fl: u8,
        win: u16,
        ts: Option<(u32, u32)>,
        sack: &[(u32, u32)],
        payload: &[u8],
    ) -> Vec<u8> {
        Build {
            eth_src: GUEST_MAC,
            eth_dst: PEER_MAC,
            net: self.gnet(),
            ip_id: 1,
            src_port: GPORT,
            dst_port: PPORT,
            seq,
            ack,
            flags: fl,
            window: win,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: ts,
            sack,
        }
        .to_frame(payload, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn peer(
        &self,
        seq: u32,
        ack: u32,
        fl: u8,
        win: u16,
        ts: Option<(u32, u32)>,
        sack: &[(u32, u32)],
        payload: &[u8],
    ) -> Vec<u8> {
        Build {
            eth_src: PEER_MAC,
            eth_dst: GUEST_MAC,
            net: self.pnet(),
            ip_id: 1,
            src_port: PPORT,
            dst_port: GPORT,
            seq,
            ack,
            flags: fl,
            window: win,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: ts,
            sack,
        }
        .to_frame(payload, &[])
    }

    fn guest_syn(&self) -> Vec<u8> {
        Build {
            eth_src: GUEST_MAC,
            eth_dst: PEER_MAC,
            net: self.gnet(),
            ip_id: 1,
            src_port: GPORT,
            dst_port: PPORT,
            seq: GISN,
            ack: 0,
            flags: flags::SYN,
            window: 64240,
            mss: Some(1460),
            wscale: Some(7),
            sack_permitted: true,
            timestamps: Some((1000, 0)),
            sack: &[],
        }
        .to_frame(&[], &[])
    }

    fn peer_synack(&self) -> Vec<u8> {
        Build {
            eth_src: PEER_MAC,
            eth_dst: GUEST_MAC,
            net: self.pnet(),
            ip_id: 1,
            src_port: PPORT,
            dst_port: GPORT,
            seq: PISN,
            ack: GISN.wrapping_add(1),
            flags: flags::SYN | flags::ACK,
            window: 8192,
            mss: Some(1400),
            wscale: Some(3),
            sack_permitted: true,
            timestamps: Some((5000, 1000)),
            sack: &[],
        }
        .to_frame(&[], &[])
    }
}

fn cfg(mode: Mode, budget: usize) -> Config {
    Config {
        mode,
        per_flow_budget: budget,
        global_cap: budget * 8,
        ..Config::default()
    }
}

fn drain(e: &mut Engine) -> Vec<Transmit> {
    std::iter::from_fn(|| e.poll_transmit()).collect()
}

fn seg(f: &[u8]) -> Segment<'_> {
    match wire::parse(f) {
        Parsed::Tcp(s) => {
            assert!(wire::verify_checksums(f, &s), "bad checksum");
            s
        }
        Parsed::Other => panic!("not TCP"),
    }
}

/// The frame with its checksum completed as a device would (for frames
/// built with `offload_checksums`).
fn completed(t: &Transmit) -> Vec<u8> {
    let mut f = t.frame.clone();
    if t.partial_csum {
        if let Parsed::Tcp(s) = wire::parse(&t.frame) {
            wire::fix_checksums(&mut f, &s.net, s.tcp_offset);
        }
    }
    f
}

fn commit_all(e: &mut Engine, now: Duration) -> Vec<Transmit> {
    let id = e.seal_epoch(now);
    e.commit_epoch(now, id);
    drain(e)
}

/// Open a speculated flow (active open by the guest). Returns the engine
/// with the handshake committed and delivered.
fn open(ep: Ep, budget: usize) -> Engine {
    open_with(ep, cfg(Mode::Speculative, budget))
}

fn open_with(ep: Ep, c: Config) -> Engine {
    let mut e = Engine::new(c).expect("valid config");
    e.handle_inner(ms(0), &ep.guest_syn());
    assert!(drain(&mut e).is_empty(), "SYN must be held for output commit");
    let out = commit_all(&mut e, ms(1));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to, Side::Outer);
    e.handle_outer(ms(2), &ep.peer_synack());
    let out = drain(&mut e);
    assert_eq!(out.len(), 1, "SYN-ACK passes at once");
    assert_eq!(out[0].frame, ep.peer_synack());
    // Third ACK from the guest.
    e.handle_inner(
        ms(3),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1001, 5000)),
            &[],
            &[],
        ),
    );
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().speculative_flows, 1);
    let out = commit_all(&mut e, ms(4));
    assert_eq!(out.len(), 1, "the third ACK goes out at commit");
    let third = completed(&out[0]);
    let s = seg(&third);
    assert_eq!(s.flags, flags::ACK);
    assert_eq!(s.ack, PISN + 1);
    assert_eq!(s.seq, GISN.wrapping_add(1));
    e
}

#[test]
fn handshake_learning_and_speculative_ack_v4_v6() {
    for v6 in [false, true] {
        let ep = Ep { v6 };
        let mut e = open(ep, 100_000);
        let payload = vec![7u8; 3000];
        let g = ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK | flags::PSH,
            502,
            Some((1010, 5000)),
            &[],
            &payload,
        );
        e.handle_inner(ms(10), &g);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1, "exactly one speculative ACK, no output to the peer");
        assert_eq!(out[0].to, Side::Inner);
        let a = seg(&out[0].frame);
        assert_eq!(a.net.addrs(), ep.pnet().addrs());
        assert_eq!((a.src_port, a.dst_port), (PPORT, GPORT));
        assert_eq!(a.flags, flags::ACK);
        assert_eq!(a.ack, GISN.wrapping_add(3001));
        assert_eq!(a.seq, PISN + 1);
        assert!(a.payload.is_empty());
        // Window in the peer's scale (3): the free budget.
        let win = u32::from(a.window) << 3;
        assert!(win <= 100_000 - 3000 && win + 8 > 100_000 - 3000, "window {win}");
        // Timestamps: TSval in the peer's domain, echo of the guest's TSval.
        assert_eq!(a.opts.timestamps, Some((5000, 1010)));
        assert_eq!(a.opts.sack_len, 0);
        assert_eq!(e.stats().bytes_held, 3000);

        // Commit: the data goes to the peer, segmented by the peer's MSS
        // (1400 - 12 bytes of timestamps), with the guest's committed ACK.
        let out = commit_all(&mut e, ms(11));
        assert!(out.iter().all(|t| t.to == Side::Outer));
        let segs: Vec<Segment<'_>> = out.iter().map(|t| seg(&t.frame)).collect();
        assert_eq!(segs.len(), 3);
        let mut next = GISN.wrapping_add(1);
        for s in &segs {
            assert_eq!(s.seq, next);
            assert!(s.payload.len() <= 1388);
            assert_eq!(s.ack, PISN + 1);
            assert_eq!(s.window, 502);
            assert_eq!(s.opts.timestamps, Some((1010, 5000)));
            assert!(s.payload.iter().all(|&b| b == 7));
            assert_eq!(s.net.addrs(), ep.gnet().addrs());
            next = next.wrapping_add(s.payload.len() as u32);
        }
        assert_eq!(next, GISN.wrapping_add(3001));
        assert!(e.poll_timeout().is_some(), "RTO armed");

        // The peer acknowledges: memory freed, timer stops, ACK consumed.
        e.handle_outer(
            ms(60),
            &ep.peer(
                PISN + 1,
                GISN.wrapping_add(3001),
                flags::ACK,
                1024,
                Some((5050, 1010)),
                &[],
                &[],
            ),
        );
        assert!(drain(&mut e).is_empty(), "pure peer ACKs are consumed");
        assert_eq!(e.stats().bytes_held, 0);
        assert_eq!(e.poll_timeout(), Some(ms(60) + IDLE), "no RTO, only the idle timeout");
        assert!(e.is_idle());
    }
}

#[test]
fn peer_data_is_rewritten_acks_never_go_backwards() {
    for v6 in [false, true] {
        let ep = Ep { v6 };
        let mut e = open(ep, 100_000);
        e.handle_inner(
            ms(10),
            &ep.guest(
                GISN.wrapping_add(1),
                PISN + 1,
                flags::ACK,
                502,
                Some((1010, 5000)),
                &[],
                &[1; 500],
            ),
        );
        drain(&mut e);
        // Peer data carrying an old ACK and SACK blocks: the guest sees the
        // speculative ACK, no SACK blocks, TSecr = its own latest TSval.
        let p = ep.peer(
            PISN + 1,
            GISN.wrapping_add(1),
            flags::ACK | flags::PSH,
            77,
            Some((5100, 999)),
            &[(GISN.wrapping_add(100), GISN.wrapping_add(200))],
            b"hello guest",
        );
        e.handle_outer(ms(20), &p);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to, Side::Inner);
        let s = seg(&out[0].frame);
        assert_eq!(s.ack, GISN.wrapping_add(501));
        assert_eq!(s.payload, b"hello guest");
        assert_eq!(s.opts.sack_len, 0);
        assert_eq!(s.opts.timestamps, Some((5100, 1010)));
        assert!(u32::from(s.window) << 3 >= 90_000);
        assert_eq!(s.seq, PISN + 1);
        // The guest's ACK of that data is held until commit.
        e.handle_inner(
            ms(21),
            &ep.guest(
                GISN.wrapping_add(501),
                PISN + 12,
                flags::ACK,
                500,
                Some((1020, 5100)),
                &[],
                &[],
            ),
        );
        assert!(drain(&mut e).is_empty());
        let out = commit_all(&mut e, ms(22));
        let acks: Vec<u32> = out.iter().map(|t| seg(&t.frame).ack).collect();
        assert!(acks.contains(&(PISN + 12)), "{acks:?}");
        // Our speculative ACKs to the guest now carry seq = its rcv_nxt.
        e.handle_inner(
            ms(23),
            &ep.guest(
                GISN.wrapping_add(501),
                PISN + 12,
                flags::ACK,
                500,
                Some((1021, 5100)),
                &[],
                &[2; 10],
            ),
        );
        let out = drain(&mut e);
        assert_eq!(seg(&out[0].frame).seq, PISN + 12);
    }
}

#[test]
fn budget_closes_window_and_update_follows() {
    let ep = Ep { v6: false };
    let budget = 16_384;
    let mut e = open(ep, budget);
    // Fill the offered window (8192 from the SYN-ACK, then the budget).
    let mut seq = GISN.wrapping_add(1);
    let mut last_ack = None;
    for i in 0..40 {
        let g = ep.guest(seq, PISN + 1, flags::ACK, 502, Some((1100 + i, 5000)), &[], &[9; 1000]);
        e.handle_inner(ms(10), &g);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        let a = seg(&out[0].frame);
        if let Some(l) = last_ack {
            assert!(a.ack.wrapping_sub(l) as i32 >= 0, "ACK went backwards");
        }
        last_ack = Some(a.ack);
        seq = a.ack; // the guest continues from what was acknowledged
        let held = e.stats().bytes_held as usize;
        assert!(held <= budget, "held {held}");
        if a.window == 0 {
            break;
        }
    }
    let held = e.stats().bytes_held as usize;
    assert!(held > budget - 1000, "window closed only when full ({held})");
    // A zero-window probe from the guest is not accepted.
    e.handle_inner(
        ms(11),
        &ep.guest(seq, PISN + 1, flags::ACK, 502, Some((1200, 5000)), &[], &[1]),
    );
    let out = drain(&mut e);
    let a = seg(&out[0].frame);
    assert_eq!(a.ack, seq);
    assert_eq!(a.window, 0);
    assert_eq!(e.stats().bytes_held as usize, held);
    // Commit and let the peer acknowledge everything: a window update.
    let out = commit_all(&mut e, ms(12));
    assert!(out.iter().all(|t| t.to == Side::Outer));
    // The peer's SYN-ACK window (8192) limits what was sent.
    let sent_end = out
        .iter()
        .map(|t| {
            let s = seg(&t.frame);
            s.seq.wrapping_add(s.payload.len() as u32)
        })
        .max_by(|a, b| (a.wrapping_sub(*b) as i32).cmp(&0))
        .unwrap();
    assert!(sent_end.wrapping_sub(GISN.wrapping_add(1)) <= 8192);
    let updates_before = e.stats().window_updates;
    e.handle_outer(
        ms(50),
        &ep.peer(PISN + 1, sent_end, flags::ACK, 8192, Some((5010, 1200)), &[], &[]),
    );
    let out = drain(&mut e);
    assert_eq!(e.stats().window_updates, updates_before + 1);
    let u: Vec<_> = out.iter().filter(|t| t.to == Side::Inner).collect();
    assert_eq!(u.len(), 1);
    let a = seg(&u[0].frame);
    assert_eq!(a.ack, seq);
    assert!(u32::from(a.window) << 3 >= 6940 - 8);
}

/// RACK (RFC 8985): a hole with one segment SACKed above it is not lost
/// at once (it may be reordered) but a reordering window after its RTT:
/// the engine's timer fires then and retransmits it, long before a tail
/// probe or the RTO. Counting duplicate ACKs would have waited for three.
#[test]
fn rack_marks_a_hole_lost_by_time() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let seg_len = 1388u32;
    let base = GISN.wrapping_add(1);
    let data = vec![5u8; seg_len as usize * 5];
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
    );
    drain(&mut e);
    assert_eq!(commit_all(&mut e, ms(20)).len(), 5);
    // The first segment acknowledged: an RTT sample of 10 ms (min RTT).
    let ack1 = base.wrapping_add(seg_len);
    e.handle_outer(
        ms(30),
        &ep.peer(PISN + 1, ack1, flags::ACK, 8192, Some((5100, 1100)), &[], &[]),
    );
    assert!(drain(&mut e).is_empty());
    // The third segment SACKed, the second not: suspect, not yet lost.
    let sack = [(base.wrapping_add(2 * seg_len), base.wrapping_add(3 * seg_len))];
    e.handle_outer(
        ms(31),
        &ep.peer(PISN + 1, ack1, flags::ACK, 8192, Some((5101, 1100)), &sack, &[]),
    );
    assert!(
        drain(&mut e).is_empty(),
        "one SACK above a hole is reordering until proven lost"
    );
    // Lost at send (20 ms) + the delivery's RTT (11 ms) + the reordering
    // window (min RTT / 4 = 2.5 ms).
    let due = ms(33) + Duration::from_micros(500);
    assert_eq!(e.poll_timeout(), Some(due));
    e.handle_timeout(due);
    let retx: Vec<u32> = drain(&mut e)
        .iter()
        .filter(|t| t.to == Side::Outer)
        .map(|t| seg(&t.frame).seq)
        .collect();
    assert_eq!(retx, vec![ack1], "the hole, and only it");
    assert_eq!(e.stats().fast_recoveries, 1);
    assert_eq!(e.stats().timeouts, 0);
    assert_eq!(e.stats().tail_probes, 0);
    // Its retransmission acknowledged with everything: the flow is clear.
    let end = base.wrapping_add(data.len() as u32);
    e.handle_outer(
        ms(45),
        &ep.peer(PISN + 1, end, flags::ACK, 8192, Some((5102, 1100)), &[], &[]),
    );
    assert_eq!(e.stats().bytes_held, 0);
    assert_eq!(e.poll_timeout(), Some(ms(45) + IDLE), "no timer left but the idle one");
}

/// A flow whose guest sends `segs` segments as fast as the engine's window
/// lets it (epochs committed every 5 ms), and whose peer acknowledges
/// every segment `rtt(sent at)` after it left; runs until `until` in
/// 0.1 ms steps, timers included. Returns the stats and the largest number
/// of segments sent within one millisecond after the first round trip.
fn ack_clocked(c: Config, segs: usize, rtt: impl Fn(Duration) -> Duration, until: Duration) -> (Stats, usize) {
    let ep = Ep { v6: false };
    let mut e = open_with(ep, c);
    let seg_len = 1388u32;
    let base = GISN.wrapping_add(1);
    let gend = base.wrapping_add(segs as u32 * seg_len);
    let (mut gnext, mut gack, mut gwnd) = (base, base, 8192);
    let mut acks: Vec<(Duration, u32)> = Vec::new();
    let mut sent_at: Vec<Duration> = Vec::new();
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    let mut now = ms(10);
    let mut acked = base;
    let mut next_commit = ms(20);
    while now < until {
        now += Duration::from_micros(100);
        let mut out = Vec::new();
        // The guest: new data within the window the engine offers.
        while after(gend, gnext) {
            let room = gack.wrapping_add(gwnd).wrapping_sub(gnext) as i32;
            let n = (room.max(0) as u32 / seg_len)
                .min(40)
                .min(gend.wrapping_sub(gnext) / seg_len);
            if n == 0 {
                break;
            }
            let data = vec![1u8; (n * seg_len) as usize];
            e.handle_inner(
                now,
                &ep.guest(gnext, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
            );
            gnext = gnext.wrapping_add(n * seg_len);
            out.extend(drain(&mut e));
            for t in out.iter().filter(|t| t.to == Side::Inner) {
                let s = seg(&t.frame);
                gack = s.ack;
                gwnd = u32::from(s.window) << 3;
            }
            if after(gnext, gack) {
                // Beyond what the engine took: the guest sends it again.
                gnext = gack;
                break;
            }
        }
        if now >= next_commit {
            out.extend(commit_all(&mut e, now));
            next_commit = now + ms(5);
        }
        acks.sort_by_key(|a| a.0);
        while acks.first().is_some_and(|a| a.0 <= now) {
            let (_, a) = acks.remove(0);
            if after(a, acked) {
                acked = a;
            }
            e.handle_outer(
                now,
                &ep.peer(PISN + 1, acked, flags::ACK, 8192, Some((5100, 1100)), &[], &[]),
            );
            out.extend(drain(&mut e));
        }
        if e.poll_timeout().is_some_and(|d| d <= now) {
            e.handle_timeout(now);
            out.extend(drain(&mut e));
        }
        for t in &out {
            let s = seg(&t.frame);
            if t.to == Side::Inner {
                gack = s.ack;
                gwnd = u32::from(s.window) << 3;
            } else if !s.payload.is_empty() {
                acks.push((now + rtt(now), s.seq.wrapping_add(s.payload.len() as u32)));
                sent_at.push(now);
            }
        }
    }
    let first = ms(20) + rtt(ms(20));
    let burst = sent_at
        .iter()
        .filter(|&&t| t > first)
        .map(|&t| sent_at.iter().filter(|&&u| u >= t && u < t + ms(1)).count())
        .max()
        .unwrap_or(0);
    (e.stats(), burst)
}

/// Gather output: with `gather_payload` a segment leaves as headers plus a
/// reference to the held bytes; headers + `held_payload` are byte for byte
/// the frame the engine would have built, and a range the peer has
/// acknowledged before the driver wrote it is not sent.
#[test]
fn gathered_segments_equal_built_ones() {
    let ep = Ep { v6: false };
    let run = |gather: bool| {
        let mut c = cfg(Mode::Speculative, 1 << 20);
        c.offload_checksums = true;
        c.tso_max = 64_000;
        c.gather_payload = gather;
        let mut e = open_with(ep, c);
        let base = GISN.wrapping_add(1);
        // Enough to wrap the held ring's slices: two guest frames, one
        // acknowledged in between.
        let data: Vec<u8> = (0..1388 * 5).map(|i| (i * 7 % 251) as u8).collect();
        e.handle_inner(
            ms(10),
            &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
        );
        drain(&mut e);
        let mut frames = Vec::new();
        let collect = |e: &mut Engine, frames: &mut Vec<Vec<u8>>| {
            while let Some(mut t) = e.poll_transmit() {
                if let Some(r) = t.held {
                    assert!(gather);
                    let (a, b) = e.held_payload(&r).expect("still held");
                    t.frame.extend_from_slice(a);
                    t.frame.extend_from_slice(b);
                }
                if t.to == Side::Outer {
                    frames.push(t.frame);
                }
            }
        };
        let id = e.seal_epoch(ms(20));
        e.commit_epoch(ms(20), id);
        collect(&mut e, &mut frames);
        let first = base.wrapping_add(1388 * 3);
        e.handle_outer(
            ms(30),
            &ep.peer(PISN + 1, first, flags::ACK, 8192, Some((5100, 1100)), &[], &[]),
        );
        collect(&mut e, &mut frames);
        let s2 = base.wrapping_add(data.len() as u32);
        e.handle_inner(
            ms(31),
            &ep.guest(s2, PISN + 1, flags::ACK, 502, Some((1101, 5000)), &[], &data),
        );
        drain(&mut e);
        let id = e.seal_epoch(ms(32));
        e.commit_epoch(ms(32), id);
        collect(&mut e, &mut frames);
        // A retransmission (the RTO) acknowledged before it is written.
        let rto = e.poll_timeout().expect("RTO armed");
        e.handle_timeout(rto);
        let end = s2.wrapping_add(data.len() as u32);
        e.handle_outer(
            rto,
            &ep.peer(PISN + 1, end, flags::ACK, 8192, Some((5101, 1101)), &[], &[]),
        );
        let mut stale = 0;
        while let Some(t) = e.poll_transmit() {
            if let Some(r) = t.held {
                assert!(e.held_payload(&r).is_none(), "acknowledged: nothing to gather");
                stale += 1;
            }
        }
        (frames, stale)
    };
    let (built, stale_built) = run(false);
    let (gathered, stale) = run(true);
    assert_eq!(gathered, built);
    // Partial checksums (offload): parsed, not verified.
    let data_frames = built
        .iter()
        .filter(|f| matches!(wire::parse(f), Parsed::Tcp(s) if !s.payload.is_empty()))
        .count();
    assert!(data_frames >= 2, "{data_frames} data frames");
    assert_eq!(stale_built, 0);
    assert_eq!(stale, 1, "the retransmission overtaken by the ACK");
}

/// Guest segments reordered on their way to the engine (two CPUs'
/// backlogs in a host bridge do that): the one ahead is kept, not dropped,
/// and both are acknowledged as soon as the hole is filled; the guest
/// never has to retransmit (it would by RTO: it gets no SACK for them).
#[test]
fn reordered_guest_segments_are_kept() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let base = GISN.wrapping_add(1);
    let a: Vec<u8> = (0..1388u32).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..1388u32).map(|i| (i * 3) as u8).collect();
    let second = base.wrapping_add(1388);
    e.handle_inner(
        ms(10),
        &ep.guest(second, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &b),
    );
    let acks: Vec<u32> = drain(&mut e)
        .iter()
        .filter(|t| t.to == Side::Inner)
        .map(|t| seg(&t.frame).ack)
        .collect();
    assert_eq!(acks, vec![base], "a duplicate ACK: the hole is still open");
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &a),
    );
    let acks: Vec<u32> = drain(&mut e)
        .iter()
        .filter(|t| t.to == Side::Inner)
        .map(|t| seg(&t.frame).ack)
        .collect();
    assert_eq!(
        acks.last(),
        Some(&base.wrapping_add(2 * 1388)),
        "both acknowledged at once"
    );
    let out = commit_all(&mut e, ms(20));
    let mut sent = Vec::new();
    for t in out.iter().filter(|t| t.to == Side::Outer) {
        sent.extend_from_slice(seg(&t.frame).payload);
    }
    assert_eq!(sent, [a, b].concat(), "the stream in order");
    e.check_invariants().expect("invariants");
}

/// Pacing: after the first RTT sample new data leaves at about cwnd per
/// SRTT (x2 in slow start) in bursts of at most ~1 ms of it, not a window
/// at a time; without pacing the same flow sends its window at once.
#[test]
fn pacing_spreads_a_window_over_the_round_trip() {
    let flat = |_| ms(10);
    let mut c = cfg(Mode::Speculative, 4 << 20);
    let (paced, paced_burst) = ack_clocked(c.clone(), 600, flat, ms(300));
    c.pacing = false;
    let (unpaced, unpaced_burst) = ack_clocked(c, 600, flat, ms(300));
    eprintln!("segments in 1 ms: paced {paced_burst}, unpaced {unpaced_burst}");
    assert!(
        unpaced_burst >= 40,
        "without pacing a window leaves at once: {unpaced_burst}"
    );
    assert!(
        paced_burst * 3 <= unpaced_burst,
        "paced bursts {paced_burst} vs unpaced {unpaced_burst}"
    );
    // Pacing costs no throughput: the same data got through.
    assert_eq!(paced.bytes_held, 0, "{paced:?}");
    assert_eq!(unpaced.bytes_held, 0, "{unpaced:?}");
    assert_eq!(paced.retransmits, 0);
}

/// HyStart++: the first slow start ends when the round trip grows by more
/// than max(4 ms, RTT/8) between rounds (a queue building), not only at a
/// loss; a steady RTT, even a long one, keeps slow start going.
#[test]
fn hystart_ends_slow_start_when_the_rtt_rises() {
    let c = cfg(Mode::Speculative, 4 << 20);
    let steady = ack_clocked(c.clone(), 600, |_| ms(10), ms(150)).0;
    assert_eq!(steady.slow_start_exits, 0, "{steady:?}");
    // A queue: every segment sent after the first round waits 10 ms more.
    let queued = ack_clocked(c, 600, |t| if t < ms(30) { ms(10) } else { ms(20) }, ms(150)).0;
    assert_eq!(queued.slow_start_exits, 1, "{queued:?}");
    assert_eq!(queued.fast_recoveries, 0);
    assert_eq!(queued.timeouts, 0);
}

#[test]
fn retransmission_timeout_with_backoff_and_fast_retransmit() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let data = vec![3u8; 1388 * 5];
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1100, 5000)),
            &[],
            &data,
        ),
    );
    drain(&mut e);
    let out = commit_all(&mut e, ms(20));
    assert_eq!(out.len(), 5);
    // Nothing acknowledged: RTO at the initial 1 s, then doubling.
    let t1 = e.poll_timeout().unwrap();
    assert_eq!(t1, ms(20) + Duration::from_secs(1));
    e.handle_timeout(t1);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let s = seg(&out[0].frame);
    assert_eq!(s.seq, GISN.wrapping_add(1));
    let t2 = e.poll_timeout().unwrap();
    assert_eq!(t2, t1 + Duration::from_secs(2));
    assert_eq!(e.stats().timeouts, 1);
    // The peer acknowledges the first segment: slow start retransmits on.
    let base = GISN.wrapping_add(1);
    let seg_len = 1388u32;
    e.handle_outer(
        ms(3100),
        &ep.peer(
            PISN + 1,
            base.wrapping_add(seg_len),
            flags::ACK,
            8192,
            Some((5100, 1100)),
            &[],
            &[],
        ),
    );
    let retx: Vec<u32> = drain(&mut e).iter().map(|t| seg(&t.frame).seq).collect();
    assert_eq!(
        retx,
        vec![base.wrapping_add(seg_len), base.wrapping_add(2 * seg_len)],
        "cwnd 1 -> 2 segments"
    );
    // Everything acknowledged: timers stop.
    let end = base.wrapping_add(data.len() as u32);
    e.handle_outer(
        ms(3200),
        &ep.peer(PISN + 1, end, flags::ACK, 8192, Some((5200, 1100)), &[], &[]),
    );
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().bytes_held, 0);
    assert_eq!(e.poll_timeout(), Some(ms(3200) + IDLE), "no RTO, only the idle timeout");

    // Fast retransmit: three duplicate ACKs with SACK blocks.
    let mut e = open(ep, 1 << 20);
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
    );
    drain(&mut e);
    assert_eq!(commit_all(&mut e, ms(20)).len(), 5);
    for i in 0..3u32 {
        let sack = [(base.wrapping_add(seg_len), base.wrapping_add((2 + i) * seg_len))];
        e.handle_outer(
            ms(60),
            &ep.peer(PISN + 1, base, flags::ACK, 8192, Some((5100, 1100)), &sack, &[]),
        );
    }
    let out = drain(&mut e);
    let retx: Vec<u32> = out.iter().map(|t| seg(&t.frame).seq).collect();
    assert_eq!(retx, vec![base], "only the hole is retransmitted");
    assert_eq!(e.stats().fast_recoveries, 1);
    assert_eq!(e.stats().timeouts, 0);
    e.handle_outer(
        ms(61),
        &ep.peer(PISN + 1, end, flags::ACK, 8192, Some((5100, 1100)), &[], &[]),
    );
    assert!(e.is_idle());
    assert_eq!(e.poll_timeout(), Some(ms(61) + IDLE), "only the idle timeout");
}

#[test]
fn fin_from_both_sides_closes_flow() {
    let ep = Ep { v6: true };
    let mut e = open(ep, 100_000);
    // Guest sends data + FIN: the speculative ACK covers the FIN.
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK | flags::FIN,
            502,
            Some((1100, 5000)),
            &[],
            b"bye",
        ),
    );
    let out = drain(&mut e);
    assert_eq!(seg(&out[0].frame).ack, GISN.wrapping_add(5));
    let out = commit_all(&mut e, ms(11));
    assert_eq!(out.len(), 1);
    let s = seg(&out[0].frame);
    assert!(s.has(flags::FIN));
    assert_eq!(s.payload, b"bye");
    // Peer ACKs the FIN and sends its own FIN.
    e.handle_outer(
        ms(20),
        &ep.peer(
            PISN + 1,
            GISN.wrapping_add(5),
            flags::ACK | flags::FIN,
            1000,
            Some((5100, 1100)),
            &[],
            &[],
        ),
    );
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let s = seg(&out[0].frame);
    assert!(s.has(flags::FIN));
    assert_eq!(s.ack, GISN.wrapping_add(5));
    assert_eq!(e.stats().speculative_flows, 1);
    // Guest ACKs the peer FIN; on commit the flow is done.
    e.handle_inner(
        ms(21),
        &ep.guest(
            GISN.wrapping_add(5),
            PISN + 2,
            flags::ACK,
            502,
            Some((1110, 5100)),
            &[],
            &[],
        ),
    );
    let out = commit_all(&mut e, ms(22));
    assert_eq!(out.len(), 1);
    assert_eq!(seg(&out[0].frame).ack, PISN + 2);
    assert_eq!(e.stats().speculative_flows, 0);
    // Late duplicate of an old peer FIN: ACK rewritten upwards; a late
    // pure ACK is consumed.
    let old = |fl| ep.peer(PISN + 1, GISN.wrapping_add(1), fl, 1000, Some((5100, 1100)), &[], &[]);
    e.handle_outer(ms(30), &old(flags::ACK | flags::FIN));
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(seg(&out[0].frame).ack, GISN.wrapping_add(5));
    e.handle_outer(ms(31), &old(flags::ACK));
    assert!(drain(&mut e).is_empty());
    // Time-wait expires: state removed, no timers.
    let t = e.poll_timeout().unwrap();
    e.handle_timeout(t);
    assert_eq!(e.stats().flows, 0);
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn rst_from_peer_closes_and_passes() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 100_000);
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1100, 5000)),
            &[],
            &[1; 100],
        ),
    );
    drain(&mut e);
    // An out-of-window RST is ignored.
    e.handle_outer(ms(11), &ep.peer(PISN + 1_000_000, 0, flags::RST, 0, None, &[], &[]));
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().speculative_flows, 1);
    let rst = ep.peer(PISN + 1, 0, flags::RST, 0, None, &[], &[]);
    e.handle_outer(ms(12), &rst);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].frame, rst);
    assert_eq!(e.stats().speculative_flows, 0);
    assert_eq!(e.stats().bytes_held, 0);
    assert_eq!(e.stats().bytes_reserved, 0);
    // Output of the closed flow at commit: nothing speculated goes out.
    let out = commit_all(&mut e, ms(13));
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn rst_from_guest_after_delivery() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 100_000);
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1100, 5000)),
            &[],
            &[1; 100],
        ),
    );
    e.handle_inner(
        ms(11),
        &ep.guest(
            GISN.wrapping_add(101),
            PISN + 1,
            flags::RST | flags::ACK,
            0,
            None,
            &[],
            &[],
        ),
    );
    let out = drain(&mut e);
    assert_eq!(out.len(), 1, "only the speculative ACK; the RST is held");
    let out = commit_all(&mut e, ms(12));
    assert_eq!(out.len(), 1, "data first, RST waits for the peer's ACK");
    assert_eq!(seg(&out[0].frame).payload.len(), 100);
    e.handle_outer(
        ms(40),
        &ep.peer(
            PISN + 1,
            GISN.wrapping_add(101),
            flags::ACK,
            1000,
            Some((5100, 1100)),
            &[],
            &[],
        ),
    );
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let s = seg(&out[0].frame);
    assert!(s.has(flags::RST));
    assert_eq!(s.seq, GISN.wrapping_add(101));
    assert_eq!(e.stats().speculative_flows, 0);

    // Without the peer's ACK, the RST goes out after the linger time.
    let mut e = open(ep, 100_000);
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1100, 5000)),
            &[],
            &[1; 100],
        ),
    );
    e.handle_inner(
        ms(11),
        &ep.guest(
            GISN.wrapping_add(101),
            PISN + 1,
            flags::RST | flags::ACK,
            0,
            None,
            &[],
            &[],
        ),
    );
    drain(&mut e);
    commit_all(&mut e, ms(12));
    let mut saw_rst = false;
    for _ in 0..20 {
        let Some(t) = e.poll_timeout() else { break };
        e.handle_timeout(t);
        for tx in drain(&mut e) {
            saw_rst |= seg(&tx.frame).has(flags::RST);
        }
        if saw_rst {
            break;
        }
    }
    assert!(saw_rst);
    assert_eq!(e.stats().speculative_flows, 0);
}

#[test]
fn fallback_non_tcp_unknown_flows_and_malformed() {
    let ep = Ep { v6: false };
    let mut e = Engine::new(cfg(Mode::Speculative, 100_000)).expect("valid config");
    // ARP: held until commit on the way out, immediate on the way in.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    e.handle_inner(ms(0), &arp);
    assert!(drain(&mut e).is_empty());
    e.handle_outer(ms(0), &arp);
    assert_eq!(drain(&mut e).len(), 1);
    // Data of a flow never seen from its SYN: held, no speculative ACK.
    let d = ep.guest(5, 6, flags::ACK, 100, None, &[], b"mid-stream");
    e.handle_inner(ms(1), &d);
    assert!(drain(&mut e).is_empty());
    // Malformed and truncated frames: no panic, fallback.
    let syn = ep.guest_syn();
    for n in 0..syn.len() {
        e.handle_inner(ms(2), &syn[..n]);
        e.handle_outer(ms(2), &syn[..n]);
    }
    let mut bad_opts = ep.guest(5, 6, flags::ACK, 100, Some((1, 2)), &[], b"x");
    bad_opts[14 + 20 + 20 + 3] = 40; // timestamp option with a bogus length
    e.handle_inner(ms(2), &bad_opts);
    let out = drain(&mut e);
    assert!(out.iter().all(|t| t.to == Side::Inner), "inner frames are held");
    let out = commit_all(&mut e, ms(3));
    assert_eq!(out[0].frame, arp);
    assert_eq!(out[1].frame, d);
    assert!(out.iter().all(|t| t.to == Side::Outer));
    let st = e.stats();
    assert!(st.non_tcp_frames > 0 && st.fallback_frames > 0);
    assert_eq!(st.spec_acks, 0);
    assert_eq!(st.buffered_bytes, 0);
}

#[test]
fn outer_frames_with_bad_checksums_are_dropped() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 100_000);
    let mut p = ep.peer(
        PISN + 1,
        GISN.wrapping_add(1),
        flags::ACK,
        100,
        Some((5100, 1001)),
        &[],
        b"data",
    );
    let n = p.len() - 1;
    p[n] ^= 0xff;
    e.handle_outer(ms(10), &p);
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().bad_checksum_drops, 1);
}

#[test]
fn buffered_and_direct_modes() {
    let ep = Ep { v6: false };
    let mut e = Engine::new(cfg(Mode::Buffered, 100_000)).expect("valid config");
    let f1 = ep.guest_syn();
    let f2 = ep.guest(1, 2, flags::ACK, 3, None, &[], b"two");
    e.handle_inner(ms(0), &f1);
    let id0 = e.seal_epoch(ms(1));
    e.handle_inner(ms(2), &f2);
    let id1 = e.seal_epoch(ms(3));
    assert_eq!((id0, id1), (EpochId(0), EpochId(1)));
    assert!(drain(&mut e).is_empty());
    e.handle_outer(ms(3), &ep.peer_synack());
    assert_eq!(drain(&mut e).len(), 1, "outer->inner is immediate");
    e.commit_epoch(ms(4), id0);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].frame, f1);
    e.commit_epoch(ms(5), id1);
    let out = drain(&mut e);
    assert_eq!(out[0].frame, f2);
    // Committing an unsealed epoch releases only what was sealed.
    e.handle_inner(ms(6), &f2);
    e.commit_epoch(ms(6), EpochId(5));
    assert!(drain(&mut e).is_empty());

    let mut d = Engine::new(cfg(Mode::Direct, 100_000)).expect("valid config");
    d.handle_inner(ms(0), &f1);
    d.handle_outer(ms(0), &f2);
    let out = drain(&mut d);
    assert_eq!(
        out[0],
        Transmit {
            to: Side::Outer,
            frame: f1,
            gso_size: None,
            partial_csum: false,
            held: None,
        }
    );
    assert_eq!(
        out[1],
        Transmit {
            to: Side::Inner,
            frame: f2,
            gso_size: None,
            partial_csum: false,
            held: None,
        }
    );
}

#[test]
fn passive_open_is_speculated() {
    let ep = Ep { v6: false };
    let mut e = Engine::new(cfg(Mode::Speculative, 100_000)).expect("valid config");
    // Peer connects to the guest.
    let syn = Build {
        eth_src: PEER_MAC,
        eth_dst: GUEST_MAC,
        net: ep.pnet(),
        ip_id: 1,
        src_port: PPORT,
        dst_port: GPORT,
        seq: PISN,
        ack: 0,
        flags: flags::SYN,
        window: 65535,
        mss: Some(1460),
        wscale: Some(5),
        sack_permitted: true,
        timestamps: Some((100, 0)),
        sack: &[],
    }
    .to_frame(&[], &[]);
    e.handle_outer(ms(0), &syn);
    assert_eq!(drain(&mut e).len(), 1);
    let synack = Build {
        eth_src: GUEST_MAC,
        eth_dst: PEER_MAC,
        net: ep.gnet(),
        ip_id: 1,
        src_port: GPORT,
        dst_port: PPORT,
        seq: GISN,
        ack: PISN + 1,
        flags: flags::SYN | flags::ACK,
        window: 65160,
        mss: Some(1460),
        wscale: Some(7),
        sack_permitted: true,
        timestamps: Some((900, 100)),
        sack: &[],
    }
    .to_frame(&[], &[]);
    e.handle_inner(ms(1), &synack);
    assert!(drain(&mut e).is_empty());
    assert_eq!(commit_all(&mut e, ms(2)).len(), 1);
    // The peer's ACK establishes the flow and reaches the guest rewritten.
    e.handle_outer(
        ms(3),
        &ep.peer(
            PISN + 1,
            GISN.wrapping_add(1),
            flags::ACK,
            2000,
            Some((110, 900)),
            &[],
            &[],
        ),
    );
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let s = seg(&out[0].frame);
    assert_eq!(s.ack, GISN.wrapping_add(1));
    assert!(u32::from(s.window) << 5 >= 99_000);
    assert_eq!(e.stats().speculative_flows, 1);
    // Guest data is acknowledged at once.
    e.handle_inner(
        ms(4),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            509,
            Some((901, 110)),
            &[],
            b"hello",
        ),
    );
    let out = drain(&mut e);
    assert_eq!(seg(&out[0].frame).ack, GISN.wrapping_add(6));
}

#[test]
fn global_cap_blocks_new_speculation() {
    let ep = Ep { v6: false };
    let mut c = cfg(Mode::Speculative, 100_000);
    c.global_cap = 4096; // less than the SYN-ACK window (8192)
    let mut e = Engine::new(c).expect("valid config");
    e.handle_inner(ms(0), &ep.guest_syn());
    commit_all(&mut e, ms(1));
    e.handle_outer(ms(2), &ep.peer_synack());
    drain(&mut e);
    e.handle_inner(
        ms(3),
        &ep.guest(GISN.wrapping_add(1), PISN + 1, flags::ACK, 502, None, &[], &[]),
    );
    e.handle_inner(
        ms(3),
        &ep.guest(GISN.wrapping_add(1), PISN + 1, flags::ACK, 502, None, &[], b"data"),
    );
    assert!(drain(&mut e).is_empty(), "not speculated: no speculative ACK");
    assert_eq!(e.stats().speculative_flows, 0);
    assert_eq!(commit_all(&mut e, ms(4)).len(), 2);
}

/// Feed a valid flow's frames with random corruption, random frames and
/// random timer/epoch events: the engine never panics and its memory
/// accounting stays consistent.
fn fuzz_run(ops: Vec<(u8, Vec<u8>, u16)>, v6: bool) {
    let ep = Ep { v6 };
    let mut e = open(ep, 50_000);
    let mut now = 10u64;
    let mut gseq = GISN.wrapping_add(1);
    for (op, bytes, x) in ops {
        now += u64::from(x % 50);
        let t = ms(now);
        match op % 10 {
            0 => e.handle_inner(t, &bytes),
            1 => e.handle_outer(t, &bytes),
            2 | 3 => {
                let g = ep.guest(gseq, PISN + 1, flags::ACK, x, Some((x.into(), 5000)), &[], &bytes);
                gseq = gseq.wrapping_add(bytes.len() as u32);
                let mut g2 = g.clone();
                if op % 10 == 3 && !bytes.is_empty() {
                    let i = usize::from(x) % g2.len();
                    g2[i] ^= bytes[0] | 1;
                }
                e.handle_inner(t, &g2);
            }
            4 | 5 => {
                let ack = GISN.wrapping_add(u32::from(x) * 97);
                let fl = if bytes.first().is_some_and(|b| b & 1 == 1) {
                    flags::ACK | flags::FIN
                } else {
                    flags::ACK
                };
                let sack = [(ack.wrapping_add(10), ack.wrapping_add(u32::from(x)))];
                let mut p = ep.peer(PISN + 1 + u32::from(x), ack, fl, x, Some((6000, 1)), &sack, &bytes);
                if op % 10 == 5 && !p.is_empty() {
                    let i = usize::from(x) % p.len();
                    p[i] ^= 0x5a;
                }
                e.handle_outer(t, &p);
            }
            6 => {
                let id = e.seal_epoch(t);
                e.commit_epoch(t, id);
            }
            7 => {
                e.seal_epoch(t);
            }
            8 => e.commit_epoch(t, EpochId(u64::from(x))),
            _ => {
                if let Some(d) = e.poll_timeout() {
                    now = now.max(d.as_millis() as u64);
                    e.handle_timeout(d.max(t));
                }
            }
        }
        while e.poll_transmit().is_some() {}
        let st = e.stats();
        e.check_invariants().unwrap_or_else(|err| panic!("{err}: {st:?}"));
        // Held bytes are reserved (+1: a FIN), until the idle timeout
        // gives the reservation of a flow still holding bytes back.
        if now < IDLE.as_millis() as u64 {
            assert!(st.bytes_held <= st.bytes_reserved + 1, "{st:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(a in proptest::collection::vec(any::<u8>(), 0..200), b in proptest::collection::vec(any::<u8>(), 0..200)) {
        for mode in [Mode::Speculative, Mode::Buffered, Mode::Direct] {
            let mut e = Engine::new(cfg(mode, 10_000)).expect("valid config");
            e.handle_inner(ms(0), &a);
            e.handle_outer(ms(0), &b);
            // Also as payload of a valid Ethernet/IPv4 header prefix.
            let mut f = Ep { v6: false }.guest_syn();
            f.truncate(14 + 20);
            f.extend_from_slice(&a);
            e.handle_inner(ms(1), &f);
            e.handle_outer(ms(1), &f);
            let id = e.seal_epoch(ms(2));
            e.commit_epoch(ms(2), id);
            e.handle_timeout(ms(10_000));
            while e.poll_transmit().is_some() {}
        }
    }

    #[test]
    fn corrupted_flow_traffic_never_panics(
        ops in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..1500), any::<u16>()), 0..60),
        v6 in any::<bool>(),
    ) {
        fuzz_run(ops, v6);
    }
}

/// Two flows share a global cap: the one that is blocked by the cap gets a
/// window update when the other's memory is released.
#[test]
fn global_cap_window_update_across_flows() {
    let ep = Ep { v6: false };
    let mut c = cfg(Mode::Speculative, 20_000);
    c.global_cap = 30_000;
    let mut e = Engine::new(c).expect("valid config");
    let with_port = |f: Vec<u8>, port: u16, guest: bool| -> Vec<u8> {
        // Re-build the frame with another guest port.
        let s = seg(&f);
        Build {
            eth_src: s.eth_src,
            eth_dst: s.eth_dst,
            net: s.net,
            ip_id: 1,
            src_port: if guest { port } else { s.src_port },
            dst_port: if guest { s.dst_port } else { port },
            seq: s.seq,
            ack: s.ack,
            flags: s.flags,
            window: s.window,
            mss: s.opts.mss,
            wscale: s.opts.wscale,
            sack_permitted: s.opts.sack_permitted,
            timestamps: s.opts.timestamps,
            sack: s.opts.sack_blocks(),
        }
        .to_frame(s.payload, &[])
    };
    let ports = [GPORT, GPORT + 1];
    // Flow 0 opens and fills its budget (20000); then flow 1 opens (it can
    // reserve its SYN-ACK window, 8192) and fills what the pool allows.
    let mut seqs = [GISN.wrapping_add(1); 2];
    for (i, &port) in ports.iter().enumerate() {
        e.handle_inner(ms(0), &with_port(ep.guest_syn(), port, true));
        commit_all(&mut e, ms(1));
        e.handle_outer(ms(2), &with_port(ep.peer_synack(), port, false));
        e.handle_inner(
            ms(3),
            &with_port(
                ep.guest(
                    GISN.wrapping_add(1),
                    PISN + 1,
                    flags::ACK,
                    502,
                    Some((1001, 5000)),
                    &[],
                    &[],
                ),
                port,
                true,
            ),
        );
        commit_all(&mut e, ms(4));
        assert_eq!(e.stats().speculative_flows, i + 1);
        for _ in 0..100 {
            let g = ep.guest(seqs[i], PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &[1; 1000]);
            e.handle_inner(ms(10), &with_port(g, port, true));
            let out = drain(&mut e);
            let a = seg(&out[0].frame);
            if a.ack == seqs[i] {
                break;
            }
            seqs[i] = a.ack;
        }
        commit_all(&mut e, ms(11));
    }
    let st = e.stats();
    assert!(st.bytes_reserved <= 30_000 + 8, "{st:?}");
    assert!(st.bytes_held <= 30_000, "{st:?}");
    assert!(st.bytes_held >= 29_000, "{st:?}");
    // The peer acknowledges flow 0: flow 1 (blocked by the global cap)
    // learns that it may send again.
    let acked = seqs[0];
    let sent0 = GISN
        .wrapping_add(1)
        .wrapping_add(8192.min(acked.wrapping_sub(GISN.wrapping_add(1))));
    e.handle_outer(
        ms(50),
        &with_port(
            ep.peer(PISN + 1, sent0, flags::ACK, 8192, Some((5010, 1100)), &[], &[]),
            ports[0],
            false,
        ),
    );
    let out = drain(&mut e);
    let to_flow1: Vec<_> = out
        .iter()
        .filter(|t| t.to == Side::Inner && seg(&t.frame).dst_port == ports[1])
        .collect();
    assert_eq!(
        to_flow1.len(),
        1,
        "window update for the flow blocked by the global cap"
    );
    assert!(seg(&to_flow1[0].frame).window > 0);
}

#[test]
fn checksum_offloaded_frames() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 100_000);
    // Peer data with a partial checksum (as with VIRTIO_NET_HDR_F_NEEDS_CSUM):
    // completed, rewritten, delivered with a valid checksum.
    let mut p = ep.peer(
        PISN + 1,
        GISN.wrapping_add(1),
        flags::ACK,
        100,
        Some((5100, 1001)),
        &[],
        b"offloaded",
    );
    let off = 14 + 20 + 16;
    p[off] = 0x12;
    p[off + 1] = 0x34;
    e.handle_outer(ms(10), &p);
    assert!(drain(&mut e).is_empty(), "a bad checksum is dropped when not declared");
    e.handle_outer_with(ms(10), &p, Checksum::Partial);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(seg(&out[0].frame).payload, b"offloaded");
    // Declared verified: not checked again.
    let p2 = ep.peer(
        PISN + 10,
        GISN.wrapping_add(1),
        flags::ACK,
        100,
        Some((5101, 1001)),
        &[],
        b"x",
    );
    e.handle_outer_with(ms(11), &p2, Checksum::Verified);
    assert_eq!(drain(&mut e).len(), 1);
    // Speculated guest data with a partial checksum (the field holds
    // anything: it is never summed): acknowledged at once, and after the
    // commit sent in a frame the engine built, its checksum valid.
    let mut d = ep.guest(
        GISN.wrapping_add(1),
        PISN + 11,
        flags::ACK | flags::PSH,
        502,
        None,
        &[],
        b"speculated",
    );
    d[off] = 0xde;
    d[off + 1] = 0xad;
    e.handle_inner_with(ms(12), &d, Checksum::Partial);
    let acks = drain(&mut e);
    assert_eq!(acks.len(), 1, "speculative ACK");
    assert_eq!(seg(&acks[0].frame).ack, GISN.wrapping_add(11));
    let out = commit_all(&mut e, ms(13));
    let data: Vec<_> = out.iter().filter(|t| t.to == Side::Outer).collect();
    assert_eq!(data.len(), 1);
    assert_eq!(seg(&data[0].frame).payload, b"speculated");
    // Guest frames with partial checksums: speculated data is re-built
    // anyway; a held (fallback) frame goes out completed.
    let mut g = ep.guest(7, 8, flags::ACK, 100, None, &[], b"fallback");
    let goff = 14 + 20 + 16;
    g[goff] = 0;
    g[goff + 1] = 0;
    let mut e2 = Engine::new(cfg(Mode::Speculative, 10_000)).expect("valid config");
    e2.handle_inner_with(ms(0), &g, Checksum::Partial);
    let out = commit_all(&mut e2, ms(1));
    assert_eq!(out.len(), 1);
    let _ = seg(&out[0].frame); // checks the checksum
}

#[test]
fn zero_window_probes_and_abort_when_peer_is_gone() {
    let ep = Ep { v6: false };
    let mut c = cfg(Mode::Speculative, 100_000);
    c.max_retries = 3;
    let mut e = Engine::new(c).expect("valid config");
    e.handle_inner(ms(0), &ep.guest_syn());
    commit_all(&mut e, ms(1));
    e.handle_outer(ms(2), &ep.peer_synack());
    e.handle_inner(
        ms(3),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1001, 5000)),
            &[],
            &[],
        ),
    );
    commit_all(&mut e, ms(4));
    drain(&mut e);
    e.handle_inner(
        ms(10),
        &ep.guest(
            GISN.wrapping_add(1),
            PISN + 1,
            flags::ACK,
            502,
            Some((1100, 5000)),
            &[],
            &[5; 3000],
        ),
    );
    drain(&mut e);
    let out = commit_all(&mut e, ms(11));
    let end = out
        .iter()
        .map(|t| {
            let s = seg(&t.frame);
            s.seq.wrapping_add(s.payload.len() as u32)
        })
        .max_by(|a, b| (a.wrapping_sub(*b) as i32).cmp(&0))
        .unwrap();
    // The peer acknowledges some data with a zero window: persist probes,
    // answered probes keep the flow alive.
    e.handle_outer(
        ms(20),
        &ep.peer(PISN + 1, end, flags::ACK, 0, Some((5100, 1100)), &[], &[]),
    );
    drain(&mut e);
    // More data from the guest cannot be sent into the zero window.
    e.handle_inner(
        ms(21),
        &ep.guest(end, PISN + 1, flags::ACK, 502, Some((1200, 5000)), &[], &[6; 2000]),
    );
    drain(&mut e);
    assert!(commit_all(&mut e, ms(22)).is_empty());
    for i in 0..6 {
        let t = e.poll_timeout().expect("persist timer");
        e.handle_timeout(t);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        let s = seg(&out[0].frame);
        assert_eq!(s.seq, end.wrapping_sub(1), "probe {i}: old sequence number");
        assert!(s.payload.is_empty());
        e.handle_outer(t, &ep.peer(PISN + 1, end, flags::ACK, 0, Some((5100, 1100)), &[], &[]));
        drain(&mut e);
    }
    assert_eq!(e.stats().zero_window_probes, 6);
    assert_eq!(e.stats().speculative_flows, 1);
    // Now the peer is gone: after max_retries unanswered probes, RST both ways.
    let mut rst = (false, false);
    for _ in 0..10 {
        let Some(t) = e.poll_timeout() else { break };
        e.handle_timeout(t);
        for tx in drain(&mut e) {
            if seg(&tx.frame).has(flags::RST) {
                match tx.to {
                    Side::Inner => rst.0 = true,
                    Side::Outer => rst.1 = true,
                }
            }
        }
        if rst.0 {
            break;
        }
    }
    assert_eq!(rst, (true, true));
    assert_eq!(e.stats().aborted_flows, 1);
    assert_eq!(e.stats().bytes_held, 0);
}

/// A lost tail draws no duplicate ACKs: the tail loss probe (the last
/// segment again, two RTTs on) makes the peer reveal the hole long before
/// the RTO, and a retransmission lost again is resent once the peer keeps
/// SACKing past it for more than an RTT.
#[test]
fn tail_loss_probe_and_lost_retransmission_beat_the_rto() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let seg_len = 1388u32;
    let base = GISN.wrapping_add(1);
    let data = vec![5u8; seg_len as usize * 5];
    let end = base.wrapping_add(data.len() as u32);
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
    );
    drain(&mut e);
    assert_eq!(commit_all(&mut e, ms(20)).len(), 5);
    // The first two segments arrive (an RTT sample of 10 ms); the tail of
    // three is lost, so no duplicate ACK will ever come.
    let peer_ack =
        |ack: u32, sack: &[(u32, u32)]| ep.peer(PISN + 1, ack, flags::ACK, 8192, Some((5100, 1100)), sack, &[]);
    e.handle_outer(ms(30), &peer_ack(base.wrapping_add(2 * seg_len), &[]));
    assert!(drain(&mut e).is_empty());
    let probe_at = e.poll_timeout().expect("a timer");
    assert!(
        probe_at < ms(100),
        "probe after ~2 RTTs, not the 200 ms+ RTO: {probe_at:?}"
    );
    e.handle_timeout(probe_at);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(
        seg(&out[0].frame).seq,
        base.wrapping_add(4 * seg_len),
        "the last segment again"
    );
    assert_eq!(e.stats().tail_probes, 1);
    assert_eq!(e.stats().timeouts, 0);
    // The probe's SACK shows the hole: recovery retransmits it at once.
    let t = probe_at + ms(10);
    e.handle_outer(
        t,
        &peer_ack(base.wrapping_add(2 * seg_len), &[(base.wrapping_add(4 * seg_len), end)]),
    );
    let retx: Vec<u32> = drain(&mut e).iter().map(|t| seg(&t.frame).seq).collect();
    assert_eq!(retx.first(), Some(&base.wrapping_add(2 * seg_len)), "{retx:?}");
    assert_eq!(e.stats().fast_recoveries, 1);
    // That retransmission is lost as well; the peer keeps SACKing newer
    // data (here: the other hole's retransmission) well over an RTT later.
    let later = t + ms(30);
    e.handle_outer(
        later,
        &peer_ack(base.wrapping_add(2 * seg_len), &[(base.wrapping_add(3 * seg_len), end)]),
    );
    let retx: Vec<u32> = drain(&mut e).iter().map(|t| seg(&t.frame).seq).collect();
    assert_eq!(
        retx,
        vec![base.wrapping_add(2 * seg_len)],
        "the lost retransmission again"
    );
    assert_eq!(e.stats().lost_retransmits, 1);
    assert_eq!(e.stats().timeouts, 0);
    e.handle_outer(later + ms(10), &peer_ack(end, &[]));
    assert!(e.is_idle());
    assert_eq!(e.poll_timeout(), Some(later + ms(10) + IDLE), "only the idle timeout");
}

/// Fuzzer find: a SACK block whose edges are more than 2^31 apart passed
/// the pairwise sequence-space trimming (l >= snd_una, r <= snd_max and
/// l < r all held), so `Flow::pipe` saw 1.5 GB SACKed out of a 7 kB
/// flight: an overflow (abort with overflow checks), in release a bogus
/// fast recovery. Blocks outside [snd_una, snd_max] must be ignored.
#[test]
fn wrapping_sack_block_is_ignored() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let seg_len = 1388u32;
    let base = GISN.wrapping_add(1);
    let data = vec![9u8; seg_len as usize * 5];
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
    );
    drain(&mut e);
    assert_eq!(commit_all(&mut e, ms(20)).len(), 5);
    let peer_ack =
        |ack: u32, sack: &[(u32, u32)]| ep.peer(PISN + 1, ack, flags::ACK, 8192, Some((5100, 1100)), sack, &[]);
    // The fuzzer's block, relative to a snd_una of 1001.
    let wild = [(base.wrapping_add(1_397_968_838), base.wrapping_add(2_885_680_151))];
    // Wholly above snd_max, and wholly below snd_una.
    let above = [(base.wrapping_add(6 * seg_len), base.wrapping_add(9 * seg_len))];
    let below = [(base.wrapping_sub(9 * seg_len), base.wrapping_sub(seg_len))];
    for sack in [&wild[..], &above[..], &below[..]] {
        e.handle_outer(ms(30), &peer_ack(base, sack));
        assert!(drain(&mut e).is_empty(), "no retransmission for {sack:?}");
        assert_eq!(e.stats().fast_recoveries, 0, "{sack:?}");
        assert_eq!(e.stats().retransmits, 0, "{sack:?}");
    }
    // A genuine SACK of three segments above a hole still starts recovery
    // (the block straddling snd_max is trimmed to it).
    let real = [(base.wrapping_add(2 * seg_len), base.wrapping_add(7 * seg_len))];
    e.handle_outer(ms(40), &peer_ack(base, &real));
    let retx: Vec<u32> = drain(&mut e).iter().map(|t| seg(&t.frame).seq).collect();
    assert_eq!(e.stats().fast_recoveries, 1);
    assert_eq!(retx.first(), Some(&base), "{retx:?}");
    e.handle_outer(ms(50), &peer_ack(base.wrapping_add(data.len() as u32), &[]));
    assert!(e.is_idle());
}

/// Fuzzer find: a peer RST closing a flow whose tail loss probe was armed
/// left the probe's deadline behind (`release_all` cleared the RTO and
/// persist deadlines only), and `handle_timeout` never cleared it either:
/// `poll_timeout()` stayed in the past for the whole time_wait and a
/// driver would spin at 100% CPU.
#[test]
fn no_timer_stays_due_after_peer_rst() {
    let ep = Ep { v6: false };
    let mut e = open(ep, 1 << 20);
    let seg_len = 1388u32;
    let base = GISN.wrapping_add(1);
    let data = vec![5u8; seg_len as usize * 4];
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &data),
    );
    drain(&mut e);
    assert_eq!(commit_all(&mut e, ms(20)).len(), 4);
    // An RTT sample (10 ms) and the tail still out: the probe is armed.
    e.handle_outer(
        ms(30),
        &ep.peer(
            PISN + 1,
            base.wrapping_add(seg_len),
            flags::ACK,
            8192,
            Some((5100, 1100)),
            &[],
            &[],
        ),
    );
    let probe_at = e.poll_timeout().expect("tail loss probe armed");
    assert!(probe_at < ms(100), "{probe_at:?}");
    // The peer resets the flow before the probe is due.
    e.handle_outer(ms(40), &ep.peer(PISN + 1, 0, flags::RST, 0, None, &[], &[]));
    assert_eq!(drain(&mut e).len(), 1, "the RST passes to the guest");
    assert_eq!(e.stats().speculative_flows, 0);
    // Drive the timers as a driver would: every deadline handled moves on.
    let mut now = ms(40);
    for _ in 0..10 {
        let Some(d) = e.poll_timeout() else { break };
        now = now.max(d);
        e.handle_timeout(now);
        drain(&mut e);
        let next = e.poll_timeout();
        assert!(next.is_none_or(|n| n > now), "timer still due at {now:?}: {next:?}");
    }
    assert_eq!(e.stats().tail_probes, 0, "no probe on a closed flow");
    assert_eq!(e.stats().flows, 0, "removed after time_wait");
    assert_eq!(e.poll_timeout(), None);
}

/// Fuzzer find: `min_rto > max_rto` made the first RTT sample panic
/// (`Duration::clamp`). Inconsistent configurations are refused up front,
/// with an error naming the field.
#[test]
fn inconsistent_config_is_refused() {
    use remora_speculate::{ConfigError, EngineReplica};
    let good = cfg(Mode::Speculative, 100_000);
    assert!(Engine::new(good.clone()).is_ok());
    assert!(Engine::new(Config::default()).is_ok());
    let rto = Config {
        min_rto: Duration::from_secs(2),
        max_rto: Duration::from_secs(1),
        initial_rto: Duration::from_secs(1),
        ..good.clone()
    };
    let err = Engine::new(rto.clone()).expect_err("min_rto > max_rto");
    assert!(matches!(err, ConfigError::RtoBounds { .. }), "{err:?}");
    assert!(err.to_string().contains("min_rto"), "{err}");
    // The replica's engine after a failover is checked the same way.
    assert_eq!(EngineReplica::new().to_engine(rto.clone()).err(), Some(err.clone()));
    assert_eq!(EngineReplica::new().into_engine(rto).err(), Some(err));
    let bad: Vec<(&str, Config)> = vec![
        (
            "per_flow_budget",
            Config {
                per_flow_budget: 0,
                ..good.clone()
            },
        ),
        (
            "per_flow_budget",
            Config {
                per_flow_budget: 3 << 30,
                ..good.clone()
            },
        ),
        (
            "global_cap",
            Config {
                global_cap: 0,
                ..good.clone()
            },
        ),
        (
            "buffered_cap",
            Config {
                buffered_cap: 0,
                ..good.clone()
            },
        ),
        ("mtu", Config { mtu: 0, ..good.clone() }),
        (
            "mtu",
            Config {
                mtu: 100_000,
                ..good.clone()
            },
        ),
        (
            "tso_max",
            Config {
                tso_max: 65_536,
                ..good.clone()
            },
        ),
        (
            "initial_cwnd",
            Config {
                initial_cwnd: 0,
                ..good.clone()
            },
        ),
        (
            "min_rto",
            Config {
                min_rto: Duration::ZERO,
                ..good.clone()
            },
        ),
        (
            "initial_rto",
            Config {
                initial_rto: Duration::ZERO,
                ..good.clone()
            },
        ),
        (
            "initial_rto",
            Config {
                initial_rto: Duration::from_secs(120),
                ..good.clone()
            },
        ),
        (
            "max_rto",
            Config {
                max_rto: Duration::MAX,
                ..good.clone()
            },
        ),
        (
            "handshake_timeout",
            Config {
                handshake_timeout: Duration::ZERO,
                ..good.clone()
            },
        ),
        (
            "time_wait",
            Config {
                time_wait: Duration::MAX,
                ..good.clone()
            },
        ),
    ];
    for (field, c) in bad {
        let err = Engine::new(c.clone()).expect_err(field);
        assert!(err.to_string().contains(field), "{field}: {err}");
        assert_eq!(c.validate(), Err(err));
    }
    // Allowed extremes.
    for c in [
        Config {
            max_flows: 0,
            ..good.clone()
        },
        Config {
            time_wait: Duration::ZERO,
            rst_linger: Duration::ZERO,
            ..good.clone()
        },
        Config {
            per_flow_budget: 1,
            global_cap: 1,
            ..good.clone()
        },
    ] {
        assert_eq!(c.validate(), Ok(()), "{c:?}");
    }
}

/// Fuzzer find: a guest RST waiting for the peer's ACK of the data before
/// it, then an abort (the peer is gone): the abort resets both sides, but
/// the pending RST stayed pending, was sent again at its linger deadline,
/// and with `time_wait` 0 the flow stayed due forever (`poll_timeout() ==
/// now` after `handle_timeout(now)`).
#[test]
fn abort_with_a_guest_rst_pending_resets_once_and_goes() {
    let ep = Ep { v6: false };
    let mut e = open_with(
        ep,
        Config {
            max_retries: 1,
            time_wait: Duration::ZERO,
            ..cfg(Mode::Speculative, 100_000)
        },
    );
    let base = GISN.wrapping_add(1);
    e.handle_inner(
        ms(10),
        &ep.guest(base, PISN + 1, flags::ACK, 502, Some((1100, 5000)), &[], &[4; 500]),
    );
    e.handle_inner(
        ms(11),
        &ep.guest(base.wrapping_add(500), PISN + 1, flags::RST, 0, None, &[], &[]),
    );
    drain(&mut e);
    let out = commit_all(&mut e, ms(20));
    assert_eq!(out.len(), 1, "the data; the RST waits for its ACK");
    let mut rsts = 0;
    let mut now = ms(20);
    for _ in 0..20 {
        let Some(d) = e.poll_timeout() else { break };
        now = now.max(d);
        e.handle_timeout(now);
        rsts += drain(&mut e)
            .iter()
            .filter(|t| t.to == Side::Outer && seg(&t.frame).has(flags::RST))
            .count();
        let next = e.poll_timeout();
        assert!(next.is_none_or(|n| n > now), "still due at {now:?}: {next:?}");
    }
    assert_eq!(e.stats().aborted_flows, 1);
    assert_eq!(rsts, 1, "one RST to the peer");
    assert_eq!(e.stats().flows, 0);
    assert_eq!(e.poll_timeout(), None);
}

//! Structured fuzzing of the engine, shared by the seeded stable test
//! (`tests/fuzz_ops.rs`) and the cargo-fuzz target (`fuzz/`, which
//! includes this file by path).
//!
//! Arbitrary bytes decode into a configuration (mode, small budgets and
//! global caps, timers; sometimes raw numbers, which `Engine::new` must
//! either refuse or run with) and a sequence of operations on up to four
//! flows, each between a model guest and a model peer that follow the
//! engine's outputs loosely: handshakes (active and passive), data both
//! ways (TSO-sized too, retransmitted, with gaps), pure ACKs with SACK
//! blocks and duplicate-ACK bursts (wild and wrapping values included),
//! RST and FIN from either side, keepalives, seal/commit (late, coalesced,
//! of unknown epochs), small and huge time jumps, checkpoints applied to a
//! replica (lost deltas, new bases, corrupted encodings) and failover to
//! the replica's engine, random and corrupted frames.
//!
//! After every operation: no panic, `Engine::check_invariants` (the
//! counters add up, held bytes inside the offered windows, windows within
//! the per-flow budget, the pool within `global_cap`, raw frames within
//! `buffered_cap`), and after `handle_timeout(now)` no timer still due
//! (`poll_timeout()` is `None` or later than `now`). After every checkpoint
//! the replica rebuilds an engine equal to the primary.

#![allow(dead_code)]

use std::time::Duration;

use remora_speculate::wire::{self, flags, Build, Net, Parsed};
use remora_speculate::{Checksum, Config, Engine, EngineDelta, EngineReplica, EpochId, Mode, Side};

/// Print every operation and the engine's state (for replays).
pub static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const NFLOWS: usize = 4;
/// Operations per input at most (keeps every input fast).
const MAX_OPS: usize = 3000;

/// Reads the input; past its end, zeros.
pub struct Input<'a> {
    d: &'a [u8],
    i: usize,
}

impl<'a> Input<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Input { d, i: 0 }
    }
    pub fn done(&self) -> bool {
        self.i >= self.d.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[usize::from(self.u8()) % v.len()]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let end = self.d.len().min(self.i + n);
        let v = self.d.get(self.i..end).map(<[u8]>::to_vec).unwrap_or_default();
        self.i += n;
        v
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The configuration: mostly consistent values chosen to reach corner
/// cases (tiny budgets and caps), sometimes raw numbers.
pub fn decode_config(inp: &mut Input<'_>) -> Config {
    let sel = inp.u8();
    if sel & 0x0f == 0x0f {
        // Raw: Engine::new must refuse what it cannot run.
        return Config {
            mode: inp.pick(&[Mode::Speculative, Mode::Buffered, Mode::Direct]),
            per_flow_budget: inp.u32() as usize,
            global_cap: inp.u32() as usize,
            buffered_cap: inp.u32() as usize,
            max_flows: usize::from(inp.u8()),
            mtu: usize::from(inp.u16()),
            tso_max: usize::from(inp.u16()),
            min_rto: Duration::from_micros(inp.u64() % (1 << 40)),
            max_rto: Duration::from_micros(inp.u64() % (1 << 40)),
            initial_rto: Duration::from_micros(inp.u64() % (1 << 40)),
            max_retries: u32::from(inp.u8()),
            initial_cwnd: inp.u32(),
            verify_outer_checksums: inp.bool(),
            time_wait: Duration::from_micros(inp.u64() % (1 << 40)),
            handshake_timeout: Duration::from_micros(inp.u64() % (1 << 40)),
            rst_linger: Duration::from_micros(inp.u64() % (1 << 40)),
            idle_timeout: Duration::from_micros(inp.u64() % (1 << 40)),
            // From the selector (no extra byte read: recorded inputs keep
            // their meaning).
            mark_acks: sel & 0x10 != 0,
            offload_checksums: sel & 0x20 != 0,
            pacing: sel & 0x01 != 0,
            gather_payload: sel & 0x02 != 0,
        };
    }
    let mode = match sel >> 6 {
        0 | 1 => Mode::Speculative,
        2 => Mode::Buffered,
        _ => Mode::Direct,
    };
    let budget = inp.pick(&[1usize, 500, 1448, 3000, 10_000, 65_535, 100_000, 1 << 20]);
    let global_cap = inp.pick(&[1usize, budget / 2 + 1, budget, 2 * budget, 3 * budget + 1, 1 << 26]);
    let min_rto = inp.pick(&[ms(1), ms(200)]);
    let max_rto = min_rto.max(inp.pick(&[ms(200), ms(2000), Duration::from_secs(60)]));
    Config {
        mode,
        per_flow_budget: budget,
        global_cap,
        buffered_cap: inp.pick(&[65_549usize, 1 << 20, 64 << 20]),
        max_flows: inp.pick(&[1usize, 2, 3, 65536]),
        mtu: inp.pick(&[576usize, 1500, 9000]),
        tso_max: inp.pick(&[0usize, 3000, 64_000]),
        min_rto,
        max_rto,
        initial_rto: inp.pick(&[min_rto, ms(1000)]).min(max_rto),
        max_retries: inp.pick(&[0u32, 2, 15]),
        initial_cwnd: inp.pick(&[1u32, 10, 1024]),
        verify_outer_checksums: inp.bool(),
        time_wait: inp.pick(&[Duration::ZERO, ms(1), ms(1000)]),
        handshake_timeout: inp.pick(&[ms(1), Duration::from_secs(75)]),
        rst_linger: inp.pick(&[Duration::ZERO, Duration::from_secs(5)]),
        idle_timeout: inp.pick(&[Duration::from_secs(300), Duration::ZERO, ms(50), ms(1)]),
        mark_acks: sel & 0x10 != 0,
        offload_checksums: sel & 0x20 != 0,
        pacing: sel & 0x01 != 0,
        gather_payload: sel & 0x02 != 0,
    }
}

/// One flow's model endpoints (loose: they follow the engine's outputs).
#[derive(Clone, Debug, Default)]
struct Model {
    v6: bool,
    gisn: u32,
    pisn: u32,
    /// Next sequence number the guest / the peer sends.
    g_nxt: u32,
    p_nxt: u32,
    /// Highest ACK the guest received (from the engine).
    g_acked: u32,
    /// The peer's cumulative ACK, and the highest sequence number the
    /// engine sent it.
    p_ack: u32,
    out_hi: u32,
    /// Options negotiated (as the models announced them).
    g_ts: bool,
    p_ts: bool,
    sack: bool,
    p_ws: u8,
}

fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Model {
    fn gport(i: usize) -> u16 {
        40000 + i as u16
    }
    fn gnet(&self) -> Net {
        if self.v6 {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s[0] = 0xfd;
            d[0] = 0xfd;
            s[15] = 1;
            d[15] = 2;
            Net::V6 {
                src: s,
                dst: d,
                traffic_class: 0,
                flow_label: 0,
                hop_limit: 64,
            }
        } else {
            Net::V4 {
                src: [10, 0, 0, 1],
                dst: [192, 0, 2, 9],
                tos: 0,
                ttl: 64,
                df: true,
            }
        }
    }
}

/// Frame parameters the operations choose.
struct Seg<'a> {
    seq: u32,
    ack: u32,
    fl: u8,
    win: u16,
    syn_opts: Option<(Option<u16>, Option<u8>, bool)>,
    ts: Option<(u32, u32)>,
    sack: &'a [(u32, u32)],
    payload: &'a [u8],
}

fn build(m: &Model, i: usize, from_guest: bool, s: &Seg<'_>) -> Vec<u8> {
    let net = if from_guest { m.gnet() } else { m.gnet().reversed() };
    let (mss, wscale, sackp) = s.syn_opts.unwrap_or((None, None, false));
    let nsack = if s.ts.is_some() { 3 } else { 4 };
    Build {
        eth_src: if from_guest { GUEST_MAC } else { PEER_MAC },
        eth_dst: if from_guest { PEER_MAC } else { GUEST_MAC },
        net,
        ip_id: 7,
        src_port: if from_guest { Model::gport(i) } else { 443 },
        dst_port: if from_guest { 443 } else { Model::gport(i) },
        seq: s.seq,
        ack: s.ack,
        flags: s.fl,
        window: s.win,
        mss,
        wscale,
        sack_permitted: sackp,
        timestamps: s.ts,
        sack: &s.sack[..s.sack.len().min(nsack)],
    }
    .to_frame(s.payload, &[])
}

/// The harness: an engine, its replica and the flows' models.
pub struct Harness {
    pub cfg: Config,
    pub engine: Engine,
    now: Duration,
    m: [Model; NFLOWS],
    replica: EngineReplica,
    /// A delta was lost: the replica refuses the next one.
    replica_stale: bool,
    ts: u32,
    pub ops: usize,
    pub failovers: usize,
}

impl Harness {
    /// `None` if `Engine::new` refused the configuration.
    pub fn new(cfg: Config) -> Option<Harness> {
        let engine = Engine::new(cfg.clone()).ok()?;
        Some(Harness {
            cfg,
            engine,
            now: ms(1),
            m: Default::default(),
            replica: EngineReplica::new(),
            replica_stale: false,
            ts: 1,
            ops: 0,
            failovers: 0,
        })
    }

    fn tick_ts(&mut self) -> u32 {
        self.ts = self.ts.wrapping_add(1);
        self.ts
    }

    /// Delivers the engine's output to the models.
    fn drain(&mut self) {
        while let Some(mut t) = self.engine.poll_transmit() {
            if let Some(r) = t.held {
                // A gathered segment: headers here, payload still held (or
                // acknowledged meanwhile: then it is not sent at all).
                let Some((a, b)) = self.engine.held_payload(&r) else {
                    continue;
                };
                assert_eq!(a.len() + b.len(), r.len as usize, "held payload of the wrong length");
                t.frame.extend_from_slice(a);
                t.frame.extend_from_slice(b);
            }
            let Parsed::Tcp(s) = wire::parse(&t.frame) else {
                continue;
            };
            let (port, peer_port) = match t.to {
                Side::Outer => (s.src_port, s.dst_port),
                Side::Inner => (s.dst_port, s.src_port),
            };
            let i = usize::from(port.wrapping_sub(40000));
            if i >= NFLOWS || peer_port != 443 {
                continue;
            }
            let m = &mut self.m[i];
            match t.to {
                Side::Outer => {
                    let end = s.seq.wrapping_add(s.seq_len());
                    if lt(m.out_hi, end) || m.out_hi == 0 {
                        m.out_hi = end;
                    }
                }
                Side::Inner => {
                    if s.has(flags::ACK) && lt(m.g_acked, s.ack) {
                        m.g_acked = s.ack;
                    }
                }
            }
        }
    }

    fn inner(&mut self, f: &[u8], how: u8) {
        match how % 8 {
            0 => self.engine.handle_inner_with(self.now, f, Checksum::Partial),
            1 => self.engine.handle_inner_with(self.now, f, Checksum::Verified),
            _ => self.engine.handle_inner(self.now, f),
        }
    }

    fn outer(&mut self, f: &[u8], how: u8) {
        match how % 8 {
            0 => self.engine.handle_outer_with(self.now, f, Checksum::Partial),
            1 => self.engine.handle_outer_with(self.now, f, Checksum::Verified),
            _ => self.engine.handle_outer(self.now, f),
        }
    }

    /// The peer's ACK as an operation chooses it.
    fn peer_ack_choice(&mut self, i: usize, inp: &mut Input<'_>) -> u32 {
        let m = &self.m[i];
        let c = inp.u8();
        let step = u32::from(inp.u8()) * 100;
        match c % 8 {
            0..=2 => m.out_hi,
            3 => {
                let a = m.p_ack.wrapping_add(step);
                if lt(m.out_hi, a) {
                    m.out_hi
                } else {
                    a
                }
            }
            4 => m.p_ack,
            5 => m.p_ack.wrapping_sub(step),
            6 => inp.u32(),
            _ => m.gisn.wrapping_add(inp.u32() % 200_000),
        }
    }

    fn sack_blocks(&mut self, i: usize, inp: &mut Input<'_>) -> Vec<(u32, u32)> {
        let n = usize::from(inp.u8() % 5);
        let m = &self.m[i];
        (0..n)
            .map(|_| match inp.u8() % 6 {
                0 => (inp.u32(), inp.u32()),
                1 => {
                    // Wrapping: edges half the sequence space apart.
                    let l = m.p_ack.wrapping_add(inp.u32() | 0x4000_0000);
                    (l, l.wrapping_add(0x5000_0000 + inp.u32() % 0x3000_0000))
                }
                _ => {
                    let a = m.p_ack.wrapping_add(u32::from(inp.u16()));
                    (a, a.wrapping_add(1 + u32::from(inp.u16())))
                }
            })
            .collect()
    }

    fn window(inp: &mut Input<'_>) -> u16 {
        match inp.u8() % 6 {
            0 => 0,
            1 => 1,
            2 => inp.u16(),
            _ => 65535,
        }
    }

    fn ts_opt(&mut self, ok: bool, echo: u32) -> Option<(u32, u32)> {
        let t = self.tick_ts();
        ok.then_some((t, echo))
    }

    /// Decodes and runs one operation; `Err` on a violated invariant.
    pub fn step(&mut self, inp: &mut Input<'_>) -> Result<(), String> {
        self.ops += 1;
        let op = inp.u8();
        let i = usize::from(inp.u8()) % NFLOWS;
        let how = inp.u8();
        let mut timed = false;
        match op % 32 {
            // Guest SYN (active open).
            0 | 1 => {
                let gisn = match inp.u8() % 4 {
                    0 => 0xffff_f000,
                    1 => 1000,
                    2 => u32::MAX,
                    _ => inp.u32(),
                };
                let (mss, ws, sack, ts) = (
                    inp.pick(&[None, Some(536u16), Some(1460), Some(9000), Some(64)]),
                    inp.pick(&[None, Some(0u8), Some(7), Some(14)]),
                    inp.bool(),
                    !inp.u8().is_multiple_of(4),
                );
                self.m[i] = Model {
                    v6: i == 3,
                    gisn,
                    g_nxt: gisn.wrapping_add(1),
                    g_ts: ts,
                    sack,
                    ..Model::default()
                };
                let t = self.ts_opt(ts, 0);
                let f = build(
                    &self.m[i],
                    i,
                    true,
                    &Seg {
                        seq: gisn,
                        ack: 0,
                        fl: flags::SYN,
                        win: 64240,
                        syn_opts: Some((mss, ws, sack)),
                        ts: t,
                        sack: &[],
                        payload: &[],
                    },
                );
                self.inner(&f, how);
            }
            // Peer SYN-ACK.
            2 | 3 => {
                let m = &mut self.m[i];
                let pisn = inp.u32();
                m.pisn = pisn;
                m.p_nxt = pisn.wrapping_add(1);
                m.p_ack = m.gisn.wrapping_add(1);
                m.out_hi = m.p_ack;
                m.p_ts = !inp.u8().is_multiple_of(4);
                m.p_ws = inp.pick(&[0u8, 3, 7, 14]);
                let sack = inp.bool();
                m.sack &= sack;
                let mss = inp.pick(&[None, Some(1400u16), Some(536), Some(8960), Some(1)]);
                let ack = if inp.u8().is_multiple_of(8) { inp.u32() } else { m.p_ack };
                let (ws, g_ts) = (m.p_ws, m.g_ts);
                let t = self.ts_opt(self.m[i].p_ts, u32::from(g_ts));
                let f = build(
                    &self.m[i],
                    i,
                    false,
                    &Seg {
                        seq: pisn,
                        ack,
                        fl: flags::SYN | flags::ACK,
                        win: Self::window(inp),
                        syn_opts: Some((mss, Some(ws), sack)),
                        ts: t,
                        sack: &[],
                        payload: &[],
                    },
                );
                self.outer(&f, how);
            }
            // Guest's third ACK / pure ACK of peer data.
            4 | 5 => {
                let m = &self.m[i];
                let ack = if inp.u8().is_multiple_of(8) { inp.u32() } else { m.p_nxt };
                let seq = m.g_nxt;
                let sack = if inp.u8().is_multiple_of(4) {
                    let a = m.p_nxt;
                    vec![(a.wrapping_add(100), a.wrapping_add(1000))]
                } else {
                    Vec::new()
                };
                let t = self.ts_opt(self.m[i].g_ts, 7);
                let f = build(
                    &self.m[i],
                    i,
                    true,
                    &Seg {
                        seq,
                        ack,
                        fl: flags::ACK,
                        win: Self::window(inp),
                        syn_opts: None,
                        ts: t,
                        sack: &sack,
                        payload: &[],
                    },
                );
                self.inner(&f, how);
            }
            // Passive open: the peer's SYN, the guest's SYN-ACK, the peer's ACK.
            6 => {
                let pisn = inp.u32();
                let ts = inp.bool();
                self.m[i] = Model {
                    v6: i == 3,
                    pisn,
                    p_nxt: pisn.wrapping_add(1),
                    p_ts: ts,
                    g_ts: ts,
                    sack: inp.bool(),
                    p_ws: inp.pick(&[0u8, 7]),
                    ..Model::default()
                };
                let t = self.ts_opt(ts, 0);
                let (sack, ws) = (self.m[i].sack, self.m[i].p_ws);
                let f = build(
                    &self.m[i],
                    i,
                    false,
                    &Seg {
                        seq: pisn,
                        ack: 0,
                        fl: flags::SYN,
                        win: 65535,
                        syn_opts: Some((Some(1460), Some(ws), sack)),
                        ts: t,
                        sack: &[],
                        payload: &[],
                    },
                );
                self.outer(&f, how);
            }
            7 => {
                let gisn = inp.u32();
                let m = &mut self.m[i];
                m.gisn = gisn;
                m.g_nxt = gisn.wrapping_add(1);
                m.p_ack = m.g_nxt;
                m.out_hi = m.g_nxt;
                let (ts, sack, ack) = (m.g_ts, m.sack, m.p_nxt);
                let t = self.ts_opt(ts, 1);
                let f = build(
                    &self.m[i],
                    i,
                    true,
                    &Seg {
                        seq: gisn,
                        ack,
                        fl: flags::SYN | flags::ACK,
                        win: Self::window(inp),
                        syn_opts: Some((Some(1460), Some(inp.pick(&[0u8, 7])), sack)),
                        ts: t,
                        sack: &[],
                        payload: &[],
                    },
                );
                self.inner(&f, how);
            }
            8 => {
                let m = &self.m[i];
                let (seq, ack) = (m.p_nxt, m.g_nxt);
                let t = self.ts_opt(self.m[i].p_ts, 1);
                let f = build(
                    &self.m[i],
                    i,
                    false,
                    &Seg {
                        seq,
                        ack,
                        fl: flags::ACK,
                        win: Self::window(inp),
                        syn_opts: None,
                        ts: t,
                        sack: &[],
                        payload: &[],
                    },
                );
                self.outer(&f, how);
            }
            // Guest data (FIN sometimes): new, from what was acknowledged
            // (retransmission), or after a gap.
            9..=12 => {
                let len = match inp.u8() % 8 {
                    0 => 0,
                    1 => usize::from(inp.u8()),
                    2 => 64_000.min(usize::from(inp.u16())),
                    _ => 1448 * (1 + usize::from(inp.u8() % 4)),
                };
                let fin = inp.u8().is_multiple_of(8);
                let m = &self.m[i];
                let seq = match inp.u8() % 8 {
                    0 => m.g_acked,
                    1 => m.g_nxt.wrapping_add(u32::from(inp.u16())),
                    2 => m.g_nxt.wrapping_sub(u32::from(inp.u16())),
                    _ => m.g_nxt,
                };
                let payload = vec![(op ^ how) | 1; len];
                let ack = m.p_nxt;
                let t = self.ts_opt(self.m[i].g_ts, 7);
                let f = build(
                    &self.m[i],
                    i,
                    true,
                    &Seg {
                        seq,
                        ack,
                        fl: flags::ACK | flags::PSH | if fin { flags::FIN } else { 0 },
                        win: Self::window(inp),
                        syn_opts: None,
                        ts: t,
                        sack: &[],
                        payload: &payload,
                    },
                );
                let end = seq.wrapping_add(len as u32).wrapping_add(u32::from(fin));
                let m = &mut self.m[i];
                if lt(m.g_nxt, end) {
                    m.g_nxt = end;
                }
                self.inner(&f, how);
            }
            // Peer data (FIN sometimes).
            13 | 14 => {
                let len = match inp.u8() % 4 {
                    0 => 0,
                    1 => usize::from(inp.u8()),
                    _ => 1448,
                };
                let fin = inp.u8().is_multiple_of(8);
                let ack = self.peer_ack_choice(i, inp);
                let m = &self.m[i];
                let seq = match inp.u8() % 8 {
                    0 => m.p_nxt.wrapping_sub(1),
                    1 => inp.u32(),
                    _ => m.p_nxt,
                };
                let payload = vec![how | 2; len];
                let win = Self::window(inp);
                let t = self.ts_opt(self.m[i].p_ts, 7);
                let f = build(
                    &self.m[i],
                    i,
                    false,
                    &Seg {
                        seq,
                        ack,
                        fl: flags::ACK | if fin { flags::FIN } else { 0 },
                        win,
                        syn_opts: None,
                        ts: t,
                        sack: &[],
                        payload: &payload,
                    },
                );
                let m = &mut self.m[i];
                let end = seq.wrapping_add(len as u32).wrapping_add(u32::from(fin));
                if seq == m.p_nxt {
                    m.p_nxt = end;
                }
                if !lt(ack, m.p_ack) && !lt(m.out_hi, ack) {
                    m.p_ack = ack;
                }
                self.outer(&f, how);
            }
            // Peer pure ACK with SACK blocks, or a duplicate-ACK burst.
            15..=18 => {
                let ack = self.peer_ack_choice(i, inp);
                let win = Self::window(inp);
                let burst = if op % 32 == 18 { 1 + inp.u8() % 8 } else { 1 };
                for _ in 0..burst {
                    let sack = self.sack_blocks(i, inp);
                    let m = &self.m[i];
                    let seq = m.p_nxt;
                    let t = self.ts_opt(m.p_ts, 7);
                    let f = build(
                        &self.m[i],
                        i,
                        false,
                        &Seg {
                            seq,
                            ack,
                            fl: flags::ACK,
                            win,
                            syn_opts: None,
                            ts: t,
                            sack: &sack,
                            payload: &[],
                        },
                    );
                    self.outer(&f, how);
                }
                let m = &mut self.m[i];
                if !lt(ack, m.p_ack) && !lt(m.out_hi, ack) {
                    m.p_ack = ack;
                }
            }
            // RST from either side (in window or anywhere).
            19 => {
                let from_guest = inp.bool();
                let m = &self.m[i];
                let seq = match inp.u8() % 4 {
                    0 => inp.u32(),
                    _ if from_guest => m.g_nxt,
                    _ => m.p_nxt,
                };
                let ack = if from_guest { m.p_nxt } else { m.g_nxt };
                let fl = flags::RST | if inp.bool() { flags::ACK } else { 0 };
                let f = build(
                    &self.m[i],
                    i,
                    from_guest,
                    &Seg {
                        seq,
                        ack,
                        fl,
                        win: 0,
                        syn_opts: None,
                        ts: None,
                        sack: &[],
                        payload: &[],
                    },
                );
                if from_guest {
                    self.inner(&f, how);
                } else {
                    self.outer(&f, how);
                }
            }
            // Epochs.
            20 => {
                self.engine.seal_epoch(self.now);
            }
            21 | 22 => {
                let id = self.engine.seal_epoch(self.now);
                let id = match inp.u8() % 8 {
                    0 => EpochId(id.0.saturating_sub(u64::from(inp.u8()))),
                    1 => EpochId(inp.u64()),
                    _ => id,
                };
                self.engine.commit_epoch(self.now, id);
            }
            // Time: small, medium and huge jumps; the driver's timer loop.
            23 | 24 => {
                let d = match inp.u8() % 8 {
                    0 => Duration::from_secs(u64::from(inp.u32())),
                    1 => ms(u64::from(inp.u16())),
                    _ => ms(u64::from(inp.u8())),
                };
                self.now += d;
                if !inp.u8().is_multiple_of(4) {
                    self.engine.handle_timeout(self.now);
                    timed = true;
                }
            }
            25 | 26 => {
                if let Some(d) = self.engine.poll_timeout() {
                    self.now = self.now.max(d);
                }
                self.engine.handle_timeout(self.now);
                timed = true;
            }
            // Checkpoints and failover.
            27 => self.checkpoint(inp)?,
            28 => {
                if inp.u8().is_multiple_of(4) {
                    self.failover()?;
                } else {
                    self.checkpoint(inp)?;
                }
            }
            // Keepalive / window probe from either side.
            29 => {
                let from_guest = inp.bool();
                let m = &self.m[i];
                let (seq, ack) = if from_guest {
                    (m.g_nxt.wrapping_sub(1), m.p_nxt)
                } else {
                    (m.p_nxt.wrapping_sub(1), m.g_nxt)
                };
                let f = build(
                    &self.m[i],
                    i,
                    from_guest,
                    &Seg {
                        seq,
                        ack,
                        fl: flags::ACK,
                        win: Self::window(inp),
                        syn_opts: None,
                        ts: None,
                        sack: &[],
                        payload: &[],
                    },
                );
                if from_guest {
                    self.inner(&f, how);
                } else {
                    self.outer(&f, how);
                }
            }
            // A valid frame with a byte flipped, or random bytes.
            30 => {
                let m = &self.m[i];
                let (seq, ack) = (m.g_nxt, m.p_nxt);
                let mut f = build(
                    &self.m[i],
                    i,
                    how & 1 == 0,
                    &Seg {
                        seq,
                        ack,
                        fl: inp.u8(),
                        win: 1000,
                        syn_opts: None,
                        ts: Some((1, 2)),
                        sack: &[(seq, seq.wrapping_add(10))],
                        payload: &[1, 2, 3],
                    },
                );
                let at = usize::from(inp.u8()) % f.len();
                f[at] ^= inp.u8() | 1;
                if how & 2 == 0 {
                    self.inner(&f, how >> 2);
                } else {
                    self.outer(&f, how >> 2);
                }
            }
            _ => {
                let f = inp.bytes(RECORD_LEN);
                if how & 1 == 0 {
                    self.inner(&f, how >> 1);
                } else {
                    self.outer(&f, how >> 1);
                }
            }
        }
        self.drain();
        self.engine.check_invariants()?;
        let st = self.engine.stats();
        if st.bytes_reserved > self.cfg.global_cap as u64 {
            return Err(format!("reserved {} above global_cap", st.bytes_reserved));
        }
        if timed {
            if let Some(d) = self.engine.poll_timeout() {
                if d <= self.now {
                    return Err(format!(
                        "after handle_timeout({:?}) a timer is still due at {d:?}",
                        self.now
                    ));
                }
            }
        }
        Ok(())
    }

    /// Seal, capture, encode/decode, apply to the replica (or lose the
    /// delta, or re-base), and compare the replica's engine with ours.
    fn checkpoint(&mut self, inp: &mut Input<'_>) -> Result<(), String> {
        self.engine.seal_epoch(self.now);
        let c = inp.u8();
        if c.is_multiple_of(16) {
            self.engine.reset_checkpoint_base();
            self.replica_stale = false;
        }
        let d = self.engine.checkpoint();
        let bytes = d.encode();
        let back = EngineDelta::decode(&bytes).map_err(|e| format!("decode of our own delta: {e}"))?;
        if back != d {
            return Err("delta changed through encode/decode".into());
        }
        // A corrupted copy: decode and apply never panic.
        if c % 8 == 1 && !bytes.is_empty() {
            let mut bad = bytes.clone();
            let at = usize::from(inp.u16()) % bad.len();
            bad[at] ^= inp.u8() | 1;
            if inp.bool() {
                bad.truncate(at);
            }
            if let Ok(bd) = EngineDelta::decode(&bad) {
                let mut r = self.replica.clone();
                let _ = r.apply(&bd);
            }
        }
        if c % 16 == 2 {
            // Lost on the way.
            self.replica_stale = true;
            return Ok(());
        }
        match self.replica.apply(&back) {
            Ok(()) if self.replica_stale && !back.is_base() => {
                return Err("the replica applied a delta after a lost one".into())
            }
            Ok(()) => self.replica_stale = false,
            Err(e) if self.replica_stale => {
                let _ = e;
                self.engine.reset_checkpoint_base();
                return Ok(());
            }
            Err(e) => return Err(format!("apply: {e}")),
        }
        let rebuilt = self
            .replica
            .to_engine(self.cfg.clone())
            .map_err(|e| format!("to_engine: {e}"))?;
        if rebuilt != self.engine {
            return Err("the replica's engine differs from the primary's".into());
        }
        Ok(())
    }

    /// The primary dies: the replica's engine takes over.
    fn failover(&mut self) -> Result<(), String> {
        if self.replica.seq().is_none() {
            return Ok(());
        }
        let mut e = self
            .replica
            .to_engine(self.cfg.clone())
            .map_err(|e| format!("to_engine: {e}"))?;
        if let Some(ep) = self.replica.epoch() {
            e.commit_epoch(self.now, ep);
        }
        e.resume_after_failover(self.now);
        self.engine = e;
        self.replica = EngineReplica::new();
        self.replica_stale = false;
        self.failovers += 1;
        Ok(())
    }
}

/// Bytes of an input that decode the configuration.
pub const CONFIG_LEN: usize = 64;
/// Bytes of an input per operation: the operation, the flow, how the
/// frame is handed over, then the operation's parameters (zeros past the
/// record's end). Fixed-size records keep a mutation local to one
/// operation.
pub const RECORD_LEN: usize = 40;

/// Runs one input: `Err` describes the first violated invariant.
pub fn run(data: &[u8]) -> Result<(), String> {
    run_harness(data).map(drop)
}

/// [`run`], returning the harness at the end (`None`: the configuration
/// was refused).
pub fn run_harness(data: &[u8]) -> Result<Option<Harness>, String> {
    let (head, ops) = data.split_at(data.len().min(CONFIG_LEN));
    let cfg = decode_config(&mut Input::new(head));
    let Some(mut h) = Harness::new(cfg) else {
        return Ok(None);
    };
    let trace = TRACE.load(std::sync::atomic::Ordering::Relaxed);
    if trace {
        eprintln!("{:?}", h.cfg);
    }
    for rec in ops.chunks(RECORD_LEN).take(MAX_OPS) {
        if trace {
            eprintln!(
                "op {} {} flow {} at {:?}: {:02x?}",
                h.ops,
                rec[0] % 32,
                rec.get(1).map_or(0, |f| f % NFLOWS as u8),
                h.now,
                rec
            );
        }
        let r = h.step(&mut Input::new(rec));
        if trace {
            eprintln!(
                "  -> now {:?} timeout {:?} {:?}",
                h.now,
                h.engine.poll_timeout(),
                h.engine.stats()
            );
        }
        r.map_err(|e| format!("op {} ({}): {e}", h.ops, rec[0] % 32))?;
    }
    Ok(Some(h))
}

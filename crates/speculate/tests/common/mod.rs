//! A small model TCP endpoint and a lossy link, used to test the engine
//! end to end without any network.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use remora_speculate::wire::{self, flags, Build, Net, Parsed};
use remora_speculate::{Config, Engine, EngineDelta, EngineReplica, EpochId, Mode, Side};

/// xorshift64* — deterministic randomness from a proptest-chosen seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn pct(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }
}

fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum St {
    Closed,
    Listen,
    SynSent,
    SynRcvd,
    Established,
    Reset,
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub mss: u16,
    pub ws: Option<u8>,
    pub sack: bool,
    pub ts: bool,
}

/// A minimal TCP endpoint.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub name: &'static str,
    pub mac: [u8; 6],
    pub other_mac: [u8; 6],
    pub net: Net,
    pub port: u16,
    pub other_port: u16,
    pub opts: Opts,
    pub st: St,
    // negotiated
    pub snd_shift: u8,
    pub rcv_shift: u8,
    pub use_sack: bool,
    pub use_ts: bool,
    pub other_mss: u16,
    // send side
    pub isn: u32,
    pub snd_una: u32,
    pub snd_nxt: u32,
    pub snd_edge: u32,
    pub data: Vec<u8>,
    pub fin_wanted: bool,
    pub fin_acked: bool,
    pub rto_ms: Option<u64>,
    pub rto_at: Option<u64>,
    pub syn_at: u64,
    // receive side
    pub irs: u32,
    pub rcv_nxt: u32,
    pub ooo: BTreeMap<u64, Vec<u8>>,
    /// Offset of the latest out-of-order arrival (its SACK block goes
    /// first, RFC 2018).
    pub last_ooo: Option<u64>,
    /// A duplicate segment to report in the next ACK (DSACK, RFC 2883).
    pub dsack: Option<(u32, u32)>,
    pub received: Vec<u8>,
    pub rcv_buf: usize,
    pub unread: usize,
    pub read_rate: usize,
    pub fin_rcvd: bool,
    pub adv_edge: Option<u32>,
    pub ts_recent: u32,
    pub reply_fin_on_fin: bool,
    // checks
    pub max_ack_seen: Option<u32>,
    pub max_edge_seen: Option<u32>,
    pub violations: Vec<String>,
    pub check_ack_monotone: bool,
    pub check_window: bool,
    pub out: VecDeque<Vec<u8>>,
    pub ip_id: u16,
    pub last_desc: String,
    /// Application write rate (bytes per ms); `None`: all data at once.
    pub write_rate: Option<usize>,
    pub probe_at: Option<u64>,
}

impl Tcp {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &'static str,
        mac: [u8; 6],
        other_mac: [u8; 6],
        net: Net,
        port: u16,
        other_port: u16,
        opts: Opts,
        isn: u32,
    ) -> Self {
        Tcp {
            name,
            mac,
            other_mac,
            net,
            port,
            other_port,
            opts,
            st: St::Closed,
            snd_shift: 0,
            rcv_shift: 0,
            use_sack: false,
            use_ts: false,
            other_mss: 536,
            isn,
            snd_una: isn,
            snd_nxt: isn,
            snd_edge: isn,
            data: Vec::new(),
            fin_wanted: false,
            fin_acked: false,
            rto_ms: None,
            rto_at: None,
            syn_at: 0,
            irs: 0,
            rcv_nxt: 0,
            ooo: BTreeMap::new(),
            last_ooo: None,
            dsack: None,
            received: Vec::new(),
            rcv_buf: 1 << 20,
            unread: 0,
            read_rate: usize::MAX,
            fin_rcvd: false,
            adv_edge: None,
            ts_recent: 0,
            reply_fin_on_fin: false,
            max_ack_seen: None,
            max_edge_seen: None,
            violations: Vec::new(),
            check_ack_monotone: false,
            check_window: false,
            out: VecDeque::new(),
            ip_id: 0,
            last_desc: String::new(),
            write_rate: None,
            probe_at: None,
        }
    }

    fn data_end(&self) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(self.data.len() as u32)
    }

    pub fn all_acked(&self) -> bool {
        self.st == St::Established && self.snd_una == self.data_end().wrapping_add(u32::from(self.fin_wanted))
    }

    fn rcv_window(&self) -> u32 {
        self.rcv_buf.saturating_sub(self.unread) as u32
    }

    fn seg(&mut self, now: u64, seq: u32, fl: u8, payload: &[u8], syn_opts: bool) {
        let ts = if self.use_ts || (syn_opts && self.opts.ts) {
            Some((now as u32 + 1000, self.ts_recent))
        } else {
            None
        };
        let mut sack = Vec::new();
        if self.use_sack && !syn_opts {
            // As Linux: a duplicate first (DSACK), then the block holding
            // the latest arrival, then the others from the highest; blocks
            // are merged ranges, three at most (with timestamps).
            let base = self.irs.wrapping_add(1);
            if let Some(d) = self.dsack.take() {
                sack.push(d);
            }
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for (&off, b) in &self.ooo {
                let end = off + b.len() as u64;
                match ranges.last_mut() {
                    Some(r) if off <= r.1 => r.1 = r.1.max(end),
                    _ => ranges.push((off, end)),
                }
            }
            if let Some(i) = self
                .last_ooo
                .and_then(|o| ranges.iter().position(|&(a, b)| a <= o && o < b))
            {
                let r = ranges.remove(i);
                ranges.push(r);
            }
            for &(a, b) in ranges.iter().rev() {
                if sack.len() >= 3 {
                    break;
                }
                sack.push((base.wrapping_add(a as u32), base.wrapping_add(b as u32)));
            }
        }
        let win = if fl & flags::SYN != 0 {
            self.rcv_window().min(65535)
        } else {
            (self.rcv_window() >> self.rcv_shift).min(65535)
        };
        if fl & flags::ACK != 0 {
            let shift = if fl & flags::SYN != 0 { 0 } else { self.rcv_shift };
            let e = self.rcv_nxt.wrapping_add(win << shift);
            self.adv_edge = Some(match self.adv_edge {
                Some(o) if lt(e, o) => o,
                _ => e,
            });
        }
        let f = Build {
            eth_src: self.mac,
            eth_dst: self.other_mac,
            net: self.net,
            ip_id: self.ip_id,
            src_port: self.port,
            dst_port: self.other_port,
            seq,
            ack: if fl & flags::ACK != 0 { self.rcv_nxt } else { 0 },
            flags: fl,
            window: win as u16,
            mss: syn_opts.then_some(self.opts.mss),
            wscale: if syn_opts { self.opts.ws } else { None },
            sack_permitted: syn_opts && self.opts.sack,
            timestamps: ts,
            sack: &sack,
        }
        .to_frame(payload, &[]);
        self.ip_id = self.ip_id.wrapping_add(1);
        self.out.push_back(f);
    }

    pub fn connect(&mut self, now: u64) {
        self.st = St::SynSent;
        self.syn_at = now;
        self.snd_nxt = self.isn.wrapping_add(1);
        self.seg(now, self.isn, flags::SYN, &[], true);
    }

    pub fn listen(&mut self) {
        self.st = St::Listen;
    }

    fn send_ack(&mut self, now: u64) {
        let s = self.snd_nxt;
        self.seg(now, s, flags::ACK, &[], false);
    }

    /// Process a frame addressed to this endpoint.
    pub fn input(&mut self, now: u64, frame: &[u8]) {
        let Parsed::Tcp(s) = wire::parse(frame) else {
            self.violations.push(format!("{}: unparsable frame", self.name));
            return;
        };
        if !wire::verify_checksums(frame, &s) {
            self.violations.push(format!("{}: bad checksum", self.name));
            return;
        }
        self.last_desc = format!(
            "seq {} ack {} win {} flags {:#x} len {} now {}",
            s.seq,
            s.ack,
            s.window,
            s.flags,
            s.payload.len(),
            now
        );
        if s.has(flags::RST) {
            self.st = St::Reset;
            return;
        }
        if self.check_ack_monotone
            && self.st == St::Established
            && s.payload.is_empty()
            && s.flags & (flags::SYN | flags::FIN | flags::RST) == 0
        {
            // RFC 9293 acceptability of a zero-length segment, as a strict
            // receiver (smoltcp) applies it: otherwise its ACK is ignored.
            let wnd = self.rcv_window();
            let ok = if wnd == 0 {
                s.seq == self.rcv_nxt
            } else {
                le(self.rcv_nxt, s.seq) && lt(s.seq, self.rcv_nxt.wrapping_add(wnd))
            };
            if !ok && s.seq != self.rcv_nxt.wrapping_sub(1) {
                self.violations.push(format!(
                    "{}: unacceptable zero-length segment seq {} rcv_nxt {} wnd {}",
                    self.name, s.seq, self.rcv_nxt, wnd
                ));
            }
        }
        if let Some((v, _)) = s.opts.timestamps {
            self.ts_recent = v;
        }
        match self.st {
            St::Listen if s.has(flags::SYN) && !s.has(flags::ACK) => {
                self.learn(&s);
                self.irs = s.seq;
                self.rcv_nxt = s.seq.wrapping_add(1);
                self.st = St::SynRcvd;
                self.syn_at = now;
                self.snd_nxt = self.isn.wrapping_add(1);
                self.seg(now, self.isn, flags::SYN | flags::ACK, &[], true);
                return;
            }
            St::SynRcvd if s.has(flags::SYN) && !s.has(flags::ACK) => {
                self.seg(now, self.isn, flags::SYN | flags::ACK, &[], true);
                return;
            }
            St::SynSent if s.has(flags::SYN) && s.has(flags::ACK) && s.ack == self.isn.wrapping_add(1) => {
                self.learn(&s);
                self.irs = s.seq;
                self.rcv_nxt = s.seq.wrapping_add(1);
                self.snd_una = s.ack;
                self.snd_edge = s.ack.wrapping_add(u32::from(s.window));
                self.st = St::Established;
                self.note_ack(s.ack, self.snd_edge);
                self.send_ack(now);
                return;
            }
            St::Established if s.has(flags::SYN) => {
                self.send_ack(now);
                return;
            }
            St::SynRcvd if s.has(flags::ACK) && s.ack == self.isn.wrapping_add(1) => {
                self.st = St::Established;
                self.snd_una = s.ack;
                self.snd_edge = s.ack.wrapping_add(u32::from(s.window) << self.snd_shift);
            }
            St::Established => {}
            _ => return,
        }
        // ACK processing.
        if s.has(flags::ACK) {
            let edge = s.ack.wrapping_add(u32::from(s.window) << self.snd_shift);
            self.note_ack(s.ack, edge);
            if lt(self.snd_nxt, s.ack) {
                self.violations
                    .push(format!("{}: ack {} beyond snd_nxt {}", self.name, s.ack, self.snd_nxt));
            } else if le(self.snd_una, s.ack) {
                self.snd_una = s.ack;
                self.snd_edge = edge;
                self.rto_at = None;
            }
            if lt(self.snd_nxt, self.snd_una) {
                self.snd_nxt = self.snd_una;
            }
        }
        // Data.
        let len = s.payload.len() as u32;
        let consumes = len > 0 || s.has(flags::FIN);
        if self.check_window && len > 0 {
            if let Some(e) = self.adv_edge {
                if lt(e, s.seq.wrapping_add(len)) {
                    self.violations.push(format!(
                        "{}: data beyond window edge {} (seq {} len {})",
                        self.name, e, s.seq, len
                    ));
                }
            }
        }
        if len > 0 {
            let base = self.irs.wrapping_add(1);
            let off = s.seq.wrapping_sub(base) as i32 as i64;
            // Check overlap consistency with what is already received.
            for (i, b) in s.payload.iter().enumerate() {
                let o = off + i as i64;
                if o >= 0 && (o as usize) < self.received.len() && self.received[o as usize] != *b {
                    self.violations
                        .push(format!("{}: retransmitted byte differs at {}", self.name, o));
                    break;
                }
            }
            let start = off.max(self.received.len() as i64);
            let skip = (start - off) as usize;
            let dup_ooo = skip < s.payload.len()
                && self
                    .ooo
                    .get(&(start as u64))
                    .is_some_and(|b| b.len() >= s.payload.len() - skip);
            if skip >= s.payload.len() || dup_ooo {
                self.dsack = Some((s.seq, s.seq.wrapping_add(s.payload.len() as u32)));
            }
            if skip < s.payload.len() {
                let o = start as u64;
                if o > self.received.len() as u64 {
                    self.last_ooo = Some(o);
                }
                let e = self.ooo.entry(o).or_default();
                if e.len() < s.payload.len() - skip {
                    *e = s.payload[skip..].to_vec();
                }
            }
            // Drain contiguous.
            loop {
                let have = self.received.len() as u64;
                let Some((&o, _)) = self.ooo.iter().next() else { break };
                if o > have {
                    break;
                }
                let Some(b) = self.ooo.remove(&o) else { break };
                let skip = (have - o) as usize;
                if skip < b.len() {
                    // Overlap consistency.
                    self.received.extend_from_slice(&b[skip..]);
                    self.unread += b.len() - skip;
                    self.rcv_nxt = self.rcv_nxt.wrapping_add((b.len() - skip) as u32);
                }
            }
        }
        if s.has(flags::FIN) && !self.fin_rcvd && s.seq.wrapping_add(len) == self.rcv_nxt {
            self.fin_rcvd = true;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            if self.reply_fin_on_fin {
                self.fin_wanted = true;
            }
        }
        if consumes || (len == 0 && lt(s.seq, self.rcv_nxt)) {
            self.send_ack(now);
        }
    }

    fn note_ack(&mut self, ack: u32, edge: u32) {
        if self.check_ack_monotone {
            if let Some(m) = self.max_ack_seen {
                if lt(ack, m) {
                    self.violations
                        .push(format!("{}: ACK went backwards: {} < {}", self.name, ack, m));
                }
            }
            if let Some(m) = self.max_edge_seen {
                // Window scaling may round the edge down by < 2^shift (RFC 7323 2.4).
                if lt(edge.wrapping_add((1u32 << self.snd_shift) - 1), m) {
                    self.violations.push(format!(
                        "{}: window edge shrank: {} < {} ({})",
                        self.name, edge, m, self.last_desc
                    ));
                }
            }
        }
        self.max_ack_seen = Some(match self.max_ack_seen {
            Some(m) if lt(ack, m) => m,
            _ => ack,
        });
        self.max_edge_seen = Some(match self.max_edge_seen {
            Some(m) if lt(edge, m) => m,
            _ => edge,
        });
    }

    fn learn(&mut self, s: &wire::Segment<'_>) {
        self.other_mss = s.opts.mss.unwrap_or(536);
        if let (Some(mine), Some(theirs)) = (self.opts.ws, s.opts.wscale) {
            self.rcv_shift = mine;
            self.snd_shift = theirs;
        }
        self.use_sack = self.opts.sack && s.opts.sack_permitted;
        self.use_ts = self.opts.ts && s.opts.timestamps.is_some();
    }

    /// Timers and new output.
    pub fn tick(&mut self, now: u64) {
        // Application reads.
        let r = self.read_rate.min(self.unread);
        if r > 0 {
            let was_small = self.rcv_window() < u32::from(self.opts.mss);
            self.unread -= r;
            if was_small && self.rcv_window() >= u32::from(self.opts.mss) && self.st == St::Established {
                self.send_ack(now);
            }
        }
        match self.st {
            St::SynSent if now >= self.syn_at + 1000 => {
                self.syn_at = now;
                self.seg(now, self.isn, flags::SYN, &[], true);
            }
            St::SynRcvd if now >= self.syn_at + 1000 => {
                self.syn_at = now;
                self.seg(now, self.isn, flags::SYN | flags::ACK, &[], true);
            }
            _ => {}
        }
        if self.st != St::Established {
            return;
        }
        if let (Some(rto), Some(at)) = (self.rto_ms, self.rto_at) {
            if now >= at && self.snd_una != self.snd_nxt {
                // Go back N.
                self.snd_nxt = self.snd_una;
                self.rto_at = Some(now + rto);
            }
        }
        let mss = u32::from(self.other_mss.min(self.opts.mss))
            .saturating_sub(if self.use_ts { 12 } else { 0 })
            .max(1);
        let written = match self.write_rate {
            Some(r) => self.data.len().min((now as usize).saturating_mul(r)),
            None => self.data.len(),
        };
        let all_written = written == self.data.len();
        let end = self.isn.wrapping_add(1).wrapping_add(written as u32);
        loop {
            let room = self.snd_edge.wrapping_sub(self.snd_nxt) as i32;
            let left = end.wrapping_sub(self.snd_nxt) as i32;
            if left > 0 {
                let n = (left as u32).min(mss).min(room.max(0) as u32);
                if n == 0 {
                    break;
                }
                let off = self.snd_nxt.wrapping_sub(self.isn.wrapping_add(1)) as usize;
                let payload = self.data[off..off + n as usize].to_vec();
                let fin = self.fin_wanted && all_written && self.snd_nxt.wrapping_add(n) == end;
                let s = self.snd_nxt;
                self.seg(
                    now,
                    s,
                    flags::ACK | flags::PSH | if fin { flags::FIN } else { 0 },
                    &payload,
                    false,
                );
                self.snd_nxt = s.wrapping_add(n).wrapping_add(u32::from(fin));
            } else if left == 0 && self.fin_wanted && all_written {
                let s = self.snd_nxt;
                self.seg(now, s, flags::ACK | flags::FIN, &[], false);
                self.snd_nxt = s.wrapping_add(1);
            } else {
                break;
            }
            if let Some(rto) = self.rto_ms {
                if self.rto_at.is_none() {
                    self.rto_at = Some(now + rto);
                }
            }
        }
        if let Some(rto) = self.rto_ms {
            if self.rto_at.is_none() && self.snd_una != self.snd_nxt {
                self.rto_at = Some(now + rto);
            }
        }
        // Persist: window closed, nothing outstanding, data waiting.
        let waiting = lt(self.snd_nxt, end) || (self.fin_wanted && all_written && self.snd_nxt == end);
        if self.snd_una == self.snd_nxt && waiting && le(self.snd_edge, self.snd_nxt) {
            match self.probe_at {
                Some(t) if now >= t => {
                    let s = self.snd_una.wrapping_sub(1);
                    self.seg(now, s, flags::ACK, &[], false);
                    self.probe_at = Some(now + 200);
                }
                None => self.probe_at = Some(now + 200),
                _ => {}
            }
        } else {
            self.probe_at = None;
        }
    }
}

/// A link that drops, duplicates and delays (reorders) frames.
#[derive(Clone, Debug)]
pub struct Link {
    pub loss: u32,
    pub dup: u32,
    pub jitter: u64,
    pub delay: u64,
    pub q: Vec<(u64, u64, Vec<u8>)>,
    pub n: u64,
    pub enabled: bool,
}

impl Link {
    pub fn new(loss: u32, dup: u32, delay: u64, jitter: u64) -> Self {
        Link {
            loss,
            dup,
            jitter,
            delay,
            q: Vec::new(),
            n: 0,
            enabled: true,
        }
    }
    pub fn send(&mut self, rng: &mut Rng, now: u64, f: Vec<u8>) {
        if self.enabled && rng.pct(self.loss) {
            return;
        }
        let copies = if self.enabled && rng.pct(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let j = if self.enabled { rng.below(self.jitter + 1) } else { 0 };
            self.n += 1;
            self.q.push((now + self.delay + j, self.n, f.clone()));
        }
    }
    pub fn due(&mut self, now: u64) -> Vec<Vec<u8>> {
        self.q.sort_by_key(|x| (x.0, x.1));
        let k = self.q.iter().take_while(|x| x.0 <= now).count();
        self.q.drain(..k).map(|x| x.2).collect()
    }
}

/// A whole scenario: guest <-> engine <-> link <-> peer.
pub struct Sim {
    pub now: u64,
    pub engine: Engine,
    pub guest: Tcp,
    pub peer: Tcp,
    pub to_peer: Link,
    pub to_engine: Link,
    pub rng: Rng,
    pub epoch_ms: u64,
    pub commit_delay: u64,
    pub next_seal: u64,
    pub pending_commits: VecDeque<(u64, remora_speculate::EpochId)>,
    pub max_held: usize,
    pub budget: usize,
    /// Output-commit check: the guest's (snd_nxt, rcv_nxt) high-water marks
    /// at each seal, and the ones of the last committed epoch.
    pub seal_marks: VecDeque<(remora_speculate::EpochId, u32, u32)>,
    pub committed_mark: Option<(u32, u32)>,
    pub commit_violations: Vec<String>,
    /// Percent of frames lost between the guest and the engine (both ways;
    /// e.g. a full virtio ring).
    pub inner_loss: u32,
    /// Checkpoint deltas taken at every seal and applied to a replica.
    pub replication: Option<Replication>,
}

/// A backup fed with the engine's checkpoint deltas (encoded and decoded)
/// at every seal, checked against the primary's state.
#[derive(Debug)]
pub struct Replication {
    pub replica: EngineReplica,
    /// Compare `replica.to_engine().expect("valid config")` with the primary after every apply.
    pub verify: bool,
    /// After applying the checkpoint of this epoch, apply no more (the
    /// primary dies before the next checkpoint is complete on the backup);
    /// the guest's state at that checkpoint is kept in `guest_at`.
    pub freeze_at: Option<EpochId>,
    pub frozen: bool,
    pub guest_at: Option<Tcp>,
    pub errors: Vec<String>,
    pub checkpoints: u64,
    pub encoded_bytes: u64,
}

impl Replication {
    pub fn new(verify: bool) -> Self {
        Replication {
            replica: EngineReplica::new(),
            verify,
            freeze_at: None,
            frozen: false,
            guest_at: None,
            errors: Vec::new(),
            checkpoints: 0,
            encoded_bytes: 0,
        }
    }

    /// Right after `seal_epoch` returned `id` (the VM is paused).
    pub fn on_seal(&mut self, engine: &mut Engine, guest: &Tcp, id: EpochId, now: u64) {
        let d = engine.checkpoint();
        let bytes = d.encode();
        self.checkpoints += 1;
        self.encoded_bytes += bytes.len() as u64;
        if self.frozen {
            return;
        }
        let d = match EngineDelta::decode(&bytes) {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(format!("t={now} decode: {e}"));
                return;
            }
        };
        if let Err(e) = self.replica.apply(&d) {
            self.errors.push(format!("t={now} apply: {e}"));
            return;
        }
        if self.replica.epoch() != Some(id) {
            self.errors
                .push(format!("t={now} replica epoch {:?} != {id:?}", self.replica.epoch()));
        }
        if self.verify {
            // Frames waiting in the output queue are not replicated.
            let drained;
            let primary: &Engine = if engine.pending_transmits() > 0 {
                let mut e = engine.clone();
                while e.poll_transmit().is_some() {}
                drained = e;
                &drained
            } else {
                engine
            };
            if let Some(diff) = engine_diff(
                &self.replica.to_engine(primary.config().clone()).expect("valid config"),
                primary,
            ) {
                self.errors
                    .push(format!("t={now} epoch {id:?}: replica differs: {diff}"));
            }
        }
        if self.freeze_at == Some(id) {
            self.frozen = true;
            self.guest_at = Some(guest.clone());
        }
    }
}

/// `None` if the engines are equal, else where their `Debug` forms differ.
pub fn engine_diff(a: &Engine, b: &Engine) -> Option<String> {
    if a == b {
        return None;
    }
    let (da, db) = (format!("{a:#?}"), format!("{b:#?}"));
    let line = da
        .lines()
        .zip(db.lines())
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| format!("line {i}: {x} | {y}"));
    Some(line.unwrap_or_else(|| format!("lengths {} {}", da.len(), db.len())))
}

pub fn v4(src: [u8; 4], dst: [u8; 4]) -> Net {
    Net::V4 {
        src,
        dst,
        tos: 0,
        ttl: 64,
        df: true,
    }
}

pub fn v6(a: u8, b: u8) -> Net {
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s[0] = 0xfd;
    d[0] = 0xfd;
    s[15] = a;
    d[15] = b;
    Net::V6 {
        src: s,
        dst: d,
        traffic_class: 0,
        flow_label: 0,
        hop_limit: 64,
    }
}

pub const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

impl Sim {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: Mode,
        budget: usize,
        ipv6: bool,
        gopts: Opts,
        popts: Opts,
        seed: u64,
        loss: u32,
        dup: u32,
        jitter: u64,
    ) -> Sim {
        let (gnet, pnet) = if ipv6 {
            (v6(1, 2), v6(2, 1))
        } else {
            (v4([10, 0, 0, 1], [10, 0, 0, 2]), v4([10, 0, 0, 2], [10, 0, 0, 1]))
        };
        let mut rng = Rng::new(seed);
        let gisn = rng.next() as u32;
        let pisn = rng.next() as u32;
        let mut guest = Tcp::new("guest", GUEST_MAC, PEER_MAC, gnet, 40000, 80, gopts, gisn);
        let mut peer = Tcp::new("peer", PEER_MAC, GUEST_MAC, pnet, 80, 40000, popts, pisn);
        guest.check_ack_monotone = true;
        peer.check_window = true;
        peer.rto_ms = Some(300);
        guest.rto_ms = Some(300);
        let cfg = Config {
            mode,
            per_flow_budget: budget,
            global_cap: budget * 4,
            time_wait: Duration::from_secs(10),
            // Heavy loss on both ways makes 15 consecutive timeouts (the
            // default abort) plausible over thousands of cases.
            max_retries: 1000,
            min_rto: Duration::from_millis(200),
            ..Config::default()
        };
        Sim {
            now: 0,
            engine: Engine::new(cfg).expect("valid config"),
            guest,
            peer,
            to_peer: Link::new(loss, dup, 5, jitter),
            to_engine: Link::new(loss, dup, 5, jitter),
            rng,
            epoch_ms: 10,
            commit_delay: 5,
            next_seal: 10,
            pending_commits: VecDeque::new(),
            max_held: 0,
            budget,
            seal_marks: VecDeque::new(),
            committed_mark: None,
            commit_violations: Vec::new(),
            inner_loss: 0,
            replication: None,
        }
    }

    fn t(&self) -> Duration {
        Duration::from_millis(self.now)
    }

    fn drain_engine(&mut self) {
        while let Some(tx) = self.engine.poll_transmit() {
            match tx.to {
                Side::Inner => {
                    let now = self.now;
                    if !self.rng.pct(self.inner_loss) {
                        self.guest.input(now, &tx.frame);
                    }
                }
                Side::Outer => {
                    self.check_output_commit(&tx.frame);
                    self.to_peer.send(&mut self.rng, self.now, tx.frame)
                }
            }
        }
    }

    fn check_output_commit(&mut self, frame: &[u8]) {
        if self.engine.config().mode == Mode::Direct {
            return;
        }
        let Parsed::Tcp(s) = wire::parse(frame) else { return };
        if s.src_port != self.guest.port {
            return;
        }
        let Some((snd, rcv)) = self.committed_mark else {
            self.commit_violations
                .push(format!("t={} output before any commit", self.now));
            return;
        };
        let end = s.seq.wrapping_add(s.seq_len());
        if lt(snd, end) {
            self.commit_violations.push(format!(
                "t={} data released before commit: end {} > {}",
                self.now, end, snd
            ));
        }
        if s.has(flags::ACK) && lt(rcv, s.ack) {
            self.commit_violations.push(format!(
                "t={} guest ACK released before commit: {} > {}",
                self.now, s.ack, rcv
            ));
        }
    }

    pub fn mark_committed(&mut self, id: remora_speculate::EpochId) {
        while self.seal_marks.front().is_some_and(|m| m.0 <= id) {
            if let Some((_, a, b)) = self.seal_marks.pop_front() {
                self.committed_mark = Some((a, b));
            }
        }
    }

    /// One millisecond of simulated time.
    pub fn step(&mut self) {
        let now = self.now;
        let t = self.t();
        // Guest output -> engine (lossless, immediate); engine replies at once.
        self.guest.tick(now);
        while let Some(f) = self.guest.out.pop_front() {
            if !self.rng.pct(self.inner_loss) {
                self.engine.handle_inner(t, &f);
            }
            self.drain_engine();
            while let Some(f2) = self.guest.out.pop_front() {
                if !self.rng.pct(self.inner_loss) {
                    self.engine.handle_inner(t, &f2);
                }
                self.drain_engine();
            }
            self.guest.tick(now);
        }
        // Peer.
        self.peer.tick(now);
        for f in self.to_peer.due(now) {
            self.peer.input(now, &f);
        }
        while let Some(f) = self.peer.out.pop_front() {
            self.to_engine.send(&mut self.rng, now, f);
        }
        for f in self.to_engine.due(now) {
            self.engine.handle_outer(t, &f);
            self.drain_engine();
        }
        // Epochs.
        if now >= self.next_seal {
            let id = self.engine.seal_epoch(t);
            if let Some(r) = self.replication.as_mut() {
                r.on_seal(&mut self.engine, &self.guest, id, now);
            }
            let (mut a, mut b) = (self.guest.snd_nxt, self.guest.rcv_nxt);
            if let Some(&(_, pa, pb)) = self.seal_marks.back() {
                a = if lt(a, pa) { pa } else { a };
                b = if lt(b, pb) { pb } else { b };
            }
            self.seal_marks.push_back((id, a, b));
            self.pending_commits.push_back((now + self.commit_delay, id));
            self.next_seal = now + self.epoch_ms;
        }
        while self.pending_commits.front().is_some_and(|c| c.0 <= now) {
            if let Some((_, id)) = self.pending_commits.pop_front() {
                self.mark_committed(id);
                self.engine.commit_epoch(t, id);
                self.drain_engine();
            }
        }
        if self.engine.poll_timeout().is_some_and(|d| d <= t) {
            self.engine.handle_timeout(t);
            self.drain_engine();
        }
        for k in self.engine.speculative_flows() {
            let h = self.engine.flow_bytes_held(&k).unwrap_or(0);
            self.max_held = self.max_held.max(h);
        }
        self.now += 1;
    }

    pub fn run_until(&mut self, limit_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        while self.now < limit_ms {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}

pub fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed ^ 0xabcdef);
    (0..n).map(|_| r.next() as u8).collect()
}

// ---------------------------------------------------------------------------
// One end-to-end scenario (guest -> engine -> lossy link -> peer) and its checks.

pub fn opts(ws: Option<u8>, sack: bool, ts: bool) -> Opts {
    Opts {
        mss: 1460,
        ws,
        sack,
        ts,
    }
}

/// Parameters of one guest -> peer scenario (see [`run`] and [`check`]).
#[derive(Clone, Debug)]
pub struct Params {
    pub mode: Mode,
    pub ipv6: bool,
    pub ws: bool,
    pub sack: bool,
    pub ts: bool,
    pub seed: u64,
    pub loss: u32,
    pub dup: u32,
    pub jitter: u64,
    pub epoch_ms: u64,
    pub commit_delay: u64,
    pub len: usize,
    pub budget: usize,
    pub reverse: usize,
    /// Let the engine build TSO frames toward the peer.
    pub tso: bool,
}

/// Builds the scenario: the guest connects to the listening peer.
pub fn run(p: &Params) -> Sim {
    let ws = p.ws.then_some(7);
    let mut sim = Sim::new(
        p.mode,
        p.budget,
        p.ipv6,
        opts(ws, p.sack, p.ts),
        opts(if p.ws { Some(2) } else { None }, p.sack, p.ts),
        p.seed,
        p.loss,
        p.dup,
        p.jitter,
    );
    if p.tso {
        let cfg = remora_speculate::Config {
            tso_max: 64_000,
            ..sim.engine.config().clone()
        };
        sim.engine = remora_speculate::Engine::new(cfg).expect("valid config");
    }
    sim.epoch_ms = p.epoch_ms;
    sim.commit_delay = p.commit_delay;
    sim.next_seal = p.epoch_ms;
    // The peer's SYN-ACK window must not exceed the budget for the
    // "held <= budget + one segment" property.
    sim.peer.rcv_buf = 256 * 1024;
    sim.guest.data = data(p.len, p.seed);
    sim.guest.fin_wanted = true;
    sim.peer.data = data(p.reverse, p.seed + 1);
    sim.peer.reply_fin_on_fin = true;
    sim.peer.listen();
    sim.guest.connect(0);
    sim
}

/// Runs the scenario to its end and checks both streams, the model
/// endpoints' violations, output commit, the memory bound and the cleanup.
pub fn check(p: &Params, sim: &mut Sim) -> Result<(), TestCaseError> {
    let done = sim.run_until(1_000_000, |s| {
        s.guest.all_acked() && s.peer.all_acked() && s.peer.fin_rcvd && s.guest.fin_rcvd && s.engine.is_idle()
    });
    let v: Vec<String> = sim
        .guest
        .violations
        .iter()
        .chain(sim.peer.violations.iter())
        .chain(sim.commit_violations.iter())
        .cloned()
        .collect();
    prop_assert!(v.is_empty(), "violations: {:?}", v);
    prop_assert!(
        done,
        "not done: guest acked {} peer acked {} fins {} {} idle {} peer {:?} guest {:?} peer got {}/{} guest got {}/{} stats {:?}",
        sim.guest.all_acked(),
        sim.peer.all_acked(),
        sim.peer.fin_rcvd,
        sim.guest.fin_rcvd,
        sim.engine.is_idle(),
        (sim.peer.st, sim.peer.snd_una, sim.peer.snd_nxt, sim.peer.fin_wanted),
        (sim.guest.st, sim.guest.snd_una, sim.guest.snd_nxt, sim.guest.rcv_nxt),
        sim.peer.received.len(),
        p.len,
        sim.guest.received.len(),
        p.reverse,
        sim.engine.stats()
    );
    prop_assert!(sim.peer.received == sim.guest.data, "peer stream differs");
    prop_assert!(sim.guest.received == sim.peer.data, "guest stream differs");
    if p.mode == Mode::Speculative {
        prop_assert!(
            sim.max_held <= p.budget + 1460,
            "held {} > budget {}",
            sim.max_held,
            p.budget
        );
    }
    // Everything acknowledged: no retransmission left, and once the closed
    // flow's linger passes, no timers at all.
    let stats = sim.engine.stats();
    prop_assert_eq!(stats.bytes_held, 0);
    sim.to_peer.enabled = false;
    sim.to_engine.enabled = false;
    let end = sim.now + 20_000;
    sim.run_until(end, |_| false);
    prop_assert_eq!(sim.engine.poll_timeout(), None);
    let stats = sim.engine.stats();
    prop_assert_eq!(stats.flows, 0, "{:?}", stats);
    prop_assert_eq!(stats.bytes_reserved, 0);
    Ok(())
}

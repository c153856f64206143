//! Checkpoint deltas: the replica equals the primary at every checkpoint,
//! failover from a replica keeps the streams exact, deltas are O(appended
//! bytes), and bad input is refused without panics or partial updates.

mod common;

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use remora_speculate::wire::{self, flags, Build, IpAddr, Parsed};
use remora_speculate::{Config, DeltaError, Engine, EngineDelta, EngineReplica, EpochId, FlowKey, Mode, Side};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn roundtrip(d: &EngineDelta) -> EngineDelta {
    match EngineDelta::decode(&d.encode()) {
        Ok(x) => x,
        Err(e) => panic!("decode of an encoded delta: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Many flows through one engine, replicated at every seal.

const GPORT0: u16 = 40000;

struct Pair {
    guest: Tcp,
    peer: Tcp,
    to_peer: Link,
    to_engine: Link,
    /// When the finished pair reconnects (same ports, new ISNs).
    restart_at: Option<u64>,
    restarts_left: u32,
    done: bool,
}

struct MultiParams {
    mode: Mode,
    /// A global cap below the flows' budgets (window updates across flows,
    /// flows not speculated).
    tight: bool,
    seed: u64,
    flows: usize,
    loss: u32,
    dup: u32,
    jitter: u64,
    /// Percent chance per ms to seal an epoch.
    seal_pct: u32,
    max_commit_delay: u64,
    max_len: usize,
    budget: usize,
    restarts: u32,
    tso: bool,
    ws: bool,
    sack: bool,
    ts: bool,
    /// Percent of checkpoints preceded by a reset to a base / lost.
    reset_pct: u32,
    lose_pct: u32,
}

struct Multi {
    p: MultiParams,
    now: u64,
    engine: Engine,
    pairs: Vec<Pair>,
    rng: common::Rng,
    pending: VecDeque<(u64, EpochId)>,
    replica: EngineReplica,
    /// A delta was lost: later ones must be refused until a new base.
    lost: bool,
    errors: Vec<String>,
    checkpoints: u64,
    bases: u64,
    refused: u64,
    completed: u64,
}

impl Multi {
    fn new(p: MultiParams) -> Multi {
        let mut rng = common::Rng::new(p.seed);
        let cfg = Config {
            mode: p.mode,
            per_flow_budget: p.budget,
            global_cap: if p.tight {
                p.budget * p.flows / 2 + 70_000
            } else {
                p.budget * p.flows.max(2)
            },
            tso_max: if p.tso { 64_000 } else { 0 },
            time_wait: ms(300),
            max_retries: 1000,
            ..Config::default()
        };
        let mut pairs = Vec::new();
        for i in 0..p.flows {
            let mut pair = Pair {
                guest: Tcp::new("g", GUEST_MAC, PEER_MAC, gnet(), 0, 0, opts(None, false, false), 0),
                peer: Tcp::new(
                    "p",
                    PEER_MAC,
                    GUEST_MAC,
                    gnet().reversed(),
                    0,
                    0,
                    opts(None, false, false),
                    0,
                ),
                to_peer: Link::new(p.loss, p.dup, 3, p.jitter),
                to_engine: Link::new(p.loss, p.dup, 3, p.jitter),
                restart_at: Some(rng.below(200)),
                restarts_left: p.restarts,
                done: false,
            };
            pair.guest.port = GPORT0 + i as u16;
            pairs.push(pair);
        }
        Multi {
            now: 0,
            engine: Engine::new(cfg).expect("valid config"),
            pairs,
            rng,
            pending: VecDeque::new(),
            replica: EngineReplica::new(),
            lost: false,
            errors: Vec::new(),
            checkpoints: 0,
            bases: 0,
            refused: 0,
            completed: 0,
            p,
        }
    }

    fn key(i: usize) -> FlowKey {
        FlowKey {
            guest_ip: IpAddr::V4([10, 0, 0, 1]),
            guest_port: GPORT0 + i as u16,
            peer_ip: IpAddr::V4([10, 0, 0, 2]),
            peer_port: 80,
        }
    }

    fn connect(&mut self, i: usize) {
        let (ws, sack, ts, max_len, budget) = (self.p.ws, self.p.sack, self.p.ts, self.p.max_len, self.p.budget);
        let gopts = opts(ws.then_some(7), sack, ts);
        let popts = opts(ws.then_some(2), sack, ts);
        let port = GPORT0 + i as u16;
        let (gisn, pisn) = (self.rng.next() as u32, self.rng.next() as u32);
        let mut guest = Tcp::new("guest", GUEST_MAC, PEER_MAC, gnet(), port, 80, gopts, gisn);
        let mut peer = Tcp::new("peer", PEER_MAC, GUEST_MAC, gnet().reversed(), 80, port, popts, pisn);
        guest.rto_ms = Some(300);
        peer.rto_ms = Some(300);
        guest.check_ack_monotone = true;
        peer.check_window = true;
        let (glen, plen) = (
            self.rng.below(max_len as u64 + 1),
            self.rng.below(max_len as u64 / 4 + 1),
        );
        guest.data = data(glen as usize, self.rng.next());
        peer.data = data(plen as usize, self.rng.next());
        guest.fin_wanted = true;
        peer.reply_fin_on_fin = true;
        peer.rcv_buf = budget.min(256 * 1024);
        peer.listen();
        guest.connect(self.now);
        let pair = &mut self.pairs[i];
        pair.guest = guest;
        pair.peer = peer;
        pair.to_peer.q.clear();
        pair.to_engine.q.clear();
        pair.done = false;
    }

    fn route(&mut self) {
        while let Some(tx) = self.engine.poll_transmit() {
            let Parsed::Tcp(s) = wire::parse(&tx.frame) else {
                continue;
            };
            let port = if tx.to == Side::Inner { s.dst_port } else { s.src_port };
            let Some(pair) = port
                .checked_sub(GPORT0)
                .and_then(|i| self.pairs.get_mut(usize::from(i)))
            else {
                continue;
            };
            match tx.to {
                Side::Inner => pair.guest.input(self.now, &tx.frame),
                Side::Outer => pair.to_peer.send(&mut self.rng, self.now, tx.frame),
            }
        }
    }

    fn step(&mut self) {
        let now = self.now;
        let t = ms(now);
        for i in 0..self.pairs.len() {
            if self.pairs[i].restart_at.is_some_and(|r| r <= now) {
                // Same ports again once the engine closed the old flow (it
                // may still linger: the new SYN replaces it).
                if self.engine.speculative_flows().contains(&Self::key(i)) {
                    self.pairs[i].restart_at = Some(now + 10);
                } else {
                    self.pairs[i].restart_at = None;
                    self.connect(i);
                }
            }
        }
        for i in 0..self.pairs.len() {
            self.pairs[i].guest.tick(now);
            while let Some(f) = self.pairs[i].guest.out.pop_front() {
                self.engine.handle_inner(t, &f);
                self.route();
                self.pairs[i].guest.tick(now);
            }
        }
        if self.rng.pct(2) {
            // A non-TCP frame from the guest: held raw for output commit.
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&GUEST_MAC);
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend((0..28 + self.rng.below(40)).map(|_| self.rng.next() as u8));
            self.engine.handle_inner(t, &f);
            self.route();
        }
        for i in 0..self.pairs.len() {
            let pair = &mut self.pairs[i];
            pair.peer.tick(now);
            for f in pair.to_peer.due(now) {
                pair.peer.input(now, &f);
            }
            while let Some(f) = pair.peer.out.pop_front() {
                pair.to_engine.send(&mut self.rng, now, f);
            }
            for f in self.pairs[i].to_engine.due(now) {
                self.engine.handle_outer(t, &f);
                self.route();
            }
        }
        if self.rng.pct(self.p.seal_pct) {
            let id = self.engine.seal_epoch(t);
            self.checkpoint(id);
            let delay = self.rng.below(self.p.max_commit_delay + 1);
            self.pending.push_back((now + delay, id));
        }
        // Commits in order, sometimes coalesced (only the newest due one).
        let due = self.pending.iter().take_while(|c| c.0 <= now).count();
        if due > 0 {
            let ids: Vec<EpochId> = self.pending.drain(..due).map(|c| c.1).collect();
            if self.rng.pct(30) {
                self.engine.commit_epoch(t, ids[ids.len() - 1]);
                self.route();
            } else {
                for id in ids {
                    self.engine.commit_epoch(t, id);
                    self.route();
                }
            }
        }
        if self.engine.poll_timeout().is_some_and(|d| d <= t) {
            self.engine.handle_timeout(t);
            self.route();
        }
        for i in 0..self.pairs.len() {
            let pair = &mut self.pairs[i];
            let finished = pair.guest.all_acked() && pair.peer.all_acked() && pair.guest.fin_rcvd && pair.peer.fin_rcvd;
            if pair.done || !finished {
                continue;
            }
            pair.done = true;
            self.completed += 1;
            if pair.peer.received != pair.guest.data || pair.guest.received != pair.peer.data {
                self.errors.push(format!("t={now} flow {i}: streams differ"));
            }
            if self.p.mode == Mode::Speculative && !self.p.tight {
                // (Without speculation, or for flows not speculated under a
                // tight cap, the guest sees the peer's own ACKs, reordered
                // by the link.)
                for v in pair.guest.violations.iter().chain(&pair.peer.violations) {
                    self.errors.push(format!("t={now} flow {i}: {v}"));
                }
            }
            if pair.restarts_left > 0 {
                pair.restarts_left -= 1;
                pair.restart_at = Some(now + self.rng.below(1000));
            }
        }
        self.now += 1;
    }

    /// Inside the pause: checkpoint, encode, decode, apply, compare.
    fn checkpoint(&mut self, id: EpochId) {
        let now = self.now;
        if self.rng.pct(self.p.reset_pct) || (self.lost && self.rng.pct(30)) {
            self.engine.reset_checkpoint_base();
        }
        let d = self.engine.checkpoint();
        self.checkpoints += 1;
        let bytes = d.encode();
        let d = match EngineDelta::decode(&bytes) {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(format!("t={now}: decode: {e}"));
                return;
            }
        };
        if d.is_base() {
            self.bases += 1;
            self.lost = false;
        } else if self.lost {
            let before = self.replica.clone();
            match self.replica.apply(&d) {
                Err(DeltaError::OutOfOrder { .. }) => self.refused += 1,
                r => self.errors.push(format!("t={now}: delta after a lost one: {r:?}")),
            }
            if self.replica != before {
                self.errors.push(format!("t={now}: refused delta changed the replica"));
            }
            return;
        } else if self.rng.pct(self.p.lose_pct) {
            self.lost = true;
            return;
        }
        if let Err(e) = self.replica.apply(&d) {
            self.errors.push(format!("t={now}: apply: {e}"));
            return;
        }
        if self.replica.epoch() != Some(id) || self.replica.seq() != Some(d.seq()) {
            self.errors
                .push(format!("t={now}: replica at {:?}", self.replica.epoch()));
        }
        let rebuilt = self
            .replica
            .to_engine(self.engine.config().clone())
            .expect("valid config");
        if let Some(diff) = engine_diff(&rebuilt, &self.engine) {
            self.errors
                .push(format!("t={now} epoch {id:?}: replica differs: {diff}"));
        }
    }
}

fn gnet() -> wire::Net {
    v4([10, 0, 0, 1], [10, 0, 0, 2])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random traffic on several flows (both ways, loss, duplicates,
    /// reordering, flows closing, lingering, removed and reopened on the same
    /// ports, raw frames), epochs sealed and committed at random (commits
    /// coalesced), checkpoints reset to a base or lost at random: after every
    /// seal the replica, fed with encoded and decoded deltas, rebuilds an
    /// engine equal to the primary, held bytes included; deltas following a
    /// lost one are refused without effect.
    #[test]
    fn replica_equals_primary_at_every_checkpoint(
        mode in prop_oneof![8 => Just(Mode::Speculative), 1 => Just(Mode::Buffered), 1 => Just(Mode::Direct)],
        tight in any::<bool>(),
        seed in any::<u64>(),
        flows in 1usize..5,
        loss in 0u32..15,
        dup in 0u32..5,
        jitter in 0u64..30,
        seal_pct in 5u32..60,
        max_commit_delay in 0u64..40,
        max_len in 0usize..200_000,
        budget in 65_536usize..300_000,
        restarts in 0u32..3,
        tso in any::<bool>(),
        ws in any::<bool>(),
        sack in any::<bool>(),
        ts in any::<bool>(),
        reset_pct in prop_oneof![Just(0u32), 1u32..5],
        lose_pct in prop_oneof![Just(0u32), 1u32..5],
    ) {
        let p = MultiParams { mode, tight, seed, flows, loss, dup, jitter, seal_pct, max_commit_delay, max_len, budget, restarts, tso, ws, sack, ts, reset_pct, lose_pct };
        let mut m = Multi::new(p);
        let total = u64::from(restarts + 1) * flows as u64;
        while m.now < 120_000 && m.completed < total {
            m.step();
            prop_assert!(m.errors.is_empty(), "{:?}", m.errors);
        }
        // Let closed flows linger out and be removed, still checkpointing.
        let end = m.now + 1_000;
        while m.now < end {
            m.step();
        }
        prop_assert!(m.errors.is_empty(), "{:?}", m.errors);
        prop_assert_eq!(m.completed, total, "transfers did not finish: {:?}", m.engine.stats());
        prop_assert!(m.checkpoints > 0);
        // Closed flows were removed (flows not speculated under a tight cap
        // linger for the handshake timeout).
        prop_assert!(tight || m.engine.stats().flows == 0, "{:?}", m.engine.stats());
        if std::env::var_os("SPEC_DEBUG").is_some() {
            eprintln!("{} checkpoints, {} bases, {} refused, {} transfers", m.checkpoints, m.bases, m.refused, m.completed);
        }
    }

    /// Failover from the replica: the backup applied every checkpoint up to
    /// that of `fail_epoch` and nothing later (the primary ran on and died
    /// before the next epoch committed). It rebuilds the engine, commits the
    /// epoch and resumes: every byte the guest was acknowledged reaches the
    /// peer exactly once and in order (and the peer's stream the guest), the
    /// guest never sees an ACK go backwards. The new primary is replicated
    /// again from a base.
    #[test]
    fn failover_from_replica_keeps_streams_exact(
        seed in any::<u64>(),
        loss in 0u32..15,
        dup in 0u32..10,
        jitter in 0u64..30,
        epoch_ms in 2u64..30,
        commit_delay in 0u64..30,
        len in 1usize..300_000,
        reverse in 0usize..50_000,
        fail_epoch in 0u64..80,
        fail_frac in 0u64..1000,
        sack in any::<bool>(),
        tso in any::<bool>(),
        write_rate in proptest::option::of(50usize..2_000),
    ) {
        let p = Params { mode: Mode::Speculative, ipv6: false, ws: true, sack, ts: true, seed, loss, dup, jitter, epoch_ms, commit_delay, len, budget: 200_000, reverse, tso };
        let mut sim = run(&p);
        sim.guest.write_rate = write_rate;
        sim.peer.write_rate = write_rate.map(|r| r / 4 + 1);
        let epoch = EpochId(fail_epoch);
        let mut r = Replication::new(true);
        r.freeze_at = Some(epoch);
        sim.replication = Some(r);
        while sim.now < 100_000 && !sim.replication.as_ref().is_some_and(|r| r.frozen) {
            if sim.guest.all_acked() && sim.peer.all_acked() && sim.engine.is_idle() {
                break;
            }
            sim.step();
        }
        let Some(r) = sim.replication.take() else { return Ok(()); };
        prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
        let Some(guest) = r.guest_at else { return Ok(()); };
        prop_assert_eq!(r.replica.epoch(), Some(epoch));
        // The primary runs on (checkpointing into the void) until some time
        // before epoch+1 commits.
        let t0 = sim.now;
        let window = epoch_ms + commit_delay;
        let fail_at = t0 + (window * fail_frac / 1000);
        while sim.now < fail_at {
            if sim.pending_commits.front().is_some_and(|c| c.1 > epoch && c.0 <= sim.now) {
                break;
            }
            sim.step();
        }
        // Failover.
        let now = ms(sim.now);
        let cfg = sim.engine.config().clone();
        sim.engine = r.replica.into_engine(cfg).expect("valid config");
        sim.guest = guest;
        sim.pending_commits.clear();
        sim.mark_committed(epoch);
        sim.seal_marks.clear();
        sim.engine.commit_epoch(now, epoch);
        sim.engine.resume_after_failover(now);
        sim.next_seal = sim.now + epoch_ms;
        sim.replication = Some(Replication::new(true));
        if std::env::var_os("SPEC_DEBUG").is_some() {
            eprintln!("failover at epoch {} t={} held {}", epoch.0, sim.now, sim.engine.bytes_held());
        }
        check(&p, &mut sim)?;
        let r = sim.replication.take();
        prop_assert!(r.as_ref().is_some_and(|r| r.errors.is_empty()), "{:?}", r.map(|r| r.errors));
    }
}

// ---------------------------------------------------------------------------
// Size and cost of deltas.

const SIZE_PISN: u32 = 0x7000_0000;

#[allow(clippy::too_many_arguments)]
fn frame(
    from_guest: bool,
    gport: u16,
    seq: u32,
    ack: u32,
    fl: u8,
    win: u16,
    wscale: Option<u8>,
    payload: &[u8],
) -> Vec<u8> {
    let (eth_src, eth_dst, net, src_port, dst_port) = if from_guest {
        (GUEST_MAC, PEER_MAC, gnet(), gport, 80)
    } else {
        (PEER_MAC, GUEST_MAC, gnet().reversed(), 80, gport)
    };
    Build {
        eth_src,
        eth_dst,
        net,
        ip_id: 0,
        src_port,
        dst_port,
        seq,
        ack,
        flags: fl,
        window: win,
        mss: wscale.map(|_| 1460),
        wscale,
        sack_permitted: wscale.is_some(),
        timestamps: None,
        sack: &[],
    }
    .to_frame(payload, &[])
}

fn gisn(gport: u16) -> u32 {
    u32::from(gport).wrapping_mul(0x9e37_79b9)
}

fn drain(e: &mut Engine) -> Vec<remora_speculate::Transmit> {
    std::iter::from_fn(|| e.poll_transmit()).collect()
}

fn seal_commit(e: &mut Engine, now: Duration) {
    let id = e.seal_epoch(now);
    e.commit_epoch(now, id);
    drain(e);
}

/// Opens a speculated flow on `gport` (the peer's window scale is 9, so the
/// guest can be offered windows of many MiB).
fn open_flow(e: &mut Engine, gport: u16) {
    let g = gisn(gport);
    e.handle_inner(ms(0), &frame(true, gport, g, 0, flags::SYN, 65535, Some(7), &[]));
    seal_commit(e, ms(0));
    let synack = frame(
        false,
        gport,
        SIZE_PISN,
        g.wrapping_add(1),
        flags::SYN | flags::ACK,
        65535,
        Some(9),
        &[],
    );
    e.handle_outer(ms(1), &synack);
    e.handle_inner(
        ms(1),
        &frame(
            true,
            gport,
            g.wrapping_add(1),
            SIZE_PISN + 1,
            flags::ACK,
            1000,
            None,
            &[],
        ),
    );
    seal_commit(e, ms(1));
}

/// The guest sends up to `n` bytes on `gport` from its stream position
/// `*pos` (64000-byte TSO frames; the engine takes what its window allows).
/// Returns the bytes accepted.
fn guest_send(e: &mut Engine, gport: u16, pos: &mut u32, n: usize, payload: &[u8]) -> usize {
    let mut sent = 0;
    while sent < n {
        let len = (n - sent).min(payload.len());
        let f = frame(
            true,
            gport,
            *pos,
            SIZE_PISN + 1,
            flags::ACK | flags::PSH,
            1000,
            None,
            &payload[..len],
        );
        e.handle_inner(ms(2), &f);
        let acks = drain(e);
        let Some(ack) = acks.iter().rev().find_map(|t| match wire::parse(&t.frame) {
            Parsed::Tcp(s) if t.to == Side::Inner => Some(s.ack),
            _ => None,
        }) else {
            break;
        };
        let took = ack.wrapping_sub(*pos) as usize;
        *pos = ack;
        sent += took;
        if took == 0 {
            break;
        }
    }
    sent
}

/// An engine holding 64 MiB in 8 flows: the base carries it all, a later
/// delta with 100 KiB appended (and 1 MiB acknowledged by a peer) is about
/// 100 KiB, and only the flows that changed are in it.
#[test]
fn delta_size_is_proportional_to_appended_bytes() {
    const FLOWS: u16 = 8;
    const PER_FLOW: usize = 8 << 20;
    let cfg = Config {
        mode: Mode::Speculative,
        per_flow_budget: PER_FLOW + (1 << 20),
        global_cap: 128 << 20,
        ..Config::default()
    };
    let mut e = Engine::new(cfg.clone()).expect("valid config");
    let payload = data(64_000, 5);
    let mut pos = Vec::new();
    for i in 0..FLOWS {
        let port = GPORT0 + i;
        open_flow(&mut e, port);
        let mut p = gisn(port).wrapping_add(1);
        assert_eq!(
            guest_send(&mut e, port, &mut p, PER_FLOW, &payload),
            PER_FLOW,
            "flow {i}"
        );
        pos.push(p);
    }
    assert_eq!(e.bytes_held(), u64::from(FLOWS) * PER_FLOW as u64);
    let mut replica = EngineReplica::new();

    // The base: everything.
    e.seal_epoch(ms(3));
    let t = Instant::now();
    let base = e.checkpoint();
    let t_base = t.elapsed();
    let t = Instant::now();
    let base_bytes = base.encode();
    let t_enc = t.elapsed();
    let t = Instant::now();
    let base = EngineDelta::decode(&base_bytes).expect("decode base");
    let t_dec = t.elapsed();
    let t = Instant::now();
    replica.apply(&base).expect("apply base");
    let t_apply = t.elapsed();
    assert!(base.is_base() && base.seq() == 0);
    assert!(base_bytes.len() > 64 << 20, "base {}", base_bytes.len());
    eprintln!(
        "base: {} bytes, {} flows; checkpoint {t_base:?}, encode {t_enc:?}, decode {t_dec:?}, apply {t_apply:?}",
        base_bytes.len(),
        base.flows_changed()
    );

    // The commit of the last flow's data (the others' data was committed
    // while the next flows opened) starts its sends: metadata only.
    let id = e.seal_epoch(ms(4));
    e.commit_epoch(ms(4), id);
    drain(&mut e);
    let d1 = roundtrip(&e.checkpoint());
    assert_eq!(d1.flows_changed(), 1);
    assert_eq!(d1.data_len(), 0);
    assert!(
        d1.encode().len() < 64 * 1024,
        "metadata-only delta {}",
        d1.encode().len()
    );
    replica.apply(&d1).expect("apply d1");

    // The peer of flow 0 acknowledges 1 MiB; flows 1 and 2 get 50 KiB each.
    let ack = gisn(GPORT0).wrapping_add(1).wrapping_add(1 << 20);
    e.handle_outer(
        ms(5),
        &frame(false, GPORT0, SIZE_PISN + 1, ack, flags::ACK, 65535, None, &[]),
    );
    drain(&mut e);
    for (i, p) in pos.iter_mut().enumerate().skip(1).take(2) {
        let port = GPORT0 + i as u16;
        assert_eq!(guest_send(&mut e, port, p, 51_200, &payload), 51_200);
    }
    let id = e.seal_epoch(ms(6));
    let t = Instant::now();
    let d2 = e.checkpoint();
    let t_delta = t.elapsed();
    let bytes = d2.encode();
    eprintln!(
        "delta: {} bytes ({} of data, {} flows) for {} MiB held; checkpoint {t_delta:?}",
        bytes.len(),
        d2.data_len(),
        d2.flows_changed(),
        e.bytes_held() >> 20
    );
    assert_eq!(d2.seq(), 2);
    assert_eq!(d2.epoch(), Some(id));
    assert_eq!(d2.flows_changed(), 3);
    assert_eq!(d2.data_len(), 102_400);
    assert!(bytes.len() < 1 << 20, "delta {} bytes", bytes.len());
    let d2 = EngineDelta::decode(&bytes).expect("decode d2");
    let t = Instant::now();
    replica.apply(&d2).expect("apply d2");
    let t_apply = t.elapsed();
    eprintln!("delta apply {t_apply:?}");
    assert_eq!(replica.bytes_held(), e.bytes_held());
    assert_eq!(
        engine_diff(&replica.to_engine(cfg.clone()).expect("valid config"), &e),
        None
    );

    // Epochs at 1 Gbit/s (25 ms: 3 MiB appended), the delta's data copied
    // into a fresh buffer and into one recycled from an earlier delta.
    e.commit_epoch(ms(6), id);
    drain(&mut e);
    let mut buf = d2.into_buffer();
    for round in 0..4 {
        for (i, p) in pos.iter_mut().enumerate().take(3) {
            let port = GPORT0 + i as u16;
            // The peer acknowledges everything (committed); the guest sends 1 MiB.
            let ack = frame(false, port, SIZE_PISN + 1, *p, flags::ACK, 65535, None, &[]);
            e.handle_outer(ms(7 + round), &ack);
            drain(&mut e);
            assert_eq!(guest_send(&mut e, port, p, 1 << 20, &payload), 1 << 20);
        }
        let id = e.seal_epoch(ms(7 + round));
        let t = Instant::now();
        let d = if round % 2 == 0 {
            e.checkpoint()
        } else {
            e.checkpoint_with(std::mem::take(&mut buf))
        };
        let took = t.elapsed();
        eprintln!(
            "3 MiB delta ({}): checkpoint {took:?}",
            if round % 2 == 0 {
                "fresh buffer"
            } else {
                "recycled buffer"
            }
        );
        assert_eq!(d.data_len(), 3 << 20);
        let t = Instant::now();
        replica.apply(&roundtrip(&d)).expect("apply");
        eprintln!("3 MiB delta: encode + decode + apply {:?}", t.elapsed());
        buf = d.into_buffer();
        e.commit_epoch(ms(7 + round), id);
        drain(&mut e);
    }
    e.seal_epoch(ms(11));
    replica.apply(&roundtrip(&e.checkpoint())).expect("apply");
    assert_eq!(engine_diff(&replica.to_engine(cfg).expect("valid config"), &e), None);
}

/// The pause cost with many flows: a delta scans the dirty flows only.
#[test]
fn checkpoint_cost_with_many_idle_flows() {
    let cfg = Config {
        per_flow_budget: 1 << 20,
        global_cap: 1 << 40,
        ..Config::default()
    };
    let mut e = Engine::new(cfg.clone()).expect("valid config");
    let payload = data(4096, 9);
    let n: u16 = 5000;
    for i in 0..n {
        let port = 10_000 + i;
        open_flow(&mut e, port);
        let mut p = gisn(port).wrapping_add(1);
        guest_send(&mut e, port, &mut p, 4096, &payload);
    }
    e.seal_epoch(ms(3));
    let t = Instant::now();
    let base = e.checkpoint();
    let t_base = t.elapsed();
    let mut replica = EngineReplica::new();
    replica.apply(&roundtrip(&base)).expect("base");
    // One flow active.
    let port = 10_000;
    let mut p = gisn(port).wrapping_add(1 + 4096);
    guest_send(&mut e, port, &mut p, 1448, &payload);
    e.seal_epoch(ms(4));
    let t = Instant::now();
    let d = e.checkpoint();
    let t_delta = t.elapsed();
    eprintln!(
        "{n} flows: base {} bytes in {t_base:?}; one active flow: delta {} bytes in {t_delta:?}",
        base.encode().len(),
        d.encode().len()
    );
    assert_eq!(d.flows_changed(), 1);
    replica.apply(&roundtrip(&d)).expect("delta");
    assert_eq!(engine_diff(&replica.to_engine(cfg).expect("valid config"), &e), None);
}

// ---------------------------------------------------------------------------
// Bad input.

/// Encoded checkpoints of a short lossy transfer (base first), and the
/// replica after each.
fn samples() -> &'static (Vec<Vec<u8>>, Vec<EngineReplica>) {
    static S: OnceLock<(Vec<Vec<u8>>, Vec<EngineReplica>)> = OnceLock::new();
    S.get_or_init(|| {
        let p = Params {
            mode: Mode::Speculative,
            ipv6: true,
            ws: true,
            sack: true,
            ts: true,
            seed: 42,
            loss: 10,
            dup: 5,
            jitter: 10,
            epoch_ms: 7,
            commit_delay: 9,
            len: 60_000,
            budget: 100_000,
            reverse: 5_000,
            tso: false,
        };
        let mut sim = run(&p);
        let mut enc = Vec::new();
        let mut reps = Vec::new();
        let mut replica = EngineReplica::new();
        while sim.now < 3_000 && enc.len() < 40 {
            let sealing = sim.now >= sim.next_seal;
            sim.step();
            if sealing {
                let bytes = sim.engine.checkpoint().encode();
                replica
                    .apply(&EngineDelta::decode(&bytes).expect("decode"))
                    .expect("apply");
                enc.push(bytes);
                reps.push(replica.clone());
            }
        }
        // Non-TCP frames held in the current epoch (a checkpoint not right
        // after a seal) and in a sealed one.
        sim.engine.handle_inner(ms(sim.now), &[0xff; 60]);
        sim.engine.seal_epoch(ms(sim.now));
        sim.engine.handle_inner(ms(sim.now), &[0xee; 70]);
        let bytes = sim.engine.checkpoint().encode();
        replica
            .apply(&EngineDelta::decode(&bytes).expect("decode"))
            .expect("apply");
        enc.push(bytes);
        reps.push(replica);
        (enc, reps)
    })
}

#[test]
fn every_truncation_is_refused() {
    let (enc, _) = samples();
    for (i, b) in enc.iter().enumerate() {
        assert!(EngineDelta::decode(b).is_ok());
        for n in 0..b.len() {
            match EngineDelta::decode(&b[..n]) {
                Err(_) => {}
                Ok(_) => panic!("checkpoint {i} truncated to {n} of {} bytes decoded", b.len()),
            }
        }
        let mut long = b.clone();
        long.push(0);
        assert!(EngineDelta::decode(&long).is_err(), "trailing byte accepted");
    }
}

#[test]
fn out_of_order_deltas_are_refused_and_change_nothing() {
    let (enc, reps) = samples();
    let d: Vec<EngineDelta> = enc.iter().map(|b| EngineDelta::decode(b).expect("decode")).collect();
    assert!(d[0].is_base() && !d[1].is_base() && d.len() > 5);
    // A delta before any base.
    let mut r = EngineReplica::new();
    assert_eq!(r.apply(&d[1]), Err(DeltaError::OutOfOrder { expected: None, got: 1 }));
    assert_eq!(r, EngineReplica::new());
    assert_eq!(r.epoch(), None);
    // Skipped, replayed and old deltas.
    let mut r = reps[2].clone();
    for (i, x) in d.iter().enumerate() {
        if i == 3 || i == 0 {
            continue;
        }
        let err = r.apply(x);
        assert!(
            matches!(err, Err(DeltaError::OutOfOrder { expected: Some(3), got }) if got == i as u64),
            "{i}: {err:?}"
        );
        assert_eq!(r, reps[2]);
    }
    r.apply(&d[3]).expect("in order");
    assert_eq!(r, reps[3]);
    // A base replaces everything.
    r.apply(&d[0]).expect("base");
    assert_eq!(r, reps[0]);
}

#[test]
fn delta_of_another_engine_is_refused_and_changes_nothing() {
    let (enc, reps) = samples();
    // Another engine with another flow: its delta 1 updates a flow this
    // replica does not know.
    let mut e = Engine::new(Config {
        per_flow_budget: 1 << 20,
        global_cap: 1 << 24,
        ..Config::default()
    })
    .expect("valid config");
    open_flow(&mut e, 999);
    e.seal_epoch(ms(2));
    let mut other = EngineReplica::new();
    other.apply(&roundtrip(&e.checkpoint())).expect("other base");
    let mut p = gisn(999).wrapping_add(1);
    guest_send(&mut e, 999, &mut p, 3000, &data(3000, 1));
    e.seal_epoch(ms(3));
    let d1 = roundtrip(&e.checkpoint());
    let mut r = reps[0].clone();
    let err = r.apply(&d1);
    // Refused for its base (another epoch), or else for its contents (two
    // engines' bases may carry the same id).
    assert!(
        matches!(err, Err(DeltaError::OtherBase { .. } | DeltaError::Mismatch(_))),
        "{err:?}"
    );
    assert_eq!(r, reps[0]);
    other.apply(&d1).expect("its own replica");
    // And the other way round.
    let d = EngineDelta::decode(&enc[1]).expect("decode");
    let before = other.clone();
    assert!(other.apply(&d).is_err());
    assert_eq!(other, before);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random bytes, with or without a valid prefix, never decode into
    /// something that panics; a refused delta leaves the replica unchanged.
    #[test]
    fn garbage_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        prefix in any::<bool>(),
        which in any::<prop::sample::Index>(),
    ) {
        let (enc, reps) = samples();
        let mut b = bytes;
        if prefix {
            let mut v = b"RSPD\x01\x00".to_vec();
            v.extend_from_slice(&(b.len().saturating_sub(3) as u64).to_le_bytes());
            v.extend_from_slice(&b);
            b = v;
        }
        if let Ok(d) = EngineDelta::decode(&b) {
            let i = which.index(enc.len());
            let mut r = reps[i].clone();
            if r.apply(&d).is_err() {
                prop_assert!(r == reps[i]);
            }
        }
    }

    /// Corrupted checkpoints (bytes flipped, cut, or spliced) decode to an
    /// error or to a delta that applies or is refused cleanly.
    #[test]
    fn corrupted_checkpoints_never_panic(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (enc, reps) = samples();
        let i = which.index(enc.len());
        let mut b = enc[i].clone();
        for (at, x) in &flips {
            let k = at.index(b.len());
            b[k] ^= x;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        if let Ok(d) = EngineDelta::decode(&b) {
            let base = if i == 0 { 0 } else { i - 1 };
            let mut r = reps[base].clone();
            if r.apply(&d).is_err() {
                prop_assert!(r == reps[base]);
            } else {
                // A delta that applied must rebuild an engine.
                let _ = r.to_engine(Config::default()).expect("valid config").stats();
            }
        }
    }
}

/// Fuzzer find: sequence numbers restart at 0 with every base, so a
/// replica holding an older base applied delta 1 of a newer base it never
/// received (the base was lost), building a state the primary never had.
/// Deltas name their base; the replica refuses another base's deltas.
#[test]
fn delta_of_a_lost_base_is_refused() {
    let cfg = Config {
        mode: Mode::Speculative,
        ..Config::default()
    };
    let mut e = Engine::new(cfg.clone()).expect("valid config");
    let mut replica = EngineReplica::new();
    open_flow(&mut e, GPORT0);
    e.seal_epoch(ms(3));
    replica.apply(&e.checkpoint()).expect("first base");
    // The driver re-bases (say a delta was lost); the new base is lost too.
    e.reset_checkpoint_base();
    open_flow(&mut e, GPORT0 + 1);
    e.seal_epoch(ms(4));
    let lost = e.checkpoint();
    assert!(lost.is_base());
    e.seal_epoch(ms(5));
    let d = e.checkpoint();
    assert_eq!(d.seq(), 1);
    let err = replica.apply(&d).expect_err("delta of a base the replica lacks");
    assert!(matches!(err, DeltaError::OtherBase { .. }), "{err}");
    assert_eq!(replica.seq(), Some(0), "unchanged");
    // A new base puts it right.
    e.reset_checkpoint_base();
    e.seal_epoch(ms(6));
    replica.apply(&e.checkpoint()).expect("base");
    e.seal_epoch(ms(7));
    replica.apply(&e.checkpoint()).expect("its delta");
    assert_eq!(engine_diff(&replica.to_engine(cfg).expect("valid config"), &e), None);
}

//! The engine: dispatch of frames to flows, the per-epoch output queue,
//! timers and outputs.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, trace, warn};

use crate::checkpoint::{EngineMark, FlowTable, NotState};
use crate::flow::{AckInfo, Ctx, Flow, FlowKey, Phase};
use crate::seq;
use crate::wire::{self, flags, Parsed, Segment};
use crate::{Checksum, Config, ConfigError, EpochId, HeldRef, Mode, Side, Stats, Transmit};

/// An entry of an epoch's output queue. `R` holds a raw frame: its bytes in
/// the engine, where they are in the data section in a checkpoint delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Item<R = Vec<u8>> {
    /// A frame held for output commit.
    Raw(R),
    /// A segment of a speculated flow: the stream reached `data_end`/`fin`
    /// and the guest's receive-side state was `ack`.
    Spec {
        key: FlowKey,
        /// The flow's incarnation (`Flow::id`): a flow removed and opened
        /// again under the same key must not get the old one's items.
        id: u64,
        data_end: u32,
        fin: bool,
        ack: Option<AckInfo>,
        pure: bool,
    },
    /// The guest reset a speculated flow.
    Rst { key: FlowKey, id: u64 },
}

impl<R> Item<R> {
    /// The same item with its raw frame (if any) converted by `f`.
    pub(crate) fn map_raw<S>(&self, f: impl FnOnce(&R) -> S) -> Item<S> {
        match self {
            Item::Raw(r) => Item::Raw(f(r)),
            Item::Spec {
                key,
                id,
                data_end,
                fin,
                ack,
                pure,
            } => Item::Spec {
                key: *key,
                id: *id,
                data_end: *data_end,
                fin: *fin,
                ack: *ack,
                pure: *pure,
            },
            Item::Rst { key, id } => Item::Rst { key: *key, id: *id },
        }
    }
}

/// The speculative TCP engine. See the crate documentation.
///
/// All state is plain data (`Clone`), so it can be checkpointed: whole by
/// cloning, or incrementally with [`Engine::checkpoint`] (see
/// [`crate::EngineDelta`]). Two engines are equal (`==`) when all their state
/// is, including the configuration and the frames waiting in
/// [`Engine::poll_transmit`]; checkpoint bookkeeping is not compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Engine {
    pub(crate) cfg: Config,
    pub(crate) flows: FlowTable,
    pub(crate) current: u64,
    pub(crate) current_items: Vec<Item>,
    pub(crate) sealed: VecDeque<(u64, Vec<Item>)>,
    pub(crate) out: VecDeque<Transmit>,
    pub(crate) global_reserved: u64,
    pub(crate) global_held: u64,
    /// Some flow's window was limited by the global cap.
    pub(crate) global_blocked: bool,
    pub(crate) spec_flows: usize,
    pub(crate) buffered_bytes: u64,
    /// The next flow incarnation id.
    pub(crate) next_flow_id: u64,
    pub(crate) stats: Stats,
    /// Where the next checkpoint starts from (not state).
    pub(crate) ckpt: NotState<EngineMark>,
    /// Frame buffers given back by the driver ([`Engine::recycle`]),
    /// reused for the frames the engine builds or copies (not state).
    pub(crate) pool: NotState<Vec<Vec<u8>>>,
    /// Bytes of guest segments all flows keep ahead of a hole (not state).
    pub(crate) guest_stash: NotState<u64>,
}

/// Frame buffers kept for reuse at most (about 6 MiB of 1.5 KiB frames,
/// more with TSO frames).
const POOL_MAX: usize = 4096;

impl Engine {
    /// A new engine; refuses an inconsistent configuration (see
    /// [`Config::validate`]).
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self::new_unchecked(cfg))
    }

    /// An engine with a configuration known to be valid (or a placeholder
    /// never used to process anything).
    pub(crate) fn new_unchecked(cfg: Config) -> Self {
        let mut flows = FlowTable::default();
        flows.timers.0.idle = cfg.idle_timeout;
        Engine {
            cfg,
            flows,
            current: 0,
            current_items: Vec::new(),
            sealed: VecDeque::new(),
            out: VecDeque::new(),
            global_reserved: 0,
            global_held: 0,
            global_blocked: false,
            spec_flows: 0,
            buffered_bytes: 0,
            next_flow_id: 0,
            stats: Stats::default(),
            ckpt: NotState::default(),
            pool: NotState::default(),
            guest_stash: NotState::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The epoch that output received now belongs to.
    pub fn current_epoch(&self) -> EpochId {
        EpochId(self.current)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.flows = self.flows.len();
        s.speculative_flows = self.flows.values().filter(|f| f.phase == Phase::Established).count();
        s.bytes_held = self.global_held;
        s.bytes_reserved = self.global_reserved;
        s.buffered_bytes = self.buffered_bytes;
        s
    }

    /// Bytes held by speculated flows (accepted from the guest, not yet
    /// acknowledged by the peer): [`Stats::bytes_held`] without the cost of
    /// a full [`Engine::stats`].
    pub fn bytes_held(&self) -> u64 {
        self.global_held
    }

    /// Bytes of raw frames held for output commit.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered_bytes
    }

    /// Bytes held by one flow (accepted from the guest, not yet acknowledged
    /// by the peer), if tracked.
    pub fn flow_bytes_held(&self, key: &FlowKey) -> Option<usize> {
        self.flows.get(key).map(|f| f.buf.len())
    }

    /// Keys of tracked flows that are currently speculated.
    pub fn speculative_flows(&self) -> Vec<FlowKey> {
        let mut v: Vec<FlowKey> = self
            .flows
            .values()
            .filter(|f| f.phase == Phase::Established)
            .map(|f| f.key)
            .collect();
        v.sort();
        v
    }

    /// True if no speculated flow has data the peer has not acknowledged
    /// and no epoch output is waiting.
    pub fn is_idle(&self) -> bool {
        self.current_items.is_empty()
            && self.sealed.iter().all(|(_, items)| items.is_empty())
            && self
                .flows
                .values()
                .all(|f| f.phase != Phase::Established || (f.buf.is_empty() && f.snd_una == f.snd_max))
    }

    /// Checks the engine's internal consistency (for tests and fuzzing;
    /// O(flows + held items)): the global counters are the sums of the
    /// flows' (`bytes_held`, `bytes_reserved`, speculated flows, buffered
    /// bytes), the pool never exceeds `global_cap` nor the raw frames
    /// `buffered_cap`, and for every speculated flow the held stream is
    /// exactly [snd_una, data_end), lies inside the window offered to the
    /// guest, which is at most `per_flow_budget` (or the window the guest
    /// learnt during the handshake) beyond snd_una, the sender's pointers
    /// are ordered and its SACK scoreboard is sorted, disjoint and inside
    /// [snd_una, snd_max]; the timer heap files every flow's deadline and
    /// `poll_timeout` is the earliest of them. Returns the first violation
    /// found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut reserved = 0u64;
        let mut held = 0u64;
        let mut stash = 0u64;
        let mut spec = 0usize;
        let mut earliest: Option<Duration> = None;
        for f in self.flows.values() {
            f.check_invariants(&self.cfg)
                .map_err(|e| format!("flow {:?}: {e}", f.key))?;
            if let Some(d) = f.next_deadline(self.cfg.idle_timeout) {
                earliest = Some(earliest.map_or(d, |e| e.min(d)));
                if f.mark.0.sched.is_none_or(|s| s > d) {
                    return Err(format!(
                        "flow {:?}: deadline {d:?} filed at {:?} in the timer heap",
                        f.key, f.mark.0.sched
                    ));
                }
            }
            reserved += f.reserved;
            held += f.buf.len() as u64;
            stash += f.guest_stash_bytes();
            spec += usize::from(f.phase == Phase::Established);
        }
        if stash != self.guest_stash.0 {
            return Err(format!("guest stash {} != sum {stash}", self.guest_stash.0));
        }
        if earliest != self.poll_timeout() {
            return Err(format!(
                "poll_timeout {:?} but the earliest deadline is {earliest:?}",
                self.poll_timeout()
            ));
        }
        if reserved != self.global_reserved {
            return Err(format!("global_reserved {} != sum {reserved}", self.global_reserved));
        }
        if held != self.global_held {
            return Err(format!("global_held {} != sum {held}", self.global_held));
        }
        if spec != self.spec_flows {
            return Err(format!("spec_flows {} != {spec} established", self.spec_flows));
        }
        if self.global_reserved > self.cfg.global_cap as u64 {
            return Err(format!(
                "global_reserved {} above global_cap {}",
                self.global_reserved, self.cfg.global_cap
            ));
        }
        let raw: u64 = self
            .current_items
            .iter()
            .chain(self.sealed.iter().flat_map(|(_, items)| items))
            .map(|i| match i {
                Item::Raw(f) => f.len() as u64,
                _ => 0,
            })
            .sum();
        if raw != self.buffered_bytes || raw > self.cfg.buffered_cap as u64 {
            return Err(format!(
                "buffered_bytes {} (cap {}) != {raw} held raw",
                self.buffered_bytes, self.cfg.buffered_cap
            ));
        }
        Ok(())
    }

    fn ctx(&mut self) -> (Ctx<'_>, &mut FlowTable) {
        (
            Ctx {
                cfg: &self.cfg,
                out: &mut self.out,
                stats: &mut self.stats,
                global_reserved: &mut self.global_reserved,
                global_held: &mut self.global_held,
                global_blocked: &mut self.global_blocked,
                spec_flows: &mut self.spec_flows,
                pool: &mut self.pool.0,
                global_stash: &mut self.guest_stash.0,
            },
            &mut self.flows,
        )
    }

    /// Gives a frame from [`Engine::poll_transmit`] back once the driver
    /// has written it: its buffer is reused for a later frame, so the data
    /// path allocates nothing in the steady state.
    pub fn recycle(&mut self, frame: Vec<u8>) {
        if self.pool.0.len() < POOL_MAX && frame.capacity() >= 256 {
            self.pool.0.push(frame);
        }
    }

    /// A copy of `frame` in a pooled buffer.
    fn copy(&mut self, frame: &[u8]) -> Vec<u8> {
        copy_pooled(&mut self.pool.0, frame)
    }

    /// Holds a copy of `frame` until its epoch commits. `partial`: its TCP
    /// checksum is only the pseudo-header sum (`Checksum::Partial`); the
    /// copy is completed, as every frame the engine passes on must be.
    fn hold(&mut self, frame: &[u8], partial: bool) {
        if self.buffered_bytes + frame.len() as u64 > self.cfg.buffered_cap as u64 {
            self.stats.buffered_drops += 1;
            return;
        }
        let f = self.copy_complete(frame, partial);
        self.buffered_bytes += f.len() as u64;
        self.current_items.push(Item::Raw(f));
    }

    /// A pooled copy of `frame`, its TCP checksum completed if `partial`
    /// (and the frame trimmed to its IP length, as the sum covers no more).
    fn copy_complete(&mut self, frame: &[u8], partial: bool) -> Vec<u8> {
        if !partial {
            return self.copy(frame);
        }
        let Parsed::Tcp(seg) = wire::parse(frame) else {
            return self.copy(frame);
        };
        let (len, net, off) = (seg.frame_len(), seg.net, seg.tcp_offset);
        let mut f = self.copy(&frame[..len]);
        wire::fix_checksums(&mut f, &net, off);
        f
    }

    fn pass_inner(&mut self, frame: &[u8]) {
        let frame = self.copy(frame);
        self.out.push_back(Transmit {
            to: Side::Inner,
            frame,
            gso_size: None,
            partial_csum: false,
            held: None,
        });
    }

    // -------------------------------------------------------------------
    // Inner (guest) side.

    /// A frame from the guest with the given checksum state.
    /// A partial checksum is completed only where the frame itself goes
    /// on (held whole, passed through): a speculated segment's payload is
    /// copied into the flow's held bytes and sent in frames the engine
    /// builds, so its checksum is never summed here.
    pub fn handle_inner_with(&mut self, now: Duration, frame: &[u8], csum: Checksum) {
        self.inner_frame(now, frame, csum == Checksum::Partial);
        self.flows.sync_timers(&self.cfg);
    }

    /// A frame from the network with the given checksum state.
    pub fn handle_outer_with(&mut self, now: Duration, frame: &[u8], csum: Checksum) {
        match csum {
            Checksum::Complete => self.handle_outer(now, frame),
            Checksum::Verified => self.handle_outer_inner(now, frame, false),
            Checksum::Partial => {
                let f = self.copy_complete(frame, true);
                self.handle_outer_inner(now, &f, false);
                self.recycle(f);
            }
        }
    }

    /// A frame from the guest (checksums complete or not needed: the guest
    /// side is trusted and not verified).
    pub fn handle_inner(&mut self, now: Duration, frame: &[u8]) {
        self.inner_frame(now, frame, false);
        self.flows.sync_timers(&self.cfg);
    }

    fn inner_frame(&mut self, now: Duration, frame: &[u8], partial: bool) {
        self.stats.inner_frames += 1;
        match self.cfg.mode {
            Mode::Direct => {
                let frame = self.copy_complete(frame, partial);
                self.out.push_back(Transmit {
                    to: Side::Outer,
                    frame,
                    gso_size: None,
                    partial_csum: false,
                    held: None,
                });
                return;
            }
            Mode::Buffered => {
                self.hold(frame, partial);
                return;
            }
            Mode::Speculative => {}
        }
        let seg = match wire::parse(frame) {
            Parsed::Tcp(s) => s,
            Parsed::Other => {
                self.stats.non_tcp_frames += 1;
                self.hold(frame, partial);
                return;
            }
        };
        let key = FlowKey::from_inner(&seg);
        if seg.has(flags::SYN) && !seg.has(flags::ACK) && !seg.has(flags::RST) {
            self.track_syn(now, key, &seg, true);
            self.hold(frame, partial);
            return;
        }
        // One lookup of the flow for the whole frame (on the hot path).
        let item = {
            let (mut ctx, flows) = self.ctx();
            match flows.get_mut(&key) {
                None => None,
                Some(mut flow) => {
                    flow.last_activity = now;
                    let speculate = match flow.phase {
                        Phase::Handshake => {
                            if seg.has(flags::RST) {
                                flow.phase = Phase::Closed;
                                false
                            } else {
                                Self::guest_handshake(&mut ctx, &mut flow, &seg)
                            }
                        }
                        Phase::Established => true,
                        Phase::Fallback | Phase::Closed => false,
                    };
                    if !speculate || seg.has(flags::SYN) {
                        None
                    } else if seg.has(flags::RST) {
                        Some(Item::Rst { key, id: flow.id })
                    } else {
                        let (ack, pure) = flow.on_guest_segment(&mut ctx, &seg);
                        trace!(?key, data_end = flow.data_end, pure, "guest segment speculated");
                        Some(Item::Spec {
                            key,
                            id: flow.id,
                            data_end: flow.data_end,
                            fin: flow.fin,
                            ack,
                            pure,
                        })
                    }
                }
            }
        };
        match item {
            Some(item) => self.current_items.push(item),
            None => {
                self.stats.fallback_frames += 1;
                self.hold(frame, partial);
            }
        }
    }

    /// A SYN (without ACK) from the guest (`from_guest`) or the peer:
    /// starts tracking the flow unless this SYN (a retransmission) or an
    /// established flow is already tracked.
    fn track_syn(&mut self, now: Duration, key: FlowKey, seg: &Segment<'_>, from_guest: bool) {
        match self.flows.get(&key) {
            Some(f) if f.phase == Phase::Established || f.phase == Phase::Fallback => {}
            Some(f)
                if f.phase == Phase::Handshake
                    && if from_guest { f.guest_syn } else { f.peer_syn }.is_some_and(|s| s.isn == seg.seq) => {}
            _ => {
                if self.flows.len() >= self.cfg.max_flows && !self.flows.contains_key(&key) {
                    return;
                }
                if let Some(mut old) = self.flows.remove(&key) {
                    let (mut ctx, _) = self.ctx();
                    old.release_all(&mut ctx);
                }
                debug!(?key, from_guest, "SYN: tracking flow");
                let mut f = Flow::new(key, seg, from_guest, now, &self.cfg);
                f.id = self.next_flow_id;
                self.next_flow_id += 1;
                self.flows.insert(key, f);
            }
        }
    }

    /// A guest segment during the handshake. Returns true if the flow is
    /// now established and the segment must be processed as speculated.
    fn guest_handshake(ctx: &mut Ctx<'_>, flow: &mut Flow, seg: &Segment<'_>) -> bool {
        if seg.has(flags::SYN) && seg.has(flags::ACK) {
            // Passive open: the guest's SYN-ACK.
            if let Some(p) = flow.peer_syn {
                if seg.ack == p.isn.wrapping_add(1) {
                    flow.guest_syn = Some(crate::flow::SynInfo::from_seg(seg));
                    flow.guest_mac = seg.eth_src;
                    flow.gw_mac = seg.eth_dst;
                    flow.guest_net = seg.net;
                }
            }
            return false;
        }
        // Active open: the guest's ACK of the peer's SYN-ACK.
        let (Some(g), Some(p)) = (flow.guest_syn, flow.peer_syn) else {
            return false;
        };
        if !seg.has(flags::ACK)
            || seg.ack != p.isn.wrapping_add(1)
            || seg.seq != g.isn.wrapping_add(1)
            || flow.guest_seen_ack != Some(g.isn.wrapping_add(1))
        {
            return false;
        }
        let ok = flow.establish(ctx);
        if ok {
            debug!(key = ?flow.key, "flow established (active open): speculating");
        }
        ok
    }

    // -------------------------------------------------------------------
    // Outer (peer) side.

    /// A frame from the network (checksums complete; verified for tracked
    /// flows if [`Config::verify_outer_checksums`]).
    pub fn handle_outer(&mut self, now: Duration, frame: &[u8]) {
        let verify = self.cfg.verify_outer_checksums;
        self.handle_outer_inner(now, frame, verify);
    }

    fn handle_outer_inner(&mut self, now: Duration, frame: &[u8], verify: bool) {
        self.outer_frame(now, frame, verify);
        self.flows.sync_timers(&self.cfg);
    }

    fn outer_frame(&mut self, now: Duration, frame: &[u8], verify: bool) {
        self.stats.outer_frames += 1;
        if self.cfg.mode != Mode::Speculative {
            self.pass_inner(frame);
            return;
        }
        let seg = match wire::parse(frame) {
            Parsed::Tcp(s) => s,
            Parsed::Other => {
                self.stats.non_tcp_frames += 1;
                self.pass_inner(frame);
                return;
            }
        };
        let key = FlowKey::from_outer(&seg);
        let phase = self.flows.get(&key).map(|f| f.phase);
        let tracked = phase.is_some();
        let is_syn = seg.has(flags::SYN) && !seg.has(flags::ACK) && !seg.has(flags::RST);
        if (tracked || is_syn) && verify && !wire::verify_checksums(frame, &seg) {
            self.stats.bad_checksum_drops += 1;
            return;
        }
        if is_syn {
            self.track_syn(now, key, &seg, false);
            self.pass_inner(frame);
            return;
        }
        let Some(phase) = phase else {
            self.stats.fallback_frames += 1;
            self.pass_inner(frame);
            return;
        };
        match phase {
            Phase::Handshake => {
                let established = {
                    let (mut ctx, flows) = self.ctx();
                    match flows.get_mut(&key) {
                        Some(mut flow) => Self::peer_handshake(&mut ctx, &mut flow, &seg),
                        None => false,
                    }
                };
                if !established {
                    if let Some(mut flow) = self.flows.get_mut(&key) {
                        if seg.has(flags::RST) {
                            flow.phase = Phase::Closed;
                        } else {
                            flow.note_raw_to_guest(&seg);
                        }
                    }
                    self.stats.fallback_frames += 1;
                    self.pass_inner(frame);
                    return;
                }
                if let Some(mut flow) = self.flows.get_mut(&key) {
                    flow.init_committed_from_syn();
                }
                self.peer_established(now, key, frame, &seg);
            }
            Phase::Established => self.peer_established(now, key, frame, &seg),
            Phase::Fallback => {
                self.stats.fallback_frames += 1;
                self.pass_inner(frame);
            }
            Phase::Closed => {
                // Keep the guest's view: never an ACK below what it saw,
                // never a window edge left of what it was offered. Pure
                // ACKs are of no use to the guest any more (its FIN, if
                // any, was acknowledged speculatively) and late duplicates
                // would carry stale sequence numbers: consume them.
                let pure = seg.payload.is_empty() && seg.flags & (flags::SYN | flags::FIN | flags::RST) == 0;
                if pure && self.flows.get(&key).is_some_and(|f| f.guest_seen_ack.is_some()) {
                    self.stats.peer_acks_consumed += 1;
                    return;
                }
                let f = match self.flows.get_mut(&key) {
                    Some(mut flow) if flow.guest_seen_ack.is_some() && seg.has(flags::ACK) && !seg.has(flags::RST) => {
                        flow.rewrite_closed(frame, &seg)
                    }
                    _ => frame.to_vec(),
                };
                self.out.push_back(Transmit {
                    to: Side::Inner,
                    frame: f,
                    gso_size: None,
                    partial_csum: false,
                    held: None,
                });
            }
        }
    }

    /// A peer segment during the handshake. Returns true if the flow is now
    /// established (passive open completed).
    fn peer_handshake(ctx: &mut Ctx<'_>, flow: &mut Flow, seg: &Segment<'_>) -> bool {
        if seg.has(flags::RST) {
            return false;
        }
        if seg.has(flags::SYN) && seg.has(flags::ACK) {
            // Active open: the peer's SYN-ACK.
            if let Some(g) = flow.guest_syn {
                if seg.ack == g.isn.wrapping_add(1) {
                    flow.peer_syn = Some(crate::flow::SynInfo::from_seg(seg));
                }
            }
            return false;
        }
        // Passive open: the peer's ACK of the guest's SYN-ACK.
        let (Some(g), Some(p)) = (flow.guest_syn, flow.peer_syn) else {
            return false;
        };
        if !seg.has(flags::ACK) || seg.ack != g.isn.wrapping_add(1) || seg.seq != p.isn.wrapping_add(1) {
            return false;
        }
        let ok = flow.establish(ctx);
        if ok {
            debug!(key = ?flow.key, "flow established (passive open): speculating");
        }
        ok
    }

    fn peer_established(&mut self, now: Duration, key: FlowKey, frame: &[u8], seg: &Segment<'_>) {
        let blocked_before = self.global_reserved;
        let (mut ctx, flows) = self.ctx();
        let Some(mut flow) = flows.get_mut(&key) else {
            return;
        };
        flow.last_activity = now;
        if seg.has(flags::RST) {
            if flow.peer_rst_valid(seg) {
                debug!(?key, "peer RST: closing flow");
                flow.close(&mut ctx, now);
                ctx.out.push_back(Transmit {
                    to: Side::Inner,
                    frame: frame.to_vec(),
                    gso_size: None,
                    partial_csum: false,
                    held: None,
                });
            }
            drop(flow);
            self.after_release(now, blocked_before);
            return;
        }
        if seg.has(flags::SYN) || !seg.has(flags::ACK) {
            // Retransmitted SYN-ACK: our ACK of it was lost. Answer from the
            // committed state if the guest's ACK was released already (else
            // it goes out at commit). Segments without ACK are ignored.
            if seg.has(flags::SYN) && seg.has(flags::ACK) && flow.committed_ack.is_some() {
                flow.resend_ack(&mut ctx, now);
            }
            return;
        }
        flow.on_peer_ack(&mut ctx, now, seg);
        let has_data = !seg.payload.is_empty() || seg.has(flags::FIN);
        let spec = flow.guest_ack();
        let guest_needs_ack = flow.guest_seen_ack.is_none_or(|a| seq::lt(a, spec));
        // A keepalive or window probe for the guest (sequence number one
        // below what it has received) must reach it so that it answers.
        let probe = !has_data && seg.seq == flow.guest_rcv_nxt().wrapping_sub(1);
        flow.note_peer_data(seg);
        if has_data || probe {
            let f = flow.rewrite_for_guest(&mut ctx, frame, seg);
            ctx.out.push_back(Transmit {
                to: Side::Inner,
                frame: f,
                gso_size: None,
                partial_csum: false,
                held: None,
            });
        } else if guest_needs_ack {
            // E.g. the peer's ACK completing a passive open: the guest gets
            // its view in a segment of ours (with an acceptable seq number).
            flow.send_spec_ack(&mut ctx);
            ctx.stats.peer_acks_consumed += 1;
        } else {
            ctx.stats.peer_acks_consumed += 1;
        }
        flow.send_loop(&mut ctx, now);
        flow.maybe_window_update(&mut ctx);
        if flow.phase == Phase::Established {
            // The peer may have acknowledged the last of a closing flow.
            flow.check_done(now, &mut ctx);
        }
        drop(flow);
        self.after_release(now, blocked_before);
    }

    /// If global reservations dropped, other flows blocked by the global
    /// cap may open their windows.
    fn after_release(&mut self, _now: Duration, before: u64) {
        if self.global_reserved >= before || !self.global_blocked {
            return;
        }
        self.global_blocked = false;
        let (mut ctx, flows) = self.ctx();
        for f in flows.values_mut_where(|f| f.window_blocked) {
            f.maybe_window_update(&mut ctx);
        }
    }

    // -------------------------------------------------------------------
    // Epochs.

    /// End the current epoch; output received from now on belongs to the
    /// next one. Returns the id of the sealed epoch.
    pub fn seal_epoch(&mut self, _now: Duration) -> EpochId {
        let id = self.current;
        let items = std::mem::take(&mut self.current_items);
        if self.cfg.mode != Mode::Direct {
            self.sealed.push_back((id, items));
        }
        self.current += 1;
        EpochId(id)
    }

    /// The backup acknowledged the checkpoint of `epoch` (and so of all
    /// earlier epochs): release their output.
    pub fn commit_epoch(&mut self, now: Duration, epoch: EpochId) {
        if epoch.0 >= self.current {
            warn!(
                epoch = epoch.0,
                current = self.current,
                "commit of an epoch not sealed yet; committing sealed epochs only"
            );
        }
        let before = self.global_reserved;
        let mut touched: Vec<FlowKey> = Vec::new();
        while self.sealed.front().is_some_and(|(id, _)| *id <= epoch.0) {
            let Some((_, items)) = self.sealed.pop_front() else {
                break;
            };
            self.stats.epochs_committed += 1;
            for item in items {
                match item {
                    Item::Raw(f) => {
                        self.buffered_bytes = self.buffered_bytes.saturating_sub(f.len() as u64);
                        self.out.push_back(Transmit {
                            to: Side::Outer,
                            frame: f,
                            gso_size: None,
                            partial_csum: false,
                            held: None,
                        });
                    }
                    Item::Spec {
                        key,
                        id,
                        data_end,
                        fin,
                        ack,
                        pure,
                    } => {
                        let (mut ctx, flows) = self.ctx();
                        if let Some(mut flow) = flows.get_mut(&key) {
                            if flow.phase == Phase::Established && flow.id == id {
                                flow.on_commit_item(&mut ctx, now, data_end, fin, ack, pure);
                                if !flow.touched {
                                    flow.touched = true;
                                    touched.push(key);
                                }
                            }
                        }
                    }
                    Item::Rst { key, id } => {
                        for k in touched.drain(..) {
                            let (mut ctx, flows) = self.ctx();
                            if let Some(mut flow) = flows.get_mut(&k) {
                                flow.touched = false;
                                flow.after_commit(&mut ctx, now);
                            }
                        }
                        let (mut ctx, flows) = self.ctx();
                        if let Some(mut flow) = flows.get_mut(&key) {
                            if flow.phase == Phase::Established && flow.id == id {
                                flow.on_guest_rst(&mut ctx, now);
                            }
                        }
                    }
                }
            }
        }
        for k in touched {
            let (mut ctx, flows) = self.ctx();
            if let Some(mut flow) = flows.get_mut(&k) {
                flow.touched = false;
                flow.after_commit(&mut ctx, now);
            }
        }
        self.after_release(now, before);
        self.flows.sync_timers(&self.cfg);
    }

    /// Resume a checkpointed engine on the backup after a failover.
    ///
    /// `self` must be the engine state captured together with (atomically
    /// with) the checkpoint the guest resumes from, i.e. right after the
    /// [`Engine::seal_epoch`] that ended that checkpoint's epoch. The caller
    /// commits that epoch (the backup acknowledged it) with
    /// [`Engine::commit_epoch`] before or after this call; any later epoch
    /// never existed. Timers are re-based on the new host's clock (`now`)
    /// and everything the peer has not acknowledged is retransmitted as
    /// after a timeout (the old primary may have sent more of the committed
    /// data than the snapshot knows; the peer's ACKs of it are accepted).
    pub fn resume_after_failover(&mut self, now: Duration) {
        let (mut ctx, flows) = self.ctx();
        for f in flows.values_mut_where(|_| true) {
            f.resume_after_failover(&mut ctx, now);
        }
        self.flows.rebuild_timers(&self.cfg);
    }

    // -------------------------------------------------------------------
    // Time and outputs.

    /// The next frame to deliver.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The payload of a [`Transmit`] built with [`Config::gather_payload`]:
    /// at most two slices of the flow's held bytes (a ring), to be written
    /// after `Transmit::frame`. `None`: the flow is gone or the peer has
    /// acknowledged the range meanwhile (a retransmission overtaken by the
    /// original's ACK): the frame is not needed and must not be sent.
    pub fn held_payload(&self, r: &HeldRef) -> Option<(&[u8], &[u8])> {
        let flow = self.flows.get(&r.key)?;
        if flow.id != r.id {
            return None;
        }
        flow.held_slices(r.seq, r.len)
    }

    /// Number of frames waiting in [`Engine::poll_transmit`].
    pub fn pending_transmits(&self) -> usize {
        self.out.len()
    }

    /// When [`Engine::handle_timeout`] should next be called: the earliest
    /// deadline of all flows, from a heap (O(1)).
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.flows.next_deadline()
    }

    /// Flow deadlines evaluated so far to keep the timer heap up to date
    /// (diagnostics: timer upkeep costs O(flows touched + timers expired),
    /// never a scan of all flows, except once after a failover).
    pub fn timer_work(&self) -> u64 {
        self.flows.timers.0.work
    }

    /// Run the timers that are due: O(expired · log n).
    pub fn handle_timeout(&mut self, now: Duration) {
        let before = self.global_reserved;
        for key in self.flows.pop_due(now) {
            let remove = {
                let (mut ctx, flows) = self.ctx();
                // Mutable access re-files the flow's next deadline.
                let Some(mut flow) = flows.get_mut(&key) else {
                    continue;
                };
                if flow.next_deadline(ctx.cfg.idle_timeout).is_none_or(|d| d > now) {
                    // Its deadline moved later since it was filed.
                    continue;
                }
                flow.on_timeout(&mut ctx, now);
                let expired = flow.linger.is_some_and(|d| d <= now) && !flow.rst_pending;
                match flow.phase {
                    Phase::Closed | Phase::Handshake | Phase::Fallback => expired,
                    Phase::Established => {
                        if flow.idle_deadline(ctx.cfg.idle_timeout).is_some_and(|d| d <= now) {
                            if flow.forgettable() {
                                debug!(?key, "idle flow forgotten");
                                *ctx.spec_flows = ctx.spec_flows.saturating_sub(1);
                                true
                            } else {
                                debug!(?key, "idle flow: reservation released");
                                flow.idle_release(&mut ctx, now);
                                false
                            }
                        } else {
                            false
                        }
                    }
                }
            };
            if remove {
                if let Some(mut f) = self.flows.remove(&key) {
                    let (mut ctx, _) = self.ctx();
                    f.release_all(&mut ctx);
                }
            }
        }
        self.after_release(now, before);
        self.flows.sync_timers(&self.cfg);
    }
}

/// `frame` copied into a buffer from `pool` (or a new one).
pub(crate) fn copy_pooled(pool: &mut Vec<Vec<u8>>, frame: &[u8]) -> Vec<u8> {
    let mut v = pool.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(frame);
    v
}

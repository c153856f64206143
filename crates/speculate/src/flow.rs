//! Per-flow state of speculated TCP connections: the guest's speculative
//! view, the held stream, and the sender toward the peer (retransmission,
//! RTO, CUBIC with SACK recovery, zero-window probing).

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, trace};

use crate::checkpoint::{FlowMark, NotState};
use crate::seq;
use crate::wire::{self, flags, IpAddr, Net, Segment, MAX_SACK};
use crate::{Config, Side, Stats, Transmit};

/// Identifies a flow by its guest and peer endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub guest_ip: IpAddr,
    pub guest_port: u16,
    pub peer_ip: IpAddr,
    pub peer_port: u16,
}

impl FlowKey {
    pub(crate) fn from_inner(s: &Segment<'_>) -> Self {
        let (src, dst) = s.net.addrs();
        FlowKey {
            guest_ip: src,
            guest_port: s.src_port,
            peer_ip: dst,
            peer_port: s.dst_port,
        }
    }
    pub(crate) fn from_outer(s: &Segment<'_>) -> Self {
        let (src, dst) = s.net.addrs();
        FlowKey {
            guest_ip: dst,
            guest_port: s.dst_port,
            peer_ip: src,
            peer_port: s.src_port,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    /// SYN seen; frames pass under output commit.
    Handshake,
    /// Speculating.
    Established,
    /// Not speculated (could not reserve memory); output commit only.
    Fallback,
    /// Finished; kept until `linger` so late peer frames get the guest's view.
    Closed,
}

/// What a SYN told us about its sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SynInfo {
    pub isn: u32,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_ok: bool,
    pub tsval: Option<u32>,
    pub window: u16,
}

impl SynInfo {
    pub(crate) fn from_seg(s: &Segment<'_>) -> Self {
        SynInfo {
            isn: s.seq,
            mss: s.opts.mss,
            wscale: s.opts.wscale,
            sack_ok: s.opts.sack_permitted,
            tsval: s.opts.timestamps.map(|t| t.0),
            window: s.window,
        }
    }
}

/// The guest's acknowledgement state from one of its segments (its receive
/// side), released to the peer only when that segment's epoch commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AckInfo {
    pub ack: u32,
    pub window: u16,
    pub tsval: Option<u32>,
    pub sack: [(u32, u32); MAX_SACK],
    pub sack_len: u8,
    /// The guest's ECN-Echo (its receive side saw congestion marks).
    pub ece: bool,
}

impl AckInfo {
    pub(crate) fn from_seg(s: &Segment<'_>) -> Self {
        AckInfo {
            ack: s.ack,
            window: s.window,
            tsval: s.opts.timestamps.map(|t| t.0),
            sack: s.opts.sack,
            sack_len: s.opts.sack_len,
            ece: s.flags & flags::ECE != 0,
        }
    }
    fn sack_blocks(&self) -> &[(u32, u32)] {
        &self.sack[..usize::from(self.sack_len).min(MAX_SACK)]
    }
}

/// CUBIC's multiplicative decrease (RFC 9438: beta_cubic = 0.7).
fn cubic_reduce(flight: u32, mss: u32) -> u32 {
    ((u64::from(flight) * 7 / 10) as u32).max(2 * mss)
}

/// CUBIC congestion avoidance (RFC 9438), in bytes and `Duration`s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cubic {
    /// Window (bytes) just before the last congestion event.
    w_max: u32,
    /// Start of the current congestion-avoidance epoch.
    epoch_start: Option<Duration>,
    /// Time for the curve to climb back to `w_max`.
    k: Duration,
    /// Origin of the curve (bytes): `w_max`, or cwnd if already above it.
    origin: u32,
    /// Reno-friendly window estimate (bytes).
    w_est: u32,
}

/// RFC 9438's C = 0.4 segments/s^3.
const CUBIC_C: f64 = 0.4;

impl Cubic {
    /// A loss or timeout: remember the window (with fast convergence) and
    /// start a new epoch at the next ACK in congestion avoidance.
    fn on_congestion(&mut self, cwnd: u32) {
        self.w_max = if cwnd < self.w_max {
            // Fast convergence: release bandwidth to newer flows.
            (u64::from(cwnd) * 17 / 20) as u32
        } else {
            cwnd
        };
        self.epoch_start = None;
    }

    /// The window CUBIC aims for one RTT from `now`, given that `acked`
    /// bytes were just acknowledged at window `cwnd`.
    fn target(&mut self, now: Duration, rtt: Duration, cwnd: u32, mss: u32, acked: u32) -> u32 {
        let mss_f = f64::from(mss.max(1));
        let start = match self.epoch_start {
            Some(t) => t,
            None => {
                self.epoch_start = Some(now);
                self.w_est = cwnd;
                if cwnd < self.w_max {
                    let segs = f64::from(self.w_max - cwnd) / mss_f;
                    self.k = Duration::from_secs_f64((segs / CUBIC_C).cbrt());
                    self.origin = self.w_max;
                } else {
                    self.k = Duration::ZERO;
                    self.origin = cwnd;
                }
                now
            }
        };
        let t = (now.saturating_sub(start) + rtt).as_secs_f64() - self.k.as_secs_f64();
        let w_cubic = f64::from(self.origin) + CUBIC_C * t * t * t * mss_f;
        // Reno-friendly region: alpha = 3 (1 - beta) / (1 + beta) segments per RTT.
        let alpha = 3.0 * 0.3 / 1.7;
        let grow = alpha * f64::from(acked) / f64::from(cwnd.max(1)) * mss_f;
        self.w_est = (f64::from(self.w_est) + grow).min(f64::from(u32::MAX)) as u32;
        let target = w_cubic.max(f64::from(self.w_est));
        target.clamp(f64::from(cwnd), f64::from(cwnd) * 1.5) as u32
    }
}

/// The offered window's initial growth target (64 KiB, within the budget).
/// The worst-case delayed ACK of a peer (RFC 8985's WCDelAckT).
const WC_DEL_ACK: Duration = Duration::from_millis(200);

fn initial_target(cfg: &Config) -> u32 {
    cfg.per_flow_budget.min(64 << 10) as u32
}

/// Retransmissions remembered per fast recovery.
const RETX_LOG_MAX: usize = 4096;

/// The first reordering threshold (segments; RFC 5681's three duplicate
/// ACKs), and the most it may grow to (Linux's tcp_max_reordering).
pub(crate) const REORDERING_INIT: u32 = 3;
const REORDERING_MAX: u32 = 300;
/// Retransmitted ranges of one recovery remembered for undo.
const UNDO_RANGES_MAX: usize = 256;
/// RACK's reordering window grows by min_rtt/4 per undone recovery, up to
/// this many steps (and never beyond SRTT); reset after
/// [`RACK_REO_RESET`] recoveries with no growth (RFC 8985 6.2).
const RACK_REO_MULT_MAX: u32 = 16;
const RACK_REO_RESET: u32 = 16;
/// At most this many log entries are looked at for the reordering timer.
const RACK_TIMER_SCAN: usize = 64;

/// HyStart++ (RFC 9406): the first slow start ends when a round's minimum
/// RTT (of at least this many samples) exceeds the previous round's by
/// an eighth, clamped to 4..16 ms: the bottleneck queue is filling. Without
/// it slow start doubles until the queue overflows, losing up to a whole
/// window (a 100 ms queue at 1 Gbit/s: ~9000 segments, and a timeout).
const HYSTART_MIN_SAMPLES: u32 = 8;
const HYSTART_MIN_ETA: Duration = Duration::from_millis(4);
const HYSTART_MAX_ETA: Duration = Duration::from_millis(16);

/// HyStart++ round state (not checkpointed, like RACK's).
#[derive(Clone, Debug, Default)]
pub(crate) struct HyStart {
    /// The round ends when this is acknowledged.
    window_end: Option<u32>,
    last_min: Option<Duration>,
    cur_min: Option<Duration>,
    samples: u32,
}

/// The most bytes of guest segments ahead of a hole a flow keeps, and
/// the most segments (each insert and drain looks at all of them).
const GUEST_STASH_BYTES: usize = 1 << 20;
const GUEST_STASH_SEGS: usize = 64;
/// ... and all flows together (at most a sixteenth of the global cap).
const GUEST_STASH_GLOBAL: u64 = 64 << 20;

/// Guest segments received ahead of the stream's end.
#[derive(Clone, Debug, Default)]
pub(crate) struct GuestStash {
    segs: Vec<(u32, Vec<u8>, bool)>,
}

impl GuestStash {
    fn bytes(&self) -> usize {
        self.segs.iter().map(|s| s.1.len()).sum()
    }
}

/// How far ahead of its pacing schedule a flow may send: bursts of up to
/// a millisecond at the pacing rate (plus a frame), as a driver's timers
/// are no finer (the VMM's poll timeout is in milliseconds) and a frame
/// per timer would make the timer the limit.
const PACING_SLACK: Duration = Duration::from_millis(1);

/// Pacing state of new data toward the peer (not checkpointed: after a
/// failover the first window goes out at once, as after idle).
#[derive(Clone, Debug, Default)]
pub(crate) struct Pacer {
    /// The earliest time the next frame of new data may leave.
    next: Option<Duration>,
    /// Armed when new data waits for `next`.
    deadline: Option<Duration>,
}

/// RACK (RFC 8985): loss is decided by time, not by counting segments. A
/// segment is lost once a segment sent more than a reordering window after
/// it was delivered, or once it has been out an RTT plus that window. So
/// per-frame jitter (reordering of up to a millisecond, ~80 segments at
/// 1 Gbit/s) costs no retransmission once reordering has been seen, and a
/// real loss is still found within a round trip.
///
/// Kept beside the state, not in it: not checkpointed (after a failover
/// the engine recovers from a timeout anyway, and the send log of a fast
/// flow would grow every checkpoint), ignored by `==`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rack {
    /// (end, time sent) of each original transmission above snd_una, in
    /// sequence (and so time) order.
    sent: VecDeque<(u32, Duration)>,
    /// Send time and end of the most recently sent data known delivered.
    xmit: Option<(Duration, u32)>,
    /// The RTT of that delivery.
    rtt: Duration,
    /// Reordering window in min_rtt/4 steps (0 until first used: 1).
    reo_mult: u32,
    /// Recoveries since `reo_mult` last grew.
    recoveries: u32,
    /// Unacknowledged, unSACKed data below this was lost.
    lost: Option<u32>,
    /// When the oldest suspect segment (sent before the delivered one,
    /// within the window) will count as lost.
    deadline: Option<Duration>,
}

/// What a fast recovery changed, to restore if it proves spurious (every
/// retransmission of it reached the peer after the original did: the
/// segments were reordered, not lost).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Undo {
    pub cwnd: u32,
    pub ssthresh: u32,
    pub cubic: Cubic,
    /// Retransmitted ranges of the recovery (None: too many to track).
    pub ranges: Option<Vec<(u32, u32, Duration)>>,
    /// Retransmissions shown spurious (DSACK, or the original acknowledged
    /// sooner than a round trip after the retransmission left).
    pub spurious: u32,
    /// Once the recovery is over, how long its DSACKs may still undo it
    /// (they follow the last retransmission by about a round trip).
    pub until: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recovery {
    /// snd_max when recovery started; recovery ends when it is acknowledged.
    pub point: u32,
    /// Entered by a retransmission timeout (everything outstanding is lost).
    pub after_rto: bool,
}

/// Everything the flow needs from the engine while processing.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a Config,
    pub out: &'a mut VecDeque<Transmit>,
    pub stats: &'a mut Stats,
    pub global_reserved: &'a mut u64,
    pub global_held: &'a mut u64,
    pub global_blocked: &'a mut bool,
    /// Number of speculated flows (for the fair share of the global cap).
    pub spec_flows: &'a mut usize,
    /// Frame buffers for reuse ([`crate::Engine::recycle`]).
    pub pool: &'a mut Vec<Vec<u8>>,
    /// Bytes of guest segments kept ahead of holes, all flows.
    pub global_stash: &'a mut u64,
}

/// A tracked flow. Everything but `buf` and `mark` is its metadata, sent
/// whole in a checkpoint delta when the flow changed; `buf` goes as the bytes
/// appended since the previous delta (see `checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Flow {
    pub key: FlowKey,
    /// Incarnation: distinguishes flows opened one after the other under
    /// the same key (assigned by the engine when tracking starts).
    pub id: u64,
    pub phase: Phase,
    pub guest_syn: Option<SynInfo>,
    pub peer_syn: Option<SynInfo>,
    /// The largest right window edge the guest learnt during the handshake.
    pub hs_edge: Option<u32>,
    /// Peer window (bytes, seq, ack) learnt during the handshake.
    pub hs_peer_wnd: Option<(u32, u32, u32)>,

    // Link and network parameters (from the guest's latest frame).
    pub guest_mac: [u8; 6],
    pub gw_mac: [u8; 6],
    pub guest_net: Net,
    pub ip_id: u16,

    // Negotiated.
    pub ts_ok: bool,
    pub sack_ok: bool,
    /// Shift the guest applies to windows it receives (the peer's wscale).
    pub peer_ws: u8,
    /// Shift the peer applies to the guest's windows.
    pub guest_ws: u8,
    pub peer_mss: u16,

    // The held guest->peer stream: bytes [snd_una, data_end) are in `buf`.
    #[serde(skip)]
    pub buf: VecDeque<u8>,
    pub data_end: u32,
    pub fin: bool,
    pub committed_end: u32,
    pub committed_fin: bool,
    /// Right edge of the window offered to the guest (never moves left).
    pub adv_edge: u32,
    /// Reservation edge: guest bytes below it are acknowledged
    /// speculatively; above it they wait for the peer's ACK (output commit).
    pub res_edge: u32,
    /// How far beyond `snd_una` the offered window may grow while the pool
    /// has room (grows when the guest fills its window, halves when idle).
    pub wnd_target: u32,
    pub reserved: u64,
    /// Last window offered was too small for the guest to send a segment.
    pub window_blocked: bool,

    // What the guest has told / been told.
    pub guest_seen_ack: Option<u32>,
    pub guest_last_ack: u32,
    pub guest_last_window: u16,
    pub guest_ts_latest: Option<u32>,

    // The peer->guest direction (passed through).
    pub peer_contig: u32,
    /// Peer ranges passed to the guest beyond `peer_contig` (sorted).
    pub peer_ooo: Vec<(u32, u32)>,
    pub peer_ts_for_guest: Option<u32>,
    pub peer_ts_recent: Option<u32>,
    pub peer_fin: Option<u32>,

    // The guest's committed receive-side state, as sent to the peer.
    pub committed_ack: Option<AckInfo>,
    pub last_sent_ack: Option<(u32, u16)>,

    // Sender toward the peer.
    pub snd_una: u32,
    pub snd_max: u32,
    pub peer_wnd: u32,
    pub wl1: u32,
    pub wl2: u32,
    pub cwnd: u32,
    pub ssthresh: u32,
    pub ca_acc: u32,
    /// CUBIC (RFC 9438) state: the window before the last reduction, the
    /// start of the current congestion-avoidance epoch, the time the cubic
    /// curve takes to reach `w_max` again, and the Reno-friendly estimate.
    pub cubic: Cubic,
    pub srtt: Option<Duration>,
    pub rttvar: Duration,
    pub rto: Duration,
    pub rtt_probe: Option<(u32, Duration)>,
    /// Data below the probe was retransmitted: the cumulative ACK reaching
    /// it may have waited for the retransmission (an inflated sample); only
    /// a SACK of the probe's own segment still measures the RTT.
    pub rtt_probe_sack_only: bool,
    pub dupacks: u32,
    /// Reordering threshold in segments: SACKed data this far above a hole
    /// (or this many duplicate ACKs) marks the hole lost. Grows to the
    /// reordering the flow has seen (a hole filled by its original
    /// segment, a spurious retransmission), as Linux's tp->reordering.
    pub reordering: u32,
    /// The smallest RTT sample (an ACK sooner than this after a
    /// retransmission was for the original).
    pub min_rtt: Option<Duration>,
    /// Undo information of the current fast recovery.
    pub undo: Option<Undo>,
    /// SACKed ranges above snd_una, sorted and disjoint.
    pub sacked: Vec<(u32, u32)>,
    pub recovery: Option<Recovery>,
    pub retx_nxt: u32,
    /// Retransmissions of the current fast recovery: (start, end, when),
    /// to tell when one of them was lost too.
    pub retx_log: VecDeque<(u32, u32, Duration)>,
    pub retries: u32,
    pub rto_deadline: Option<Duration>,
    pub persist_deadline: Option<Duration>,
    /// Tail loss probe (RFC 8985 section 7): when the last segments of a
    /// flight are lost no duplicate ACK arrives, so after about two RTTs
    /// the last segment is sent again to draw a SACK that reveals the hole.
    pub tlp_deadline: Option<Duration>,
    /// A probe is out (one per flight, until snd_una advances).
    pub tlp_sent: bool,
    pub persist_backoff: u32,
    /// Window probes / zero-window retransmissions without any ACK since.
    pub probes_out: u32,
    /// Closed/handshake expiry, or the deadline of a pending guest RST.
    pub linger: Option<Duration>,
    pub rst_pending: bool,
    /// The last frame of the flow from either side (idle timeout).
    pub last_activity: Duration,
    /// In the touched list of a commit being processed.
    pub touched: bool,
    /// Checkpoint bookkeeping (not state: ignored by `==`, not serialised).
    #[serde(skip)]
    pub mark: NotState<FlowMark>,
    /// RACK loss detection (derived from this host's sends; not serialised).
    #[serde(skip)]
    pub rack: NotState<Rack>,
    /// Pacing of new data (not serialised).
    #[serde(skip)]
    pub pacer: NotState<Pacer>,
    /// HyStart++ in the first slow start (not serialised).
    #[serde(skip)]
    pub hystart: NotState<HyStart>,
    /// Guest segments that arrived ahead of `data_end` (not acknowledged,
    /// so not state: a replica without them gets them again).
    #[serde(skip)]
    pub guest_stash: NotState<GuestStash>,
}

impl Flow {
    pub(crate) fn new(key: FlowKey, seg: &Segment<'_>, from_guest: bool, now: Duration, cfg: &Config) -> Self {
        let (guest_mac, gw_mac, guest_net) = if from_guest {
            (seg.eth_src, seg.eth_dst, seg.net)
        } else {
            (seg.eth_dst, seg.eth_src, seg.net.reversed())
        };
        let syn = SynInfo::from_seg(seg);
        Flow {
            key,
            id: 0,
            phase: Phase::Handshake,
            guest_syn: from_guest.then_some(syn),
            peer_syn: (!from_guest).then_some(syn),
            hs_edge: None,
            hs_peer_wnd: None,
            guest_mac,
            gw_mac,
            guest_net,
            ip_id: 0,
            ts_ok: false,
            sack_ok: false,
            peer_ws: 0,
            guest_ws: 0,
            peer_mss: 536,
            buf: VecDeque::new(),
            data_end: 0,
            fin: false,
            committed_end: 0,
            committed_fin: false,
            adv_edge: 0,
            res_edge: 0,
            wnd_target: 0,
            reserved: 0,
            window_blocked: false,
            guest_seen_ack: None,
            guest_last_ack: 0,
            guest_last_window: 0,
            guest_ts_latest: None,
            peer_contig: 0,
            peer_ooo: Vec::new(),
            peer_ts_for_guest: None,
            peer_ts_recent: None,
            peer_fin: None,
            committed_ack: None,
            last_sent_ack: None,
            snd_una: 0,
            snd_max: 0,
            peer_wnd: 0,
            wl1: 0,
            wl2: 0,
            cwnd: 0,
            ssthresh: u32::MAX,
            ca_acc: 0,
            cubic: Cubic::default(),
            srtt: None,
            rttvar: Duration::ZERO,
            rto: cfg.initial_rto,
            rtt_probe: None,
            rtt_probe_sack_only: false,
            dupacks: 0,
            reordering: REORDERING_INIT,
            min_rtt: None,
            undo: None,
            sacked: Vec::new(),
            recovery: None,
            retx_nxt: 0,
            retx_log: VecDeque::new(),
            retries: 0,
            rto_deadline: None,
            persist_deadline: None,
            tlp_deadline: None,
            tlp_sent: false,
            persist_backoff: 0,
            probes_out: 0,
            linger: Some(now + cfg.handshake_timeout),
            rst_pending: false,
            last_activity: now,
            touched: false,
            mark: NotState::default(),
            rack: NotState::default(),
            pacer: NotState::default(),
            hystart: NotState::default(),
            guest_stash: NotState::default(),
        }
    }

    /// The sequence number the guest's stream has reached (incl. FIN): the
    /// speculative ACK.
    pub(crate) fn spec_ack(&self) -> u32 {
        self.data_end.wrapping_add(u32::from(self.fin))
    }

    fn stream_end_committed(&self) -> u32 {
        self.committed_end.wrapping_add(u32::from(self.committed_fin))
    }

    /// The earliest of the flow's deadlines (`idle`: `Config::idle_timeout`).
    pub(crate) fn next_deadline(&self, idle: Duration) -> Option<Duration> {
        [
            self.rto_deadline,
            self.persist_deadline,
            self.linger,
            self.tlp_deadline,
            self.rack.0.deadline,
            self.pacer.0.deadline,
            self.idle_deadline(idle),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When an established flow counts as idle (no frame since).
    pub(crate) fn idle_deadline(&self, idle: Duration) -> Option<Duration> {
        (self.phase == Phase::Established && !idle.is_zero()).then(|| self.last_activity.saturating_add(idle))
    }

    /// An idle flow that holds nothing and owes nothing: it may be
    /// forgotten (both directions acknowledged and committed, no reset
    /// pending).
    pub(crate) fn forgettable(&self) -> bool {
        self.buf.is_empty()
            && self.snd_una == self.snd_max
            && self.snd_max == self.stream_end_committed()
            && self.committed_end == self.data_end
            && self.committed_fin == self.fin
            && !self.rst_pending
    }

    /// The idle timeout of a flow that still holds bytes: give the
    /// reservation back (the bytes stay, held under output commit) and
    /// look again one idle period later.
    pub(crate) fn idle_release(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        self.res_edge = self.snd_una;
        self.set_reserved(ctx);
        self.last_activity = now;
    }

    /// See `Engine::check_invariants`.
    pub(crate) fn check_invariants(&self, cfg: &Config) -> Result<(), String> {
        if self.phase != Phase::Established {
            if self.reserved != 0 || !self.buf.is_empty() {
                return Err(format!(
                    "{:?} flow holds {} bytes, reserves {}",
                    self.phase,
                    self.buf.len(),
                    self.reserved
                ));
            }
            return Ok(());
        }
        let Some(g) = self.guest_syn else {
            return Err("established without the guest's SYN".into());
        };
        let una = self.snd_una;
        let off = |s: u32| s.wrapping_sub(una);
        if self.buf.len() as u64 != u64::from(seq::dist(una, self.data_end)) {
            return Err(format!(
                "buf {} != data_end - snd_una {}",
                self.buf.len(),
                seq::dist(una, self.data_end)
            ));
        }
        if self.reserved != u64::from(seq::dist(una, self.res_edge)) {
            return Err(format!("reserved {} != res_edge - snd_una", self.reserved));
        }
        let wnd = u64::from(seq::dist(una, self.adv_edge));
        if seq::gt(self.data_end, self.adv_edge) {
            return Err(format!("data_end beyond the offered edge by {}", off(self.data_end)));
        }
        let hs = u64::from(seq::dist(g.isn.wrapping_add(1), self.hs_edge.unwrap_or(una)));
        // (+1: the ACK of a FIN sent at the window's edge moves the edge
        // over the FIN's sequence number, which holds no byte.)
        if wnd > (cfg.per_flow_budget as u64).max(hs) + u64::from(self.fin) {
            return Err(format!(
                "offered window {wnd} above budget {} (handshake window {hs})",
                cfg.per_flow_budget
            ));
        }
        // snd_una <= snd_max <= committed stream end <= speculated end.
        let (m, c, e) = (
            off(self.snd_max),
            off(self.stream_end_committed()),
            off(self.spec_ack()),
        );
        if !(m <= c && c <= e && e < 1 << 31) {
            return Err(format!(
                "sender pointers out of order: snd_max +{m} committed +{c} end +{e}"
            ));
        }
        let mut last = 0u32;
        for &(l, r) in &self.sacked {
            let (l, r) = (off(l), off(r));
            if !(last <= l && l < r && r <= m) {
                return Err(format!(
                    "SACK scoreboard {:?} (offsets from snd_una {una})",
                    self.sacked
                ));
            }
            last = r;
        }
        if self.cwnd == 0 {
            return Err("zero cwnd".into());
        }
        Ok(())
    }

    /// Record what an outer frame passed raw to the guest during the
    /// handshake told it (ACK and window edge).
    pub(crate) fn note_raw_to_guest(&mut self, seg: &Segment<'_>) {
        if !seg.has(flags::ACK) {
            return;
        }
        let shift = if seg.has(flags::SYN) { 0 } else { self.hs_shift() };
        let edge = seg.ack.wrapping_add(u32::from(seg.window) << shift);
        self.hs_edge = Some(self.hs_edge.map_or(edge, |e| seq::max(e, edge)));
        self.guest_seen_ack = Some(self.guest_seen_ack.map_or(seg.ack, |a| seq::max(a, seg.ack)));
        self.hs_peer_wnd = Some((u32::from(seg.window) << shift, seg.seq, seg.ack));
    }

    fn hs_shift(&self) -> u8 {
        match (self.guest_syn, self.peer_syn) {
            (Some(g), Some(p)) if g.wscale.is_some() => p.wscale.unwrap_or(0),
            _ => 0,
        }
    }

    /// Both SYNs seen and acknowledged: start speculating. Returns false if
    /// the flow could not reserve its initial window (it then falls back).
    pub(crate) fn establish(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let (Some(g), Some(p)) = (self.guest_syn, self.peer_syn) else {
            return false;
        };
        self.ts_ok = g.tsval.is_some() && p.tsval.is_some();
        self.sack_ok = g.sack_ok && p.sack_ok;
        let ws_ok = g.wscale.is_some() && p.wscale.is_some();
        self.peer_ws = if ws_ok { p.wscale.unwrap_or(0) } else { 0 };
        self.guest_ws = if ws_ok { g.wscale.unwrap_or(0) } else { 0 };
        let v6 = matches!(self.guest_net, Net::V6 { .. });
        self.peer_mss = p.mss.unwrap_or(if v6 { 1220 } else { 536 }).max(64);
        let start = g.isn.wrapping_add(1);
        self.data_end = start;
        self.committed_end = start;
        self.snd_una = start;
        self.snd_max = start;
        self.retx_nxt = start;
        self.adv_edge = seq::max(self.hs_edge.unwrap_or(start), start);
        self.res_edge = self.adv_edge;
        self.wnd_target = initial_target(ctx.cfg);
        let need = u64::from(seq::dist(start, self.adv_edge));
        if *ctx.global_reserved + need > ctx.cfg.global_cap as u64 {
            self.phase = Phase::Fallback;
            return false;
        }
        self.reserved = need;
        *ctx.global_reserved += need;
        let (wnd, wl1, wl2) = self.hs_peer_wnd.unwrap_or((u32::from(p.window), p.isn, start));
        self.peer_wnd = wnd;
        self.wl1 = wl1;
        self.wl2 = wl2;
        self.peer_contig = p.isn.wrapping_add(1);
        self.guest_last_ack = p.isn.wrapping_add(1);
        self.peer_ts_for_guest = p.tsval;
        self.peer_ts_recent = p.tsval;
        self.guest_ts_latest = g.tsval;
        self.cwnd = ctx.cfg.initial_cwnd.max(1) * u32::from(self.peer_mss);
        self.rto = ctx.cfg.initial_rto;
        self.phase = Phase::Established;
        *ctx.spec_flows += 1;
        self.linger = None;
        true
    }

    /// Initial committed ack state for a flow the peer opened (the guest's
    /// SYN-ACK was released before the peer could acknowledge it).
    pub(crate) fn init_committed_from_syn(&mut self) {
        if let (Some(g), Some(p)) = (self.guest_syn, self.peer_syn) {
            let ws = if g.wscale.is_some() && p.wscale.is_some() {
                g.wscale.unwrap_or(0)
            } else {
                0
            };
            let a = AckInfo {
                ack: p.isn.wrapping_add(1),
                window: g.window >> ws,
                tsval: g.tsval,
                ..AckInfo::default()
            };
            self.committed_ack = Some(a);
            self.last_sent_ack = Some((a.ack, a.window));
        }
    }

    // ---------------------------------------------------------------
    // Memory accounting and the window offered to the guest.
    //
    // Two edges: `adv_edge`, the right window edge offered to the guest
    // (never moves left), and `res_edge`, the reservation: guest bytes below
    // it are acknowledged speculatively, bytes above it (still inside the
    // offered window) are held under output commit and acknowledged to the
    // guest only when the peer acknowledges them. The reservation follows
    // use: it grows to cover bytes as they arrive (within the budget, the
    // global cap and, when the pool is tight, a fair share of it) and is
    // given back as soon as the peer acknowledges them. The offered window
    // is never smaller than the peer's own window (what output commit would
    // let the guest send), so a flow without reservation still progresses
    // as if buffered; beyond it, it grows with demand up to the budget while
    // the pool has room.

    fn set_reserved(&mut self, ctx: &mut Ctx<'_>) {
        let r = if self.phase == Phase::Established {
            if seq::lt(self.res_edge, self.snd_una) {
                self.res_edge = self.snd_una;
            }
            u64::from(seq::dist(self.snd_una, self.res_edge))
        } else {
            0
        };
        *ctx.global_reserved = (*ctx.global_reserved + r).saturating_sub(self.reserved);
        self.reserved = r;
    }

    pub(crate) fn release_all(&mut self, ctx: &mut Ctx<'_>) {
        *ctx.global_held = ctx.global_held.saturating_sub(self.buf.len() as u64);
        self.buf = VecDeque::new();
        *ctx.global_reserved = ctx.global_reserved.saturating_sub(self.reserved);
        self.reserved = 0;
        // No sender timer outlives the held stream (a flow closed by a
        // peer RST kept its tail-loss-probe deadline, which no one cleared).
        self.rto_deadline = None;
        self.persist_deadline = None;
        self.tlp_deadline = None;
        self.tlp_sent = false;
        self.rack.0 = Rack::default();
        self.pacer.0 = Pacer::default();
        self.clear_guest_stash(ctx);
    }

    fn held(&self) -> u64 {
        u64::from(seq::dist(self.snd_una, self.spec_ack()))
    }

    fn guest_seg_size(&self) -> u64 {
        u64::from(self.peer_mss)
    }

    /// Bytes of the held stream above the reservation (output commit).
    pub(crate) fn overflow(&self) -> u32 {
        if seq::gt(self.data_end, self.res_edge) {
            seq::dist(seq::max(self.res_edge, self.snd_una), self.data_end)
        } else {
            0
        }
    }

    /// The ACK the guest may see: its stream up to the reservation
    /// (speculated), and beyond it what the peer acknowledged.
    pub(crate) fn guest_ack(&self) -> u32 {
        let end = self.spec_ack();
        let spec = if seq::le(self.data_end, self.res_edge) {
            end
        } else {
            self.res_edge
        };
        let peer = seq::min(self.snd_una, end);
        let a = seq::max(spec, peer);
        self.guest_seen_ack
            .map_or(a, |s| if seq::le(s, end) { seq::max(s, a) } else { a })
    }

    /// Bytes of reservation the flow may hold now: its own plus what the
    /// pool allows (a fair share of it when it is tight).
    fn reservable(&self, ctx: &Ctx<'_>) -> u64 {
        let budget = ctx.cfg.per_flow_budget as u64;
        let cap = ctx.cfg.global_cap as u64;
        let global_free = cap.saturating_sub(*ctx.global_reserved);
        let mut can = (self.reserved + global_free).min(budget);
        if global_free < budget {
            let fair = cap / (*ctx.spec_flows).max(1) as u64;
            can = can.min(fair.max(self.reserved));
        }
        can
    }

    /// Grow the reservation over held bytes (never beyond the offered
    /// edge); true if the guest's ACK advanced.
    fn reserve_held(&mut self, ctx: &mut Ctx<'_>) -> bool {
        if self.phase != Phase::Established {
            return false;
        }
        let before = self.guest_ack();
        if seq::lt(self.res_edge, self.snd_una) {
            self.res_edge = self.snd_una;
        }
        if seq::gt(self.data_end, self.res_edge) {
            let can = self.reservable(ctx);
            let want = u64::from(seq::dist(self.snd_una, self.data_end));
            let edge = self.snd_una.wrapping_add(want.min(can) as u32);
            if seq::gt(edge, self.res_edge) {
                self.res_edge = edge;
                self.set_reserved(ctx);
            }
        }
        if self.overflow() > 0 {
            *ctx.global_blocked = true;
            self.window_blocked = true;
        }
        self.guest_ack() != before
    }

    /// The right edge the engine would offer now (before SWS avoidance):
    /// at least the peer's window, and up to `wnd_target` beyond `snd_una`
    /// (within the budget) while the pool has room for it.
    fn offer_edge(&self, ctx: &Ctx<'_>) -> u32 {
        let budget = ctx.cfg.per_flow_budget as u32;
        let limit = self.snd_una.wrapping_add(budget);
        let peer = seq::min(self.wl2.wrapping_add(self.peer_wnd), limit);
        let cap = ctx.cfg.global_cap as u64;
        let global_free = cap.saturating_sub(*ctx.global_reserved);
        // A roomy pool offers the whole budget; a tight one grows with use.
        let want = if global_free >= 2 * u64::from(budget) {
            u64::from(budget)
        } else {
            u64::from(self.wnd_target.min(budget))
        };
        let mut room = (u64::from(seq::dist(self.snd_una, self.res_edge)) + global_free).min(want);
        if global_free < u64::from(budget) {
            let fair = cap / (*ctx.spec_flows).max(1) as u64;
            room = room.min(fair);
        }
        let spec = self.snd_una.wrapping_add(room as u32);
        seq::max(seq::max(peer, spec), self.adv_edge)
    }

    fn sws_threshold(&self, ctx: &Ctx<'_>) -> u64 {
        self.guest_seg_size().min(ctx.cfg.per_flow_budget as u64 / 2).max(1)
    }

    /// Compute the ACK and window fields for a segment to the guest, moving
    /// the offered right edge (never left) and updating the reservation.
    pub(crate) fn ack_window_for_guest(&mut self, ctx: &mut Ctx<'_>) -> (u32, u16) {
        self.reserve_held(ctx);
        let ack = self.guest_ack();
        let cur = u64::from(seq::dist(ack, self.adv_edge));
        let offer = u64::from(seq::dist(ack, self.offer_edge(ctx)));
        let sws = self.sws_threshold(ctx);
        let bytes = if offer >= cur + sws || (offer > cur && offer >= ctx.cfg.per_flow_budget as u64 / 2) {
            offer
        } else {
            cur
        };
        let ws = u32::from(self.peer_ws);
        let mut win = (bytes >> ws).min(65535);
        if (win << ws) < cur {
            // The scaled window cannot express the current edge exactly.
            // Round up (no shrinking) unless that would let the flow exceed
            // its budget; rounding up every time would creep the edge by up
            // to 2^ws - 1 bytes per ACK. Rounding down shrinks the edge by
            // less than 2^ws bytes, which RFC 7323 (2.4) tolerates; data the
            // guest already sent up to the old edge is still accepted.
            let up = cur.div_ceil(1u64 << ws).min(65535);
            let limit = u64::from(seq::dist(
                ack,
                self.snd_una.wrapping_add(ctx.cfg.per_flow_budget as u32),
            ));
            if (up << ws) <= limit {
                win = up;
            }
        }
        let edge = ack.wrapping_add((win << ws) as u32);
        self.adv_edge = seq::max(self.adv_edge, edge);
        self.window_blocked = u64::from(seq::dist(ack, self.adv_edge)) < sws || self.overflow() > 0;
        let global_free = (ctx.cfg.global_cap as u64).saturating_sub(*ctx.global_reserved);
        if self.window_blocked && global_free < ctx.cfg.per_flow_budget as u64 {
            *ctx.global_blocked = true;
        }
        (ack, win as u16)
    }

    // ---------------------------------------------------------------
    // Frames to the guest.

    /// The guest's receive position as far as we know (seq of our ACKs).
    pub(crate) fn guest_rcv_nxt(&self) -> u32 {
        seq::max(self.guest_last_ack, self.peer_contig)
    }

    /// Send the guest a speculative ACK (also serves as window update).
    pub(crate) fn send_spec_ack(&mut self, ctx: &mut Ctx<'_>) {
        let (ack, window) = self.ack_window_for_guest(ctx);
        let ts = if self.ts_ok {
            Some((self.peer_ts_for_guest.unwrap_or(0), self.guest_ts_latest.unwrap_or(0)))
        } else {
            None
        };
        let net = match self.guest_net.reversed() {
            Net::V4 { src, dst, tos, df, .. } => Net::V4 {
                src,
                dst,
                tos: tos & !3,
                ttl: 64,
                df,
            },
            Net::V6 {
                src,
                dst,
                traffic_class,
                ..
            } => Net::V6 {
                src,
                dst,
                traffic_class: traffic_class & !3,
                flow_label: 0,
                hop_limit: 64,
            },
        };
        let mut frame = ctx.pool.pop().unwrap_or_default();
        wire::Build {
            eth_src: self.gw_mac,
            eth_dst: self.guest_mac,
            net,
            ip_id: 0,
            src_port: self.key.peer_port,
            dst_port: self.key.guest_port,
            seq: self.guest_rcv_nxt(),
            ack,
            flags: flags::ACK,
            window,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: ts,
            sack: &[],
        }
        .write_frame(
            &mut frame,
            if ctx.cfg.mark_acks { &wire::RACC_MARK } else { &[] },
            &[],
            &[],
            None,
            false,
        );
        self.guest_seen_ack = Some(ack);
        ctx.stats.spec_acks += 1;
        ctx.out.push_back(Transmit {
            to: Side::Inner,
            frame,
            gso_size: None,
            partial_csum: false,
            held: None,
        });
    }

    /// If the guest's window was (nearly) closed and space has freed, tell it.
    pub(crate) fn maybe_window_update(&mut self, ctx: &mut Ctx<'_>) {
        if self.phase != Phase::Established || !self.window_blocked {
            return;
        }
        let acked = self.reserve_held(ctx);
        let ack = self.guest_ack();
        let cur = u64::from(seq::dist(ack, self.adv_edge));
        let offer = u64::from(seq::dist(ack, self.offer_edge(ctx)));
        if acked || offer >= cur + self.sws_threshold(ctx) || offer >= ctx.cfg.per_flow_budget as u64 / 2 {
            ctx.stats.window_updates += 1;
            self.send_spec_ack(ctx);
        }
    }

    /// Rewrite a peer frame for the guest: ACK = speculative ACK, window =
    /// the engine's offer, TSecr = the guest's latest TSval, SACK blocks
    /// removed (they describe the engine-owned direction).
    pub(crate) fn rewrite_for_guest(&mut self, ctx: &mut Ctx<'_>, frame: &[u8], seg: &Segment<'_>) -> Vec<u8> {
        let (ack, window) = self.ack_window_for_guest(ctx);
        let mut f = crate::engine::copy_pooled(ctx.pool, &frame[..seg.frame_len().min(frame.len())]);
        let off = seg.tcp_offset;
        let hl = seg.tcp_header_len;
        if f.len() < off + hl || hl > 60 {
            return f;
        }
        let mut old = [0u8; 60];
        old[..hl].copy_from_slice(&f[off..off + hl]);
        old[16] = 0;
        old[17] = 0;
        f[off + 8..off + 12].copy_from_slice(&ack.to_be_bytes());
        f[off + 14..off + 16].copy_from_slice(&window.to_be_bytes());
        if let (Some(o), Some(ts)) = (seg.opts.tsecr_offset, self.guest_ts_latest) {
            if o + 4 <= hl {
                f[off + o..off + o + 4].copy_from_slice(&ts.to_be_bytes());
            }
        }
        if let Some((o, l)) = seg.opts.sack_option {
            if o + l <= hl {
                f[off + o..off + o + l].fill(1);
            }
        }
        let mut new = [0u8; 60];
        new[..hl].copy_from_slice(&f[off..off + hl]);
        new[16] = 0;
        new[17] = 0;
        let c = wire::checksum_adjust(seg.checksum, &old[..hl], &new[..hl]);
        f[off + 16..off + 18].copy_from_slice(&c.to_be_bytes());
        self.guest_seen_ack = Some(ack);
        f
    }

    /// Rewrite a late peer frame of a closed flow: ACK and window edge no
    /// less than what the guest was told.
    pub(crate) fn rewrite_closed(&mut self, frame: &[u8], seg: &Segment<'_>) -> Vec<u8> {
        let mut f = frame[..seg.frame_len().min(frame.len())].to_vec();
        let off = seg.tcp_offset;
        if f.len() < off + 20 {
            return f;
        }
        let ack = self.guest_seen_ack.map_or(seg.ack, |a| seq::max(a, seg.ack));
        let ws = u32::from(self.peer_ws);
        let need = u64::from(seq::dist(ack, self.adv_edge)).div_ceil(1u64 << ws);
        let win = u64::from(seg.window).max(need).min(65535) as u16;
        self.adv_edge = seq::max(self.adv_edge, ack.wrapping_add(u32::from(win) << ws));
        let mut old = [0u8; 8];
        old.copy_from_slice(&f[off + 8..off + 16]);
        f[off + 8..off + 12].copy_from_slice(&ack.to_be_bytes());
        f[off + 14..off + 16].copy_from_slice(&win.to_be_bytes());
        let c = wire::checksum_adjust(seg.checksum, &old, &f[off + 8..off + 16]);
        f[off + 16..off + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    // ---------------------------------------------------------------
    // Guest -> engine.

    /// Accept a guest segment of an established flow. Returns the ack info
    /// to queue in the epoch, whether it was a pure ACK, and whether the
    /// guest must get a speculative ACK.
    pub(crate) fn on_guest_segment(&mut self, ctx: &mut Ctx<'_>, seg: &Segment<'_>) -> (Option<AckInfo>, bool) {
        self.guest_mac = seg.eth_src;
        self.gw_mac = seg.eth_dst;
        self.guest_net = seg.net;
        let ackinfo = seg.has(flags::ACK).then(|| AckInfo::from_seg(seg));
        if seg.has(flags::ACK) && seq::ge(seg.ack, self.guest_last_ack) {
            self.guest_last_ack = seg.ack;
        }
        self.guest_last_window = seg.window;
        if let Some((tsval, _)) = seg.opts.timestamps {
            self.guest_ts_latest = Some(tsval);
        }
        let has_data = !seg.payload.is_empty() || seg.has(flags::FIN);
        if !has_data {
            if seq::lt(seg.seq, self.spec_ack()) {
                // A window probe or keepalive (old sequence number): answer
                // it like a receiver would; do not forward it as a separate
                // (duplicate) ACK to the peer.
                self.send_spec_ack(ctx);
                return (ackinfo, false);
            }
            return (ackinfo, true);
        }
        if !self.fin {
            let fin = seg.has(flags::FIN);
            if seq::gt(seg.seq, self.data_end) {
                self.stash_guest(ctx, seg.seq, seg.payload, fin);
            } else {
                self.accept_guest(ctx, seg.seq, seg.payload, fin);
                self.drain_guest_stash(ctx);
            }
        }
        // The guest filled the window it was offered: let it grow.
        if u64::from(seq::dist(self.data_end, self.adv_edge)) < self.sws_threshold(ctx) {
            let used = seq::dist(self.snd_una, self.adv_edge);
            self.wnd_target = used
                .max(self.wnd_target)
                .saturating_mul(2)
                .min(ctx.cfg.per_flow_budget as u32);
        }
        // Bytes beyond the reservation wait for the peer's ACK (as under
        // output commit): no duplicate ACK for them.
        let seen = self.guest_seen_ack;
        self.reserve_held(ctx);
        if seen != Some(self.guest_ack()) || self.overflow() == 0 {
            self.send_spec_ack(ctx);
        }
        (ackinfo, false)
    }

    /// Takes the guest's bytes [start, start + len) from `data_end` on,
    /// within the offered window.
    fn accept_guest(&mut self, ctx: &mut Ctx<'_>, start: u32, payload: &[u8], fin: bool) {
        let end = start.wrapping_add(payload.len() as u32);
        if !(seq::le(start, self.data_end) && seq::ge(end, self.data_end)) {
            return;
        }
        let skip = seq::dist(start, self.data_end) as usize;
        let room = seq::dist(self.data_end, self.adv_edge) as usize;
        let take = (payload.len() - skip).min(room);
        self.buf.extend(&payload[skip..skip + take]);
        self.mark.0.pushed += take as u64;
        *ctx.global_held += take as u64;
        self.data_end = self.data_end.wrapping_add(take as u32);
        if fin && skip + take == payload.len() {
            self.fin = true;
        }
    }

    /// A guest segment beyond `data_end` (its predecessor not yet seen:
    /// the path from the guest reordered them, e.g. two CPUs' backlogs in
    /// a host bridge): kept for a moment instead of dropped, which left
    /// the guest to find the "loss" by its RTO (a 200 ms stall per
    /// reordering for a SACK sender that gets no SACK for it).
    fn stash_guest(&mut self, ctx: &mut Ctx<'_>, start: u32, payload: &[u8], fin: bool) {
        let end = start.wrapping_add(payload.len() as u32);
        let global_max = (ctx.cfg.global_cap as u64 / 16).min(GUEST_STASH_GLOBAL);
        let st = &mut self.guest_stash.0;
        if payload.is_empty()
            || seq::gt(end, self.adv_edge)
            || st.segs.len() >= GUEST_STASH_SEGS
            || st.bytes() + payload.len() > GUEST_STASH_BYTES
            || *ctx.global_stash + payload.len() as u64 > global_max
            || st.segs.iter().any(|s| s.0 == start)
        {
            return;
        }
        *ctx.global_stash += payload.len() as u64;
        st.segs.push((start, payload.to_vec(), fin));
    }

    /// Bytes of guest segments kept ahead of a hole.
    pub(crate) fn guest_stash_bytes(&self) -> u64 {
        self.guest_stash.0.bytes() as u64
    }

    /// Forgets the stashed guest segments (the flow ends).
    fn clear_guest_stash(&mut self, ctx: &mut Ctx<'_>) {
        let st = std::mem::take(&mut self.guest_stash.0);
        *ctx.global_stash = ctx.global_stash.saturating_sub(st.bytes() as u64);
    }

    /// Accepts stashed segments that now continue the stream.
    fn drain_guest_stash(&mut self, ctx: &mut Ctx<'_>) {
        while !self.fin {
            let de = self.data_end;
            let st = &mut self.guest_stash.0;
            // Wholly below data_end: already have them.
            let before = st.bytes();
            st.segs.retain(|(s, p, _)| seq::gt(s.wrapping_add(p.len() as u32), de));
            *ctx.global_stash = ctx.global_stash.saturating_sub((before - st.bytes()) as u64);
            let Some(i) = st.segs.iter().position(|(s, _, _)| seq::le(*s, de)) else {
                return;
            };
            let (start, payload, fin) = st.segs.swap_remove(i);
            *ctx.global_stash = ctx.global_stash.saturating_sub(payload.len() as u64);
            self.accept_guest(ctx, start, &payload, fin);
            if self.data_end == de {
                return;
            }
        }
    }

    // ---------------------------------------------------------------
    // Epoch commit.

    pub(crate) fn on_commit_item(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Duration,
        data_end: u32,
        fin: bool,
        ack: Option<AckInfo>,
        pure: bool,
    ) {
        self.last_activity = now;
        if seq::gt(data_end, self.committed_end) {
            self.committed_end = data_end;
        }
        self.committed_fin |= fin;
        if let Some(a) = ack {
            self.committed_ack = Some(a);
        }
        if pure && ack.is_some() {
            self.send_pure_ack(ctx, now);
        }
    }

    /// After an epoch's items: send what the windows allow, and tell the
    /// peer about a changed guest ACK/window.
    pub(crate) fn after_commit(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        self.send_loop(ctx, now);
        if let Some(a) = self.committed_ack {
            if self.last_sent_ack != Some((a.ack, a.window)) {
                self.send_pure_ack(ctx, now);
            }
        }
        self.check_done(now, ctx);
    }

    /// Guest RST committed: deliver what is left, then reset.
    pub(crate) fn on_guest_rst(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        self.rst_pending = true;
        self.linger = Some(now + ctx.cfg.rst_linger);
        self.maybe_send_rst(ctx, now, false);
    }

    fn maybe_send_rst(&mut self, ctx: &mut Ctx<'_>, now: Duration, force: bool) {
        if !self.rst_pending || !(force || self.snd_una == self.stream_end_committed()) {
            return;
        }
        let seqno = self.snd_una;
        self.emit(ctx, now, seqno, 0, flags::RST | flags::ACK, false);
        self.rst_pending = false;
        self.close(ctx, now);
    }

    pub(crate) fn close(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        if self.phase == Phase::Established {
            *ctx.spec_flows = ctx.spec_flows.saturating_sub(1);
        }
        self.release_all(ctx);
        self.phase = Phase::Closed;
        // A guest RST still waiting for the peer's ACK is moot: the flow
        // was reset (by the peer, or by an abort that reset both sides).
        // Left pending it was sent again at the linger deadline, and with a
        // zero time_wait the flow stayed due forever.
        self.rst_pending = false;
        self.linger = Some(now + ctx.cfg.time_wait);
    }

    pub(crate) fn check_done(&mut self, now: Duration, ctx: &mut Ctx<'_>) {
        if self.phase != Phase::Established {
            return;
        }
        let fin_acked = self.committed_fin && self.snd_una == self.stream_end_committed() && self.fin;
        let peer_fin_acked = match (self.peer_fin, self.committed_ack) {
            (Some(f), Some(a)) => seq::gt(a.ack, f),
            _ => false,
        };
        if fin_acked && peer_fin_acked {
            self.close(ctx, now);
        }
    }

    /// Abort after too many retransmission timeouts: reset both sides.
    fn abort(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        ctx.stats.aborted_flows += 1;
        let seqno = self.snd_max;
        self.emit(ctx, now, seqno, 0, flags::RST | flags::ACK, false);
        let net = self.guest_net.reversed();
        let frame = wire::Build {
            eth_src: self.gw_mac,
            eth_dst: self.guest_mac,
            net,
            ip_id: 0,
            src_port: self.key.peer_port,
            dst_port: self.key.guest_port,
            seq: self.guest_rcv_nxt(),
            ack: self.guest_ack(),
            flags: flags::RST | flags::ACK,
            window: 0,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: None,
            sack: &[],
        }
        .to_frame(&[], &[]);
        ctx.out.push_back(Transmit {
            to: Side::Inner,
            frame,
            gso_size: None,
            partial_csum: false,
            held: None,
        });
        self.close(ctx, now);
    }

    // ---------------------------------------------------------------
    // Engine -> peer.

    fn opts_len(&self) -> usize {
        let nsack = if self.sack_ok {
            self.committed_ack.map_or(0, |a| a.sack_blocks().len().min(3))
        } else {
            0
        };
        wire::options_len(false, false, false, self.ts_ok, nsack)
    }

    /// Payload bytes per segment toward the peer.
    pub(crate) fn mss_eff(&self, cfg: &Config) -> u32 {
        let l3 = self.guest_net.header_len() + 20;
        let by_mtu = cfg.mtu.saturating_sub(l3);
        let base = usize::from(self.peer_mss).min(by_mtu);
        base.saturating_sub(self.opts_len()).max(64) as u32
    }

    /// Build and queue one segment toward the peer.
    fn emit(&mut self, ctx: &mut Ctx<'_>, now: Duration, seqno: u32, len: u32, fl: u8, probe_seq: bool) {
        let _ = now;
        let a = self.committed_ack.unwrap_or_else(|| AckInfo {
            ack: self.peer_syn.map_or(0, |p| p.isn.wrapping_add(1)),
            window: self.guest_syn.map_or(0, |g| g.window),
            tsval: self.guest_syn.and_then(|g| g.tsval),
            ..AckInfo::default()
        });
        let ts = if self.ts_ok {
            Some((
                a.tsval.or(self.guest_syn.and_then(|g| g.tsval)).unwrap_or(0),
                self.peer_ts_recent.unwrap_or(0),
            ))
        } else {
            None
        };
        let sack: &[(u32, u32)] = if self.sack_ok && fl & flags::RST == 0 {
            let b = a.sack_blocks();
            &b[..b.len().min(3)]
        } else {
            &[]
        };
        let off = seq::dist(self.snd_una, seqno) as usize;
        let n = (len as usize).min(self.buf.len().saturating_sub(off));
        let gather = n > 0 && ctx.cfg.gather_payload && ctx.cfg.offload_checksums;
        let (p1, p2) = if n == 0 || gather {
            (&[][..], &[][..])
        } else {
            self.held_range(off, n)
        };
        let mut fl = fl;
        if !probe_seq && fl & flags::RST == 0 {
            fl |= flags::ACK;
            if n > 0 && off + n == self.buf.len() {
                fl |= flags::PSH;
            }
        }
        if a.ece && fl & flags::RST == 0 {
            fl |= flags::ECE;
        }
        // Engine-built segments are not ECN-capable (the engine does not
        // react to congestion marks).
        let net = match self.guest_net {
            Net::V4 { src, dst, tos, ttl, df } => Net::V4 {
                src,
                dst,
                tos: tos & !3,
                ttl,
                df,
            },
            Net::V6 {
                src,
                dst,
                traffic_class,
                flow_label,
                hop_limit,
            } => Net::V6 {
                src,
                dst,
                traffic_class: traffic_class & !3,
                flow_label,
                hop_limit,
            },
        };
        let mut frame = ctx.pool.pop().unwrap_or_default();
        wire::Build {
            eth_src: self.guest_mac,
            eth_dst: self.gw_mac,
            net,
            ip_id: self.ip_id,
            src_port: self.key.guest_port,
            dst_port: self.key.peer_port,
            seq: if probe_seq { self.snd_una.wrapping_sub(1) } else { seqno },
            ack: a.ack,
            flags: fl,
            window: a.window,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: ts,
            sack,
        }
        .write_frame(&mut frame, &[], p1, p2, gather.then_some(n), ctx.cfg.offload_checksums);
        self.ip_id = self.ip_id.wrapping_add(1);
        self.last_sent_ack = Some((a.ack, a.window));
        ctx.stats.segments_sent += 1;
        let mss = self.mss_eff(ctx.cfg);
        ctx.out.push_back(Transmit {
            to: Side::Outer,
            frame,
            gso_size: (n as u32 > mss).then(|| mss.min(u32::from(u16::MAX)) as u16),
            partial_csum: ctx.cfg.offload_checksums,
            held: gather.then_some(crate::HeldRef {
                key: self.key,
                id: self.id,
                seq: seqno,
                len: n as u32,
            }),
        });
    }

    /// Held bytes [off, off + n) from snd_una, as (at most) two slices of
    /// the ring; `off + n` must be within the held bytes.
    fn held_range(&self, off: usize, n: usize) -> (&[u8], &[u8]) {
        let (s1, s2) = self.buf.as_slices();
        if off + n <= s1.len() {
            (&s1[off..off + n], &s2[..0])
        } else if off >= s1.len() {
            let o2 = off - s1.len();
            (&s1[..0], &s2[o2..o2 + n])
        } else {
            (&s1[off..], &s2[..n - (s1.len() - off)])
        }
    }

    /// Held bytes [seqno, seqno + len), if all still held (not yet
    /// acknowledged by the peer).
    pub(crate) fn held_slices(&self, seqno: u32, len: u32) -> Option<(&[u8], &[u8])> {
        if seq::lt(seqno, self.snd_una) {
            return None;
        }
        let off = seq::dist(self.snd_una, seqno) as usize;
        let n = len as usize;
        (off.checked_add(n)? <= self.buf.len()).then(|| self.held_range(off, n))
    }

    pub(crate) fn resend_ack(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        self.send_pure_ack(ctx, now);
    }

    fn send_pure_ack(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        let s = self.snd_max;
        self.emit(ctx, now, s, 0, flags::ACK, false);
    }

    fn sacked_in(&self, a: u32, b: u32) -> u32 {
        let mut n = 0;
        for &(l, r) in &self.sacked {
            let l = seq::max(l, a);
            let r = seq::min(r, b);
            n += seq::dist(l, r);
        }
        n
    }

    fn high_sack(&self) -> u32 {
        self.sacked.last().map_or(self.snd_una, |b| b.1)
    }

    fn lost_end(&self, cfg: &Config) -> Option<u32> {
        let r = self.recovery?;
        Some(if r.after_rto {
            r.point
        } else {
            let one = self.snd_una.wrapping_add(self.mss_eff(cfg));
            // RACK's boundary where it knows the send times; else every
            // hole below the highest SACK (RFC 6675's simplification).
            let lost = if self.rack_on() {
                self.rack.0.lost.unwrap_or(self.snd_una)
            } else {
                self.high_sack()
            };
            seq::min(seq::max(lost, one), r.point)
        })
    }

    /// RFC 6675-style estimate of the bytes in flight.
    fn pipe(&self, cfg: &Config) -> u32 {
        let flight = seq::dist(self.snd_una, self.snd_max);
        let sacked = if self.sack_ok {
            self.sacked_in(self.snd_una, self.snd_max)
        } else {
            (self.dupacks.saturating_mul(self.mss_eff(cfg))).min(flight)
        };
        let lost = match self.lost_end(cfg) {
            Some(le) if seq::lt(self.retx_nxt, le) => seq::dist(self.retx_nxt, le) - self.sacked_in(self.retx_nxt, le),
            _ => 0,
        };
        flight.saturating_sub(sacked).saturating_sub(lost)
    }

    /// First sequence number >= `s` not covered by a SACK block.
    fn next_unsacked(&self, mut s: u32) -> u32 {
        for &(l, r) in &self.sacked {
            if seq::le(l, s) && seq::lt(s, r) {
                s = r;
            }
        }
        s
    }

    fn next_sack_start(&self, s: u32) -> Option<u32> {
        self.sacked.iter().map(|b| b.0).find(|&l| seq::gt(l, s))
    }

    /// Right edge of the peer's receive window.
    fn peer_edge(&self) -> u32 {
        self.wl2.wrapping_add(self.peer_wnd)
    }

    /// The peer's window leaves no room beyond what was sent.
    fn window_closed(&self) -> bool {
        seq::le(self.peer_edge(), self.snd_max)
    }

    fn arm_rto(&mut self, now: Duration) {
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rto);
        }
    }

    /// Transmit retransmissions and new data as cwnd and the peer's window allow.
    pub(crate) fn send_loop(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        if self.phase != Phase::Established {
            return;
        }
        let cfg = ctx.cfg;
        let mss = self.mss_eff(cfg);
        // New data goes out in TSO frames of whole segments if allowed.
        let burst = if cfg.tso_max > mss as usize {
            let max = cfg.tso_max.min(64_000) as u32;
            (max / mss * mss).max(mss)
        } else {
            mss
        };
        let stream_end = self.stream_end_committed();
        // Retransmissions during recovery.
        while let Some(lost_end) = self.lost_end(cfg) {
            let start = self.next_unsacked(seq::max(self.retx_nxt, self.snd_una));
            if seq::ge(start, lost_end) || seq::ge(start, self.snd_max) {
                self.retx_nxt = seq::max(self.retx_nxt, start);
                break;
            }
            let mut end = seq::min(start.wrapping_add(mss), lost_end);
            end = seq::min(end, self.snd_max);
            if let Some(ns) = self.next_sack_start(start) {
                end = seq::min(end, ns);
            }
            let data_end = seq::min(end, self.committed_end);
            let len = seq::dist(start, data_end);
            let fin = self.committed_fin && data_end == self.committed_end && seq::gt(end, self.committed_end);
            if self.pipe(cfg).saturating_add(len.max(1)) > self.cwnd {
                return;
            }
            self.retransmit(ctx, now, start, len, fin);
            self.retx_nxt = end;
        }
        // New data.
        self.pacer.0.deadline = None;
        loop {
            if seq::ge(self.snd_max, stream_end) {
                break;
            }
            if let Some(t) = self.pacer.0.next.filter(|&t| t > now + PACING_SLACK) {
                // Paced: more than the slack ahead of the schedule. Wait
                // (a timer) unless there is nothing to send anyway.
                if seq::lt(self.snd_max, self.committed_end) && self.cwnd > self.pipe(cfg) {
                    self.pacer.0.deadline = Some(t - PACING_SLACK);
                }
                break;
            }
            let data_left = seq::dist(self.snd_max, self.committed_end);
            let wnd_room = seq::dist(self.snd_max, self.peer_edge());
            let cwnd_room = self.cwnd.saturating_sub(self.pipe(cfg));
            let len = data_left.min(burst).min(wnd_room).min(cwnd_room);
            let outstanding = self.snd_max != self.snd_una;
            if data_left > 0 {
                if len == 0 || (len < mss && len < data_left && outstanding) {
                    break;
                }
            } else if cwnd_room == 0 && outstanding {
                break;
            }
            let fin = self.committed_fin && self.snd_max.wrapping_add(len) == self.committed_end;
            let s = self.snd_max;
            self.emit(ctx, now, s, len, if fin { flags::FIN } else { 0 }, false);
            self.snd_max = s.wrapping_add(len).wrapping_add(u32::from(fin));
            self.rack.0.sent.push_back((self.snd_max, now));
            if cfg.pacing {
                self.pace(now, len);
            }
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((self.snd_max, now));
                self.rtt_probe_sack_only = self.recovery.is_some();
            }
            self.arm_rto(now);
            self.arm_tlp(now);
        }
        if self.snd_max == self.snd_una && seq::lt(self.snd_max, stream_end) && self.window_closed() {
            if self.persist_deadline.is_none() {
                self.persist_deadline = Some(now + self.persist_interval(cfg));
            }
        } else {
            self.persist_deadline = None;
        }
    }

    /// `len` bytes of new data left at `now`: the next may leave after
    /// `len` at the pacing rate (cwnd / SRTT, x2 in slow start, x1.2
    /// after). No RTT sample yet: no pacing (the initial window leaves at
    /// once, as in Linux).
    fn pace(&mut self, now: Duration, len: u32) {
        let Some(srtt) = self.srtt.filter(|s| !s.is_zero()) else {
            self.pacer.0.next = None;
            return;
        };
        let gain_pct: u128 = if self.cwnd < self.ssthresh / 2 { 200 } else { 120 };
        let rate = u128::from(self.cwnd.max(1)) * gain_pct; // bytes per srtt, x100
        let gap_ns = u128::from(len) * 100 * srtt.as_nanos() / rate;
        let gap = Duration::from_nanos(u64::try_from(gap_ns).unwrap_or(u64::MAX).min(1 << 40));
        let base = self.pacer.0.next.map_or(now, |t| t.max(now));
        self.pacer.0.next = Some(base + gap);
    }

    fn persist_interval(&self, cfg: &Config) -> Duration {
        let base = self.rto.max(cfg.min_rto);
        base.saturating_mul(1u32 << self.persist_backoff.min(16))
            .min(cfg.max_rto)
    }

    fn retransmit(&mut self, ctx: &mut Ctx<'_>, now: Duration, start: u32, len: u32, fin: bool) {
        ctx.stats.retransmits += 1;
        let end = start.wrapping_add(len).wrapping_add(u32::from(fin));
        if let Some(u) = self.undo.as_mut() {
            match u.ranges.as_mut() {
                Some(r) if r.len() < UNDO_RANGES_MAX => r.push((start, end, now)),
                _ => u.ranges = None,
            }
        }
        if self.recovery.is_some_and(|r| !r.after_rto) && self.retx_log.len() < RETX_LOG_MAX {
            self.retx_log.push_back((start, end, now));
        }
        // Karn: never sample RTT from a retransmitted range; a range
        // retransmitted below the probe leaves only its SACK to sample.
        if let Some((probe_end, _)) = self.rtt_probe {
            if seq::lt(start, probe_end) && seq::ge(end, probe_end) {
                self.rtt_probe = None;
            } else if seq::lt(start, probe_end) {
                self.rtt_probe_sack_only = true;
            }
        }
        self.emit(ctx, now, start, len, if fin { flags::FIN } else { 0 }, false);
        self.arm_rto(now);
    }

    fn enter_recovery(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        let mss = self.mss_eff(ctx.cfg);
        let flight = seq::dist(self.snd_una, self.snd_max);
        self.undo = Some(Undo {
            cwnd: self.cwnd,
            ssthresh: self.ssthresh,
            cubic: self.cubic.clone(),
            ranges: Some(Vec::new()),
            spurious: 0,
            until: None,
        });
        self.cubic.on_congestion(self.cwnd);
        self.ssthresh = cubic_reduce(flight, mss);
        self.cwnd = self.ssthresh;
        self.recovery = Some(Recovery {
            point: self.snd_max,
            after_rto: false,
        });
        ctx.stats.fast_recoveries += 1;
        let rk = &mut self.rack.0;
        rk.recoveries += 1;
        if rk.recoveries >= RACK_REO_RESET {
            rk.reo_mult = 1;
            rk.recoveries = 0;
        }
        self.retx_log.clear();
        // Fast retransmit of the first hole, regardless of cwnd.
        self.retx_nxt = self.retransmit_first_hole(ctx, now).unwrap_or(self.snd_una);
    }

    /// Retransmits the first segment not acknowledged and not SACKed,
    /// regardless of cwnd; returns its end.
    fn retransmit_first_hole(&mut self, ctx: &mut Ctx<'_>, now: Duration) -> Option<u32> {
        let mss = self.mss_eff(ctx.cfg);
        let start = self.next_unsacked(self.snd_una);
        if !seq::lt(start, self.snd_max) {
            return None;
        }
        let mut end = seq::min(start.wrapping_add(mss), self.snd_max);
        if let Some(ns) = self.next_sack_start(start) {
            end = seq::min(end, ns);
        }
        let data_end = seq::min(end, self.committed_end);
        let fin = self.committed_fin && data_end == self.committed_end && seq::gt(end, self.committed_end);
        self.retransmit(ctx, now, start, seq::dist(start, data_end), fin);
        Some(end)
    }

    /// Arms the tail loss probe for the current flight: two smoothed RTTs
    /// (at least 5 ms) after now, if that comes before the RTO.
    fn arm_tlp(&mut self, now: Duration) {
        self.tlp_deadline = None;
        let Some(srtt) = self.srtt else {
            return;
        };
        if self.tlp_sent || self.recovery.is_some() || self.snd_una == self.snd_max {
            return;
        }
        // RFC 8985 7.2: PTO = 2 SRTT; with one segment in flight plus the
        // worst-case delayed ACK (a request/response peer in Linux's
        // pingpong mode holds its ACK for the next request: probing at
        // 2 SRTT would retransmit every response's last segment).
        let mut pto = (srtt * 2).max(Duration::from_millis(5));
        if seq::dist(self.snd_una, self.snd_max) <= u32::from(self.peer_mss) {
            pto += WC_DEL_ACK;
        }
        let at = now + pto;
        if self.rto_deadline.is_none_or(|rto| at < rto) {
            self.tlp_deadline = Some(at);
        }
    }

    /// Sends the last segment of the flight again (the tail loss probe).
    fn send_tail_probe(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        if self.phase != Phase::Established
            || self.recovery.is_some()
            || self.snd_una == self.snd_max
            || self.window_closed()
        {
            return;
        }
        let mss = self.mss_eff(ctx.cfg);
        let data_end = seq::min(self.snd_max, self.committed_end);
        let start = seq::max(self.snd_una, data_end.wrapping_sub(mss));
        let fin = self.committed_fin && self.snd_max == self.committed_end.wrapping_add(1);
        if start == data_end && !fin {
            return;
        }
        ctx.stats.tail_probes += 1;
        self.tlp_sent = true;
        self.retransmit(ctx, now, start, seq::dist(start, data_end), fin);
    }

    /// RACK usable (SACK, an RTT sample, a delivered send time known):
    /// loss is decided by send times.
    fn rack_on(&self) -> bool {
        self.sack_ok && self.min_rtt.is_some() && self.rack.0.xmit.is_some()
    }

    /// RACK's reordering window (RFC 8985 6.2): none while no reordering
    /// was seen and the hole is already clear (in recovery, or a
    /// reordering threshold's worth SACKed above it); else a quarter of
    /// the minimum RTT per step, at most SRTT.
    fn reo_wnd(&self, mss: u32) -> Duration {
        let seen = self.reordering > REORDERING_INIT;
        if !seen
            && (self.recovery.is_some()
                || self.sacked_in(self.snd_una, self.snd_max) >= self.reordering.saturating_mul(mss))
        {
            return Duration::ZERO;
        }
        let Some(min_rtt) = self.min_rtt else {
            return Duration::ZERO;
        };
        let w = min_rtt / 4 * self.rack.0.reo_mult.max(1);
        self.srtt.map_or(w, |s| w.min(s))
    }

    /// Data [l, r) was newly delivered (ACKed or SACKed): RACK remembers
    /// the latest send time delivered. A retransmitted range counts with
    /// its retransmission's time, unless the ACK came sooner than the
    /// minimum RTT after it (then it was the original's: ambiguous, skipped).
    fn rack_delivered(&mut self, ctx: &mut Ctx<'_>, now: Duration, l: u32, r: u32) {
        if !seq::gt(r, self.snd_una) {
            // At or below the cumulative ACK (a late or duplicate report):
            // delivered long ago, its send time no longer logged.
            return;
        }
        let i = self.rack.0.sent.partition_point(|&(end, _)| seq::lt(end, r));
        let Some(&(_, orig)) = self.rack.0.sent.get(i) else {
            return;
        };
        let retx = self
            .retx_log
            .iter()
            .rev()
            .find(|&&(a, b, _)| seq::lt(a, r) && seq::lt(l, b))
            .map(|e| e.2);
        let t = match (retx, self.min_rtt) {
            (Some(at), Some(m)) if now.saturating_sub(at) >= m => at,
            (Some(_), _) => return,
            (None, _) => {
                self.hystart_sample(ctx, now.saturating_sub(orig));
                orig
            }
        };
        let rk = &mut self.rack.0;
        if rk.xmit.is_none_or(|(xt, xe)| t > xt || (t == xt && seq::gt(r, xe))) {
            rk.xmit = Some((t, r));
            rk.rtt = now.saturating_sub(t);
        }
    }

    /// An RTT sample (an original transmission delivered) during the first
    /// slow start: HyStart++'s delay increase test.
    fn hystart_sample(&mut self, ctx: &mut Ctx<'_>, rtt: Duration) {
        if self.ssthresh != u32::MAX || self.recovery.is_some() {
            return;
        }
        let h = &mut self.hystart.0;
        h.cur_min = Some(h.cur_min.map_or(rtt, |m| m.min(rtt)));
        h.samples += 1;
        if h.samples < HYSTART_MIN_SAMPLES {
            return;
        }
        if let (Some(cur), Some(last)) = (h.cur_min, h.last_min) {
            let eta = (last / 8).clamp(HYSTART_MIN_ETA, HYSTART_MAX_ETA);
            if cur >= last + eta {
                debug!(key = ?self.key, cwnd = self.cwnd, ?cur, ?last, "HyStart++: slow start ends");
                self.ssthresh = self.cwnd;
                ctx.stats.slow_start_exits += 1;
            }
        }
    }

    /// Recomputes what RACK counts lost (RFC 8985 6.2: data sent before
    /// the latest delivered send, in time then sequence order, and out for
    /// that delivery's RTT plus the reordering window; a prefix of the send
    /// log), and the timer for the first suspect segment.
    fn rack_detect(&mut self, now: Duration, mss: u32) {
        let reo = self.reo_wnd(mss);
        let rk = &self.rack.0;
        let Some((xt, xend)) = rk.xmit else {
            self.rack.0.lost = None;
            self.rack.0.deadline = None;
            return;
        };
        let before = |end: u32, t: Duration| t < xt || (t == xt && seq::le(end, xend));
        let n = rk
            .sent
            .partition_point(|&(end, t)| before(end, t) && t + rk.rtt + reo <= now);
        let lost = n.checked_sub(1).map(|i| rk.sent[i].0);
        // Sent before the delivered data, not yet lost, not wholly SACKed:
        // lost at send + RTT + window (later than now) unless delivered.
        let mut deadline = None;
        let mut start = lost.map_or(self.snd_una, |b| seq::max(b, self.snd_una));
        for &(end, t) in rk.sent.iter().skip(n).take(RACK_TIMER_SCAN) {
            if !before(end, t) {
                break;
            }
            if seq::gt(end, start) && self.sacked_in(start, end) < seq::dist(start, end) {
                deadline = Some(t + rk.rtt + reo);
                break;
            }
            start = seq::max(start, end);
        }
        self.rack.0.lost = lost;
        self.rack.0.deadline = deadline;
    }

    /// The end of the last part of [l, r) not SACKed before: the newly
    /// delivered data sent last (an ACK that fills a hole also covers data
    /// SACKed long ago, whose send time would be no RTT sample). None if
    /// all of it was SACKed already.
    fn last_unsacked_end(&self, l: u32, mut r: u32) -> Option<u32> {
        for &(a, b) in self.sacked.iter().rev() {
            if seq::le(r, l) {
                break;
            }
            if seq::lt(a, r) && seq::le(r, b) {
                r = a;
            }
        }
        seq::lt(l, r).then_some(r)
    }

    /// RACK counts the first hole above snd_una lost.
    fn rack_hole_lost(&self) -> bool {
        self.rack_on()
            && self
                .rack
                .0
                .lost
                .is_some_and(|b| seq::gt(b, self.next_unsacked(self.snd_una)))
    }

    /// During fast recovery: if the retransmission of the segment at
    /// snd_una was itself lost, send it again now instead of waiting for
    /// the retransmission timeout (a RACK-style check: the peer keeps
    /// acknowledging later data more than an RTT after the retransmission
    /// left). One lost retransmission used to cost a 200 ms+ timeout and a
    /// restart from one segment.
    fn recover_lost_retransmission(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        let (Some(r), Some(srtt)) = (self.recovery, self.srtt) else {
            return;
        };
        let una = self.snd_una;
        if r.after_rto || una == self.snd_max || self.sacked_in(una, self.snd_max) == 0 {
            return;
        }
        let Some(&(_, _, at)) = self
            .retx_log
            .iter()
            .rev()
            .find(|e| seq::le(e.0, una) && seq::lt(una, e.1))
        else {
            return;
        };
        let reorder_window = srtt / 4 + Duration::from_millis(1);
        if now.saturating_sub(at) > srtt + reorder_window {
            ctx.stats.lost_retransmits += 1;
            if let Some(end) = self.retransmit_first_hole(ctx, now) {
                self.retx_nxt = seq::max(self.retx_nxt, end);
            }
        }
    }

    fn rtt_sample(&mut self, cfg: &Config, r: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(r, |m| m.min(r)));
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
        self.update_rto(cfg);
    }

    fn update_rto(&mut self, cfg: &Config) {
        if let Some(s) = self.srtt {
            let k = (self.rttvar * 4).max(Duration::from_millis(1));
            self.rto = (s + k).clamp(cfg.min_rto, cfg.max_rto);
        }
    }

    // ---------------------------------------------------------------
    // Peer -> engine.

    /// Process the ACK, window and SACK fields of a peer segment.
    pub(crate) fn on_peer_ack(&mut self, ctx: &mut Ctx<'_>, now: Duration, seg: &Segment<'_>) {
        let ack = seg.ack;
        let probe_out = self.tlp_sent;
        if seq::lt(ack, self.snd_una.wrapping_sub(1 << 30)) {
            return;
        }
        if seq::gt(ack, self.snd_max) {
            // Only committed data can have reached the peer (e.g. sent by
            // the previous primary before a failover); anything else is bogus.
            if seq::gt(ack, self.stream_end_committed()) {
                return;
            }
            self.snd_max = ack;
        }
        let wnd = u32::from(seg.window) << self.peer_ws;
        let old_wnd = self.peer_wnd;
        if seq::ge(ack, self.snd_una) && (seq::lt(self.wl1, seg.seq) || (self.wl1 == seg.seq && seq::le(self.wl2, ack)))
        {
            self.peer_wnd = wnd;
            self.wl1 = seg.seq;
            self.wl2 = ack;
        }
        let cfg = ctx.cfg;
        let mss = self.mss_eff(cfg);
        let high_before = self.high_sack();
        if self.sack_ok {
            for (i, &(l, r)) in seg.opts.sack_blocks().iter().enumerate() {
                // RFC 2883: a first block at or below the cumulative ACK,
                // or inside a SACKed range, reports a duplicate arrival.
                let dsack = i == 0
                    && seq::lt(l, r)
                    && (seq::le(r, seq::max(ack, self.snd_una)) || self.sacked_in(l, r) == seq::dist(l, r));
                if dsack {
                    self.note_delivered(ctx, now, l, r, true);
                    continue;
                }
                if seq::lt(l, high_before) && seq::gt(r, self.snd_una) {
                    // Filled (part of) a hole below the highest SACK.
                    let (fl, fr) = (seq::max(l, self.snd_una), seq::min(r, high_before));
                    if seq::lt(fl, fr) && self.sacked_in(fl, fr) < seq::dist(fl, fr) {
                        self.note_hole_filled(ctx, now, fl, fr, high_before, mss);
                    }
                }
                if let Some(e) = self.last_unsacked_end(l, r) {
                    self.rack_delivered(ctx, now, l, e);
                }
                if let Some((end, t)) = self.rtt_probe {
                    // The probe's own segment SACKed: an exact sample.
                    if seq::lt(l, end) && seq::ge(r, end) {
                        self.rtt_sample(cfg, now.saturating_sub(t));
                        self.rtt_probe = None;
                    }
                }
                self.add_sack(l, r);
            }
        }
        if seq::gt(ack, self.snd_una) && seq::gt(high_before, self.snd_una) {
            // The cumulative ACK filled the hole at snd_una.
            let una = self.snd_una;
            self.note_hole_filled(ctx, now, una, seq::min(ack, high_before), high_before, mss);
        }
        if seq::gt(ack, self.snd_una) {
            let una = self.snd_una;
            let h = &mut self.hystart.0;
            if h.window_end.is_none_or(|e| seq::ge(ack, e)) {
                // A new HyStart++ round.
                if h.samples > 0 {
                    h.last_min = h.cur_min;
                }
                h.cur_min = None;
                h.samples = 0;
                h.window_end = Some(self.snd_max);
            }
            if let Some(e) = self.last_unsacked_end(una, ack) {
                self.rack_delivered(ctx, now, una, e);
            }
            while self.rack.0.sent.front().is_some_and(|&(end, _)| seq::le(end, ack)) {
                self.rack.0.sent.pop_front();
            }
            let acked = seq::dist(self.snd_una, ack);
            let bytes = seq::dist(self.snd_una, seq::min(ack, self.data_end)) as usize;
            let bytes = bytes.min(self.buf.len());
            self.buf.drain(..bytes);
            *ctx.global_held = ctx.global_held.saturating_sub(bytes as u64);
            self.snd_una = ack;
            self.retx_nxt = seq::max(self.retx_nxt, ack);
            self.retx_log.retain(|e| seq::gt(e.1, ack));
            self.tlp_sent = false;
            self.sacked.retain(|b| seq::gt(b.1, ack));
            if let Some(first) = self.sacked.first_mut() {
                first.0 = seq::max(first.0, ack);
            }
            if let Some((end, t)) = self.rtt_probe {
                if seq::ge(ack, end) {
                    if !self.rtt_probe_sack_only {
                        self.rtt_sample(cfg, now.saturating_sub(t));
                    }
                    self.rtt_probe = None;
                }
            }
            self.retries = 0;
            self.update_rto(cfg);
            if self.srtt.is_none() {
                self.rto = cfg.initial_rto;
            }
            self.dupacks = 0;
            match self.recovery {
                Some(r) if seq::ge(ack, r.point) => {
                    self.recovery = None;
                    self.retx_log.clear();
                    if !r.after_rto {
                        self.cwnd = self.ssthresh.max(mss);
                    }
                    self.try_undo(ctx, now);
                }
                // After a timeout, slow start continues during recovery.
                Some(r) if r.after_rto => {
                    self.cwnd = self
                        .cwnd
                        .saturating_add(acked.min(self.cwnd))
                        .min(self.ssthresh.max(mss));
                }
                Some(_) => {}
                None => {
                    if self.cwnd < self.ssthresh {
                        self.cwnd = self.cwnd.saturating_add(acked.min(self.cwnd));
                    } else {
                        let target = self
                            .cubic
                            .target(now, self.srtt.unwrap_or(self.rto), self.cwnd, mss, acked);
                        // Grow toward the target by (target - cwnd) / cwnd
                        // per acknowledged byte (at least Reno's pace).
                        let step = u64::from(target.saturating_sub(self.cwnd)).max(u64::from(mss));
                        let add = u64::from(acked) * step + u64::from(self.ca_acc);
                        let inc = add / u64::from(self.cwnd.max(1));
                        self.ca_acc = (add % u64::from(self.cwnd.max(1))) as u32;
                        self.cwnd = self.cwnd.saturating_add(inc.min(u64::from(mss) * 64) as u32);
                    }
                }
            }
            self.rto_deadline = if self.snd_una != self.snd_max {
                Some(now + self.rto)
            } else {
                None
            };
            if self.held() == 0 {
                // Idle: give the window back gradually (the offered edge
                // stays; it is not grown again beyond the target).
                self.wnd_target = (self.wnd_target / 2).max(initial_target(cfg));
            }
            self.set_reserved(ctx);
            self.maybe_send_rst(ctx, now, false);
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && !seg.has(flags::FIN)
            && wnd == old_wnd
            && self.snd_max != self.snd_una
        {
            self.dupacks += 1;
            self.recover_lost_retransmission(ctx, now);
        }
        self.probes_out = 0;
        if !self.window_closed() {
            self.persist_backoff = 0;
        }
        self.rack_detect(now, mss);
        if self.recovery.is_none() && self.snd_max != self.snd_una {
            let sacked = if self.sack_ok {
                self.sacked_in(self.snd_una, self.snd_max)
            } else {
                0
            };
            // With RACK (SACK and known send times) the hole is lost when
            // RACK says so; else by counting (duplicate ACKs, or SACKed
            // segments above it). The answer to a tail loss probe SACKs it
            // above a hole: that hole was lost (no more ACKs are coming).
            let thresh = self.reordering;
            let counted = !self.rack_on() && (self.dupacks >= thresh || sacked >= thresh.saturating_mul(mss));
            if counted || self.rack_hole_lost() || (probe_out && sacked > 0) {
                self.enter_recovery(ctx, now);
            }
        }
        self.arm_tlp(now);
        if let Some((tsval, _)) = seg.opts.timestamps {
            self.peer_ts_recent = Some(self.peer_ts_recent.map_or(tsval, |t| seq::max(t, tsval)));
        }
    }

    /// A hole [start, end) below the highest SACKed byte `high` was
    /// filled. If it was never retransmitted, the segments were reordered
    /// by that distance: raise the reordering threshold. If it was, and
    /// the ACK came sooner than a round trip after the retransmission,
    /// the original filled it: the retransmission was spurious.
    fn note_hole_filled(&mut self, ctx: &mut Ctx<'_>, now: Duration, start: u32, end: u32, high: u32, mss: u32) {
        let overlaps = |&(a, b, _): &(u32, u32, Duration)| seq::lt(a, end) && seq::lt(start, b);
        let retransmitted = self.undo.as_ref().is_some_and(|u| match &u.ranges {
            Some(r) => r.iter().any(overlaps),
            None => true,
        }) || self.retx_log.iter().any(overlaps);
        if !retransmitted && self.recovery.is_none_or(|r| !r.after_rto) && !self.tlp_sent {
            let dist = seq::dist(start, high).div_ceil(mss.max(1)).saturating_add(1);
            let new = dist.clamp(self.reordering, REORDERING_MAX);
            if new > self.reordering {
                trace!(key = ?self.key, from = self.reordering, to = new, "reordering seen");
                self.reordering = new;
            }
            return;
        }
        self.note_delivered(ctx, now, start, end, false);
    }

    /// Bytes [l, r) reached the peer by an earlier copy than a
    /// retransmission of the current recovery (`dsack`: the peer says it
    /// got them twice; else an ACK came sooner than a round trip after the
    /// retransmission left). Counts the spurious retransmissions.
    fn note_delivered(&mut self, ctx: &mut Ctx<'_>, now: Duration, l: u32, r: u32, dsack: bool) {
        let floor = self.min_rtt.or(self.srtt).unwrap_or(Duration::ZERO);
        let Some(u) = self.undo.as_mut() else {
            return;
        };
        let Some(ranges) = u.ranges.as_mut() else {
            return;
        };
        let before = ranges.len();
        ranges.retain(|&(a, b, at)| {
            let overlaps = seq::lt(a, r) && seq::lt(l, b);
            !(overlaps && (dsack || now.saturating_sub(at) < floor))
        });
        let n = (before - ranges.len()) as u32;
        if n > 0 {
            u.spurious += n;
            if dsack && self.reordering < REORDERING_MAX {
                // A duplicate: the hole was reordered, not lost.
                self.reordering = (self.reordering + 1).min(REORDERING_MAX);
            }
            self.try_undo(ctx, now);
        }
    }

    /// Every retransmission of the recovery proved spurious: restore the
    /// window and the CUBIC state from before it (RFC 3708 / Linux undo).
    fn try_undo(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        let rtt = self.srtt.or(self.min_rtt).unwrap_or(Duration::from_millis(200));
        let recovering = self.recovery.is_some();
        let Some(u) = self.undo.as_mut() else {
            return;
        };
        if !recovering {
            // The recovery is over: its DSACKs may still come for a round
            // trip (and a little); after that a real loss stays, and a late
            // duplicate must not restore an old window.
            let until = *u.until.get_or_insert(now + rtt * 2 + Duration::from_millis(10));
            if now > until || u.ranges.is_none() {
                self.undo = None;
                return;
            }
        }
        if !(u.ranges.as_ref().is_some_and(|r| r.is_empty()) && u.spurious > 0) {
            return;
        }
        let Some(u) = self.undo.take() else {
            return;
        };
        self.cwnd = self.cwnd.max(u.cwnd);
        self.ssthresh = u.ssthresh;
        self.cubic = u.cubic;
        self.retx_log.clear();
        if self.recovery.is_some_and(|r| !r.after_rto) {
            self.recovery = None;
        }
        ctx.stats.spurious_recoveries += 1;
        let rk = &mut self.rack.0;
        rk.reo_mult = (rk.reo_mult.max(1) + 1).min(RACK_REO_MULT_MAX);
        rk.recoveries = 0;
        debug!(key = ?self.key, reordering = self.reordering, "spurious recovery undone");
    }

    /// Records a SACK block of the peer. Only the part inside
    /// [snd_una, snd_max] counts; a block wholly outside it (or malformed,
    /// e.g. with edges half the sequence space apart) is ignored. The edges
    /// are compared as offsets from `snd_una`: pairwise sequence-space
    /// comparisons are not transitive across more than 2^31 bytes, so a
    /// block such as (una + 1.4e9, una + 2.9e9) would pass "l >= una",
    /// "r <= snd_max" and "l < r" all at once.
    fn add_sack(&mut self, l: u32, r: u32) {
        if !seq::lt(l, r) {
            return;
        }
        let flight = seq::dist(self.snd_una, self.snd_max);
        let off_r = r.wrapping_sub(self.snd_una);
        if off_r == 0 || off_r >= 1 << 31 {
            // Right edge at or below snd_una: nothing new.
            return;
        }
        // l < r and r above snd_una: an offset of l above r's means l lies
        // below snd_una (a block straddling it): trim it there.
        let off_l = l.wrapping_sub(self.snd_una);
        let off_l = if off_l > off_r { 0 } else { off_l };
        let off_r = off_r.min(flight);
        if off_l >= off_r {
            return;
        }
        let l = self.snd_una.wrapping_add(off_l);
        let r = self.snd_una.wrapping_add(off_r);
        let mut nl = l;
        let mut nr = r;
        let mut out = Vec::with_capacity(self.sacked.len() + 1);
        let mut placed = false;
        for &(bl, br) in &self.sacked {
            if seq::lt(br, nl) {
                out.push((bl, br));
            } else if seq::gt(bl, nr) {
                if !placed {
                    out.push((nl, nr));
                    placed = true;
                }
                out.push((bl, br));
            } else {
                nl = seq::min(nl, bl);
                nr = seq::max(nr, br);
            }
        }
        if !placed {
            out.push((nl, nr));
        }
        self.sacked = out;
    }

    /// Track the peer->guest direction for a segment passed to the guest
    /// (or consumed): contiguous position, FIN, TSval for the guest's view.
    pub(crate) fn note_peer_data(&mut self, seg: &Segment<'_>) {
        let end = seg.seq.wrapping_add(seg.payload.len() as u32);
        let in_order = seq::le(seg.seq, self.peer_contig);
        if in_order {
            if let Some((tsval, _)) = seg.opts.timestamps {
                self.peer_ts_for_guest = Some(self.peer_ts_for_guest.map_or(tsval, |t| seq::max(t, tsval)));
            }
        }
        let fin_end = end.wrapping_add(u32::from(seg.has(flags::FIN)));
        if in_order {
            if seq::gt(fin_end, self.peer_contig) {
                self.peer_contig = fin_end;
            }
            // The guest reassembles: ranges passed out of order join.
            while let Some(&(l, r)) = self.peer_ooo.first() {
                if seq::gt(l, self.peer_contig) {
                    break;
                }
                self.peer_contig = seq::max(self.peer_contig, r);
                self.peer_ooo.remove(0);
            }
        } else if seq::gt(fin_end, seg.seq) && self.peer_ooo.len() < 32 {
            let pos = self
                .peer_ooo
                .iter()
                .position(|&(l, _)| seq::gt(l, seg.seq))
                .unwrap_or(self.peer_ooo.len());
            self.peer_ooo.insert(pos, (seg.seq, fin_end));
            // Merge overlapping neighbours.
            let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.peer_ooo.len());
            for &(l, r) in &self.peer_ooo {
                match merged.last_mut() {
                    Some(last) if seq::le(l, last.1) => last.1 = seq::max(last.1, r),
                    _ => merged.push((l, r)),
                }
            }
            self.peer_ooo = merged;
        }
        if seg.has(flags::FIN) {
            self.peer_fin = Some(end);
        }
    }

    /// A peer RST is acceptable if its sequence number is inside the
    /// receive window the guest is known to have.
    pub(crate) fn peer_rst_valid(&self, seg: &Segment<'_>) -> bool {
        let lo = self.guest_last_ack;
        let wnd = (u32::from(self.guest_last_window) << self.guest_ws).max(65535);
        seq::ge(seg.seq, lo) && seq::le(seg.seq, lo.wrapping_add(wnd))
    }

    pub(crate) fn resume_after_failover(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        let cfg = ctx.cfg;
        // Every time is re-based on the new host's clock.
        self.last_activity = now;
        self.rtt_probe = None;
        self.rto_deadline = None;
        self.persist_deadline = None;
        self.tlp_deadline = None;
        self.tlp_sent = false;
        self.retx_log.clear();
        self.rack.0 = Rack::default();
        self.pacer.0 = Pacer::default();
        self.hystart.0 = HyStart::default();
        self.cubic.epoch_start = None;
        self.persist_backoff = 0;
        self.retries = 0;
        self.probes_out = 0;
        self.linger = match self.phase {
            Phase::Handshake | Phase::Fallback => Some(now + cfg.handshake_timeout),
            Phase::Closed => Some(now + cfg.time_wait),
            Phase::Established if self.rst_pending => Some(now + cfg.rst_linger),
            Phase::Established => None,
        };
        if self.phase != Phase::Established {
            return;
        }
        let mss = self.mss_eff(cfg);
        self.dupacks = 0;
        self.sacked.clear();
        self.cwnd = cfg.initial_cwnd.max(1) * mss;
        if self.snd_una != self.snd_max {
            self.recovery = Some(Recovery {
                point: self.snd_max,
                after_rto: true,
            });
            self.retx_nxt = self.snd_una;
        } else {
            self.recovery = None;
        }
        self.send_loop(ctx, now);
        // The peer may have acknowledged (and opened its window for) more
        // than the checkpoint knows: the old primary went on sending
        // committed data. An old-sequence empty segment makes it answer at
        // once with its current ACK and window, instead of the engine
        // waiting for a timeout when it cannot send (window used up).
        let s = self.snd_una.wrapping_sub(1);
        self.emit(ctx, now, s, 0, flags::ACK, true);
        if self.snd_una != self.snd_max {
            self.arm_rto(now);
        }
    }

    // ---------------------------------------------------------------
    // Timers.

    pub(crate) fn on_timeout(&mut self, ctx: &mut Ctx<'_>, now: Duration) {
        if let Some(d) = self.linger {
            if d <= now {
                if self.rst_pending {
                    self.maybe_send_rst(ctx, now, true);
                    return;
                }
                // Closed/handshake expiry is handled by the engine.
                if matches!(self.phase, Phase::Established) {
                    self.linger = None;
                }
            }
        }
        if self.phase != Phase::Established {
            // Sender timers mean nothing outside Established: never leave
            // one behind (it would stay due forever).
            self.rto_deadline = None;
            self.persist_deadline = None;
            self.tlp_deadline = None;
            self.rack.0.deadline = None;
            self.pacer.0.deadline = None;
            return;
        }
        if self.pacer.0.deadline.is_some_and(|d| d <= now) {
            self.pacer.0.deadline = None;
            self.send_loop(ctx, now);
        }
        if self.rack.0.deadline.is_some_and(|d| d <= now) {
            // RACK's reordering timer: a suspect segment's time is up.
            self.rack.0.deadline = None;
            let mss = self.mss_eff(ctx.cfg);
            self.rack_detect(now, mss);
            if self.recovery.is_none() && self.rack_hole_lost() {
                self.enter_recovery(ctx, now);
            }
            self.send_loop(ctx, now);
        }
        if let Some(d) = self.rto_deadline {
            if d <= now {
                self.rto_deadline = None;
                if self.snd_una != self.snd_max {
                    // With a zero window the peer is alive but not reading:
                    // the retransmissions are window probes (as in Linux),
                    // counted only while the peer does not answer them.
                    if self.window_closed() {
                        self.probes_out += 1;
                    } else {
                        self.retries += 1;
                    }
                    if self.retries > ctx.cfg.max_retries || self.probes_out > ctx.cfg.max_retries {
                        self.abort(ctx, now);
                        return;
                    }
                    ctx.stats.timeouts += 1;
                    let mss = self.mss_eff(ctx.cfg);
                    if self.recovery.is_none_or(|r| !r.after_rto) {
                        let flight = self.pipe(ctx.cfg);
                        self.cubic.on_congestion(self.cwnd);
                        self.ssthresh = cubic_reduce(flight, mss);
                    }
                    self.cwnd = mss;
                    self.ca_acc = 0;
                    self.dupacks = 0;
                    self.rtt_probe = None;
                    self.undo = None;
                    self.recovery = Some(Recovery {
                        point: self.snd_max,
                        after_rto: true,
                    });
                    self.retx_log.clear();
                    self.retx_nxt = self.snd_una;
                    self.rto = (self.rto * 2).min(ctx.cfg.max_rto);
                    self.send_loop(ctx, now);
                    self.arm_rto(now);
                }
            }
        }
        if self.tlp_deadline.is_some_and(|d| d <= now) {
            self.tlp_deadline = None;
            self.send_tail_probe(ctx, now);
        }
        if let Some(d) = self.persist_deadline {
            if d <= now {
                self.persist_deadline = None;
                if self.window_closed() && self.snd_una == self.snd_max {
                    self.probes_out += 1;
                    if self.probes_out > ctx.cfg.max_retries {
                        self.abort(ctx, now);
                        return;
                    }
                    ctx.stats.zero_window_probes += 1;
                    let s = self.snd_una;
                    self.emit(ctx, now, s, 0, flags::ACK, true);
                    self.persist_backoff += 1;
                    self.persist_deadline = Some(now + self.persist_interval(ctx.cfg));
                } else {
                    self.send_loop(ctx, now);
                }
            }
        }
    }
}

#[cfg(test)]
mod cubic_tests {
    use super::*;

    const MSS: u32 = 1000;

    #[test]
    fn cubic_climbs_back_to_w_max_after_k_and_probes_beyond() {
        let mut c = Cubic::default();
        c.on_congestion(100 * MSS);
        let cwnd = cubic_reduce(100 * MSS, MSS);
        assert_eq!(cwnd, 70 * MSS);
        let rtt = Duration::from_millis(10);
        let t0 = Duration::from_secs(1);
        // K = cbrt(30 / 0.4) = 4.22 s.
        let first = c.target(t0, rtt, cwnd, MSS, MSS);
        assert!(first >= cwnd && first < 72 * MSS, "concave start: {first}");
        assert!((c.k.as_secs_f64() - 4.217).abs() < 0.01, "K {:?}", c.k);
        let at_k = c.target(t0 + c.k - rtt, rtt, 99 * MSS, MSS, MSS);
        assert!((99 * MSS..=101 * MSS).contains(&at_k), "plateau at w_max: {at_k}");
        let later = c.target(t0 + c.k + Duration::from_secs(3), rtt, 101 * MSS, MSS, MSS);
        assert!(later > 105 * MSS, "convex probing beyond w_max: {later}");
        assert!(later <= 151 * MSS + MSS / 2, "at most 1.5 cwnd: {later}");
    }

    #[test]
    fn fast_convergence_lowers_w_max_when_losses_come_earlier() {
        let mut c = Cubic::default();
        c.on_congestion(100 * MSS);
        c.on_congestion(80 * MSS);
        assert_eq!(c.w_max, 68 * MSS);
    }
}

//! `remora-speculate`: the sans-IO speculative TCP engine of remora.
//!
//! The engine sits between the guest ("inner" side) and the network
//! ("outer" side, the peer) and sees layer-2 Ethernet frames. It has no
//! sockets and no clocks: frames, epoch events and the current time go in
//! ([`Engine::handle_inner`], [`Engine::handle_outer`], [`Engine::seal_epoch`],
//! [`Engine::commit_epoch`], [`Engine::handle_timeout`]); frames and timer
//! requests come out ([`Engine::poll_transmit`], [`Engine::poll_timeout`]).
//!
//! Modes ([`Mode`]):
//! * `Direct`: both directions are forwarded at once (no replication).
//! * `Buffered`: plain Remus output commit; every inner->outer frame is held
//!   until the epoch it was received in commits.
//! * `Speculative`: TCP flows seen from their SYN are acknowledged to the
//!   guest at once; their bytes are held until their epoch commits and the
//!   engine then owns their reliable delivery to the peer (retransmission,
//!   RFC 6298 RTO, fast retransmit / SACK recovery, CUBIC congestion
//!   control, zero-window probing). Everything else falls back to `Buffered`.
//!
//! Outer->inner frames are always delivered at once; in `Speculative` mode
//! the ACK, window, SACK and TSecr fields of established flows are rewritten
//! to the guest's (speculative) view, and pure ACKs of the peer are consumed.
//!
//! Frames with offloaded (partial) checksums are accepted through
//! [`Engine::handle_inner_with`] / [`Engine::handle_outer_with`]. After a
//! failover, a snapshot of the engine taken at `seal_epoch` is resumed with
//! [`Engine::resume_after_failover`]. The crate's README.md describes the
//! design in detail and what a driver (the relay, the VMM) must do.
//!
//! Replication: [`Engine::checkpoint`] (right after `seal_epoch`, inside the
//! pause) returns an [`EngineDelta`] (a full base, then per-epoch deltas:
//! engine fields, new sealed epochs, changed flows' metadata and the bytes
//! appended to their held streams); [`EngineDelta::encode`] /
//! [`EngineDelta::decode`] move it over the wire and an [`EngineReplica`] on
//! the backup applies it and rebuilds the engine on failover.

mod checkpoint;
mod engine;
mod flow;
mod seq;
pub mod wire;

pub use checkpoint::{DeltaError, EngineDelta, EngineReplica};
pub use engine::Engine;

pub use flow::FlowKey;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Forwarding mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Forward both ways at once.
    Direct,
    /// Hold every inner->outer frame until its epoch commits.
    Buffered,
    /// Speculate established TCP flows; everything else as `Buffered`.
    Speculative,
}

/// The two sides of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The guest.
    Inner,
    /// The network / peer.
    Outer,
}

/// A frame to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: Side,
    /// A complete Ethernet II frame (no vnet header; checksums complete for
    /// frames the engine built; passthrough frames are left as received).
    pub frame: Vec<u8>,
    /// Set on TCP frames the engine built with more payload than one
    /// segment ([`Config::tso_max`]): the segment size the device must cut
    /// the frame into (virtio-net GSO).
    pub gso_size: Option<u16>,
    /// The TCP checksum field holds only the pseudo-header sum
    /// ([`Config::offload_checksums`]): the driver must hand the frame to
    /// its device with virtio-net's `NEEDS_CSUM` (checksum start at the TCP
    /// header, offset 16).
    pub partial_csum: bool,
    /// With [`Config::gather_payload`]: `frame` holds the headers only and
    /// the payload is this range of the flow's held bytes, to be written
    /// straight out of them ([`Engine::held_payload`]) in one gather write.
    pub held: Option<HeldRef>,
}

/// A range of a flow's held bytes, the payload of a [`Transmit`] whose
/// frame holds only the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldRef {
    pub(crate) key: FlowKey,
    pub(crate) id: u64,
    pub(crate) seq: u32,
    /// Payload bytes.
    pub len: u32,
}

/// The state of a received frame's checksums, as a virtio-net header
/// (vnet_hdr) would describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Checksums are complete but not verified (outer TCP frames of
    /// tracked flows are verified if [`Config::verify_outer_checksums`]).
    #[default]
    Complete,
    /// Verified by the device/kernel (`VIRTIO_NET_HDR_F_DATA_VALID`).
    Verified,
    /// The TCP checksum is partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`: only the
    /// pseudo-header sum is filled in). The engine completes it, so every
    /// frame it outputs carries complete checksums.
    Partial,
}

/// Identifier of an epoch (monotonically increasing from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EpochId(pub u64);

/// Engine configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub mode: Mode,
    /// Bytes a speculative flow may hold (accepted from the guest and not yet
    /// acknowledged by the peer). The window offered to the guest never lets
    /// it exceed this (except for the window the peer already offered in its
    /// SYN-ACK, at most 64 KiB, which the engine must honour).
    pub per_flow_budget: usize,
    /// Bytes all speculative flows together may reserve. A flow that cannot
    /// reserve its initial window at establishment is not speculated.
    pub global_cap: usize,
    /// Bytes of raw frames held for output commit (fallback traffic). Frames
    /// beyond it are dropped (counted in [`Stats::buffered_drops`]).
    pub buffered_cap: usize,
    /// Maximum number of tracked flows; further SYNs are not speculated.
    pub max_flows: usize,
    /// IP MTU toward the peer (limits the segments the engine builds).
    pub mtu: usize,
    /// Largest TCP payload of one frame the engine builds toward the peer.
    /// Above the segment size such a frame is a TSO super-segment
    /// ([`Transmit::gso_size`]) for a driver whose device segments (a TAP
    /// with vnet headers); at most 64000. 0: one segment per frame.
    pub tso_max: usize,
    /// Lower bound of the retransmission timeout (Linux: 200 ms, RFC 6298: 1 s).
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout (with backoff).
    pub max_rto: Duration,
    /// RTO before the first RTT sample.
    pub initial_rto: Duration,
    /// Consecutive RTOs without progress, or window probes the peer does
    /// not answer, after which a flow is aborted (RST to both sides).
    /// A peer that answers probes with a zero window is waited for forever.
    pub max_retries: u32,
    /// Initial congestion window in segments (RFC 6928: 10).
    pub initial_cwnd: u32,
    /// Verify TCP/IPv4 checksums of outer frames of tracked flows before
    /// acting on them (corrupt frames are dropped).
    pub verify_outer_checksums: bool,
    /// How long a closed flow's state is kept (so late duplicates of the
    /// peer still get the guest's view of the ACK). Short: the guest keeps
    /// its own TIME_WAIT; after the flow is dropped a late peer segment
    /// passes unchanged (its ACK is the guest's, both FINs being
    /// acknowledged) and the guest's answer goes out under output commit.
    pub time_wait: Duration,
    /// How long an unfinished handshake is tracked.
    pub handshake_timeout: Duration,
    /// After the guest resets a flow whose data the peer has not yet all
    /// acknowledged, how long the engine keeps delivering before sending
    /// the reset anyway.
    pub rst_linger: Duration,
    /// An established flow without any frame from either side for this
    /// long gives its reservation back to the pool, and is forgotten when
    /// it holds nothing (later frames of it pass as for an unknown flow:
    /// under output commit toward the peer, unchanged toward the guest).
    /// `Duration::ZERO` disables it.
    pub idle_timeout: Duration,
    /// Put [`wire::RACC_MARK`] on the ACKs the engine builds for the guest
    /// of a speculated flow, so that RACC in the guest knows its ACKs come
    /// from a speculating VMM (other TCP stacks ignore the option).
    pub mark_acks: bool,
    /// Segments the engine builds toward the peer leave with a partial
    /// checksum ([`Transmit::partial_csum`]) for a driver whose device
    /// completes it (a TAP with virtio-net headers): the engine never sums
    /// the bytes it sends.
    pub offload_checksums: bool,
    /// Pace new data toward the peer at the congestion window per smoothed
    /// RTT (twice that in slow start, 1.2 times after, as Linux's internal
    /// pacing): an epoch's output, released at once by its commit, would
    /// otherwise leave as one burst of up to a window and overflow a
    /// shallow bottleneck queue.
    pub pacing: bool,
    /// With [`Config::offload_checksums`]: segments the engine builds from
    /// held bytes leave as headers plus a [`HeldRef`] ([`Transmit::held`])
    /// instead of a copy of the payload, for a driver that writes them
    /// with one gather write (writev) out of [`Engine::held_payload`]: a
    /// byte is then copied once into the held bytes and once out of them
    /// (by the kernel). Ignored without checksum offload (the engine would
    /// have to read the payload to sum it).
    pub gather_payload: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Speculative,
            per_flow_budget: 4 << 20,
            global_cap: 256 << 20,
            buffered_cap: 64 << 20,
            max_flows: 65536,
            mtu: 1500,
            tso_max: 0,
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(60),
            initial_rto: Duration::from_secs(1),
            max_retries: 15,
            initial_cwnd: 10,
            verify_outer_checksums: true,
            time_wait: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(75),
            rst_linger: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            mark_acks: true,
            offload_checksums: false,
            pacing: true,
            gather_payload: false,
        }
    }
}

/// The largest per-flow budget: windows are at most 65535 << 14 bytes
/// (RFC 7323), and held bytes must stay far below 2^31 for sequence-space
/// comparisons.
pub const MAX_PER_FLOW_BUDGET: usize = 1 << 30;
/// The longest duration a [`Config`] may hold (timers are `now + d`).
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The smallest [`Config::buffered_cap`]: one maximal Ethernet frame
/// (a smaller cap could never hold any frame, not even a SYN).
pub const MIN_BUFFERED_CAP: usize = 14 + 65535;

/// An inconsistent [`Config`] (see [`Config::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("Config::{field} is {got}, must be at least {min}")]
    TooSmall { field: &'static str, got: u64, min: u64 },
    #[error("Config::{field} is {got}, must be at most {max}")]
    TooLarge { field: &'static str, got: u64, max: u64 },
    #[error("Config::{field} is {got:?}, must be more than zero")]
    ZeroDuration { field: &'static str, got: Duration },
    #[error("Config::{field} is {got:?}, must be at most {max:?}")]
    DurationTooLarge {
        field: &'static str,
        got: Duration,
        max: Duration,
    },
    #[error("Config::min_rto ({min_rto:?}) is above Config::max_rto ({max_rto:?})")]
    RtoBounds { min_rto: Duration, max_rto: Duration },
    #[error("Config::initial_rto ({initial_rto:?}) is above Config::max_rto ({max_rto:?})")]
    InitialRto { initial_rto: Duration, max_rto: Duration },
}

impl Config {
    /// Checks that the configuration is consistent: what [`Engine::new`]
    /// and [`EngineReplica::to_engine`] refuse. Budgets, caps and the
    /// initial window are at least 1 (and bounded where arithmetic needs
    /// it), the MTU is 576..=65535, `tso_max` at most 64000, timers more
    /// than zero where a zero would re-fire at once (RTOs, handshake
    /// timeout), `min_rto <= max_rto`, `initial_rto <= max_rto`, and every
    /// duration at most [`MAX_CONFIG_DURATION`]. `max_flows` 0 (nothing
    /// speculated), `time_wait` 0, `rst_linger` 0 and `idle_timeout` 0
    /// (disabled) are allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range(field: &'static str, got: usize, min: usize, max: usize) -> Result<(), ConfigError> {
            let got = got as u64;
            if got < min as u64 {
                return Err(ConfigError::TooSmall {
                    field,
                    got,
                    min: min as u64,
                });
            }
            if got > max as u64 {
                return Err(ConfigError::TooLarge {
                    field,
                    got,
                    max: max as u64,
                });
            }
            Ok(())
        }
        fn duration(field: &'static str, got: Duration, nonzero: bool) -> Result<(), ConfigError> {
            if nonzero && got.is_zero() {
                return Err(ConfigError::ZeroDuration { field, got });
            }
            if got > MAX_CONFIG_DURATION {
                return Err(ConfigError::DurationTooLarge {
                    field,
                    got,
                    max: MAX_CONFIG_DURATION,
                });
            }
            Ok(())
        }
        range("per_flow_budget", self.per_flow_budget, 1, MAX_PER_FLOW_BUDGET)?;
        range("global_cap", self.global_cap, 1, usize::MAX)?;
        range("buffered_cap", self.buffered_cap, MIN_BUFFERED_CAP, usize::MAX)?;
        range("mtu", self.mtu, 576, 65535)?;
        range("tso_max", self.tso_max, 0, 64_000)?;
        range("initial_cwnd", self.initial_cwnd as usize, 1, 1024)?;
        duration("min_rto", self.min_rto, true)?;
        duration("max_rto", self.max_rto, true)?;
        duration("initial_rto", self.initial_rto, true)?;
        duration("time_wait", self.time_wait, false)?;
        duration("handshake_timeout", self.handshake_timeout, true)?;
        duration("rst_linger", self.rst_linger, false)?;
        duration("idle_timeout", self.idle_timeout, false)?;
        if self.min_rto > self.max_rto {
            return Err(ConfigError::RtoBounds {
                min_rto: self.min_rto,
                max_rto: self.max_rto,
            });
        }
        if self.initial_rto > self.max_rto {
            return Err(ConfigError::InitialRto {
                initial_rto: self.initial_rto,
                max_rto: self.max_rto,
            });
        }
        Ok(())
    }
}

/// Counters and gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Tracked flows (any phase).
    pub flows: usize,
    /// Flows currently speculated.
    pub speculative_flows: usize,
    /// Bytes held by speculative flows (uncommitted + unacknowledged by the peer).
    pub bytes_held: u64,
    /// Bytes reserved by the windows offered to the guest (>= bytes_held).
    pub bytes_reserved: u64,
    /// Bytes of raw frames held for output commit.
    pub buffered_bytes: u64,
    pub inner_frames: u64,
    pub outer_frames: u64,
    /// Frames (either side) that were not TCP or not understood.
    pub non_tcp_frames: u64,
    /// TCP frames of flows not speculated (fallback to output commit).
    pub fallback_frames: u64,
    pub spec_acks: u64,
    pub window_updates: u64,
    pub segments_sent: u64,
    pub retransmits: u64,
    pub fast_recoveries: u64,
    /// Fast recoveries found spurious (every retransmission of them
    /// reached the peer after its original: reordering, not loss) and
    /// undone: window and CUBIC state restored.
    pub spurious_recoveries: u64,
    /// First slow starts ended by HyStart++ (the RTT rose: a queue is
    /// filling) rather than by a loss.
    pub slow_start_exits: u64,
    /// Retransmissions found lost during fast recovery and sent again
    /// without waiting for a timeout.
    pub lost_retransmits: u64,
    /// Tail loss probes sent (the last segment again, ~2 RTTs after it).
    pub tail_probes: u64,
    pub timeouts: u64,
    pub zero_window_probes: u64,
    pub peer_acks_consumed: u64,
    pub bad_checksum_drops: u64,
    pub buffered_drops: u64,
    pub aborted_flows: u64,
    pub epochs_committed: u64,
}

//! Output commit inside a virtio-net device: the speculative engine
//! ([`remora_speculate::Engine`]) between the device and its TAP.
//!
//! The engine lives in the device's worker thread. The VMM and the
//! replication driver talk to it through an [`OutputCommit`] handle:
//!
//! * before a checkpoint's pause the VMM asks for a seal
//!   ([`OutputCommit::request_seal`]); when the worker parks for that pause
//!   it ends the engine's epoch and leaves the epoch id and the engine's
//!   checkpoint delta in the handle ([`OutputCommit::take_sealed`]), so the
//!   epoch boundary is exactly the checkpoint's cut;
//! * when the backup acknowledges a checkpoint the driver commits its epoch
//!   ([`OutputCommit::commit`]): the worker releases that epoch's output;
//! * without a backup (before protection, after losing it, after a
//!   failover) the handle is in auto-commit mode: every epoch commits at
//!   once, so output flows freely while the engine keeps owning the
//!   delivery of what it acknowledged speculatively.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use remora_speculate::{Checksum, Engine, EngineDelta, EpochId, Side};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::lock;
use crate::devices::vnet::{self, VnetHdr, HDR_LEN};

/// No epoch committed yet.
const NONE: u64 = u64::MAX;

/// The output gate is open for good (no lease).
pub const LEASE_FOREVER: u64 = u64::MAX;

/// Nanoseconds on the process's monotonic clock (the output lease's time
/// base; only differences within one process matter).
pub fn mono_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let o = *ORIGIN.get_or_init(Instant::now);
    // Never 0: a lease of 0 means "closed".
    (o.elapsed().as_nanos() as u64).saturating_add(1)
}

/// What the worker left at a seal.
pub struct Sealed {
    pub epoch: EpochId,
    pub delta: EngineDelta,
    /// The engine's clock at the seal.
    pub at: Duration,
}

/// Shared between a virtio-net worker (which owns the engine) and the VMM.
pub struct OutputCommit {
    seal: AtomicBool,
    reset_base: AtomicBool,
    auto: AtomicBool,
    commit_to: AtomicU64,
    sealed: Mutex<Option<Sealed>>,
    /// Bytes the engine holds (speculated and buffered), updated by the worker.
    held: AtomicU64,
    /// Engine flows speculated, updated by the worker.
    flows: AtomicU64,
    /// The worker runs an engine.
    installed: AtomicBool,
    /// An engine to put on the path of a running device (`ctl protect` of
    /// a VM started without output commit).
    install: Mutex<Option<Engine>>,
    /// The output lease: frames go to the TAP only while [`mono_ns`] is
    /// below this ([`LEASE_FOREVER`]: always; 0: never). A protected
    /// primary may emit only while its backup cannot yet have decided it
    /// is dead; a fenced copy never again.
    lease_until: AtomicU64,
    /// Closed for good (this copy lost the fence).
    fenced: AtomicBool,
    /// Wakes the worker for a commit or a mode change.
    pub wake: EventFd,
}

impl OutputCommit {
    pub fn new() -> io::Result<OutputCommit> {
        Ok(OutputCommit {
            seal: AtomicBool::new(false),
            reset_base: AtomicBool::new(true),
            auto: AtomicBool::new(true),
            commit_to: AtomicU64::new(NONE),
            sealed: Mutex::new(None),
            held: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            installed: AtomicBool::new(false),
            install: Mutex::new(None),
            lease_until: AtomicU64::new(LEASE_FOREVER),
            fenced: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Puts `engine` on the device's path at the worker's next wake-up, if
    /// it has none yet (flows that started before it are not speculated:
    /// they fall back to output commit). Returns false if the device
    /// already has an engine.
    pub fn install(&self, engine: Engine) -> bool {
        let mut g = lock(&self.install);
        if self.installed.load(Ordering::Acquire) {
            return false;
        }
        *g = Some(engine);
        let _ = self.wake.write(1);
        true
    }

    /// Whether the device runs an engine (or will at its next wake-up).
    pub fn has_engine(&self) -> bool {
        self.installed.load(Ordering::Acquire) || lock(&self.install).is_some()
    }

    pub(crate) fn take_install(&self) -> Option<Engine> {
        lock(&self.install).take()
    }

    pub(crate) fn set_installed(&self) {
        self.installed.store(true, Ordering::Release);
    }

    /// The next park of the worker ends the engine's epoch (call before
    /// pausing the device for a checkpoint).
    pub fn request_seal(&self) {
        self.seal.store(true, Ordering::Release);
    }

    /// The epoch and engine delta of the last seal, once.
    pub fn take_sealed(&self) -> Option<Sealed> {
        lock(&self.sealed).take()
    }

    /// The backup acknowledged the checkpoint holding `epoch`: release it
    /// (and every earlier epoch).
    pub fn commit(&self, epoch: EpochId) {
        let _ = self.commit_to.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (c == NONE || c < epoch.0).then_some(epoch.0)
        });
        let _ = self.wake.write(1);
    }

    /// Protected (`false`: hold output until commits) or not (`true`:
    /// everything commits at once, including what is held now).
    pub fn set_auto_commit(&self, auto: bool) {
        self.auto.store(auto, Ordering::Release);
        if !auto {
            // The next checkpoint's delta is a full base for the new backup.
            self.reset_base.store(true, Ordering::Release);
        }
        let _ = self.wake.write(1);
    }

    pub fn auto_commit(&self) -> bool {
        self.auto.load(Ordering::Acquire)
    }

    /// Whether frames may go to the TAP now.
    pub fn may_emit(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == LEASE_FOREVER || (until != 0 && mono_ns() < until)
    }

    /// Sets the output lease (absolute [`mono_ns`]; [`LEASE_FOREVER`]
    /// opens the gate, 0 closes it). Ignored once fenced.
    pub fn set_lease(&self, until: u64) {
        if self.fenced.load(Ordering::Acquire) {
            return;
        }
        self.lease_until.store(until, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// Moves the lease forward to `until` (never back, never past an open
    /// gate); wakes the worker if the gate was closed.
    pub fn extend_lease(&self, until: u64) {
        if self.fenced.load(Ordering::Acquire) {
            return;
        }
        let was_open = self.may_emit();
        let _ = self.lease_until.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (c != LEASE_FOREVER && c < until).then_some(until)
        });
        if !was_open {
            let _ = self.wake.write(1);
        }
    }

    /// This copy lost the fence: no frame reaches the TAP any more.
    pub fn fence_off(&self) {
        self.fenced.store(true, Ordering::Release);
        self.lease_until.store(0, Ordering::Release);
    }

    /// Bytes the engine holds for the peer (as of the worker's last pass).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Flows the engine speculates (as of the worker's last pass).
    pub fn flows(&self) -> u64 {
        self.flows.load(Ordering::Relaxed)
    }
}

/// How many frames for the guest may wait before the worker stops reading
/// the TAP.
const INNER_BACKLOG: usize = 512;

/// The engine's side of a net worker: frames in, frames out to the TAP
/// (written at once, or kept while the TAP is full) and to the guest
/// (queued for the RX ring).
pub struct EnginePort {
    pub engine: Engine,
    pub ctl: std::sync::Arc<OutputCommit>,
    origin: Instant,
    /// The engine's clock at `origin` (non-zero for an engine restored
    /// from a checkpoint: its clock goes on from the primary's).
    base: Duration,
    /// Frames for the guest, with their vnet header.
    pub to_guest: VecDeque<Vec<u8>>,
    /// Frames for the TAP that it could not take yet (header + frame).
    pub to_tap: VecDeque<Vec<u8>>,
    committed: u64,
    mtu: usize,
    /// Announce the guest's MAC (RARP, QEMU-style rounds) at these times.
    announce: VecDeque<Duration>,
    mac: [u8; 6],
    /// The guest's IPv4 addresses (from the engine's flows), for
    /// gratuitous ARP in the announce rounds.
    announce_ips: Vec<[u8; 4]>,
    pub tap_drops: u64,
    /// When the flow gauge was last refreshed (it costs a pass over flows).
    gauge_at: Option<Duration>,
}

impl EnginePort {
    pub fn new(engine: Engine, ctl: std::sync::Arc<OutputCommit>, mac: [u8; 6], base: Duration) -> EnginePort {
        let mtu = engine.config().mtu;
        ctl.set_installed();
        EnginePort {
            engine,
            ctl,
            origin: Instant::now(),
            base,
            to_guest: VecDeque::new(),
            to_tap: VecDeque::new(),
            committed: NONE,
            mtu,
            announce: VecDeque::new(),
            mac,
            announce_ips: Vec::new(),
            tap_drops: 0,
            gauge_at: None,
        }
    }

    pub fn now(&self) -> Duration {
        self.base + self.origin.elapsed()
    }

    /// Starts announcing the guest's MAC: RARP broadcasts now and after
    /// 50, 150, 300 and 500 ms (as QEMU's announce rounds do), so the LAN's
    /// switches learn the new port at once.
    pub fn start_announce(&mut self) {
        let now = self.now();
        let mut ips: Vec<[u8; 4]> = self
            .engine
            .speculative_flows()
            .iter()
            .filter_map(|k| match k.guest_ip {
                remora_speculate::wire::IpAddr::V4(a) => Some(a),
                remora_speculate::wire::IpAddr::V6(_) => None,
            })
            .collect();
        ips.sort_unstable();
        ips.dedup();
        self.announce_ips = ips;
        for ms in [0u64, 50, 150, 300, 500] {
            self.announce.push_back(now + Duration::from_millis(ms));
        }
    }

    /// Whether the guest's side is backed up enough that the TAP should
    /// not be read.
    pub fn guest_backlogged(&self) -> bool {
        self.to_guest.len() >= INNER_BACKLOG
    }

    /// A frame from the guest (vnet header + Ethernet frame).
    pub fn from_guest(&mut self, buf: &mut [u8]) {
        let now = self.now();
        if let Some((frame, csum)) = strip(buf, vnet::inner_checksum) {
            self.engine.handle_inner_with(now, frame, csum);
        }
    }

    /// A frame from the TAP (vnet header + Ethernet frame).
    pub fn from_tap(&mut self, buf: &mut [u8]) {
        let now = self.now();
        if let Some((frame, csum)) = strip(buf, vnet::engine_checksum) {
            self.engine.handle_outer_with(now, frame, csum);
        }
    }

    /// The engine's next deadline, as a poll timeout in ms (-1: none).
    pub fn timeout_ms(&self) -> i32 {
        let next = [self.engine.poll_timeout(), self.announce.front().copied()]
            .into_iter()
            .flatten()
            .min();
        match next {
            None => -1,
            Some(d) => {
                let now = self.now();
                if d <= now {
                    0
                } else {
                    ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
                }
            }
        }
    }

    /// Runs due timers, commits what the handle says, and (in auto-commit
    /// mode) commits the current epoch at once.
    pub fn tick(&mut self) {
        let now = self.now();
        if self.engine.poll_timeout().is_some_and(|d| d <= now) {
            self.engine.handle_timeout(now);
        }
        while self.announce.front().is_some_and(|d| *d <= now) {
            self.announce.pop_front();
            let f = rarp(self.mac);
            self.push_tap(&f, None);
            for ip in self.announce_ips.clone() {
                let f = garp(self.mac, ip);
                self.push_tap(&f, None);
            }
        }
        let c = self.ctl.commit_to.load(Ordering::Acquire);
        if c != NONE && (self.committed == NONE || c > self.committed) {
            self.committed = c;
            self.engine.commit_epoch(now, EpochId(c));
        }
        if self.ctl.auto_commit() {
            let e = self.engine.seal_epoch(now);
            self.engine.commit_epoch(now, e);
            self.committed = e.0;
        }
    }

    /// At a checkpoint's park: ends the epoch and leaves it with the
    /// engine's delta in the handle, if a seal was requested.
    pub fn seal_if_requested(&mut self) {
        if !self.ctl.seal.swap(false, Ordering::AcqRel) {
            return;
        }
        if self.ctl.reset_base.swap(false, Ordering::AcqRel) {
            self.engine.reset_checkpoint_base();
        }
        let now = self.now();
        let epoch = self.engine.seal_epoch(now);
        let delta = self.engine.checkpoint();
        let old = lock(&self.ctl.sealed).replace(Sealed { epoch, delta, at: now });
        if old.is_some() {
            // Not reached: each checkpoint takes its seal in its pause.
            tracing::error!("virtio-net: an engine checkpoint was never taken; the backup will need a new base");
            self.ctl.reset_base.store(true, Ordering::Release);
        }
    }

    /// Moves the engine's output to the two queues / the TAP.
    pub fn drain(&mut self, tap: &mut dyn super::net::FrameIo) {
        self.flush_tap(tap);
        while let Some(t) = self.engine.poll_transmit() {
            let mut frame = t.frame;
            let Some(hdr) = vnet::header_for_output(&mut frame, 0, self.mtu, t.gso_size, t.partial_csum) else {
                tracing::debug!(len = frame.len(), "frame longer than the MTU and not TCP: dropped");
                continue;
            };
            match t.to {
                Side::Inner => {
                    let mut b = Vec::with_capacity(HDR_LEN + frame.len());
                    b.extend_from_slice(&hdr.to_bytes());
                    b.extend_from_slice(&frame);
                    self.to_guest.push_back(b);
                }
                Side::Outer => self.push_tap(&frame, Some(hdr)),
            }
            self.engine.recycle(frame);
        }
        self.flush_tap(tap);
        self.ctl.held.store(
            self.engine.bytes_held() + self.engine.buffered_bytes(),
            Ordering::Relaxed,
        );
        let now = self.now();
        if self.gauge_at.is_none_or(|t| now >= t + Duration::from_millis(100)) {
            self.gauge_at = Some(now);
            self.ctl
                .flows
                .store(self.engine.stats().speculative_flows as u64, Ordering::Relaxed);
        }
    }

    fn push_tap(&mut self, frame: &[u8], hdr: Option<VnetHdr>) {
        let mut b = Vec::with_capacity(HDR_LEN + frame.len());
        b.extend_from_slice(&hdr.unwrap_or_default().to_bytes());
        b.extend_from_slice(frame);
        self.to_tap.push_back(b);
    }

    /// Writes queued TAP frames until the TAP is full; true if all went.
    /// Nothing goes once the output lease has run out
    /// ([`OutputCommit::may_emit`]; the frames wait, and the lease's
    /// renewal wakes the worker).
    pub fn flush_tap(&mut self, tap: &mut dyn super::net::FrameIo) -> bool {
        while let Some(f) = self.to_tap.front() {
            // Checked per frame: a process stopped (SIGSTOP, a host stall)
            // in the middle of a batch must not send the rest when it
            // wakes after its lease ran out. What remains is the window
            // between this check and the write's system call.
            if !self.ctl.may_emit() {
                return false;
            }
            match tap.send(f) {
                Ok(_) => {
                    self.to_tap.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EIO) => {
                    return false;
                }
                Err(e) => {
                    self.tap_drops += 1;
                    if self.tap_drops.is_power_of_two() {
                        tracing::warn!("virtio-net: TAP refused a frame: {e} ({} so far)", self.tap_drops);
                    }
                    self.to_tap.pop_front();
                }
            }
        }
        true
    }
}

/// Splits a vnet-header frame; `csum` says what the engine gets to know of
/// its checksums (and completes an offloaded one where the engine needs it).
fn strip(buf: &mut [u8], csum: fn(&mut [u8], &VnetHdr) -> Checksum) -> Option<(&[u8], Checksum)> {
    let hdr = VnetHdr::parse(buf)?;
    let frame = buf.get_mut(HDR_LEN..)?;
    let csum = csum(frame, &hdr);
    Some((frame, csum))
}

/// A RARP request announcing `mac` (what QEMU's self-announce sends): it
/// makes every switch on the LAN learn the guest's new port.
pub fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

/// A gratuitous ARP request for `ip` from `mac` (sender and target IP
/// the same): hosts on the LAN update their ARP caches at once.
pub fn garp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_announces_the_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[32..38], &mac, "target hardware address");
    }

    #[test]
    fn garp_names_the_guest_ip_twice() {
        let f = garp([0x52, 0x54, 0, 1, 2, 3], [10, 0, 0, 2]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &[10, 0, 0, 2], "sender IP");
        assert_eq!(&f[38..42], &[10, 0, 0, 2], "target IP");
    }

    #[test]
    fn the_output_lease_opens_extends_and_fences() {
        let c = OutputCommit::new().unwrap();
        assert!(c.may_emit(), "open without protection");
        c.set_lease(mono_ns() + 50_000_000);
        assert!(c.may_emit());
        c.set_lease(mono_ns().saturating_sub(1));
        assert!(!c.may_emit(), "a lease in the past holds output");
        let until = mono_ns() + 1_000_000_000;
        c.extend_lease(until);
        assert!(c.may_emit());
        c.extend_lease(until - 500_000_000);
        assert_eq!(c.lease_until.load(Ordering::Acquire), until, "never moves back");
        c.fence_off();
        assert!(!c.may_emit());
        c.set_lease(LEASE_FOREVER);
        c.extend_lease(u64::MAX - 1);
        assert!(!c.may_emit(), "fenced for good");
    }

    #[test]
    fn commits_only_move_forward() {
        let c = OutputCommit::new().unwrap();
        c.commit(EpochId(5));
        c.commit(EpochId(3));
        assert_eq!(c.commit_to.load(Ordering::Acquire), 5);
        c.commit(EpochId(9));
        assert_eq!(c.commit_to.load(Ordering::Acquire), 9);
    }
}

//! `remora-relay`: the speculative TCP engine ([`remora_speculate::Engine`])
//! between two TAP devices.
//!
//! The inner TAP stands for the protected guest, the outer one for the
//! network. The relay bridges them at layer 2: `direct` forwards frames
//! untouched both ways (the baseline: a plain userspace bridge), `buffered`
//! holds every inner->outer frame until its epoch ends plus a commit delay
//! (Remus output commit), `speculative` lets the engine acknowledge the
//! inner side's TCP segments at once and own their delivery. Epochs are
//! simulated: every `epoch` the current epoch is sealed, and `commit_delay`
//! later it commits, as if the backup had acknowledged its checkpoint.
//!
//! I/O is one thread: `ppoll` on both TAPs, batches of reads, the engine's
//! output written with `writev`. The TAPs offer checksum and TSO offloads,
//! so frames of up to 64 KiB cross in one system call ([`vnet`]).

pub use remora_vmm::devices::vnet;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remora_speculate::{Config, Engine, EpochId, Mode, Side, Stats};
use remora_vmm::devices::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use tracing::{debug, warn};

use vnet::{VnetHdr, HDR_LEN};

/// Largest frame a TAP with TSO hands over, plus its header.
const BUF_LEN: usize = HDR_LEN + 14 + 65_535 + 64;
/// Frames read from one side before the engine's output is written.
const BATCH: usize = 64;
/// Payload of the TSO frames the engine builds toward the peer.
const TSO_MAX: usize = 64_000;
/// Longest sleep in `ppoll`, so a stop request is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot bring TAP '{name}' up: {error}")]
    LinkUp { name: String, error: io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{what}: {error}")]
    Io { what: &'static str, error: io::Error },
}

/// What to relay and how.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub inner_tap: String,
    pub outer_tap: String,
    pub mode: Mode,
    /// Epoch length (ignored in direct mode).
    pub epoch: Duration,
    /// Time from the end of an epoch to its commit.
    pub commit_delay: Duration,
    /// Bytes one speculated flow may hold.
    pub budget: usize,
    /// Bytes all speculated flows together may hold.
    pub global_cap: usize,
    /// IP MTU of both links.
    pub mtu: usize,
}

impl RelayConfig {
    fn check(&self) -> Result<(), RelayError> {
        let bad = |m: String| Err(RelayError::Config(m));
        if self.inner_tap == self.outer_tap {
            return bad(format!("inner and outer TAP are both '{}'", self.inner_tap));
        }
        if self.mode != Mode::Direct && self.epoch.is_zero() {
            return bad("the epoch must be at least 1 ms".into());
        }
        if !(576..=65_535 - 14).contains(&self.mtu) {
            return bad(format!("MTU {} out of range 576..=65521", self.mtu));
        }
        if self.budget < 2 * self.mtu {
            return bad(format!(
                "budget {} bytes is below two segments ({} bytes)",
                self.budget,
                2 * self.mtu
            ));
        }
        if self.global_cap < self.budget {
            return bad(format!(
                "global cap {} bytes is below the per-flow budget {}",
                self.global_cap, self.budget
            ));
        }
        Ok(())
    }
}

/// Counters of a relay run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub elapsed: Duration,
    /// Frames and bytes read from the inner / outer TAP.
    pub inner_frames: u64,
    pub inner_bytes: u64,
    pub outer_frames: u64,
    pub outer_bytes: u64,
    /// Frames written to the inner / outer TAP.
    pub to_inner: u64,
    pub to_outer: u64,
    pub to_outer_bytes: u64,
    /// Frames the kernel refused on write, or too long and not TCP.
    pub drops: u64,
    /// Highest bytes held by speculated flows plus frames held for commit.
    pub max_held: u64,
    pub engine: Stats,
    /// Mbit/s read from the inner TAP and written to the outer one over
    /// the last interval (set on the once-a-second reports).
    pub rate_mbit: Option<(f64, f64)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.engine;
        // Rates over the last interval, or averages over the whole run.
        let (in_mbit, out_mbit) = self.rate_mbit.unwrap_or_else(|| {
            let secs = self.elapsed.as_secs_f64().max(1e-9);
            (
                self.inner_bytes as f64 * 8.0 / secs / 1e6,
                self.to_outer_bytes as f64 * 8.0 / secs / 1e6,
            )
        });
        write!(
            f,
            "t={:.1}s in={} out={} in_mbit={in_mbit:.0} to_outer_mbit={out_mbit:.0} flows={} spec={} held={} \
             buffered={} max_held={} spec_acks={} segs={} retx={} fast_rec={} undone={} hystart={} lost_retx={} tlp={} rto={} probes={} fallback={} \
             epochs={} aborted={} drops={}",
            self.elapsed.as_secs_f64(),
            self.inner_frames,
            self.outer_frames,
            e.flows,
            e.speculative_flows,
            e.bytes_held,
            e.buffered_bytes,
            self.max_held,
            e.spec_acks,
            e.segments_sent,
            e.retransmits,
            e.fast_recoveries,
            e.spurious_recoveries,
            e.slow_start_exits,
            e.lost_retransmits,
            e.tail_probes,
            e.timeouts,
            e.zero_window_probes,
            e.fallback_frames,
            e.epochs_committed,
            e.aborted_flows,
            self.drops + e.buffered_drops + e.bad_checksum_drops,
        )
    }
}

/// A relay between two open TAPs.
pub struct Relay {
    cfg: RelayConfig,
    engine: Engine,
    inner: Tap,
    outer: Tap,
    start: Instant,
    next_seal: Duration,
    commits: VecDeque<(Duration, EpochId)>,
    report: Report,
    buf: Vec<u8>,
}

impl Relay {
    /// Opens (or creates) both TAPs, enables offloads and brings them up.
    pub fn open(cfg: RelayConfig) -> Result<Relay, RelayError> {
        cfg.check()?;
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        let mut taps = Vec::new();
        for name in [&cfg.inner_tap, &cfg.outer_tap] {
            let tap = Tap::open(name)?;
            tap.set_offload(offloads)?;
            link_up(name).map_err(|error| RelayError::LinkUp {
                name: name.clone(),
                error,
            })?;
            taps.push(tap);
        }
        let outer = taps.pop().ok_or_else(|| RelayError::Config("no outer TAP".into()))?;
        let inner = taps.pop().ok_or_else(|| RelayError::Config("no inner TAP".into()))?;
        let engine = Engine::new(Config {
            mode: cfg.mode,
            per_flow_budget: cfg.budget,
            global_cap: cfg.global_cap,
            mtu: cfg.mtu,
            tso_max: TSO_MAX,
            // The outer TAP completes checksums (NEEDS_CSUM), and segments
            // of held bytes are written straight out of them (writev).
            offload_checksums: true,
            gather_payload: true,
            ..Config::default()
        })
        .map_err(|e| RelayError::Config(e.to_string()))?;
        Ok(Relay {
            next_seal: cfg.epoch,
            cfg,
            engine,
            inner,
            outer,
            start: Instant::now(),
            commits: VecDeque::new(),
            report: Report::default(),
            buf: vec![0; BUF_LEN],
        })
    }

    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The counters so far.
    pub fn report(&self) -> Report {
        let mut r = self.report.clone();
        r.elapsed = self.now();
        r.engine = self.engine.stats();
        r
    }

    /// Relays until `stop` is set; calls `each_second` with the counters
    /// once a second. Returns the final counters.
    pub fn run(&mut self, stop: &AtomicBool, mut each_second: impl FnMut(&Report)) -> Result<Report, RelayError> {
        let second = Duration::from_secs(1);
        let mut next_report = second;
        let mut last = Report::default();
        while !stop.load(Ordering::Relaxed) {
            let now = self.now();
            let next_work = self.on_time(now);
            if now >= next_report {
                let mut r = self.report();
                let secs = (r.elapsed - last.elapsed).as_secs_f64().max(1e-9);
                r.rate_mbit = Some((
                    (r.inner_bytes - last.inner_bytes) as f64 * 8.0 / secs / 1e6,
                    (r.to_outer_bytes - last.to_outer_bytes) as f64 * 8.0 / secs / 1e6,
                ));
                each_second(&r);
                last = r;
                next_report += second;
                if next_report <= now {
                    next_report = now + second;
                }
            }
            let deadline = next_work
                .map_or(next_report, |t| t.min(next_report))
                .min(now + MAX_SLEEP);
            let (inner_ready, outer_ready) = self.wait(deadline.saturating_sub(now))?;
            // Outer first: ACKs from the peer free budget for the guest.
            if outer_ready {
                self.read_side(Side::Outer)?;
            }
            if inner_ready {
                self.read_side(Side::Inner)?;
            }
        }
        Ok(self.report())
    }

    /// Seals and commits due epochs, runs due engine timers and writes the
    /// output; returns when there is timed work next (none in direct mode).
    fn on_time(&mut self, now: Duration) -> Option<Duration> {
        if self.cfg.mode == Mode::Direct {
            return None;
        }
        if now >= self.next_seal {
            let id = self.engine.seal_epoch(now);
            self.commits.push_back((now + self.cfg.commit_delay, id));
            self.next_seal += self.cfg.epoch;
            if self.next_seal <= now {
                // Stalled for more than an epoch: start the grid anew.
                self.next_seal = now + self.cfg.epoch;
            }
        }
        while let Some(&(at, id)) = self.commits.front() {
            if at > now {
                break;
            }
            self.commits.pop_front();
            self.engine.commit_epoch(now, id);
        }
        let mut timer = self.engine.poll_timeout();
        if timer.is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
            timer = self.engine.poll_timeout();
        }
        self.flush();
        let commit = self.commits.front().map(|&(at, _)| at);
        [Some(self.next_seal), commit, timer].into_iter().flatten().min()
    }

    /// Waits until a TAP is readable or `timeout` passes.
    fn wait(&self, timeout: Duration) -> Result<(bool, bool), RelayError> {
        let mut fds = [
            libc::pollfd {
                fd: self.inner.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.outer.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `fds` is an array of two initialized pollfds and `ts` a
        // valid timespec, both living for the call; no signal mask is passed.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok((false, false));
            }
            return Err(RelayError::Io {
                what: "waiting for the TAPs",
                error: e,
            });
        }
        let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok((ready(&fds[0]), ready(&fds[1])))
    }

    /// Reads up to a batch of frames from one side and handles them.
    fn read_side(&mut self, side: Side) -> Result<(), RelayError> {
        let fd = self.fd(side);
        for _ in 0..BATCH {
            // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes
            // owned by self for the call.
            let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    // The link is down or the TAP went away for a moment:
                    // nothing to read now.
                    _ if e.raw_os_error() == Some(libc::EIO) => break,
                    _ => {
                        return Err(RelayError::Io {
                            what: "reading a TAP",
                            error: e,
                        })
                    }
                }
            }
            let n = n as usize;
            if n <= HDR_LEN {
                continue;
            }
            let wire_len = (n - HDR_LEN) as u64;
            match side {
                Side::Inner => {
                    self.report.inner_frames += 1;
                    self.report.inner_bytes += wire_len;
                }
                Side::Outer => {
                    self.report.outer_frames += 1;
                    self.report.outer_bytes += wire_len;
                }
            }
            if self.cfg.mode == Mode::Direct {
                // A plain bridge: the frame and its offload metadata as read.
                let to = match side {
                    Side::Inner => Side::Outer,
                    Side::Outer => Side::Inner,
                };
                let (hdr, frame) = self.buf[..n].split_at(HDR_LEN);
                let (tap, rep) = (self.fd(to), &mut self.report);
                count_write(rep, to, frame.len(), write_frame(tap, &[hdr, frame, &[], &[]]));
                continue;
            }
            let Some(hdr) = VnetHdr::parse(&self.buf[..n]) else {
                continue;
            };
            let frame = &mut self.buf[HDR_LEN..n];
            let now = self.start.elapsed();
            match side {
                Side::Inner => {
                    let csum = vnet::inner_checksum(frame, &hdr);
                    self.engine.handle_inner_with(now, frame, csum)
                }
                Side::Outer => {
                    let csum = vnet::engine_checksum(frame, &hdr);
                    self.engine.handle_outer_with(now, frame, csum)
                }
            }
            // Out at once, not after the batch: a speculative ACK written
            // only after up to 64 more frames (4 MiB of TSO frames) were
            // read gives the guest an ACK delay of milliseconds that varies
            // with the batch.
            if self.engine.pending_transmits() > 0 {
                self.flush();
            }
        }
        if self.cfg.mode != Mode::Direct {
            let held = self.engine.bytes_held() + self.engine.buffered_bytes();
            self.report.max_held = self.report.max_held.max(held);
            self.flush();
        }
        Ok(())
    }

    fn fd(&self, side: Side) -> RawFd {
        match side {
            Side::Inner => self.inner.fd(),
            Side::Outer => self.outer.fd(),
        }
    }

    /// Writes the engine's output.
    /// A segment built from held bytes (`Transmit::held`) is written as
    /// vnet header, headers and the held bytes themselves in one writev:
    /// its payload is never copied in user space.
    fn flush(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let mut frame = t.frame;
            let (p1, p2) = match &t.held {
                None => (&[][..], &[][..]),
                Some(r) => match self.engine.held_payload(r) {
                    Some(p) => p,
                    None => {
                        // Acknowledged meanwhile (a retransmission the
                        // original's ACK overtook): nothing to send.
                        self.engine.recycle(frame);
                        continue;
                    }
                },
            };
            let gathered = p1.len() + p2.len();
            let Some(hdr) = vnet::header_for_output(&mut frame, gathered, self.cfg.mtu, t.gso_size, t.partial_csum)
            else {
                debug!(len = frame.len(), "frame longer than the MTU and not TCP: dropped");
                self.report.drops += 1;
                continue;
            };
            let res = write_frame(self.fd(t.to), &[&hdr.to_bytes(), &frame, p1, p2]);
            count_write(&mut self.report, t.to, frame.len() + gathered, res);
            self.engine.recycle(frame);
        }
    }
}

fn count_write(rep: &mut Report, to: Side, len: usize, res: io::Result<()>) {
    match (res, to) {
        (Ok(()), Side::Inner) => rep.to_inner += 1,
        (Ok(()), Side::Outer) => {
            rep.to_outer += 1;
            rep.to_outer_bytes += len as u64;
        }
        (Err(e), _) => {
            rep.drops += 1;
            if rep.drops.is_power_of_two() {
                warn!(side = ?to, error = %e, drops = rep.drops, "TAP refused a frame");
            }
        }
    }
}

/// Writes a virtio-net header and a frame (its parts in order: headers,
/// then a payload in up to two pieces) to a TAP in one system call.
fn write_frame(fd: RawFd, parts: &[&[u8]; 4]) -> io::Result<()> {
    let iov = parts.map(|p| libc::iovec {
        iov_base: p.as_ptr() as *mut libc::c_void,
        iov_len: p.len(),
    });
    loop {
        // SAFETY: every iovec points into a slice that lives for the call
        // (empty ones have length 0); the kernel only reads them.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `struct ifreq` with the flags member.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Sets IFF_UP on interface `name` of this network namespace.
fn link_up(name: &str) -> io::Result<()> {
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket creation; the descriptor is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq; `req` is a
    // valid, correctly sized ifreq living for both calls; `sock` is ours.
    let res = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else if req.flags & libc::IFF_UP as libc::c_short != 0 {
            Ok(())
        } else {
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: `sock` is a descriptor this function opened and owns.
    unsafe { libc::close(sock) };
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayConfig {
        RelayConfig {
            inner_tap: "a".into(),
            outer_tap: "b".into(),
            mode: Mode::Speculative,
            epoch: Duration::from_millis(25),
            commit_delay: Duration::from_millis(1),
            budget: 4 << 20,
            global_cap: 256 << 20,
            mtu: 1500,
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(cfg().check().is_ok());
        type Mutation = fn(&mut RelayConfig);
        let cases: [(Mutation, &str); 5] = [
            (|c| c.outer_tap = "a".into(), "both 'a'"),
            (|c| c.epoch = Duration::ZERO, "epoch"),
            (|c| c.mtu = 100, "MTU"),
            (|c| c.budget = 1000, "budget"),
            (|c| c.global_cap = 1 << 20, "global cap"),
        ];
        for (mutate, want) in cases {
            let mut c = cfg();
            mutate(&mut c);
            let err = c.check().expect_err(want).to_string();
            assert!(err.contains(want), "{err}");
        }
        let mut direct = cfg();
        direct.mode = Mode::Direct;
        direct.epoch = Duration::ZERO;
        assert!(direct.check().is_ok(), "direct mode has no epochs");
    }
}

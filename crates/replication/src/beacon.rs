//! Heartbeats from a thread of their own.
//!
//! The threads that write checkpoints (primary) or apply them (backup) can
//! be busy for longer than a heartbeat interval — a long pause, a large
//! checkpoint, a slow disk — and silence is how each side detects the
//! other's death. So every connection has a beacon: a thread that writes a
//! Heartbeat whenever nothing was written for an interval. All writers of
//! a connection share one [`Link`], so frames never interleave.
//!
//! The link also keeps what the output lease needs. The primary's link
//! logs when each write began and at which byte offset; the backup's
//! beacon reports how many bytes it has received (`Received`). The
//! backup's liveness clock restarted no earlier than the primary's write
//! of those bytes began, so the backup cannot decide the primary is dead
//! before `write start + heartbeat timeout`: the primary may emit output
//! until then ([`Link::lease_base`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The writing half of a connection, shared by its writers.
pub struct Link {
    w: Mutex<Writer>,
    origin: Instant,
    /// Nanoseconds since `origin` of the last write.
    last_tx: AtomicU64,
    stop: AtomicBool,
    /// Bytes received on this connection (the backup's reader counts them;
    /// its beacon reports them).
    pub rx_bytes: AtomicU64,
}

/// The stream and its write log.
struct Writer {
    s: crate::tls::SecureWrite,
    /// Bytes written so far.
    sent: u64,
    /// (offset of the write's first byte, `mono_ns` when it began), oldest
    /// first; pruned as the peer reports receipt.
    log: VecDeque<(u64, u64)>,
}

/// Writes kept in the log at most (older ones are merged away: a lease
/// computed from a merged entry is earlier, never later, so still safe).
const LOG_MAX: usize = 4096;

impl Writer {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        if self.log.len() >= LOG_MAX {
            // Drop the second entry: the first's (earlier) time now stands
            // for both.
            self.log.remove(1);
        }
        self.log
            .push_back((self.sent, remora_vmm::devices::virtio::commit::mono_ns()));
        self.sent += b.len() as u64;
        self.s.write_all(b)
    }
}

impl Link {
    pub fn new(w: crate::tls::SecureWrite) -> Arc<Link> {
        Arc::new(Link {
            w: Mutex::new(Writer {
                s: w,
                sent: 0,
                log: VecDeque::new(),
            }),
            origin: Instant::now(),
            last_tx: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            rx_bytes: AtomicU64::new(0),
        })
    }

    /// Writes whole frames (never interleaved with another writer's).
    pub fn write(&self, b: &[u8]) -> std::io::Result<()> {
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        let r = w.write_all(b);
        self.touch();
        r
    }

    /// The peer has received `bytes` of what this link wrote: when the
    /// write holding the last of them began ([`mono_ns`]), if known. The
    /// log before it is dropped.
    ///
    /// [`mono_ns`]: remora_vmm::devices::virtio::commit::mono_ns
    pub fn lease_base(&self, bytes: u64) -> Option<u64> {
        if bytes == 0 {
            return None;
        }
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        if bytes > w.sent {
            return None;
        }
        let last = bytes - 1;
        while w.log.len() >= 2 && w.log[1].0 <= last {
            w.log.pop_front();
        }
        w.log.front().filter(|(off, _)| *off <= last).map(|(_, t)| *t)
    }

    /// Encodes and writes one message.
    pub fn send(&self, m: &remora_proto::Message) -> std::io::Result<()> {
        let mut out = Vec::new();
        m.encode(&mut out).map_err(std::io::Error::other)?;
        self.write(&out)
    }

    fn touch(&self) {
        self.last_tx
            .store(self.origin.elapsed().as_nanos() as u64, Ordering::Release);
    }

    /// Ends the connection in order: what was written so far goes out,
    /// then a FIN; waits until the peer closes its side (or resets it),
    /// reading (and dropping) what it still sends, at most `limit`; then
    /// closes both ways. Returns whether the peer closed its side.
    ///
    /// A plain close is not enough before a process exits: closing a
    /// socket with unread data (the peer's heartbeats) resets the
    /// connection, and a reset throws away everything still queued for
    /// sending (the end of a checkpoint, the Shutdown message after it),
    /// which the peer then takes for a crash. (Another thread may read the
    /// same socket meanwhile: the end of the stream is seen by both.)
    pub fn finish(&self, limit: Duration) -> bool {
        use std::io::Read;
        self.stop.store(true, Ordering::Release);
        let w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        w.s.shutdown_write();
        let raw = w.s.raw();
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        let _ = raw.set_read_timeout(Some(Duration::from_millis(20)));
        let closed = loop {
            if start.elapsed() > limit {
                break false;
            }
            match (&*raw).read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) if crate::would_block(&e) => {}
                Err(_) => break false,
            }
        };
        let _ = raw.shutdown(std::net::Shutdown::Both);
        closed
    }

    /// Closes the connection both ways and stops the beacon.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Release);
        let w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        w.s.shutdown();
    }

    /// Starts the beacon: a Heartbeat whenever nothing was written for
    /// `interval` (with `report_rx`, a `Received` report instead, and one
    /// every half interval while bytes arrive). It ends when the link is
    /// closed or a write fails.
    pub fn start_beacon(self: &Arc<Link>, interval: Duration, report_rx: bool) -> std::io::Result<()> {
        let link = self.clone();
        std::thread::Builder::new().name("repl-beacon".into()).spawn(move || {
            // Silence means death to the other side: the beacon must run
            // on time even when the host's CPUs are saturated.
            if !remora_vmm::promote_to_realtime() {
                tracing::debug!("heartbeat thread runs at normal priority (no CAP_SYS_NICE)");
            }
            let mut reported = 0;
            while !link.stop.load(Ordering::Acquire) {
                std::thread::sleep(interval / 2);
                let now = link.origin.elapsed();
                let last = Duration::from_nanos(link.last_tx.load(Ordering::Acquire));
                let rx = link.rx_bytes.load(Ordering::Acquire);
                let news = report_rx && rx != reported;
                if !news && now.saturating_sub(last) < interval {
                    continue;
                }
                let mut out = Vec::new();
                let beat = if report_rx {
                    reported = rx;
                    remora_proto::Message::Received { bytes: rx }
                } else {
                    remora_proto::Message::Heartbeat {
                        sent_at_ns: now.as_nanos() as u64,
                    }
                };
                if beat.encode(&mut out).is_err() {
                    return;
                }
                // A writer holding the lock is sending: no beat needed.
                let Ok(mut w) = link.w.try_lock() else {
                    continue;
                };
                if w.write_all(&out).is_err() {
                    return;
                }
                drop(w);
                link.touch();
            }
        })?;
        Ok(())
    }
}

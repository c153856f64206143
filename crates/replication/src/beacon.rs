//! Heartbeats from a thread of their own.
//!
//! The threads that write checkpoints (primary) or apply them (backup) can
//! be busy for longer than a heartbeat interval — a long pause, a large
//! checkpoint, a slow disk — and silence is how each side detects the
//! other's death. So every connection has a beacon: a thread that writes a
//! Heartbeat whenever nothing was written for an interval. All writers of
//! a connection share one [`Link`], so frames never interleave.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The writing half of a connection, shared by its writers.
pub struct Link {
    w: Mutex<TcpStream>,
    origin: Instant,
    /// Nanoseconds since `origin` of the last write.
    last_tx: AtomicU64,
    stop: AtomicBool,
}

impl Link {
    pub fn new(w: TcpStream) -> Arc<Link> {
        Arc::new(Link {
            w: Mutex::new(w),
            origin: Instant::now(),
            last_tx: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Writes whole frames (never interleaved with another writer's).
    pub fn write(&self, b: &[u8]) -> std::io::Result<()> {
        let mut w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        let r = w.write_all(b);
        self.touch();
        r
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
        let _ = w.shutdown(std::net::Shutdown::Write);
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        let _ = w.set_read_timeout(Some(Duration::from_millis(20)));
        let closed = loop {
            if start.elapsed() > limit {
                break false;
            }
            match (&*w).read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) if crate::would_block(&e) => {}
                Err(_) => break false,
            }
        };
        let _ = w.shutdown(std::net::Shutdown::Both);
        closed
    }

    /// Closes the connection both ways and stops the beacon.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Release);
        let w = self.w.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }

    /// Starts the beacon: a Heartbeat whenever nothing was written for
    /// `interval`. It ends when the link is closed or a write fails.
    pub fn start_beacon(self: &Arc<Link>, interval: Duration) -> std::io::Result<()> {
        let link = self.clone();
        std::thread::Builder::new().name("repl-beacon".into()).spawn(move || {
            // Silence means death to the other side: the beacon must run
            // on time even when the host's CPUs are saturated.
            if !remora_vmm::promote_to_realtime() {
                tracing::debug!("heartbeat thread runs at normal priority (no CAP_SYS_NICE)");
            }
            while !link.stop.load(Ordering::Acquire) {
                std::thread::sleep(interval / 2);
                let now = link.origin.elapsed();
                let last = Duration::from_nanos(link.last_tx.load(Ordering::Acquire));
                if now.saturating_sub(last) < interval {
                    continue;
                }
                let mut out = Vec::new();
                let beat = remora_proto::Message::Heartbeat {
                    sent_at_ns: now.as_nanos() as u64,
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

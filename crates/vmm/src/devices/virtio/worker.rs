//! Pause/resume/stop for device worker threads, so a snapshot sees device
//! queues at the same instant as the parked vCPUs.
//!
//! A worker calls [`WorkerCtl::checkpoint`] whenever it wakes (its poll
//! set includes [`WorkerCtl::wake`]); the VMM calls [`WorkerCtl::pause`],
//! which returns once the worker is parked between requests and has
//! published the state of the queues it owns.
//!
//! A worker thread holds a [`WorkerAlive`] guard for its whole life: when
//! the thread ends (returns on an error, or panics) the guard marks the
//! worker dead, and [`WorkerCtl::pause`] returns an error instead of
//! waiting for a thread that will never park.

use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::lock;

/// A queue's state in a snapshot (virtio-queue's `QueueState`, serializable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnap {
    fn from(s: QueueState) -> Self {
        QueueSnap {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnap {
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// A validated queue from untrusted snapshot data.
    pub fn to_queue(self) -> Result<Queue, String> {
        let s = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(s).map_err(|e| format!("invalid queue in snapshot: {e:?}"))
    }
}

#[derive(Default)]
struct Ctl {
    stop: bool,
    pause: bool,
    paused: bool,
    /// Counts pause requests; `parked_gen` is the one the worker last
    /// parked (and published its queues) for. A pause waits for its own
    /// park: a worker resumed but not yet run must not pass for parked.
    pause_gen: u64,
    parked_gen: u64,
    /// The worker thread has ended.
    dead: bool,
    queues: Vec<QueueSnap>,
}

/// [`WorkerCtl::pause`] of a worker whose thread has ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its worker thread has ended; the device no longer works and cannot be snapshotted")]
pub struct WorkerDead;

/// Held by a worker thread while it runs (see [`WorkerCtl::alive`]).
pub struct WorkerAlive<'a> {
    ctl: &'a WorkerCtl,
    name: &'static str,
}

impl Drop for WorkerAlive<'_> {
    /// Runs on every way out of the thread: a return, an error, a panic.
    fn drop(&mut self) {
        let mut g = lock(&self.ctl.state);
        g.dead = true;
        if !g.stop {
            let how = if std::thread::panicking() { "panicked" } else { "ended" };
            tracing::error!(
                "{} worker thread {how} unexpectedly: the device stops working",
                self.name
            );
        }
        self.ctl.cv.notify_all();
    }
}

/// Shared between a device and its worker thread.
pub struct WorkerCtl {
    state: Mutex<Ctl>,
    cv: Condvar,
    /// Written to wake the worker out of its poll.
    pub wake: EventFd,
}

impl WorkerCtl {
    pub fn new() -> std::io::Result<Self> {
        Ok(WorkerCtl {
            state: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Worker side, first thing in the worker thread: returns the guard
    /// that marks the worker dead when dropped. Hold it until the thread
    /// ends.
    pub fn alive(&self, name: &'static str) -> WorkerAlive<'_> {
        WorkerAlive { ctl: self, name }
    }

    /// Whether the worker thread has ended.
    pub fn is_dead(&self) -> bool {
        lock(&self.state).dead
    }

    /// Worker side, on every wake-up: parks while a pause is requested
    /// (after publishing `queues`); returns false once the worker must exit.
    pub fn checkpoint(&self, queues: &[&Queue]) -> bool {
        let _ = self.wake.read();
        let mut g = lock(&self.state);
        if g.pause && !g.stop {
            loop {
                g.queues = queues.iter().map(|q| QueueSnap::of(q)).collect();
                g.parked_gen = g.pause_gen;
                g.paused = true;
                self.cv.notify_all();
                while g.pause && !g.stop && g.parked_gen == g.pause_gen {
                    g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                // Resumed and paused again before this thread ran: nothing
                // changed, park again for the new pause.
                if !g.pause || g.stop {
                    break;
                }
            }
            g.paused = false;
        }
        !g.stop
    }

    /// Whether a pause is requested: a worker that sees it parks at once
    /// (its next [`WorkerCtl::checkpoint`]).
    pub fn pause_requested(&self) -> bool {
        lock(&self.state).pause
    }

    /// VMM side: asks the worker to park at its next wake-up and returns
    /// at once; [`WorkerCtl::pause`] then waits for it. Lets the worker
    /// park while the vCPUs are being stopped.
    pub fn request_pause(&self) {
        let mut g = lock(&self.state);
        if !g.pause {
            g.pause = true;
            g.pause_gen += 1;
            let _ = self.wake.write(1);
        }
    }

    /// VMM side: parks the worker; returns its queues, or [`WorkerDead`]
    /// if its thread has ended (it would never park).
    pub fn pause(&self) -> Result<Vec<QueueSnap>, WorkerDead> {
        let mut g = lock(&self.state);
        if !g.pause {
            g.pause = true;
            g.pause_gen += 1;
            let _ = self.wake.write(1);
        }
        while g.parked_gen != g.pause_gen && !g.stop && !g.dead {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.parked_gen != g.pause_gen {
            return Err(WorkerDead);
        }
        Ok(g.queues.clone())
    }

    pub fn resume(&self) {
        let mut g = lock(&self.state);
        g.pause = false;
        self.cv.notify_all();
    }

    pub fn stop(&self) {
        let mut g = lock(&self.state);
        g.stop = true;
        let _ = self.wake.write(1);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// `ctl.pause()` on another thread; None if it has not returned
    /// within 5 s.
    fn pause_within(ctl: &Arc<WorkerCtl>) -> Option<Result<Vec<QueueSnap>, WorkerDead>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = ctl.clone();
        std::thread::spawn(move || {
            let _ = tx.send(c.pause());
        });
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }

    #[test]
    fn pause_parks_a_live_worker() {
        let ctl = Arc::new(WorkerCtl::new().unwrap());
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            let _alive = c.alive("test");
            // A worker's loop: wait for a wake-up, then look.
            loop {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&c.wake),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: `fds` is a valid array of one pollfd for the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
                if !c.checkpoint(&[]) {
                    return;
                }
            }
        });
        assert_eq!(pause_within(&ctl), Some(Ok(Vec::new())));
        assert!(!ctl.is_dead());
        ctl.resume();
        ctl.stop();
        t.join().unwrap();
        assert!(ctl.is_dead());
    }

    /// A worker that returns or panics, before or while the VMM waits for
    /// it to park: `pause` returns an error instead of waiting forever.
    #[test]
    fn pause_returns_when_the_worker_thread_ends() {
        for (panics, early) in [(false, true), (true, true), (false, false), (true, false)] {
            let ctl = Arc::new(WorkerCtl::new().unwrap());
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let c = ctl.clone();
            let t = std::thread::spawn(move || {
                let _alive = c.alive("test");
                let _ = go_rx.recv();
                assert!(!panics, "the worker failed");
            });
            let paused = if early {
                drop(go_tx);
                let _ = t.join();
                pause_within(&ctl)
            } else {
                let (tx, rx) = std::sync::mpsc::channel();
                let c = ctl.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(c.pause());
                });
                std::thread::sleep(Duration::from_millis(50));
                drop(go_tx);
                let _ = t.join();
                rx.recv_timeout(Duration::from_secs(5)).ok()
            };
            assert_eq!(paused, Some(Err(WorkerDead)), "panics={panics} early={early}");
            assert!(ctl.is_dead());
        }
    }
}

//! Pause/resume/stop for device worker threads, so a snapshot sees device
//! queues at the same instant as the parked vCPUs.
//!
//! A worker calls [`WorkerCtl::checkpoint`] whenever it wakes (its poll
//! set includes [`WorkerCtl::wake`]); the VMM calls [`WorkerCtl::pause`],
//! which returns once the worker is parked between requests and has
//! published the state of the queues it owns.

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
    queues: Vec<QueueSnap>,
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

    /// Worker side, on every wake-up: parks while a pause is requested
    /// (after publishing `queues`); returns false once the worker must exit.
    pub fn checkpoint(&self, queues: &[&Queue]) -> bool {
        let _ = self.wake.read();
        let mut g = lock(&self.state);
        if g.pause && !g.stop {
            g.queues = queues.iter().map(|q| QueueSnap::of(q)).collect();
            g.paused = true;
            self.cv.notify_all();
            while g.pause && !g.stop {
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
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
            let _ = self.wake.write(1);
        }
    }

    /// VMM side: parks the worker; returns its queues.
    pub fn pause(&self) -> Vec<QueueSnap> {
        let mut g = lock(&self.state);
        g.pause = true;
        let _ = self.wake.write(1);
        while !g.paused && !g.stop {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.queues.clone()
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

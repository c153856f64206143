//! virtio-blk driver and the `disk:MIB` / `diskcheck:MIB` workloads.
//!
//! One request queue; each request is a 3-descriptor chain (16-byte
//! header, one data buffer, status byte) in a fixed slot. Requests go in
//! batches (up to [`MAX_SLOTS`] x [`CHUNK`] bytes), one notification per
//! batch; the driver then sleeps until the device interrupt (EVENT_IDX
//! armed) and collects the completions.

use core::sync::atomic::Ordering;

use crate::irq;
use crate::palloc;
use crate::pattern::{self, DISK_SEED};
use crate::say;
use crate::smp::Lapic;
use crate::time;
use crate::virtio::{Mmio, Queue, DESC_NEXT, DESC_WRITE, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

/// Request slots (3 descriptors each).
const MAX_SLOTS: usize = 32;
/// Bytes per data request of the workloads.
const CHUNK: usize = 256 << 10;
/// Give up on a batch after this long.
const BATCH_TIMEOUT_MS: u64 = 30_000;

/// One request.
#[derive(Clone, Copy)]
pub struct Req {
    pub kind: u32,
    pub sector: u64,
    pub addr: u64,
    pub len: u32,
}

/// A virtio-blk device.
pub struct Blk {
    q: Queue,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    hdrs: u64,
    slots: usize,
    /// Requests of the last [`Blk::submit`], and how many completed.
    submitted: usize,
    done: usize,
}

impl Blk {
    pub fn new(mmio: Mmio) -> Result<Blk, &'static str> {
        let f = mmio.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | F_SEG_MAX | F_RO | F_FLUSH)?;
        let q = mmio.queue(0, 128, f & VIRTIO_F_RING_EVENT_IDX != 0)?;
        let capacity = u64::from(mmio.config32(0)) | (u64::from(mmio.config32(4)) << 32);
        let slots = (usize::from(q.size) / 3).min(MAX_SLOTS);
        mmio.driver_ok();
        Ok(Blk {
            q,
            capacity,
            read_only: f & F_RO != 0,
            flush: f & F_FLUSH != 0,
            hdrs: palloc::alloc(slots * 32, 4096),
            slots,
            submitted: 0,
            done: 0,
        })
    }

    /// Puts `reqs` (at most `slots` of them) in the queue and notifies the
    /// device; [`Blk::poll`] collects them.
    pub fn submit(&mut self, reqs: &[Req]) {
        assert!(reqs.len() <= self.slots);
        for (i, r) in reqs.iter().enumerate() {
            let hdr = self.hdrs + 32 * i as u64;
            let status = hdr + 16;
            // SAFETY: slot i's header and status byte in our allocation.
            unsafe {
                (hdr as *mut u32).write_volatile(r.kind);
                ((hdr + 4) as *mut u32).write_volatile(0);
                ((hdr + 8) as *mut u64).write_volatile(r.sector);
                (status as *mut u8).write_volatile(0xff);
            }
            let d = (3 * i) as u16;
            self.q.set_desc(d, hdr, 16, DESC_NEXT, d + 1);
            if r.kind == T_FLUSH || r.len == 0 {
                self.q.set_desc(d + 1, status, 1, DESC_WRITE, 0);
            } else {
                let fl = if r.kind == T_IN { DESC_WRITE } else { 0 };
                self.q.set_desc(d + 1, r.addr, r.len, fl | DESC_NEXT, d + 2);
                self.q.set_desc(d + 2, status, 1, DESC_WRITE, 0);
            }
            self.q.push(d);
        }
        self.q.kick();
        self.submitted = reqs.len();
        self.done = 0;
    }

    /// Collects completions of the submitted requests: `None` while some
    /// are outstanding, else the index and status of the first that
    /// failed, if any.
    pub fn poll(&mut self) -> Option<Result<(), (usize, u8)>> {
        while self.q.pop_used().is_some() {
            self.done += 1;
        }
        if self.done < self.submitted {
            return None;
        }
        for i in 0..self.submitted {
            // SAFETY: slot i's status byte, written by the device.
            let s = unsafe { ((self.hdrs + 32 * i as u64 + 16) as *const u8).read_volatile() };
            if s != 0 {
                return Some(Err((i, s)));
            }
        }
        Some(Ok(()))
    }

    /// Asks for an interrupt at the next completion; true if completions
    /// already wait.
    pub fn arm(&mut self) -> bool {
        self.q.arm()
    }

    /// Runs `reqs` (at most `slots` of them) and waits for all. Returns
    /// the index and status of the first that failed.
    pub fn run(&mut self, lapic: &Lapic, reqs: &[Req]) -> Result<(), (usize, u8)> {
        self.submit(reqs);
        let deadline = time::Deadline::after_ms(BATCH_TIMEOUT_MS);
        loop {
            let seen = irq::irq_count().load(Ordering::Acquire);
            if let Some(r) = self.poll() {
                return r;
            }
            if deadline.expired() {
                return Err((self.done, 0xfe));
            }
            if self.q.arm() {
                continue;
            }
            irq::sleep(lapic, seen, Some(1_000_000));
        }
    }
}

fn status_name(s: u8) -> &'static str {
    match s {
        1 => "IOERR",
        2 => "UNSUPP",
        0xfe => "TIMEOUT",
        _ => "?",
    }
}

/// `disk:MIB` (write, flush, read back, verify) and `diskcheck:MIB`
/// (read and verify only).
pub fn workload(blk: Option<&mut Blk>, lapic: &Lapic, mib: u64, check_only: bool) {
    let name = if check_only { "diskcheck" } else { "disk" };
    let Some(blk) = blk else {
        say!("{name} error: no virtio-blk device");
        return;
    };
    let bytes = mib << 20;
    if !check_only && blk.read_only {
        say!("{name}: device is read-only; the writes should fail");
    }
    if blk.capacity * 512 < bytes {
        say!("{name} error: disk has {} sectors, need {}", blk.capacity, bytes / 512);
        return;
    }
    let batch = blk.slots.min(16);
    let buf = palloc::alloc_slice(CHUNK * batch);
    let base = buf.as_ptr() as u64;
    let mut reqs = [Req {
        kind: 0,
        sector: 0,
        addr: 0,
        len: 0,
    }; MAX_SLOTS];
    let run_pass = |blk: &mut Blk, buf: &mut [u8], kind: u32, reqs: &mut [Req; MAX_SLOTS]| -> bool {
        let mut off = 0u64;
        while off < bytes {
            let n = (((bytes - off) as usize).div_ceil(CHUNK)).min(batch);
            let len = ((bytes - off) as usize).min(n * CHUNK);
            if kind == T_OUT {
                pattern::fill(DISK_SEED, off, &mut buf[..len]);
            } else {
                buf[..len].fill(0xa5);
            }
            for (i, r) in reqs[..n].iter_mut().enumerate() {
                let o = i * CHUNK;
                *r = Req {
                    kind,
                    sector: (off + o as u64) / 512,
                    addr: base + o as u64,
                    len: (len - o).min(CHUNK) as u32,
                };
            }
            if let Err((i, s)) = blk.run(lapic, &reqs[..n]) {
                let what = if kind == T_OUT { "write" } else { "read" };
                say!(
                    "{name} error: {what} sector={} status={s} ({})",
                    reqs[i].sector,
                    status_name(s)
                );
                return false;
            }
            if kind == T_IN {
                if let Some(bad) = first_mismatch(DISK_SEED, off, &buf[..len]) {
                    let mut want = [0u8; 8];
                    let at = bad & !7;
                    pattern::fill(DISK_SEED, at, &mut want);
                    let s = (at - off) as usize;
                    let mut got = [0u8; 8];
                    got.copy_from_slice(&buf[s..s + 8]);
                    say!(
                        "{name} MISMATCH offset={at:#x} sector={} want={:#018x} got={:#018x}",
                        at / 512,
                        u64::from_le_bytes(want),
                        u64::from_le_bytes(got)
                    );
                    return false;
                }
            }
            off += len as u64;
        }
        true
    };
    let t0 = time::rdtsc();
    if !check_only {
        if !run_pass(blk, buf, T_OUT, &mut reqs) {
            return;
        }
        if blk.flush {
            let flush = [Req {
                kind: T_FLUSH,
                sector: 0,
                addr: 0,
                len: 0,
            }];
            if let Err((_, s)) = blk.run(lapic, &flush) {
                say!("{name} error: flush status={s} ({})", status_name(s));
                return;
            }
        }
    }
    let t1 = time::rdtsc();
    if !run_pass(blk, buf, T_IN, &mut reqs) {
        return;
    }
    let t2 = time::rdtsc();
    let rate = |t: u64| {
        let us = (u128::from(t) * 1_000_000 / u128::from(time::tsc_hz())).max(1);
        (u128::from(bytes) / us) as u64 // bytes/us = MB/s
    };
    if check_only {
        say!("diskcheck ok mib={mib} read_mb_s={}", rate(t2 - t1));
    } else {
        say!(
            "disk ok mib={mib} write_mb_s={} read_mb_s={}",
            rate(t1 - t0),
            rate(t2 - t1)
        );
    }
}

/// Offset (in the disk) of the first byte of `buf` (read from disk offset
/// `off`, a multiple of 8) that differs from the pattern with `seed`.
fn first_mismatch(seed: u64, off: u64, buf: &[u8]) -> Option<u64> {
    for (k, c) in buf.chunks_exact(8).enumerate() {
        let at = off + 8 * k as u64;
        let want = pattern::splitmix64((at / 8).wrapping_add(seed));
        let got = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        if want != got {
            return Some(at);
        }
    }
    None
}

/// The pattern seed of `diskloop` round `round` (1, 2, ...).
fn round_seed(round: u64) -> u64 {
    DISK_SEED.wrapping_add(round << 40)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Write,
    Flush,
    Read,
}

/// `diskloop:MIB`: endless rounds of `disk:MIB` with a new pattern each
/// round (round `r` writes the disk pattern with seed `DISK_SEED + (r <<
/// 40)`), driven from the BSP's service loop without blocking it: one batch
/// of requests in flight, [`DiskLoop::service`] collects it and submits the
/// next. Prints `diskloop ok rounds=N mib=M` at the end of a round at most
/// once a second; on an error or a mismatch it prints the line and stops.
pub struct DiskLoop {
    blk: Blk,
    mib: u64,
    bytes: u64,
    buf: &'static mut [u8],
    batch: usize,
    reqs: [Req; MAX_SLOTS],
    /// Requests in flight (0: none).
    nreqs: usize,
    round: u64,
    phase: Phase,
    /// Disk offset and length of the batch in flight (or next).
    off: u64,
    len: usize,
    deadline: time::Deadline,
    next_print: u64,
    stopped: bool,
}

impl DiskLoop {
    /// Prints a `diskloop error: ...` line and returns `None` if there is no
    /// usable disk.
    pub fn new(blk: Option<Blk>, mib: u64) -> Option<DiskLoop> {
        let Some(blk) = blk else {
            say!("diskloop error: no virtio-blk device");
            return None;
        };
        let bytes = mib << 20;
        if blk.capacity * 512 < bytes {
            say!(
                "diskloop error: disk has {} sectors, need {}",
                blk.capacity,
                bytes / 512
            );
            return None;
        }
        if blk.read_only {
            say!("diskloop error: device is read-only");
            return None;
        }
        let batch = blk.slots.min(16);
        let mut d = DiskLoop {
            blk,
            mib,
            bytes,
            buf: palloc::alloc_slice(CHUNK * batch),
            batch,
            reqs: [Req {
                kind: 0,
                sector: 0,
                addr: 0,
                len: 0,
            }; MAX_SLOTS],
            nreqs: 0,
            round: 1,
            phase: Phase::Write,
            off: 0,
            len: 0,
            deadline: time::Deadline::after_ms(BATCH_TIMEOUT_MS),
            next_print: time::rdtsc() + time::tsc_hz(),
            stopped: false,
        };
        d.submit_next();
        Some(d)
    }

    /// Submits the batch at `off` of the current phase.
    fn submit_next(&mut self) {
        let base = self.buf.as_ptr() as u64;
        if self.phase == Phase::Flush {
            self.reqs[0] = Req {
                kind: T_FLUSH,
                sector: 0,
                addr: 0,
                len: 0,
            };
            self.nreqs = 1;
        } else {
            let left = (self.bytes - self.off) as usize;
            let n = left.div_ceil(CHUNK).min(self.batch);
            self.len = left.min(n * CHUNK);
            let kind = if self.phase == Phase::Write { T_OUT } else { T_IN };
            if kind == T_OUT {
                pattern::fill(round_seed(self.round), self.off, &mut self.buf[..self.len]);
            } else {
                self.buf[..self.len].fill(0xa5);
            }
            for (i, r) in self.reqs[..n].iter_mut().enumerate() {
                let o = i * CHUNK;
                *r = Req {
                    kind,
                    sector: (self.off + o as u64) / 512,
                    addr: base + o as u64,
                    len: (self.len - o).min(CHUNK) as u32,
                };
            }
            self.nreqs = n;
        }
        self.blk.submit(&self.reqs[..self.nreqs]);
        self.deadline = time::Deadline::after_ms(BATCH_TIMEOUT_MS);
    }

    /// Collects the batch in flight and submits the next; true if anything
    /// completed.
    pub fn service(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        let res = match self.blk.poll() {
            Some(r) => r,
            None => {
                if self.deadline.expired() {
                    say!("diskloop error: no completion in {BATCH_TIMEOUT_MS} ms");
                    self.stopped = true;
                }
                return false;
            }
        };
        if let Err((i, s)) = res {
            let what = match self.reqs[i].kind {
                T_OUT => "write",
                T_IN => "read",
                _ => "flush",
            };
            say!(
                "diskloop error: {what} sector={} status={s} ({})",
                self.reqs[i].sector,
                status_name(s)
            );
            self.stopped = true;
            return true;
        }
        match self.phase {
            Phase::Write => {
                self.off += self.len as u64;
                if self.off == self.bytes {
                    self.off = 0;
                    self.phase = if self.blk.flush { Phase::Flush } else { Phase::Read };
                }
            }
            Phase::Flush => self.phase = Phase::Read,
            Phase::Read => {
                let seed = round_seed(self.round);
                if let Some(bad) = first_mismatch(seed, self.off, &self.buf[..self.len]) {
                    let at = bad & !7;
                    let s = (at - self.off) as usize;
                    let mut got = [0u8; 8];
                    got.copy_from_slice(&self.buf[s..s + 8]);
                    say!(
                        "diskloop MISMATCH round={} offset={at:#x} sector={} want={:#018x} got={:#018x}",
                        self.round,
                        at / 512,
                        pattern::splitmix64((at / 8).wrapping_add(seed)),
                        u64::from_le_bytes(got)
                    );
                    self.stopped = true;
                    return true;
                }
                self.off += self.len as u64;
                if self.off == self.bytes {
                    let now = time::rdtsc();
                    // Robust to the TSC jumping (e.g. across a restore).
                    let second = time::tsc_hz();
                    if now >= self.next_print || self.next_print - now > 2 * second {
                        self.next_print = now + second;
                        say!("diskloop ok rounds={} mib={}", self.round, self.mib);
                    }
                    self.off = 0;
                    self.round += 1;
                    self.phase = Phase::Write;
                }
            }
        }
        self.submit_next();
        true
    }

    /// Asks for an interrupt at the next completion; true if completions
    /// already wait.
    pub fn arm(&mut self) -> bool {
        !self.stopped && self.blk.arm()
    }
}

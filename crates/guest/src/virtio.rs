//! virtio-mmio (version 2) devices: discovery, the transport and split
//! virtqueues.
//!
//! Discovery: the DSDT is scanned for `LNRO0005` devices (the string _HID),
//! taking the first Memory32Fixed and Extended Interrupt descriptors that
//! follow each (a full AML interpreter is not needed for the VMM's or
//! QEMU microvm's tables), plus every `virtio_mmio.device=SIZE@BASE:IRQ`
//! word of the command line. Notifications are batched and both rings use
//! VIRTIO_F_RING_EVENT_IDX; interrupts are never acknowledged through
//! InterruptACK (a userspace exit): the VMM signals its irqfd on every
//! used-buffer notification regardless of InterruptStatus.

use core::sync::atomic::{fence, Ordering};

use crate::palloc;
use crate::phys::{le16, le32};

/// Most virtio-mmio devices we look at.
pub const MAX_DEVICES: usize = 16;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

const MAGIC: u32 = 0x7472_6976;
// Register offsets.
const R_MAGIC: usize = 0x00;
const R_VERSION: usize = 0x04;
const R_DEVICE_ID: usize = 0x08;
const R_DEV_FEATURES: usize = 0x10;
const R_DEV_FEATURES_SEL: usize = 0x14;
const R_DRV_FEATURES: usize = 0x20;
const R_DRV_FEATURES_SEL: usize = 0x24;
const R_QUEUE_SEL: usize = 0x30;
const R_QUEUE_NUM_MAX: usize = 0x34;
const R_QUEUE_NUM: usize = 0x38;
const R_QUEUE_READY: usize = 0x44;
const R_QUEUE_NOTIFY: usize = 0x50;
const R_STATUS: usize = 0x70;
const R_QUEUE_DESC: usize = 0x80;
const R_QUEUE_DRIVER: usize = 0x90;
const R_QUEUE_DEVICE: usize = 0xa0;
const R_CONFIG: usize = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// A virtio-mmio window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDev {
    pub base: u64,
    pub gsi: u32,
}

/// The devices found, without duplicates.
pub struct Found {
    pub devs: [MmioDev; MAX_DEVICES],
    pub len: usize,
}

impl Found {
    fn add(&mut self, d: MmioDev) {
        if self.len < MAX_DEVICES && !self.devs[..self.len].iter().any(|x| x.base == d.base) {
            self.devs[self.len] = d;
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &MmioDev> {
        self.devs[..self.len].iter()
    }
}

/// Finds virtio-mmio windows in the DSDT's AML and on the command line.
pub fn discover(dsdt: Option<&[u8]>, cmdline: &[u8]) -> Found {
    let mut found = Found {
        devs: [MmioDev { base: 0, gsi: 0 }; MAX_DEVICES],
        len: 0,
    };
    if let Some(aml) = dsdt {
        let hid = b"LNRO0005";
        let hits = (0..aml.len().saturating_sub(hid.len())).filter(|&i| &aml[i..i + hid.len()] == hid);
        let mut starts = [0usize; 64];
        let mut n = 0;
        for i in hits {
            if n < starts.len() {
                starts[n] = i;
                n += 1;
            }
        }
        for k in 0..n {
            let from = starts[k] + hid.len();
            let to = if k + 1 < n { starts[k + 1] } else { aml.len() }.min(from + 1024);
            if let Some(d) = parse_crs(&aml[from..to]) {
                found.add(d);
            }
        }
    }
    if let Ok(text) = core::str::from_utf8(cmdline) {
        for word in text.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("virtio_mmio.device=") {
                if let Some(d) = parse_cmdline_dev(v) {
                    found.add(d);
                }
            }
        }
    }
    found
}

/// The first Memory32Fixed (0x86) and Extended Interrupt (0x89) resource
/// descriptors in `b` (the bytes after a device's _HID).
fn parse_crs(b: &[u8]) -> Option<MmioDev> {
    let mut base = None;
    let mut gsi = None;
    let mut i = 0;
    while i + 3 < b.len() && (base.is_none() || gsi.is_none()) {
        match b[i] {
            0x86 if le16(b, i + 1) == 9 && base.is_none() && i + 12 <= b.len() => {
                base = Some(u64::from(le32(b, i + 4)));
                i += 12;
                continue;
            }
            0x89 if gsi.is_none() && i + 9 <= b.len() && b[i + 4] >= 1 && le16(b, i + 1) >= 6 => {
                gsi = Some(le32(b, i + 5));
                i += 9;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Some(MmioDev { base: base?, gsi: gsi? })
}

/// `SIZE@BASE:IRQ[:ID]` (Linux's virtio_mmio.device= syntax).
fn parse_cmdline_dev(v: &str) -> Option<MmioDev> {
    let (_size, rest) = v.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_num(parts.next()?)?;
    let gsi = parse_num(parts.next()?)? as u32;
    Some(MmioDev { base, gsi })
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// # Safety
    /// `base` must be a virtio-mmio window in the uncached identity map.
    pub unsafe fn new(base: u64) -> Self {
        Mmio { base: base as usize }
    }

    pub fn r32(&self, off: usize) -> u32 {
        // SAFETY: a register of the window (see new).
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }

    pub fn w32(&self, off: usize, v: u32) {
        // SAFETY: a register of the window (see new).
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }

    pub fn config8(&self, off: usize) -> u8 {
        // SAFETY: the device configuration space (see new).
        unsafe { core::ptr::read_volatile((self.base + R_CONFIG + off) as *const u8) }
    }

    pub fn config32(&self, off: usize) -> u32 {
        self.r32(R_CONFIG + off)
    }

    /// (version, device id), or None if there is no virtio device here.
    pub fn probe(&self) -> Option<(u32, u32)> {
        if self.r32(R_MAGIC) != MAGIC {
            return None;
        }
        let id = self.r32(R_DEVICE_ID);
        (id != 0).then(|| (self.r32(R_VERSION), id))
    }

    /// Resets the device and negotiates `want & offered` (VERSION_1 must be
    /// in both). Returns the features in use.
    pub fn negotiate(&self, want: u64) -> Result<u64, &'static str> {
        self.w32(R_STATUS, 0);
        self.w32(R_STATUS, S_ACK);
        self.w32(R_STATUS, S_ACK | S_DRIVER);
        self.w32(R_DEV_FEATURES_SEL, 0);
        let lo = self.r32(R_DEV_FEATURES);
        self.w32(R_DEV_FEATURES_SEL, 1);
        let hi = self.r32(R_DEV_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        let f = offered & want;
        if f & VIRTIO_F_VERSION_1 == 0 {
            self.w32(R_STATUS, S_FAILED);
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        self.w32(R_DRV_FEATURES_SEL, 0);
        self.w32(R_DRV_FEATURES, f as u32);
        self.w32(R_DRV_FEATURES_SEL, 1);
        self.w32(R_DRV_FEATURES, (f >> 32) as u32);
        self.w32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if self.r32(R_STATUS) & S_FEATURES_OK == 0 {
            self.w32(R_STATUS, S_FAILED);
            return Err("device refused FEATURES_OK");
        }
        Ok(f)
    }

    /// Sets up queue `index` with at most `max` entries.
    pub fn queue(&self, index: u32, max: u16, event_idx: bool) -> Result<Queue, &'static str> {
        self.w32(R_QUEUE_SEL, index);
        let dev_max = self.r32(R_QUEUE_NUM_MAX);
        if dev_max == 0 {
            return Err("queue not available");
        }
        let mut size = u32::from(max).min(dev_max);
        // A power of two (split rings need not, but it keeps indexes simple).
        while size & (size - 1) != 0 {
            size &= size - 1;
        }
        let q = Queue::new(size as u16, event_idx, self.base + R_QUEUE_NOTIFY, index);
        self.w32(R_QUEUE_NUM, size);
        let set = |off: usize, a: u64| {
            self.w32(off, a as u32);
            self.w32(off + 4, (a >> 32) as u32);
        };
        set(R_QUEUE_DESC, q.desc as u64);
        set(R_QUEUE_DRIVER, q.avail as u64);
        set(R_QUEUE_DEVICE, q.used as u64);
        self.w32(R_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn driver_ok(&self) {
        self.w32(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }
}

/// A split virtqueue in memory from [`palloc`].
pub struct Queue {
    pub size: u16,
    desc: *mut u8,
    avail: *mut u16,
    used: *mut u8,
    notify: *mut u32,
    index: u32,
    event_idx: bool,
    /// Next avail index to publish (shadow of avail.idx).
    avail_idx: u16,
    /// avail.idx at the last notification decision.
    kicked_idx: u16,
    /// Next used entry to look at.
    last_used: u16,
}

// SAFETY: the queue's memory is owned by the queue; raw pointers only.
unsafe impl Send for Queue {}

impl Queue {
    fn new(size: u16, event_idx: bool, notify: usize, index: u32) -> Queue {
        let n = usize::from(size);
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n + 4095) & !4095;
        let total = used_off + 6 + 8 * n;
        let mem = palloc::alloc(total, 4096) as *mut u8;
        Queue {
            size,
            desc: mem,
            // SAFETY: offsets inside the allocation.
            avail: unsafe { mem.add(avail_off) } as *mut u16,
            // SAFETY: as above.
            used: unsafe { mem.add(used_off) },
            notify: notify as *mut u32,
            index,
            event_idx,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        }
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        // SAFETY: descriptor i of this queue's table.
        unsafe {
            let d = self.desc.add(16 * usize::from(i));
            (d as *mut u64).write_volatile(addr);
            (d.add(8) as *mut u32).write_volatile(len);
            (d.add(12) as *mut u16).write_volatile(flags);
            (d.add(14) as *mut u16).write_volatile(next);
        }
    }

    /// Puts the chain starting at `head` in the avail ring (published by
    /// [`Queue::kick`]).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: avail ring entry `slot`.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Entries pushed but not yet completed (by avail/used index).
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Publishes pushed entries and notifies the device if it asked for it.
    pub fn kick(&mut self) {
        let new = self.avail_idx;
        let old = self.kicked_idx;
        if new == old {
            return;
        }
        fence(Ordering::Release);
        // SAFETY: avail.idx.
        unsafe { self.avail.add(1).write_volatile(new) };
        fence(Ordering::SeqCst);
        self.kicked_idx = new;
        let notify = if self.event_idx {
            // avail_event is after the used ring.
            // SAFETY: used ring's trailing avail_event field.
            let ev = unsafe { (self.used.add(4 + 8 * usize::from(self.size)) as *const u16).read_volatile() };
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: used.flags; bit 0 = VIRTQ_USED_F_NO_NOTIFY.
            let flags = unsafe { (self.used as *const u16).read_volatile() };
            flags & 1 == 0
        };
        if notify {
            // SAFETY: the QueueNotify register (an ioeventfd).
            unsafe { self.notify.write_volatile(self.index) };
        }
    }

    /// The next completed chain: (head, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx.
        let idx = unsafe { (self.used.add(2) as *const u16).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used ring element `slot`.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot);
            (
                (e as *const u32).read_volatile(),
                (e.add(4) as *const u32).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Asks for an interrupt at the next completion; returns true if
    /// completions are already waiting (then poll again instead of
    /// sleeping).
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            // SAFETY: avail ring's trailing used_event field.
            unsafe {
                self.avail
                    .add(2 + usize::from(self.size))
                    .write_volatile(self.last_used)
            };
        }
        fence(Ordering::SeqCst);
        // SAFETY: used.idx.
        let idx = unsafe { (self.used.add(2) as *const u16).read_volatile() };
        idx != self.last_used
    }
}

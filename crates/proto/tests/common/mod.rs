//! Shared helpers for the integration tests: a VM identity, random-ish
//! checkpoint contents, and a primary/backup pair wired back to back.

#![allow(dead_code)]

use std::time::Duration;

use remora_proto::{
    BackupConfig, BackupEvent, BackupSession, Checkpoint, CkptCounts, DeviceIdentity, OutputMode, PrimaryConfig,
    PrimaryEvent, PrimarySender, PrimarySession, VmIdentity, PAGE_SIZE,
};

pub const DISK_SIZE: u64 = 1 << 20;

pub fn identity() -> VmIdentity {
    VmIdentity {
        mem_mib: 64,
        vcpus: 2,
        devices: vec![
            DeviceIdentity::Net {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            },
            DeviceIdentity::Disk {
                size_bytes: DISK_SIZE,
                read_only: false,
                id: *b"root-disk\0\0\0\0\0\0\0\0\0\0\0",
            },
            DeviceIdentity::Net {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
            },
            DeviceIdentity::Disk {
                size_bytes: DISK_SIZE,
                read_only: false,
                id: *b"data-disk\0\0\0\0\0\0\0\0\0\0\0",
            },
        ],
    }
}

/// A page whose content is a cheap pseudo-random function of `seed`.
pub fn page(seed: u32) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    p
}

pub fn bytes(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}

/// What the primary puts in one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub epoch: u64,
    pub pages: Vec<(u64, u32)>,
    pub state: Vec<u8>,
    pub engines: Vec<(u32, Vec<u8>)>,
    pub disk: Vec<(u32, u64, Vec<u8>)>,
}

impl Spec {
    pub fn counts(&self) -> CkptCounts {
        CkptCounts {
            pages: self.pages.len() as u64,
            state_len: self.state.len() as u64,
            engines: self.engines.len() as u32,
            disk_writes: self.disk.len() as u64,
        }
    }

    /// Checks a delivered checkpoint against this spec.
    pub fn check(&self, seq: u64, c: &Checkpoint) {
        assert_eq!(c.seq, seq);
        assert_eq!(c.epoch, self.epoch, "epoch of {seq}");
        assert_eq!(c.page_count(), self.pages.len(), "pages of {seq}");
        for ((gpa, p), (want_gpa, seed)) in c.iter_pages().zip(&self.pages) {
            assert_eq!(gpa, *want_gpa);
            assert!(p[..] == page(*seed)[..], "page {gpa:#x} of {seq}");
        }
        assert_eq!(c.state, self.state, "state of {seq}");
        assert_eq!(c.engines, self.engines, "engines of {seq}");
        let disk: Vec<_> = c.disk.iter().map(|d| (d.disk, d.offset, d.data.clone())).collect();
        assert_eq!(disk, self.disk, "disk of {seq}");
    }
}

/// Writes checkpoint `seq` through the sender. The state goes in two calls
/// when it can.
pub fn send(s: &mut PrimarySender, seq: u64, spec: &Spec) {
    s.begin_checkpoint(seq, spec.epoch, spec.counts()).unwrap();
    let pages: Vec<(u64, [u8; PAGE_SIZE])> = spec.pages.iter().map(|&(g, seed)| (g, page(seed))).collect();
    s.pages(pages.iter().map(|(g, p)| (*g, p))).unwrap();
    let half = spec.state.len() / 2;
    s.state(&spec.state[..half]).unwrap();
    s.state(&spec.state[half..]).unwrap();
    for (net, b) in &spec.engines {
        s.engine(*net, b).unwrap();
    }
    for (disk, offset, data) in &spec.disk {
        s.disk_write(*disk, *offset, data).unwrap();
    }
    assert_eq!(s.end_checkpoint().unwrap(), seq);
}

pub fn primary() -> PrimarySession {
    let mut cfg = PrimaryConfig::new(identity(), OutputMode::Speculative, 25);
    cfg.heartbeat_interval = Duration::from_millis(20);
    cfg.heartbeat_timeout = Duration::from_millis(100);
    PrimarySession::new(cfg).unwrap()
}

pub fn backup() -> BackupSession {
    BackupSession::new(BackupConfig::new(identity()))
}

pub fn backup_events(b: &mut BackupSession) -> Vec<BackupEvent> {
    std::iter::from_fn(|| b.poll_event()).collect()
}

pub fn primary_events(p: &mut PrimarySession) -> Vec<PrimaryEvent> {
    std::iter::from_fn(|| p.poll_event()).collect()
}

/// Feeds the backup's output to the primary.
pub fn backup_to_primary(b: &mut BackupSession, p: &mut PrimarySession, now: Duration) {
    if let Some(out) = b.poll_output() {
        p.handle_input(now, &out);
    }
}

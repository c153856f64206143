//! Time from the TSC (rdtsc is native in ring 3: CR4.TSD is clear).

use core::arch::x86_64::{__cpuid, _mm_lfence, _rdtsc, CpuidResult};
use core::sync::atomic::{AtomicU64, Ordering};

/// TSC rate assumed when CPUID does not tell: deliberately high, so that
/// timeouts computed with it last at least as long as asked.
const ASSUMED_TSC_HZ: u64 = 4_000_000_000;

/// TSC ticks per second (0: not yet determined).
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time stamp counter (allowed in ring 3).
    unsafe { _rdtsc() }
}

/// Reads the TSC with `lfence` on both sides, so it is not reordered with
/// the code being timed.
pub fn rdtsc_fenced() -> u64 {
    // SAFETY: lfence and rdtsc have no memory effects; SSE2 (lfence) is
    // part of the x86_64 baseline.
    unsafe {
        _mm_lfence();
        let t = _rdtsc();
        _mm_lfence();
        t
    }
}

fn cpuid(leaf: u32) -> CpuidResult {
    __cpuid(leaf)
}

/// The TSC rate according to CPUID: the hypervisor timing leaf
/// 0x40000010 (kHz), else leaf 0x15 (crystal ratio), else leaf 0x16 (base
/// MHz). `None` if none of them says.
pub fn tsc_hz_from_cpuid() -> Option<u64> {
    let hv = cpuid(0x4000_0000);
    if hv.eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).eax;
        if khz != 0 {
            return Some(u64::from(khz) * 1000);
        }
    }
    let max = cpuid(0).eax;
    if max >= 0x15 {
        let l = cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax));
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    None
}

/// TSC ticks per second for timeouts: from CPUID, else [`ASSUMED_TSC_HZ`].
pub fn tsc_hz() -> u64 {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => {
            let hz = tsc_hz_from_cpuid().unwrap_or(ASSUMED_TSC_HZ);
            TSC_HZ.store(hz, Ordering::Relaxed);
            hz
        }
        hz => hz,
    }
}

/// Sets the TSC rate (after calibration).
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// Microseconds since TSC 0.
pub fn micros() -> u64 {
    (u128::from(rdtsc()) * 1_000_000 / u128::from(tsc_hz())) as u64
}

/// A point in TSC time.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let ticks = tsc_hz() / 1000 * ms;
        Deadline(rdtsc().saturating_add(ticks))
    }

    pub fn expired(&self) -> bool {
        rdtsc() >= self.0
    }
}

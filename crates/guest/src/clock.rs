//! `clock`: the guest's monotonic time never goes backwards and its timer
//! keeps firing, also across snapshots and restores.
//!
//! Time is the TSC (see [`time`]; `rdtsc` is native in ring 3). Every
//! reading a CPU takes through [`Mono::check`] must be at least the last
//! reading of the same CPU and at least the latest reading any CPU
//! published before it (a shared maximum: read the maximum, then the TSC,
//! then publish), so a TSC that steps back on one vCPU, or vCPUs whose TSCs
//! disagree, are both caught. A restored VM continues from the saved TSC,
//! so a restore that loses or rewinds it is caught the same way.
//!
//! Timer ticks: a CPU arms its LAPIC timer (periodic, so that a tick that
//! fires before the CPU halts is followed by another) and halts on a word
//! that never changes; only an interrupt to this CPU can wake it, and the
//! CPUs running `clock` get no interrupts but their timer. Each wake-up is
//! a tick, counted per CPU.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::irq;
use crate::say;
use crate::smp::{Lapic, MAX_CPUS};
use crate::time;

/// The latest TSC reading any CPU published.
static LATEST: AtomicU64 = AtomicU64::new(0);
/// Timer ticks per CPU.
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Nanoseconds of guest monotonic time for a TSC value.
pub fn nanos(tsc: u64) -> u64 {
    (u128::from(tsc) * 1_000_000_000 / u128::from(time::tsc_hz())) as u64
}

/// One CPU's view of the clock.
pub struct Mono {
    prev: u64,
}

impl Mono {
    pub const fn new() -> Self {
        Mono { prev: 0 }
    }

    /// Reads the TSC on CPU `cpu`; if it is below this CPU's previous
    /// reading or the latest any CPU published, prints
    /// `clock BACKWARDS prev=NS now=NS cpu=C` and powers off.
    pub fn check(&mut self, cpu: u32) -> u64 {
        let latest = LATEST.load(Ordering::Acquire);
        // The fence before rdtsc keeps it after the load above.
        let now = time::rdtsc_fenced();
        let prev = self.prev.max(latest);
        if now < prev {
            say!("clock BACKWARDS prev={} now={} cpu={cpu}", nanos(prev), nanos(now));
            crate::bg::power_off();
        }
        self.prev = now;
        LATEST.fetch_max(now, Ordering::AcqRel);
        now
    }
}

/// Waits for one tick of this CPU's LAPIC timer (`period_us` apart) and
/// counts it for CPU `cpu`.
pub fn tick(cpu: u32, lapic: &Lapic, period_us: u64) {
    irq::wait_timer_tick(lapic, period_us);
    TICKS[cpu as usize].fetch_add(1, Ordering::Relaxed);
}

/// Ticks of CPUs `first..first + n`: (sum, fewest of one CPU).
pub fn ticks(first: u32, n: u32) -> (u64, u64) {
    let t = &TICKS[first as usize..(first + n) as usize];
    let sum = t.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    let min = t.iter().map(|a| a.load(Ordering::Relaxed)).min().unwrap_or(0);
    (sum, min)
}

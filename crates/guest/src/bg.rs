//! The endless per-CPU workloads `mem:MIB` and `clock`, run by one worker
//! per CPU that does both.
//!
//! Alone they run on every CPU and never return. Beside a network or
//! `diskloop` workload (which the BSP serves) they run on every CPU but the
//! BSP: [`start`] returns and the BSP goes on. The first worker prints
//! `mem ok checks=N` and `clock ok t=NS ticks=N min_ticks=M` once a second
//! by the TSC.
//!
//! With `mem`, a `clock` worker checks the time after every batch of pages
//! and waits for one timer tick ([`TICK_BUSY_US`]) every [`TICK_EVERY_MS`];
//! without `mem` it waits for ticks ([`TICK_IDLE_US`]) back to back.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::clock::{self, Mono};
use crate::irq;
use crate::memtest;
use crate::power::Power;
use crate::say;
use crate::smp::{self, Job, Lapic};
use crate::sync::SpinLock;
use crate::time;

/// Timer period of a tick taken between batches of `mem` pages.
const TICK_BUSY_US: u64 = 1000;
/// How often a `mem` worker takes a tick.
const TICK_EVERY_MS: u64 = 20;
/// Timer period of a `clock` worker without `mem`.
const TICK_IDLE_US: u64 = 10_000;

/// The first worker CPU and the number of workers.
static FIRST: AtomicU32 = AtomicU32::new(0);
static WORKERS: AtomicU32 = AtomicU32::new(1);
static MEM: AtomicBool = AtomicBool::new(false);
static CLOCK: AtomicBool = AtomicBool::new(false);
static POWER: SpinLock<Option<Power>> = SpinLock::new(None);

/// Powers off (after a MISMATCH or BACKWARDS line) from any CPU.
pub fn power_off() -> ! {
    let p = POWER.lock().unwrap_or_else(Power::without_acpi);
    p.poweroff()
}

/// Starts `mem:MIB` (if `mem` is set) and `clock` (if `clock`) on every
/// CPU, never returning, or with `beside` on every CPU but this one (the
/// BSP), returning at once. Powers off if they cannot run.
pub fn start(lapic: &Lapic, power: &Power, mem: Option<u64>, clock: bool, beside: bool) {
    *POWER.lock() = Some(*power);
    lapic.publish();
    let online = smp::online().max(1);
    let (first, workers) = if beside { (1, online - 1) } else { (0, online) };
    if workers == 0 {
        say!("error: mem and clock need a second CPU beside the network and diskloop workloads");
        power.poweroff();
    }
    FIRST.store(first, Ordering::Relaxed);
    WORKERS.store(workers, Ordering::Relaxed);
    MEM.store(mem.is_some(), Ordering::Relaxed);
    CLOCK.store(clock, Ordering::Relaxed);
    if let Some(mib) = mem {
        if !memtest::setup(mib, workers) {
            power.poweroff();
        }
    }
    let job = Job { func: worker, arg: 0 };
    if beside {
        smp::start_on_aps(lapic, job);
    } else {
        smp::run_on_all(lapic, job);
        power.poweroff()
    }
}

fn worker(cpu: u32, _arg: u64) -> u64 {
    let (first, n) = (FIRST.load(Ordering::Relaxed), WORKERS.load(Ordering::Relaxed));
    let idx = cpu - first;
    let clock = CLOCK.load(Ordering::Relaxed);
    let mut mem = MEM.load(Ordering::Relaxed).then(|| memtest::Worker::new(idx, n));
    let lapic = smp::local_lapic();
    if clock {
        irq::timer_init(&lapic);
    }
    let mut mono = Mono::new();
    let second = time::tsc_hz();
    let tick_every = second / 1000 * TICK_EVERY_MS;
    let mut next_tick = 0;
    let mut next_print = time::rdtsc() + second;
    loop {
        if let Some(m) = mem.as_mut() {
            m.batch();
        }
        if clock {
            let now = mono.check(cpu);
            match mem {
                Some(_) if now >= next_tick => {
                    clock::tick(cpu, &lapic, TICK_BUSY_US);
                    next_tick = now + tick_every;
                }
                Some(_) => {}
                None => clock::tick(cpu, &lapic, TICK_IDLE_US),
            }
        }
        if idx != 0 {
            continue;
        }
        let now = time::rdtsc();
        // Robust to the TSC jumping (e.g. across a snapshot restore).
        if now >= next_print || next_print - now > 2 * second {
            next_print = if now - next_print.min(now) < second {
                next_print + second
            } else {
                now + second
            };
            if mem.is_some() {
                say!("mem ok checks={}", memtest::total_checks());
            }
            if clock {
                let t = clock::nanos(mono.check(cpu));
                let (ticks, min) = clock::ticks(first, n);
                say!("clock ok t={t} ticks={ticks} min_ticks={min}");
            }
        }
    }
}

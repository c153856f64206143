//! `mem:MIB`: a memory checker for snapshot/migration tests.
//!
//! A MIB-MiB region (from [`palloc`]) is split into 4 KiB pages; CPU `c` of
//! `n` owns the pages `p` with `p % n == c`. Each CPU forever picks one of
//! its pages (xorshift), verifies it against the generation recorded for it
//! in a table in guest memory (one `u32` per page), then rewrites it with
//! the next generation and records that. Word `w` of page `p` at
//! generation `g` is `((p << 32) | g) ^ (w * 0x9e3779b97f4a7c15)`
//! (generation 0: all zero, as allocated). CPU 0 prints
//! `mem ok checks=N` (pages verified by all CPUs so far) every second by the
//! TSC, and powers off after any CPU reports
//! `mem MISMATCH page=P word=W want=X got=Y`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::palloc;
use crate::power::Power;
use crate::say;
use crate::smp::{self, Job, Lapic, MAX_CPUS};
use crate::time;

const PAGE_WORDS: usize = 512;

static BASE: AtomicU64 = AtomicU64::new(0);
static TABLE: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static NCPUS: AtomicU64 = AtomicU64::new(1);
static FAILED: AtomicBool = AtomicBool::new(false);
static CHECKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static POWER: crate::sync::SpinLock<Option<Power>> = crate::sync::SpinLock::new(None);

#[inline(always)]
fn word(page: u64, gen: u32, w: usize) -> u64 {
    if gen == 0 {
        return 0;
    }
    ((page << 32) | u64::from(gen)) ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

pub fn workload(lapic: &Lapic, power: &Power, mib: u64) -> ! {
    let pages = (mib << 20) / 4096;
    if pages == 0 {
        say!("mem error: size 0");
        power.poweroff();
    }
    *POWER.lock() = Some(*power);
    BASE.store(palloc::alloc((pages * 4096) as usize, 4096), Ordering::Relaxed);
    TABLE.store(palloc::alloc(pages as usize * 4, 4096), Ordering::Relaxed);
    PAGES.store(pages, Ordering::Relaxed);
    NCPUS.store(u64::from(smp::online()).max(1), Ordering::Relaxed);
    say!("mem start mib={mib} pages={pages} cpus={}", smp::online());
    smp::run_on_all(lapic, Job { func: worker, arg: 0 });
    power.poweroff()
}

fn worker(cpu: u32, _arg: u64) -> u64 {
    let base = BASE.load(Ordering::Relaxed) as *mut u64;
    let table = TABLE.load(Ordering::Relaxed) as *mut u32;
    let pages = PAGES.load(Ordering::Relaxed);
    let n = NCPUS.load(Ordering::Relaxed);
    let c = u64::from(cpu);
    let mine = (pages + n - 1 - c) / n; // pages p = c + k*n < pages
    if mine == 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    let mut x = 0x2545_f491_4f6c_dd1d ^ (c + 1);
    let second = time::tsc_hz();
    let mut next_print = time::rdtsc() + second;
    let mut checks = 0u64;
    loop {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = c + (x % mine) * n;
            // SAFETY: p < pages: the table entry and the page are inside the
            // allocations, and only this CPU touches page p and its entry.
            unsafe {
                let gen = table.add(p as usize).read_volatile();
                let page = base.add(p as usize * PAGE_WORDS);
                for w in 0..PAGE_WORDS {
                    let got = page.add(w).read_volatile();
                    let want = word(p, gen, w);
                    if got != want {
                        say!("mem MISMATCH page={p} word={w} gen={gen} want={want:#018x} got={got:#018x}");
                        FAILED.store(true, Ordering::SeqCst);
                        loop {
                            if cpu == 0 {
                                fail();
                            }
                            core::hint::spin_loop();
                        }
                    }
                }
                let g = gen.wrapping_add(1).max(1);
                for w in 0..PAGE_WORDS {
                    page.add(w).write_volatile(word(p, g, w));
                }
                table.add(p as usize).write_volatile(g);
            }
            checks += 1;
        }
        CHECKS[cpu as usize].store(checks, Ordering::Relaxed);
        if cpu == 0 {
            if FAILED.load(Ordering::SeqCst) {
                fail();
            }
            let now = time::rdtsc();
            // Robust to the TSC jumping (e.g. across a snapshot restore).
            if now >= next_print || next_print - now > 2 * second {
                next_print = if now - next_print.min(now) < second {
                    next_print + second
                } else {
                    now + second
                };
                let total: u64 = CHECKS.iter().map(|a| a.load(Ordering::Relaxed)).sum();
                say!("mem ok checks={total}");
            }
        }
    }
}

fn fail() -> ! {
    let p = POWER.lock().unwrap_or_else(Power::without_acpi);
    p.poweroff()
}

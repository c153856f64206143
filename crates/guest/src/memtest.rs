//! `mem:MIB`: a memory checker for snapshot/migration tests.
//!
//! A MIB-MiB region (from [`palloc`]) is split into 4 KiB pages; worker `c`
//! of `n` owns the pages `p` with `p % n == c`. Each worker forever picks
//! one of its pages (xorshift), verifies it against the generation recorded
//! for it in a table in guest memory (one `u32` per page), then rewrites it
//! with the next generation and records that. Word `w` of page `p` at
//! generation `g` is `((p << 32) | g) ^ (w * 0x9e3779b97f4a7c15)`
//! (generation 0: all zero, as allocated). The first worker prints
//! `mem ok checks=N` (pages verified by all workers so far) every second by
//! the TSC (see [`crate::bg`], which runs the workers); a worker that finds
//! a bad page prints `mem MISMATCH page=P word=W gen=G want=X got=Y` and
//! powers off.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::palloc;
use crate::say;
use crate::smp::MAX_CPUS;

const PAGE_WORDS: usize = 512;
/// Pages a worker checks between two looks at the clock.
const BATCH: u64 = 256;

static BASE: AtomicU64 = AtomicU64::new(0);
static TABLE: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static CHECKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

#[inline(always)]
fn word(page: u64, gen: u32, w: usize) -> u64 {
    if gen == 0 {
        return 0;
    }
    ((page << 32) | u64::from(gen)) ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Allocates the region and its table and prints `mem start`; false (after
/// `mem error: size 0`) if the region is empty.
pub fn setup(mib: u64, workers: u32) -> bool {
    let pages = (mib << 20) / 4096;
    if pages == 0 {
        say!("mem error: size 0");
        return false;
    }
    BASE.store(palloc::alloc((pages * 4096) as usize, 4096), Ordering::Relaxed);
    TABLE.store(palloc::alloc(pages as usize * 4, 4096), Ordering::Relaxed);
    PAGES.store(pages, Ordering::Relaxed);
    say!("mem start mib={mib} pages={pages} cpus={workers}");
    true
}

/// Pages verified by all workers so far.
pub fn total_checks() -> u64 {
    CHECKS.iter().map(|a| a.load(Ordering::Relaxed)).sum()
}

/// One worker's part of the checker.
pub struct Worker {
    base: *mut u64,
    table: *mut u32,
    /// This worker's index and the number of workers.
    c: u64,
    n: u64,
    /// Pages this worker owns.
    mine: u64,
    x: u64,
    checks: u64,
}

impl Worker {
    /// Worker `c` of `n` (after [`setup`]).
    pub fn new(c: u32, n: u32) -> Worker {
        let pages = PAGES.load(Ordering::Relaxed);
        let (c, n) = (u64::from(c), u64::from(n.max(1)));
        Worker {
            base: BASE.load(Ordering::Relaxed) as *mut u64,
            table: TABLE.load(Ordering::Relaxed) as *mut u32,
            c,
            n,
            mine: (pages + n - 1).saturating_sub(c) / n, // pages p = c + k*n < pages
            x: 0x2545_f491_4f6c_dd1d ^ (c + 1),
            checks: 0,
        }
    }

    /// Verifies and rewrites [`BATCH`] pages, then publishes the count.
    pub fn batch(&mut self) {
        if self.mine == 0 {
            return;
        }
        let (base, table, c, n, mine) = (self.base, self.table, self.c, self.n, self.mine);
        let mut x = self.x;
        for _ in 0..BATCH {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = c + (x % mine) * n;
            // SAFETY: p < pages: the table entry and the page are inside the
            // allocations, and only this worker touches page p and its entry.
            unsafe {
                let gen = table.add(p as usize).read_volatile();
                let page = base.add(p as usize * PAGE_WORDS);
                for w in 0..PAGE_WORDS {
                    let got = page.add(w).read_volatile();
                    let want = word(p, gen, w);
                    if got != want {
                        say!("mem MISMATCH page={p} word={w} gen={gen} want={want:#018x} got={got:#018x}");
                        crate::bg::power_off();
                    }
                }
                let g = gen.wrapping_add(1).max(1);
                for w in 0..PAGE_WORDS {
                    page.add(w).write_volatile(word(p, g, w));
                }
                table.add(p as usize).write_volatile(g);
            }
        }
        self.x = x;
        self.checks += BATCH;
        CHECKS[c as usize].store(self.checks, Ordering::Relaxed);
    }
}

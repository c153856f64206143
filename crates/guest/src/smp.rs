//! The local APIC, AP start-up and running a job on every CPU.
//!
//! Start-up: the BSP copies the shim's real-mode trampoline to a free page
//! below 1 MiB, then sends INIT and a start-up IPI to every other enabled
//! LAPIC of the MADT (a second SIPI after 10 ms to any that has not
//! arrived). Each AP runs the trampoline, the shim's long-mode path (which
//! hands out CPU indexes with `lock xadd`) and `iretq`s into
//! [`ap_main`] in ring 3, which counts itself online and waits for jobs.
//!
//! Jobs: the BSP publishes a [`Job`], bumps a generation counter and sends
//! the wake-up IPI to all other CPUs; idle APs sleep in HALT_IF on that
//! counter, so a job posted between their check and their sleep is never
//! missed.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::bootinfo::{StartInfo, MEMMAP_RAM};
use crate::phys::{Range, RangeSet};
use crate::sync::SpinLock;
use crate::sys;
use crate::time::Deadline;

/// Most CPUs the guest runs on; must match SHIM_MAX_CPUS in shim.S.
pub const MAX_CPUS: usize = 64;
/// The wake-up IPI (the shim's handler only sends EOI).
pub const IPI_VECTOR: u8 = 0x40;
/// The LAPIC spurious-interrupt vector (the shim's handler just returns).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Preferred trampoline page (free in the VMM's layout and QEMU's).
const TRAMPOLINE_PAGE: u64 = 0x8000;
/// How long to wait for APs before the second SIPI, and in total.
const SIPI_RETRY_MS: u64 = 10;
const AP_TIMEOUT_MS: u64 = 1000;

// LAPIC registers (xAPIC MMIO offsets).
const LAPIC_ID: usize = 0x20;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LOW: usize = 0x300;
const LAPIC_ICR_HIGH: usize = 0x310;
/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// ICR: delivery status (send pending), level assert, delivery modes,
/// destination shorthand "all excluding self".
const ICR_PENDING: u32 = 1 << 12;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
const ICR_ALL_BUT_SELF: u32 = 3 << 18;

/// The LAPIC MMIO base, for the APs (set by the BSP before starting them).
static LAPIC_BASE: AtomicU64 = AtomicU64::new(crate::acpi::DEFAULT_LAPIC);
/// CPUs running in ring 3.
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// Bumped for every new job; idle APs sleep on it.
static JOB_GEN: AtomicU32 = AtomicU32::new(0);
/// The current job.
static JOB: SpinLock<Option<Job>> = SpinLock::new(None);
/// APs that finished the current job.
static JOB_DONE: AtomicU32 = AtomicU32::new(0);
/// Each CPU's result for the current job.
static RESULTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

extern "C" {
    /// The AP trampoline in shim.S (real-mode code, copied below 1 MiB).
    static shim_trampoline_start: u8;
    static shim_trampoline_end: u8;
}

/// Work for every CPU: `func(cpu_index, arg)` returns that CPU's result.
#[derive(Clone, Copy)]
pub struct Job {
    pub func: fn(u32, u64) -> u64,
    pub arg: u64,
}

/// This CPU's local APIC (xAPIC mode, MMIO; ring 3 reaches it through the
/// user-accessible, uncached identity map; each access traps to KVM's
/// in-kernel LAPIC).
pub struct Lapic {
    base: usize,
}

impl Lapic {
    /// # Safety
    /// `base` must be the physical address of the local APIC page (below
    /// 4 GiB, so it is identity-mapped uncached).
    pub unsafe fn new(base: u64) -> Self {
        Lapic { base: base as usize }
    }

    pub fn read(&self, reg: usize) -> u32 {
        // SAFETY: an aligned LAPIC register inside the LAPIC page (see new).
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u32) }
    }

    pub fn write(&self, reg: usize, value: u32) {
        // SAFETY: an aligned LAPIC register inside the LAPIC page (see new).
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u32, value) }
    }

    /// Makes this LAPIC's address the one [`local_lapic`] returns (the BSP
    /// calls it; every CPU sees its own LAPIC at the same address).
    pub fn publish(&self) {
        LAPIC_BASE.store(self.base as u64, Ordering::Release);
    }

    /// This CPU's APIC ID.
    pub fn id(&self) -> u32 {
        self.read(LAPIC_ID) >> 24
    }

    /// Software-enables the LAPIC (spurious vector 0xff), so it accepts
    /// fixed interrupts such as the wake-up IPI. (The shim has already
    /// masked LINT0, where a BIOS-programmed 8259 PIC would deliver.)
    pub fn enable(&self) {
        self.write(LAPIC_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    }

    fn send(&self, dest: u32, low: u32) {
        self.write(LAPIC_ICR_HIGH, dest << 24);
        self.write(LAPIC_ICR_LOW, low);
        for _ in 0..1000 {
            if self.read(LAPIC_ICR_LOW) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }

    pub fn send_init(&self, apic_id: u32) {
        self.send(apic_id, ICR_INIT | ICR_ASSERT);
    }

    pub fn send_startup(&self, apic_id: u32, page: u64) {
        self.send(apic_id, ICR_STARTUP | ICR_ASSERT | (page >> 12) as u32);
    }

    /// Sends a fixed interrupt to every other CPU.
    pub fn send_ipi_all_but_self(&self, vector: u8) {
        self.send(0, ICR_ALL_BUT_SELF | ICR_ASSERT | u32::from(vector));
    }
}

/// CPUs running in ring 3.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Counts the BSP in (called once from its entry).
pub fn bsp_online() {
    ONLINE.fetch_add(1, Ordering::Release);
}

/// The trampoline's bytes (in the loaded image).
fn trampoline() -> &'static [u8] {
    // SAFETY: the two symbols delimit the trampoline inside .shim.text,
    // which is loaded, never written and lives for the whole run.
    unsafe {
        let start = &raw const shim_trampoline_start;
        let end = &raw const shim_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// A 4 KiB page below 1 MiB for the trampoline: RAM in the memory map
/// (or the classic 0x1000-0x9f000 if there is no map), not in `avoid`.
/// Prefers 0x8000.
pub fn pick_trampoline_page(info: &StartInfo, avoid: &RangeSet) -> Option<u64> {
    let have_map = info.memmap().any(|e| e.kind == MEMMAP_RAM);
    let fits = |p: u64| {
        let r = Range::new(p, 4096);
        let ram = if have_map {
            info.memmap()
                .any(|e| e.kind == MEMMAP_RAM && e.addr <= p && p + 4096 <= e.addr + e.size)
        } else {
            (0x1000..0x9_f000).contains(&p)
        };
        ram && !avoid.overlaps(&r)
    };
    if fits(TRAMPOLINE_PAGE) {
        return Some(TRAMPOLINE_PAGE);
    }
    (1..0x100u64).map(|i| i << 12).find(|&p| fits(p))
}

/// Starts every CPU in `apic_ids` except this one with the trampoline at
/// `page`, and waits until they are online (or the timeout). Returns the
/// number of CPUs online.
pub fn start_aps(lapic: &Lapic, apic_ids: &[u32], page: u64) -> u32 {
    let me = lapic.id();
    // xAPIC physical destinations are 8 bits.
    let targets = || apic_ids.iter().copied().filter(move |&id| id != me && id < 0xff);
    let n = targets().count() as u32;
    if n == 0 {
        return online();
    }
    LAPIC_BASE.store(lapic.base as u64, Ordering::Release);
    let code = trampoline();
    // SAFETY: `page` is free RAM below 1 MiB (pick_trampoline_page: in the
    // memory map, clear of the start info, command line and ACPI tables,
    // and below the image), identity-mapped, 4 KiB long, which the
    // trampoline fits in (linker.ld asserts it).
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), page as *mut u8, code.len()) };
    let want = online() + n;
    for id in targets() {
        lapic.send_init(id);
    }
    for id in targets() {
        lapic.send_startup(id, page);
    }
    let retry = Deadline::after_ms(SIPI_RETRY_MS);
    let give_up = Deadline::after_ms(AP_TIMEOUT_MS);
    let mut resent = false;
    while online() < want && !give_up.expired() {
        if !resent && retry.expired() {
            // CPUs already running ignore a second SIPI.
            for id in targets() {
                lapic.send_startup(id, page);
            }
            resent = true;
        }
        core::hint::spin_loop();
    }
    online()
}

/// Ring-3 entry of every AP (CPU index >= 1).
pub fn ap_main(cpu: u32) -> ! {
    // SAFETY: LAPIC_BASE holds the MADT's LAPIC address; the BSP stored it
    // before sending the SIPI that started this CPU.
    let lapic = unsafe { Lapic::new(LAPIC_BASE.load(Ordering::Acquire)) };
    lapic.enable();
    let mut seen = JOB_GEN.load(Ordering::Acquire);
    ONLINE.fetch_add(1, Ordering::Release);
    loop {
        let gen = JOB_GEN.load(Ordering::Acquire);
        if gen == seen {
            sys::halt_if(&JOB_GEN, seen);
            continue;
        }
        seen = gen;
        let job = *JOB.lock();
        if let Some(job) = job {
            let r = (job.func)(cpu, job.arg);
            RESULTS[cpu as usize].store(r, Ordering::Relaxed);
            JOB_DONE.fetch_add(1, Ordering::Release);
        }
    }
}

/// The calling CPU's local APIC (at the address the BSP published).
pub fn local_lapic() -> Lapic {
    // SAFETY: LAPIC_BASE holds the MADT's LAPIC address (or the
    // architectural default), below 4 GiB.
    unsafe { Lapic::new(LAPIC_BASE.load(Ordering::Acquire)) }
}

/// Starts `job` on every online CPU but this one (the BSP) and returns at
/// once: for jobs that never end. No other job can run after it.
pub fn start_on_aps(lapic: &Lapic, job: Job) {
    *JOB.lock() = Some(job);
    JOB_DONE.store(0, Ordering::Relaxed);
    JOB_GEN.fetch_add(1, Ordering::Release);
    if online() > 1 {
        lapic.send_ipi_all_but_self(IPI_VECTOR);
    }
}

/// Runs `job` on every online CPU (the BSP included, as CPU 0) and waits
/// for all; returns the results of CPUs `0..online()`.
pub fn run_on_all(lapic: &Lapic, job: Job) -> &'static [AtomicU64] {
    let n = online();
    *JOB.lock() = Some(job);
    JOB_DONE.store(0, Ordering::Relaxed);
    JOB_GEN.fetch_add(1, Ordering::Release);
    if n > 1 {
        lapic.send_ipi_all_but_self(IPI_VECTOR);
    }
    let r = (job.func)(0, job.arg);
    RESULTS[0].store(r, Ordering::Relaxed);
    while JOB_DONE.load(Ordering::Acquire) < n - 1 {
        core::hint::spin_loop();
    }
    &RESULTS[..n as usize]
}

//! Interrupts and sleeping: IOAPIC routing, the LAPIC one-shot timer, TSC
//! calibration, and "sleep until an interrupt or a timeout".
//!
//! Design: the shim's vectors 0x41-0x4f (the LAPIC timer and the devices)
//! only `lock incl shim_irq_count`, EOI and `iretq`. Ring 3 works NAPI
//! style: read [`irq_count`], drain the used rings, re-arm them
//! (EVENT_IDX), and if nothing is pending call [`sleep`] with the count it
//! read: HALT_IF halts only if no interrupt came in between, so wake-ups are
//! never lost. The timeout is a LAPIC one-shot timer (TSC-deadline mode
//! needs a WRMSR, i.e. ring 0, so the MMIO timer is used, calibrated once
//! against the TSC, which is calibrated once against the PIT).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::smp::Lapic;
use crate::sys::{self, PortSize};
use crate::time;

/// The LAPIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x41;
/// Vector of virtio device interrupts (all devices share it: the handler
/// only counts, the drivers look at their rings).
pub const DEVICE_VECTOR: u8 = 0x42;

// LAPIC timer registers.
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INIT: usize = 0x380;
const LAPIC_TIMER_CUR: usize = 0x390;
const LAPIC_TIMER_DIV: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode "periodic" (0: one-shot).
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration value for "divide by 1".
const DIV_BY_1: u32 = 0xb;

extern "C" {
    /// Interrupts taken on vectors 0x41-0x4f (shim.S).
    static shim_irq_count: AtomicU32;
}

/// LAPIC timer ticks per millisecond (0: not calibrated).
static LAPIC_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

/// The interrupt counter the shim bumps.
pub fn irq_count() -> &'static AtomicU32 {
    // SAFETY: a static in .shim.data, only ever accessed atomically.
    unsafe { &shim_irq_count }
}

/// Calibrates the TSC against the PIT (channel 2, 25 ms), falling back to
/// CPUID; then the LAPIC timer against the TSC. Sets up the timer LVT.
pub fn calibrate(lapic: &Lapic) {
    match tsc_hz_from_pit() {
        Some(hz) => time::set_tsc_hz(hz),
        None if time::tsc_hz_from_cpuid().is_none() => time::set_tsc_hz(tsc_hz_from_lapic(lapic)),
        None => {}
    }
    let hz = time::tsc_hz();
    lapic.write(LAPIC_TIMER_DIV, DIV_BY_1);
    lapic.write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic.write(LAPIC_TIMER_INIT, u32::MAX);
    let t0 = time::rdtsc_fenced();
    let wait = hz / 100; // 10 ms
    while time::rdtsc().wrapping_sub(t0) < wait {
        core::hint::spin_loop();
    }
    let cur = lapic.read(LAPIC_TIMER_CUR);
    let t1 = time::rdtsc_fenced();
    lapic.write(LAPIC_TIMER_INIT, 0);
    let ticks = u64::from(u32::MAX - cur);
    let tsc = t1.wrapping_sub(t0).max(1);
    let per_ms = (u128::from(ticks) * u128::from(hz) / u128::from(tsc) / 1000) as u64;
    LAPIC_TICKS_PER_MS.store(per_ms.max(1), Ordering::Relaxed);
    // One-shot, unmasked.
    lapic.write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
}

/// The TSC rate assuming the LAPIC timer counts at KVM's default 1 GHz
/// (APIC bus cycle 1 ns): the fallback when there is no PIT (QEMU microvm
/// has no port 0x61) and CPUID does not say.
fn tsc_hz_from_lapic(lapic: &Lapic) -> u64 {
    const LAPIC_HZ: u64 = 1_000_000_000;
    const TICKS: u32 = 20_000_000; // 20 ms at 1 GHz
    lapic.write(LAPIC_TIMER_DIV, DIV_BY_1);
    lapic.write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic.write(LAPIC_TIMER_INIT, u32::MAX);
    let t0 = time::rdtsc_fenced();
    let c0 = lapic.read(LAPIC_TIMER_CUR);
    let mut c1 = c0;
    while c0 - c1 < TICKS && c1 != 0 {
        c1 = lapic.read(LAPIC_TIMER_CUR);
    }
    let t1 = time::rdtsc_fenced();
    lapic.write(LAPIC_TIMER_INIT, 0);
    let ticks = u64::from(c0 - c1).max(1);
    (u128::from(t1.wrapping_sub(t0)) * u128::from(LAPIC_HZ) / u128::from(ticks)) as u64
}

/// LAPIC timer ticks per millisecond.
pub fn lapic_ticks_per_ms() -> u64 {
    LAPIC_TICKS_PER_MS.load(Ordering::Relaxed)
}

/// TSC rate measured with PIT channel 2 (mode 0, 25 ms), or `None` when
/// there is no PIT (its output never goes high).
fn tsc_hz_from_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u64 = 29_830; // 25 ms
                               // SAFETY: the PC speaker gate port and PIT channel 2: no memory effects.
    unsafe {
        let gate = sys::port_in(0x61, PortSize::Byte);
        sys::port_out(0x61, (gate & !0x02) | 0x01, PortSize::Byte);
        sys::port_out(0x43, 0xb0, PortSize::Byte); // ch 2, lo/hi, mode 0
        sys::port_out(0x42, (COUNT & 0xff) as u32, PortSize::Byte);
        let t0 = time::rdtsc_fenced();
        sys::port_out(0x42, (COUNT >> 8) as u32, PortSize::Byte);
        // Give up after ~1 s even at the (high) assumed TSC rate.
        let limit = 4_000_000_000u64;
        loop {
            let t = time::rdtsc_fenced();
            if sys::port_in(0x61, PortSize::Byte) & 0x20 != 0 {
                let hz = u128::from(t.wrapping_sub(t0)) * u128::from(PIT_HZ) / u128::from(COUNT);
                sys::port_out(0x61, gate & !0x03, PortSize::Byte);
                return (hz > 10_000_000).then_some(hz as u64);
            }
            if t.wrapping_sub(t0) > limit {
                return None;
            }
        }
    }
}

/// Arms the one-shot timer `us` microseconds from now (at most ~4 s at a
/// 1 GHz timer: longer waits just wake early).
pub fn arm_timer(lapic: &Lapic, us: u64) {
    let ticks = (us.saturating_mul(lapic_ticks_per_ms()) / 1000).clamp(1, u64::from(u32::MAX));
    lapic.write(LAPIC_TIMER_INIT, ticks as u32);
}

/// Sets up this CPU's LAPIC timer as [`calibrate`] does the BSP's (divide
/// by 1, one-shot, unmasked), for an AP that needs its timer.
pub fn timer_init(lapic: &Lapic) {
    lapic.write(LAPIC_TIMER_DIV, DIV_BY_1);
    lapic.write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
}

/// Halts this CPU until an interrupt arrives on it, with its LAPIC timer
/// running periodically every `us` microseconds (so the wake-up cannot be
/// missed: a tick that comes before the halt is followed by another);
/// then stops the timer and puts it back in one-shot mode. On a CPU that
/// gets no other interrupts (an AP; devices interrupt the BSP) the return
/// means the timer fired and its interrupt was delivered.
pub fn wait_timer_tick(lapic: &Lapic, us: u64) {
    /// Never changes: HALT_IF on it always halts.
    static NEVER: AtomicU32 = AtomicU32::new(0);
    let ticks = (us.saturating_mul(lapic_ticks_per_ms()) / 1000).clamp(1, u64::from(u32::MAX));
    // Changing the mode stops the timer; the initial count starts it.
    lapic.write(LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    lapic.write(LAPIC_TIMER_INIT, ticks as u32);
    sys::halt_if(&NEVER, 0);
    lapic.write(LAPIC_TIMER_INIT, 0);
    lapic.write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
}

/// Sleeps until an interrupt comes (or came since [`irq_count`] read
/// `seen`), or for at most `timeout_us` (None: no timeout).
pub fn sleep(lapic: &Lapic, seen: u32, timeout_us: Option<u64>) {
    if let Some(us) = timeout_us {
        arm_timer(lapic, us);
    }
    sys::halt_if(irq_count(), seen);
}

/// The I/O APIC (MMIO; ring 3 programs it through the identity map).
pub struct IoApic {
    base: usize,
    gsi_base: u32,
}

impl IoApic {
    /// # Safety
    /// `base` must be the I/O APIC's MMIO page (below 4 GiB).
    pub unsafe fn new(base: u64, gsi_base: u32) -> Self {
        IoApic {
            base: base as usize,
            gsi_base,
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: IOREGSEL and IOWIN of the I/O APIC page (see new).
        unsafe {
            core::ptr::write_volatile(self.base as *mut u32, reg);
            core::ptr::write_volatile((self.base + 0x10) as *mut u32, value);
        }
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: IOREGSEL and IOWIN of the I/O APIC page (see new).
        unsafe {
            core::ptr::write_volatile(self.base as *mut u32, reg);
            core::ptr::read_volatile((self.base + 0x10) as *const u32)
        }
    }

    /// Routes `gsi` to `vector` on the CPU with APIC ID `dest`: fixed,
    /// physical, edge, active high, unmasked. False if this I/O APIC has no
    /// pin for `gsi`.
    pub fn route(&self, gsi: u32, vector: u8, dest: u32) -> bool {
        let Some(pin) = gsi.checked_sub(self.gsi_base) else {
            return false;
        };
        let pins = ((self.read(1) >> 16) & 0xff) + 1;
        if pin >= pins {
            return false;
        }
        let reg = 0x10 + 2 * pin;
        self.write(reg, LVT_MASKED);
        self.write(reg + 1, dest << 24);
        self.write(reg, u32::from(vector));
        true
    }
}

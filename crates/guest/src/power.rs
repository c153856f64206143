//! Power-off and reset, the ACPI way first.
//!
//! Power-off: the hardware-reduced SLEEP_CONTROL_REG (`SLP_TYP << 2 |
//! SLP_EN`), else the legacy PM1a/PM1b control blocks (`SLP_TYP << 10 |
//! SLP_EN`), else QEMU's isa-debug-exit port 0xf4, else a triple fault.
//! Reset: the FADT RESET_REG, else the i8042 (`0xfe` to port 0x64), else a
//! triple fault. Each method gets a grace period (the VMM may stop the VM
//! a little after the write) before the next one is tried.

use crate::acpi::{Acpi, Gas};
use crate::phys;
use crate::say;
use crate::sys::{self, PortSize};
use crate::time::Deadline;

/// `_S5_` sleep type when the DSDT has none.
const DEFAULT_S5: u8 = 5;
/// SLP_EN in SLEEP_CONTROL_REG.
const HW_REDUCED_SLP_EN: u64 = 1 << 5;
/// SLP_EN in PM1x_CNT.
const PM1_SLP_EN: u64 = 1 << 13;
/// QEMU isa-debug-exit (exits with status (value << 1) | 1).
const ISA_DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 command port and its "pulse reset line" command.
const I8042_CMD_PORT: u16 = 0x64;
const I8042_RESET: u32 = 0xfe;
/// How long a method may take to stop the VM before the next is tried.
const GRACE_MS: u64 = 1000;

/// How to power off and reset this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Power {
    sleep_control: Option<Gas>,
    pm1a_cnt: Option<Gas>,
    pm1b_cnt: Option<Gas>,
    s5: (u8, u8),
    reset: Option<(Gas, u8)>,
}

impl Power {
    /// Without ACPI: isa-debug-exit and the i8042 only.
    pub fn without_acpi() -> Self {
        Power {
            s5: (DEFAULT_S5, DEFAULT_S5),
            ..Power::default()
        }
    }

    pub fn from_acpi(acpi: &Acpi) -> Self {
        let mut p = Power::without_acpi();
        if let Some(f) = &acpi.fadt {
            if f.hw_reduced() {
                p.sleep_control = f.sleep_control;
            } else {
                p.pm1a_cnt = f.pm1a_cnt;
                p.pm1b_cnt = f.pm1b_cnt;
            }
            p.s5 = f.s5.unwrap_or(p.s5);
            p.reset = f.reset;
        }
        p
    }

    /// The sleep type written for S5 (SLP_TYPa).
    pub fn s5_type(&self) -> u8 {
        self.s5.0
    }

    /// Turns the machine off. Does not return.
    pub fn poweroff(&self) -> ! {
        if let Some(g) = self.sleep_control {
            let v = (u64::from(self.s5.0) << 2) | HW_REDUCED_SLP_EN;
            if write_gas(&g, v) {
                wait_grace();
            }
        }
        if let Some(a) = self.pm1a_cnt {
            let mut ok = write_gas(&a, (u64::from(self.s5.0) << 10) | PM1_SLP_EN);
            if let Some(b) = self.pm1b_cnt {
                ok |= write_gas(&b, (u64::from(self.s5.1) << 10) | PM1_SLP_EN);
            }
            if ok {
                wait_grace();
            }
        }
        // SAFETY: isa-debug-exit ends the VM; on a machine without it the
        // write to an unused port is ignored.
        unsafe { sys::port_out(ISA_DEBUG_EXIT_PORT, 0, PortSize::Dword) };
        wait_grace();
        say!("error: power-off failed, triple-faulting instead");
        sys::triple_fault()
    }

    /// Resets the machine. Does not return.
    pub fn reset(&self) -> ! {
        if let Some((g, v)) = self.reset {
            if write_gas(&g, u64::from(v)) {
                wait_grace();
            }
        }
        // SAFETY: the i8042 reset command only resets the machine.
        unsafe { sys::port_out(I8042_CMD_PORT, I8042_RESET, PortSize::Byte) };
        wait_grace();
        sys::triple_fault()
    }
}

fn wait_grace() {
    let d = Deadline::after_ms(GRACE_MS);
    while !d.expired() {
        core::hint::spin_loop();
    }
}

/// Writes `value` to an ACPI register; false if the GAS cannot be used.
fn write_gas(g: &Gas, value: u64) -> bool {
    let value = value << g.bit_offset;
    let bits = g.access_bits();
    match g.space {
        Gas::IO => match u16::try_from(g.addr) {
            Ok(port) => {
                // SAFETY: a power-management register the firmware names
                // for exactly this write; it has no effect on memory.
                unsafe { sys::port_out(port, value as u32, PortSize::from_bits(bits)) };
                true
            }
            Err(_) => false,
        },
        Gas::MEMORY if phys::is_mapped(g.addr, u64::from(bits / 8)) => {
            let p = g.addr as usize;
            // SAFETY: a memory-mapped power-management register the firmware
            // names for exactly this write (uncached in 3-4 GiB); it is
            // identity-mapped, and naturally aligned for its width per ACPI.
            unsafe {
                match bits {
                    16 => core::ptr::write_volatile(p as *mut u16, value as u16),
                    32 => core::ptr::write_volatile(p as *mut u32, value as u32),
                    64 => core::ptr::write_volatile(p as *mut u64, value),
                    _ => core::ptr::write_volatile(p as *mut u8, value as u8),
                }
            }
            true
        }
        _ => false,
    }
}

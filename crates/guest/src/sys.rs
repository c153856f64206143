//! Calls from the ring-3 program into the ring-0 shim (`shim.S`).
//!
//! ABI: `int3` (a DPL=3 interrupt gate) with `rax` = number and `rdi`,
//! `rsi`, `rdx` = arguments; the result comes back in `rax` (`u64::MAX` for
//! an unknown number). `rcx`, `rdx`, `rsi` and `rdi` are clobbered; the user
//! stack is not touched (the handler runs on the CPU's kernel stack). Each
//! call costs about 13 us under kvm_pvm plus ~1.5 us per shim instruction,
//! so it is for console lines, power management and sleeping, not for
//! anything per packet.

use core::arch::asm;
use core::sync::atomic::AtomicU32;

/// `WRITE(port, ptr, len)`: `rep outsb` of a buffer to an I/O port.
const SYS_WRITE: u64 = 0;
/// `OUT(port, value, size)`: one `out` of 1, 2 or 4 bytes.
const SYS_OUT: u64 = 1;
/// `IN(port, size) -> value`: one `in` of 1, 2 or 4 bytes.
const SYS_IN: u64 = 2;
/// `HALT_IF(ptr, expected)`: with interrupts off, `sti; hlt` if the `u32`
/// at `ptr` still equals `expected`; returns after the next interrupt.
const SYS_HALT_IF: u64 = 3;
/// `TRIPLE_FAULT()`: empty IDT plus a fault; never returns.
const SYS_TRIPLE_FAULT: u64 = 4;

/// Size of a port access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSize {
    Byte = 1,
    Word = 2,
    Dword = 4,
}

impl PortSize {
    /// The size for an access of `bits` bits (ACPI GAS access widths);
    /// anything else is treated as a byte.
    pub fn from_bits(bits: u32) -> Self {
        match bits {
            16 => PortSize::Word,
            32 | 64 => PortSize::Dword,
            _ => PortSize::Byte,
        }
    }
}

/// Traps into the shim.
///
/// # Safety
/// The call must be one the shim implements with arguments that are valid
/// for it: pointers readable for the given length, and port I/O whose
/// device side effects cannot break memory safety.
#[inline(always)]
unsafe fn syscall(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret: u64;
    // SAFETY: the caller guarantees the arguments are valid for `nr`; the
    // shim preserves every register except the ones declared here, does not
    // touch the user stack, and returns with `iretq` (restoring RFLAGS).
    unsafe {
        asm!(
            "int3",
            inlateout("rax") nr => ret,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => _,
            lateout("rcx") _,
            options(nostack),
        );
    }
    ret
}

/// Writes `bytes` to I/O port `port` (`rep outsb`, one trap for the whole
/// buffer).
///
/// # Safety
/// `port` must be a device register for which these writes have no effect
/// on memory the program uses (e.g. a UART data register).
pub unsafe fn write_port(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: the buffer is a live slice, readable for its length; the
    // caller vouches for the port.
    unsafe {
        syscall(SYS_WRITE, u64::from(port), bytes.as_ptr() as u64, bytes.len() as u64);
    }
}

/// Writes `value` to I/O port `port`.
///
/// # Safety
/// The write must not have device side effects that break memory safety
/// (for instance a DMA set-up pointing at memory the program uses).
pub unsafe fn port_out(port: u16, value: u32, size: PortSize) {
    // SAFETY: OUT reads no memory; the caller vouches for the port.
    unsafe {
        syscall(SYS_OUT, u64::from(port), u64::from(value), size as u64);
    }
}

/// Reads I/O port `port`.
///
/// # Safety
/// As for [`port_out`]: reading the port must not have side effects that
/// break memory safety.
#[allow(dead_code)] // kept for the drivers to come (virtio, PIT, ...)
pub unsafe fn port_in(port: u16, size: PortSize) -> u32 {
    // SAFETY: IN reads no memory; the caller vouches for the port.
    unsafe { syscall(SYS_IN, u64::from(port), size as u64, 0) as u32 }
}

/// Sleeps until the next interrupt, unless `word` no longer holds
/// `expected` (checked with interrupts off, so a wake-up that changes
/// `word` and sends an interrupt is never lost). May return spuriously.
pub fn halt_if(word: &AtomicU32, expected: u32) {
    // SAFETY: HALT_IF only reads the u32 behind a live reference.
    unsafe {
        syscall(SYS_HALT_IF, word.as_ptr() as u64, u64::from(expected), 0);
    }
}

/// Triple-faults the machine: the VMM sees a shutdown (a reset).
pub fn triple_fault() -> ! {
    // SAFETY: TRIPLE_FAULT takes no arguments and does not return.
    unsafe {
        syscall(SYS_TRIPLE_FAULT, 0, 0, 0);
    }
    // Not reached; keep the type system and the hardware both satisfied.
    loop {
        core::hint::spin_loop();
    }
}

//! Guest physical memory layout, in one place.
//!
//! ```text
//! 0x0000_0000  RAM (real-mode IVT, boot structures below, up to EBDA)
//!   0x0500     GDT for the 64-bit Linux boot (4 entries)
//!   0x0520     IDT for the 64-bit Linux boot (empty)
//!   0x6000     PVH hvm_start_info, 0x6040 its module list (initrd)
//!   0x7000     PVH memory map / Linux zero page (boot_params)
//!   0x8ff0     initial stack (64-bit Linux boot)
//!   0x9000     PML4, 0xa000 PDPT, 0xb000 PD (64-bit Linux boot: 1 GiB identity map)
//!   0x2_0000   kernel command line
//! 0x0009_fc00  reserved: EBDA, VGA hole, BIOS area
//!   0xe_0000   ACPI RSDP, then XSDT, FADT, MADT, DSDT
//! 0x0010_0000  RAM: kernel (1 MiB), ..., initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap (virtio-mmio windows, IOAPIC, LAPIC) up to 4 GiB
//! 0x1_0000_0000 RAM above 4 GiB, if any
//! ```

/// GDT for the 64-bit Linux boot protocol.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty, limit 0) for the 64-bit Linux boot protocol.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit Linux boot.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line and its maximum size (including the NUL).
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the usable low RAM (start of the EBDA).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables: RSDP first, the others after it, all below 1 MiB.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels are loaded (and the start of high memory).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start and end of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC and local APIC MMIO windows (in-kernel).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS and identity-map pages (needed on Intel), just below the IOAPIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// virtio-mmio windows (4 KiB each) and their interrupts: device `i` is at
/// `VIRTIO_MMIO_BASE + i * 0x1000` on GSI `VIRTIO_GSI_BASE + i`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_GSI_BASE: u32 = 5;
/// IOAPIC pins 5..=23 are free for virtio devices.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
pub const I8042_RESET_CMD: u8 = 0xfe;
/// ACPI hardware-reduced sleep control and status registers (FADT).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The `_S5_` sleep type the DSDT advertises; the guest writes it to the
/// sleep control register (bits 2-4) with SLP_EN (bit 5) to power off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// Smallest guest memory we accept.
pub const MIN_MEM_MIB: u64 = 16;

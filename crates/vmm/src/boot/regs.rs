//! Initial vCPU state for the two entry protocols, as plain data (no KVM
//! calls here, so it is unit-tested without /dev/kvm).

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::{BootEntry, EntryMode};
use crate::layout::*;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR indices set at boot.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Fast string operations on.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without this Linux treats
/// all of RAM as uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot GDT: null, code, data, TSS. Code is 64-bit for the Linux boot,
/// 32-bit for PVH.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// A GDT descriptor from flags (type/S/DPL/P in bits 0-7, AVL/L/DB/G in
/// bits 12-15), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM view of a GDT descriptor loaded into a segment register.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// General purpose registers at entry.
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    match entry.mode {
        EntryMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry.entry_addr,
            rbx: entry.boot_info_addr,
            ..Default::default()
        },
        EntryMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry.entry_addr,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: entry.boot_info_addr,
            ..Default::default()
        },
    }
}

/// Special registers at entry, on top of what KVM reported (`base`).
/// Writes the boot GDT/IDT (and, for the Linux boot, page tables) into
/// guest memory.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    base: &kvm_sregs,
) -> Result<kvm_sregs, vm_memory::GuestMemoryError> {
    let mut sregs = *base;
    let gdt = boot_gdt(mode);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt = kvm_dtable {
        base: BOOT_GDT_START,
        limit: (std::mem::size_of_val(&gdt) - 1) as u16,
        ..Default::default()
    };
    sregs.idt = kvm_dtable {
        base: BOOT_IDT_START,
        limit: 0,
        ..Default::default()
    };
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages (Linux 64-bit boot).
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT_START | PRESENT_RW, GuestAddress(PML4_START))?;
    mem.write_obj(PD_START | PRESENT_RW, GuestAddress(PDPT_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW | PAGE_SIZE_2M, GuestAddress(PD_START + i * 8))?;
    }
    Ok(())
}

/// x87/SSE control state at entry.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set on every vCPU at boot.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn gdt_entries_decode() {
        let code64 = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code64.l, 1);
        assert_eq!(code64.db, 0);
        assert_eq!(code64.type_, 0xb);
        assert_eq!(code64.present, 1);
        assert_eq!(code64.selector, 8);
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = kvm_segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let tss = kvm_segment_from_gdt(gdt_entry(0x808b, 0x1234_5678, 0x67), 3);
        assert_eq!(tss.base, 0x1234_5678);
        assert_eq!(tss.s, 0);
        assert_eq!(gdt_entry(0, 0, 0), 0);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let mem = mem();
        let entry = BootEntry {
            mode: EntryMode::Pvh,
            entry_addr: 0x10_0040,
            boot_info_addr: PVH_INFO_START,
        };
        let s = boot_sregs(&mem, EntryMode::Pvh, &kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.db, s.cs.l, s.cs.base, s.cs.limit), (1, 0, 0, 0xffff_ffff));
        assert_eq!(s.ds.type_, 3);
        let r = boot_regs(&entry);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0040, PVH_INFO_START, 2));
    }

    #[test]
    fn linux64_state_is_long_mode_with_identity_map() {
        let mem = mem();
        let s = boot_sregs(&mem, EntryMode::Linux64, &kvm_sregs::default()).unwrap();
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        let pd_last: u64 = mem.read_obj(GuestAddress(PD_START + 511 * 8)).unwrap();
        assert_eq!(pd_last & !0xfff, 511 << 21);
        assert_ne!(pd_last & 0x80, 0);
        let entry = BootEntry {
            mode: EntryMode::Linux64,
            entry_addr: 0x10_0200,
            boot_info_addr: ZERO_PAGE_START,
        };
        let r = boot_regs(&entry);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x10_0200, ZERO_PAGE_START, BOOT_STACK_POINTER));
    }
}

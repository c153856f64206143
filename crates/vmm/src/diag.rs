//! Crash diagnostics: translate a guest virtual address through the guest's
//! own page tables so an emulation failure can show the instruction bytes.

use crate::memory::GuestMemoryMmap;
use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Guest-physical address of linear address `la`, or `None` if unmapped.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, la: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(la & 0xffff_ffff);
    }
    let read = |addr: u64| -> Option<u64> { mem.read_obj::<u64>(GuestAddress(addr)).ok() };
    if sregs.efer & EFER_LMA != 0 {
        let levels: u32 = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = sregs.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = read(table + ((la >> shift) & 0x1ff) * 8)?;
            if e & PRESENT == 0 {
                return None;
            }
            if level == 1 || ((level == 2 || level == 3) && e & PAGE_SIZE != 0) {
                let page_mask = (1u64 << shift) - 1;
                return Some((e & ADDR_MASK & !page_mask) | (la & page_mask));
            }
            table = e & ADDR_MASK;
        }
        None
    } else if sregs.cr4 & CR4_PAE != 0 {
        let pdpte = read((sregs.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & ADDR_MASK) + ((la >> 21) & 0x1ff) * 8)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PAGE_SIZE != 0 {
            return Some((pde & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff));
        }
        let pte = read((pde & ADDR_MASK) + ((la >> 12) & 0x1ff) * 8)?;
        (pte & PRESENT != 0).then_some((pte & ADDR_MASK) | (la & 0xfff))
    } else {
        let read32 = |addr: u64| -> Option<u64> { mem.read_obj::<u32>(GuestAddress(addr)).ok().map(u64::from) };
        let pde = read32((sregs.cr3 & 0xffff_f000) + ((la >> 22) & 0x3ff) * 4)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PAGE_SIZE != 0 && sregs.cr4 & CR4_PSE != 0 {
            return Some((pde & 0xffc0_0000) | (la & 0x3f_ffff));
        }
        let pte = read32((pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4)?;
        (pte & PRESENT != 0).then_some((pte & 0xffff_f000) | (la & 0xfff))
    }
}

/// Up to 15 instruction bytes at `cs:rip`, stopping at the first unmapped byte.
pub fn instruction_bytes(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    for i in 0..15u64 {
        let la = sregs.cs.base.wrapping_add(rip).wrapping_add(i);
        let Some(pa) = translate(mem, sregs, la) else { break };
        match mem.read_obj::<u8>(GuestAddress(pa)) {
            Ok(b) => out.push(b),
            Err(_) => break,
        }
    }
    out
}

/// Hex dump "0f 0b 90".
pub fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_walk_with_4k_and_2m_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[0] -> PT 0x4000, PD[1] 2 MiB page at 4 MiB.
        mem.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x40_0083u64, GuestAddress(0x3008)).unwrap();
        mem.write_obj(0x5003u64, GuestAddress(0x4000 + 7 * 8)).unwrap();
        mem.write_slice(&[0xcc, 0x90], GuestAddress(0x5010)).unwrap();
        let sregs = kvm_sregs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cr3: 0x1000,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, 0x7010), Some(0x5010));
        assert_eq!(translate(&mem, &sregs, 0x20_1234), Some(0x40_1234));
        assert_eq!(translate(&mem, &sregs, 0x8000), None);
        let bytes = instruction_bytes(&mem, &sregs, 0x7010);
        assert_eq!(&bytes[..2], &[0xcc, 0x90]);
        assert_eq!(hex_bytes(&bytes[..2]), "cc 90");
    }

    #[test]
    fn paging_off_is_identity() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x100)).unwrap();
        let sregs = kvm_sregs::default();
        assert_eq!(&instruction_bytes(&mem, &sregs, 0x100)[..2], &[0x0f, 0x0b]);
    }
}
